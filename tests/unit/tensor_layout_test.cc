// The layout's gather is compared with a naive reference: walk every multi-index in C order
// and read each element at storage_offset + sum(index * stride).
#include "tensor_layout.h"

#include <catch2/catch.hpp>
#include <random>
#include <vector>

using namespace ckptfs;

namespace {

std::vector<std::uint8_t> reference_image(const std::vector<std::int64_t>& shape,
                                          const std::vector<std::int64_t>& stride,
                                          std::int64_t offset, std::uint32_t itemsize,
                                          const std::vector<std::uint8_t>& storage) {
  std::vector<std::uint8_t> out;
  std::size_t numel = 1;
  for (auto s : shape) numel *= static_cast<std::size_t>(s);
  std::vector<std::int64_t> idx(shape.size(), 0);
  for (std::size_t n = 0; n < numel; ++n) {
    std::int64_t e = offset;
    for (std::size_t d = 0; d < shape.size(); ++d) e += idx[d] * stride[d];
    for (std::uint32_t b = 0; b < itemsize; ++b)
      out.push_back(storage[static_cast<std::size_t>(e) * itemsize + b]);
    for (std::size_t d = shape.size(); d-- > 0;) {
      if (++idx[d] < shape[d]) break;
      idx[d] = 0;
    }
  }
  return out;
}

std::vector<std::uint8_t> gather(const TensorLayout& layout,
                                 const std::vector<std::uint8_t>& storage, std::uint64_t off,
                                 std::uint64_t len) {
  std::vector<std::uint8_t> out;
  layout.for_each_run(off, len, [&](std::uint64_t pos, std::uint64_t n) {
    out.insert(out.end(), storage.begin() + static_cast<std::ptrdiff_t>(pos),
               storage.begin() + static_cast<std::ptrdiff_t>(pos + n));
  });
  return out;
}

}  // namespace

// The layout takes spans; brace lists need a vector to live in.
using D = std::vector<std::int64_t>;

TEST_CASE("random views gather exactly the reference bytes, for every sub-range") {
  std::mt19937 rng(7);
  std::vector<std::uint8_t> storage(4096);
  for (std::size_t i = 0; i < storage.size(); ++i) storage[i] = static_cast<std::uint8_t>(rng());
  int checked = 0;
  for (int iter = 0; iter < 3000; ++iter) {
    std::size_t ndim = rng() % 5;
    std::vector<std::int64_t> shape(ndim), stride(ndim);
    for (std::size_t d = 0; d < ndim; ++d) {
      shape[d] = static_cast<std::int64_t>(rng() % 5);
      stride[d] = static_cast<std::int64_t>(rng() % 8);
    }
    if (iter % 3 == 0) {  // make some of them contiguous, so the fast path is covered too
      std::int64_t run = 1;
      for (std::size_t d = ndim; d-- > 0;) {
        stride[d] = run;
        run *= std::max<std::int64_t>(shape[d], 1);
      }
    }
    std::uint32_t itemsize = 1u << (rng() % 4);
    std::int64_t offset = static_cast<std::int64_t>(rng() % 6);
    if (TensorLayout::validate(shape, stride, offset, itemsize, storage.size())) continue;
    TensorLayout layout(shape, stride, offset, itemsize);
    auto want = reference_image(shape, stride, offset, itemsize, storage);
    REQUIRE(layout.nbytes() == want.size());
    REQUIRE(gather(layout, storage, 0, want.size()) == want);
    for (int k = 0; k < 5 && !want.empty(); ++k) {
      std::uint64_t a = rng() % want.size();
      std::uint64_t n = rng() % (want.size() - a + 1);
      REQUIRE(gather(layout, storage, a, n) ==
              std::vector<std::uint8_t>(want.begin() + static_cast<std::ptrdiff_t>(a),
                                        want.begin() + static_cast<std::ptrdiff_t>(a + n)));
    }
    ++checked;
  }
  CHECK(checked > 1000);
}

TEST_CASE("contiguous views are one run; transposes are not") {
  CHECK(TensorLayout(D{3, 4}, D{4, 1}, 2, 4).contiguous());
  CHECK(TensorLayout(D{1, 4, 1}, D{99, 1, 7}, 0, 2).contiguous());  // size-1 dims ignore strides
  CHECK_FALSE(TensorLayout(D{3, 4}, D{1, 3}, 0, 4).contiguous());
  CHECK(TensorLayout(D{}, D{}, 5, 8).nbytes() == 8);  // 0-dim: one element
  CHECK(TensorLayout(D{0, 3}, D{3, 1}, 0, 4).nbytes() == 0);
}

TEST_CASE("validation refuses views outside the storage and overflowing shapes") {
  CHECK_FALSE(TensorLayout::validate(D{3, 4}, D{4, 1}, 0, 4, 48));
  CHECK(TensorLayout::validate(D{3, 4}, D{4, 1}, 1, 4, 48));  // one element too far
  CHECK(TensorLayout::validate(D{3, 4}, D{4, 1}, 0, 4, 47));
  CHECK(TensorLayout::validate(D{2, 2}, D{1}, 0, 4, 100));  // rank mismatch
  CHECK(TensorLayout::validate(D{-1}, D{1}, 0, 4, 100));
  CHECK(TensorLayout::validate(D{4}, D{-1}, 0, 4, 100));
  CHECK(TensorLayout::validate(D{4}, D{1}, -1, 4, 100));
  CHECK(TensorLayout::validate(D{1LL << 40, 1LL << 40}, D{1, 1}, 0, 4, 100));  // numel overflow
  CHECK(TensorLayout::validate(D{2}, D{INT64_MAX / 2}, 0, 4, 100));            // offset overflow
  CHECK_FALSE(TensorLayout::validate(D{0, 1LL << 40}, D{1, 1}, 0, 4, 0));      // empty is fine
  CHECK_FALSE(TensorLayout::validate(D{5, 3}, D{0, 1}, 0, 2, 6));              // expand: stride 0
}
