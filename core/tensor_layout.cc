#include "tensor_layout.h"

#include <fmt/format.h>

namespace ckptfs {

std::optional<std::string> TensorLayout::validate(std::span<const std::int64_t> shape,
                                                  std::span<const std::int64_t> stride,
                                                  std::int64_t storage_offset,
                                                  std::uint32_t itemsize,
                                                  std::uint64_t storage_nbytes) {
  if (shape.size() != stride.size()) {
    return fmt::format("shape has {} dims but stride has {}", shape.size(), stride.size());
  }
  if (storage_offset < 0) return "negative storage offset";
  // Checked arithmetic: a hostile file may declare shapes whose products overflow.
  constexpr std::uint64_t kLimit = std::uint64_t{1} << 62;
  std::uint64_t numel = 1;
  for (std::size_t d = 0; d < shape.size(); ++d) {
    if (shape[d] < 0) return "negative dimension in shape";
    if (stride[d] < 0) return "negative stride";
    if (__builtin_mul_overflow(numel, static_cast<std::uint64_t>(shape[d]), &numel) ||
        numel > kLimit) {
      return "shape is too large (element count overflows)";
    }
  }
  std::uint64_t bytes = 0;
  if (__builtin_mul_overflow(numel, std::uint64_t{itemsize}, &bytes) || bytes > kLimit)
    return "tensor is too large";
  if (numel == 0) return std::nullopt;  // an empty tensor touches no storage byte
  std::uint64_t last = static_cast<std::uint64_t>(storage_offset);
  for (std::size_t d = 0; d < shape.size(); ++d) {
    std::uint64_t reach = 0;
    if (__builtin_mul_overflow(static_cast<std::uint64_t>(shape[d] - 1),
                               static_cast<std::uint64_t>(stride[d]), &reach) ||
        __builtin_add_overflow(last, reach, &last) || last > kLimit) {
      return "strides reach too far (offset overflows)";
    }
  }
  std::uint64_t end_byte = 0;
  if (__builtin_mul_overflow(last + 1, std::uint64_t{itemsize}, &end_byte))
    return "strides reach too far (offset overflows)";
  if (end_byte > storage_nbytes) {
    return fmt::format("view needs {} bytes of its storage, which holds only {}", end_byte,
                       storage_nbytes);
  }
  return std::nullopt;
}

TensorLayout::TensorLayout(std::span<const std::int64_t> shape,
                           std::span<const std::int64_t> stride, std::int64_t storage_offset,
                           std::uint32_t itemsize) {
  std::uint64_t numel = 1;
  for (auto s : shape) numel *= static_cast<std::uint64_t>(s);
  nbytes_ = numel * itemsize;
  base_ = static_cast<std::uint64_t>(storage_offset) * itemsize;
  if (numel == 0) {
    run_bytes_ = 0;
    return;
  }
  // Drop size-1 dims (their stride is irrelevant), then merge each dim into the run while
  // the run stays contiguous, from the innermost dim outwards.
  std::vector<Dim> dims;
  for (std::size_t d = 0; d < shape.size(); ++d) {
    if (shape[d] != 1) {
      dims.push_back(
          {static_cast<std::uint64_t>(shape[d]), static_cast<std::uint64_t>(stride[d]) * itemsize});
    }
  }
  run_bytes_ = itemsize;
  while (!dims.empty() && dims.back().stride_bytes == run_bytes_) {
    run_bytes_ *= dims.back().size;
    dims.pop_back();
  }
  // Merge remaining adjacent outer dims that are contiguous with each other.
  std::vector<Dim> merged;
  for (const Dim& d : dims) {
    if (!merged.empty() && merged.back().stride_bytes == d.stride_bytes * d.size) {
      merged.back().size *= d.size;
      merged.back().stride_bytes = d.stride_bytes;
    } else {
      merged.push_back(d);
    }
  }
  dims_ = std::move(merged);
}

void TensorLayout::for_each_run(
    std::uint64_t offset, std::uint64_t length,
    const std::function<void(std::uint64_t, std::uint64_t)>& run) const {
  if (length == 0) return;
  if (dims_.empty()) {
    run(base_ + offset, length);
    return;
  }
  std::uint64_t outer = offset / run_bytes_;
  std::uint64_t in_run = offset % run_bytes_;
  // Unravel |outer| over the outer dims once, then step it like an odometer.
  std::vector<std::uint64_t> index(dims_.size());
  std::uint64_t rest = outer;
  std::uint64_t pos = base_;
  for (std::size_t d = dims_.size(); d-- > 0;) {
    index[d] = rest % dims_[d].size;
    rest /= dims_[d].size;
    pos += index[d] * dims_[d].stride_bytes;
  }
  while (length > 0) {
    std::uint64_t n = std::min(run_bytes_ - in_run, length);
    run(pos + in_run, n);
    length -= n;
    in_run = 0;
    for (std::size_t d = dims_.size(); d-- > 0;) {
      pos += dims_[d].stride_bytes;
      if (++index[d] < dims_[d].size) break;
      pos -= dims_[d].stride_bytes * dims_[d].size;
      index[d] = 0;
    }
  }
}

}  // namespace ckptfs
