#include "tensor_reader.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

#include "errors.h"

namespace ckptfs {

void TensorReader::check_range(const TensorInfo& t, std::uint64_t offset,
                               std::uint64_t length) const {
  if (!t.error().empty()) throw FormatError(std::string(t.error()));
  if (offset > t.nbytes() || length > t.nbytes() - offset) {
    throw FormatError(fmt::format("read past the end of tensor '{}'", catalog_.path_of(t)));
  }
}

std::uint32_t TensorReader::swap_unit(const TensorInfo& t) {
  return t.dtype().is_complex ? t.dtype().itemsize / 2 : t.dtype().itemsize;
}

bool TensorReader::transformed(const TensorInfo& t) const {
  return (catalog_.big_endian() && swap_unit(t) > 1) || t.conj || t.neg;
}

StreamHint TensorReader::stream_of(const TensorInfo& t, std::uint64_t base, std::uint64_t offset,
                                   std::uint64_t length) const {
  StreamHint hint{.end = base + catalog_.storages()[t.storage].nbytes,
                  .starts = opens_stream(offset, length)};
  // Storages are numbered in the order the pickle first uses them: a reader going through the
  // state dict takes the next one next.
  if (t.storage + 1 < catalog_.storages().size()) {
    const TensorCatalog::SourceSpan next = catalog_.record_span(t.storage + 1);
    hint.next_begin = next.begin;
    hint.next_end = next.end;
  }
  return hint;
}

void TensorReader::gather(const TensorInfo& t, const TensorLayout& layout, std::uint64_t offset,
                          std::span<std::byte> dst) const {
  const std::uint64_t base = catalog_.data_offset(t.storage, opens_stream(offset, dst.size()));
  const StreamHint stream = stream_of(t, base, offset, dst.size());
  std::size_t done = 0;
  // Strided views are many short runs, mostly inside one block: keep that block pinned and
  // copy from it directly instead of taking the cache lock per run.
  std::optional<BlockCache::Pin> held;
  layout.for_each_run(offset, dst.size(), [&](std::uint64_t storage_byte, std::uint64_t length) {
    std::uint64_t pos = base + storage_byte;
    while (length > 0) {
      if (!held || !held->contains(pos, 1)) {
        held.reset();
        held.emplace(cache_.pin(pos, stream));
      }
      std::uint64_t n = std::min(length, held->end() - pos);
      std::memcpy(dst.data() + done, held->at(pos), static_cast<std::size_t>(n));
      done += static_cast<std::size_t>(n);
      pos += n;
      length -= n;
    }
  });
}

bool TensorReader::pin_pieces(const TensorInfo& t, std::uint64_t offset, std::uint64_t length,
                              std::vector<BlockCache::Pin>& pins,
                              std::vector<std::span<const std::byte>>& pieces,
                              std::size_t max_pieces) const {
  check_range(t, offset, length);
  // Reading a local header may wait for a block: read() does that, holding no pins.
  if (transformed(t) || !catalog_.data_offset_known(t.storage)) return false;
  const std::size_t first_pin = pins.size();
  const std::size_t first_piece = pieces.size();
  const std::uint64_t base = catalog_.data_offset(t.storage);
  const StreamHint stream = stream_of(t, base, offset, length);
  bool ok = true;
  t.layout().for_each_run(offset, length, [&](std::uint64_t storage_byte, std::uint64_t n) {
    std::uint64_t pos = base + storage_byte;
    while (ok && n > 0) {
      if (pins.size() == first_pin || !pins.back().contains(pos, 1)) {
        std::optional<BlockCache::Pin> pin = cache_.try_pin(pos, stream);
        if (!pin) {
          ok = false;
          return;
        }
        pins.push_back(std::move(*pin));
      }
      const BlockCache::Pin& held = pins.back();
      const std::uint64_t take = std::min(n, held.end() - pos);
      const std::byte* at = held.at(pos);
      // Runs that continue where the last piece ends (a contiguous tensor) stay one piece.
      if (pieces.size() > first_piece && pieces.back().data() + pieces.back().size() == at) {
        pieces.back() = {pieces.back().data(), pieces.back().size() + take};
      } else if (pieces.size() - first_piece == max_pieces) {
        ok = false;
        return;
      } else {
        pieces.emplace_back(at, static_cast<std::size_t>(take));
      }
      pos += take;
      n -= take;
    }
  });
  if (!ok) {
    pins.erase(pins.begin() + static_cast<std::ptrdiff_t>(first_pin), pins.end());
    pieces.resize(first_piece);
  }
  return ok;
}

void TensorReader::read(const TensorInfo& t, std::uint64_t offset, std::span<std::byte> dst) const {
  check_range(t, offset, dst.size());
  const TensorLayout layout = t.layout();
  if (!transformed(t)) {
    gather(t, layout, offset, dst);
    return;
  }
  const std::uint32_t itemsize = t.dtype().itemsize;
  const bool complex = t.dtype().is_complex;
  const std::uint32_t unit = swap_unit(t);
  const bool swap = catalog_.big_endian() && unit > 1;
  // Transform whole elements: widen the range to element boundaries, then copy the asked part.
  const std::uint64_t first = offset - offset % itemsize;
  const std::uint64_t end = offset + dst.size();
  const std::uint64_t last =
      std::min<std::uint64_t>(t.nbytes(), (end + itemsize - 1) / itemsize * itemsize);
  thread_local std::vector<std::byte> scratch;
  scratch.resize(static_cast<std::size_t>(last - first));
  gather(t, layout, first, scratch);
  if (swap) {
    for (std::size_t i = 0; i + unit <= scratch.size(); i += unit) {
      std::reverse(scratch.begin() + static_cast<std::ptrdiff_t>(i),
                   scratch.begin() + static_cast<std::ptrdiff_t>(i + unit));
    }
  }
  // Now little-endian: a component's sign bit is the top bit of its last byte. neg negates
  // the real part (the value, for real types) and the imaginary part; conj negates the
  // imaginary part, so with both set it cancels there.
  const bool flip_real = t.neg;
  const bool flip_imag = complex && t.neg != t.conj;
  if (flip_real || flip_imag) {
    for (std::size_t e = 0; e + itemsize <= scratch.size(); e += itemsize) {
      if (flip_real) scratch[e + unit - 1] ^= std::byte{0x80};
      if (flip_imag) scratch[e + itemsize - 1] ^= std::byte{0x80};
    }
  }
  std::memcpy(dst.data(), scratch.data() + (offset - first), dst.size());
}

}  // namespace ckptfs
