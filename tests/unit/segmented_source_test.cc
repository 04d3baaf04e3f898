#include "segmented_source.h"

#include <zlib.h>

#include <catch2/catch.hpp>
#include <cstring>
#include <random>
#include <vector>

#include "errors.h"
#include "memory_source.h"

using namespace ckptfs;

namespace {

std::vector<std::byte> random_bytes(std::size_t n, unsigned seed, int alphabet) {
  std::mt19937 rng(seed);
  std::vector<std::byte> v(n);
  for (auto& b : v) b = static_cast<std::byte>(rng() % alphabet);  // small alphabet: compressible
  return v;
}

std::vector<std::byte> raw_deflate(const std::vector<std::byte>& in) {
  z_stream z{};
  REQUIRE(deflateInit2(&z, 6, Z_DEFLATED, -MAX_WBITS, 8, Z_DEFAULT_STRATEGY) == Z_OK);
  std::vector<std::byte> out(compressBound(static_cast<uLong>(in.size())) + 64);
  z.next_in = reinterpret_cast<Bytef*>(const_cast<std::byte*>(in.data()));
  z.avail_in = static_cast<uInt>(in.size());
  z.next_out = reinterpret_cast<Bytef*>(out.data());
  z.avail_out = static_cast<uInt>(out.size());
  REQUIRE(deflate(&z, Z_FINISH) == Z_STREAM_END);
  out.resize(z.total_out);
  deflateEnd(&z);
  return out;
}

}  // namespace

TEST_CASE("inflated records serve any range, forwards and backwards") {
  auto plain = random_bytes(300000, 1, 7);
  auto packed = raw_deflate(plain);
  std::vector<std::byte> file(100 + packed.size(), std::byte{0xAA});  // data starts at offset 100
  for (std::size_t i = 0; i < packed.size(); ++i) file[100 + i] = packed[i];
  MemorySource src(file);
  InflatedRecord rec(src, 100, packed.size(), plain.size(), "rec");
  std::mt19937 rng(2);
  for (int i = 0; i < 200; ++i) {
    std::uint64_t off = rng() % plain.size();
    std::vector<std::byte> buf(std::min<std::uint64_t>(rng() % 20000, plain.size() - off));
    rec.read_at(off, buf);
    REQUIRE(std::memcmp(buf.data(), plain.data() + off, buf.size()) == 0);
  }
  std::vector<std::byte> past(10);
  CHECK_THROWS_AS(rec.read_at(plain.size() - 5, past), IoError);
}

TEST_CASE("corrupt or short deflate data is an IoError, never a crash") {
  auto plain = random_bytes(50000, 3, 5);
  auto packed = raw_deflate(plain);
  std::mt19937 rng(4);
  for (int i = 0; i < 200; ++i) {
    auto bad = packed;
    for (int k = 0; k < 4; ++k) bad[rng() % bad.size()] = static_cast<std::byte>(rng());
    MemorySource src(bad);
    InflatedRecord rec(src, 0, bad.size(), plain.size(), "bad");
    std::vector<std::byte> buf(plain.size());
    try {
      rec.read_at(0, buf);
    } catch (const IoError&) {
    }
  }
  MemorySource shorter(std::vector<std::byte>(
      packed.begin(), packed.begin() + static_cast<std::ptrdiff_t>(packed.size() / 2)));
  InflatedRecord rec(shorter, 0, packed.size() / 2, plain.size(), "short");
  std::vector<std::byte> buf(plain.size());
  CHECK_THROWS_AS(rec.read_at(0, buf), IoError);
}

TEST_CASE("segments sit after the file at aligned offsets; gaps read as zeros") {
  auto file_bytes = random_bytes(5000, 5, 256);
  MemorySource file(file_bytes);
  SegmentedSource seg(file);
  auto extra = random_bytes(3000, 6, 256);
  std::uint64_t at = seg.append(std::make_unique<MemorySource>(extra));
  CHECK(at == SegmentedSource::kAlign);
  CHECK(seg.size() == at + extra.size());
  std::vector<std::byte> all(seg.size());
  seg.read_at(0, all);  // spans file, gap and segment
  CHECK(std::memcmp(all.data(), file_bytes.data(), file_bytes.size()) == 0);
  CHECK(std::all_of(all.begin() + 5000, all.begin() + static_cast<std::ptrdiff_t>(at),
                    [](std::byte b) { return b == std::byte{0}; }));
  CHECK(std::memcmp(all.data() + at, extra.data(), extra.size()) == 0);
}
