#include "read_ahead.h"

#include <catch2/catch.hpp>
#include <cstring>
#include <vector>

using namespace ckptfs;

namespace {

// Bytes i % 251, and a log of the reads the ReadAhead makes.
class LoggedSource final : public ByteSource {
 public:
  explicit LoggedSource(std::size_t n) : size_(n) {}
  std::uint64_t size() const override { return size_; }
  void read_at(std::uint64_t offset, std::span<std::byte> dst) const override {
    REQUIRE(offset + dst.size() <= size_);
    for (std::size_t i = 0; i < dst.size(); ++i)
      dst[i] = static_cast<std::byte>((offset + i) % 251);
    reads.push_back(dst.size());
  }
  std::timespec mtime() const override { return {}; }
  std::string describe() const override { return "logged"; }

  mutable std::vector<std::size_t> reads;

 private:
  std::size_t size_;
};

// Reads 46 bytes at each offset, as the local headers of a zip are read, and checks them.
void read_headers(ReadAhead& r, std::uint64_t first, std::uint64_t gap, std::uint64_t end) {
  for (std::uint64_t at = first; at + 46 <= end; at += gap) {
    std::byte got[46];
    r.read(at, got);
    for (std::size_t i = 0; i < sizeof got; ++i)
      REQUIRE(got[i] == static_cast<std::byte>((at + i) % 251));
  }
}

}  // namespace

TEST_CASE("dense headers: one source read per window") {
  LoggedSource src(64u << 20);
  ReadAhead r(src);
  read_headers(r, 0, 4400, 8u << 20);  // 4 KiB tensors: 1,907 headers in 8 MiB
  CHECK(src.reads.size() <= (8u << 20) / ReadAhead::kWindow + 1);
  CHECK(src.reads.front() == ReadAhead::kWindow);
}

TEST_CASE("sparse headers: a page per header, not a window of tensor data") {
  LoggedSource src(600u << 20);
  ReadAhead r(src);
  read_headers(r, 64, (4u << 20) + 4160, 600u << 20);  // 4 MiB tensors
  REQUIRE(src.reads.size() > 100);
  std::size_t total = 0;
  for (std::size_t n : src.reads) total += n;
  // The first read cannot know; every later one is a page.
  CHECK(src.reads.front() == ReadAhead::kWindow);
  CHECK(total <= ReadAhead::kWindow + (src.reads.size() - 1) * ReadAhead::kSparseWindow);
}

TEST_CASE("a read longer than the sparse window, and one at the end of the source") {
  LoggedSource src(10u << 20);
  ReadAhead r(src);
  std::vector<std::byte> a(100);
  r.read(0, a);
  std::vector<std::byte> big(9000);  // sparse, and larger than a page
  r.read(5u << 20, big);
  for (std::size_t i = 0; i < big.size(); ++i)
    REQUIRE(big[i] == static_cast<std::byte>(((5u << 20) + i) % 251));
  std::vector<std::byte> tail(10);
  r.read((10u << 20) - 10, tail);
  for (std::size_t i = 0; i < tail.size(); ++i)
    REQUIRE(tail[i] == static_cast<std::byte>(((10u << 20) - 10 + i) % 251));
}
