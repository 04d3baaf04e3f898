#include "block_cache.h"

#include <algorithm>
#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <cstring>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "errors.h"

using namespace ckptfs;

namespace {

// An in-memory ByteSource that counts reads and can fail or slow down on demand.
class MemorySource final : public ByteSource {
 public:
  explicit MemorySource(std::size_t n) : data_(n) {
    std::mt19937 rng(1);
    for (auto& b : data_) b = static_cast<std::byte>(rng());
  }
  std::uint64_t size() const override { return data_.size(); }
  void read_at(std::uint64_t offset, std::span<std::byte> dst) const override {
    ++reads;
    {
      std::lock_guard lock(offsets_mu);
      offsets.push_back(offset);
    }
    if (delay_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
    if (fail) throw IoError("injected failure", 5);
    std::memcpy(dst.data(), data_.data() + offset, dst.size());
  }
  std::timespec mtime() const override { return {}; }
  std::string describe() const override { return "memory"; }
  const std::byte* bytes() const { return data_.data(); }

  // The 64 KiB blocks read so far (their offsets / 64 KiB), in any order.
  std::vector<std::uint64_t> blocks_read() const {
    std::lock_guard lock(offsets_mu);
    std::vector<std::uint64_t> out;
    for (std::uint64_t o : offsets) out.push_back(o >> 16);
    return out;
  }
  bool block_read(std::uint64_t block) const {
    const auto b = blocks_read();
    return std::find(b.begin(), b.end(), block) != b.end();
  }

  mutable std::atomic<int> reads{0};
  mutable std::mutex offsets_mu;
  mutable std::vector<std::uint64_t> offsets;
  std::atomic<bool> fail{false};
  int delay_ms = 0;

 private:
  std::vector<std::byte> data_;
};

bool same(const MemorySource& src, std::uint64_t off, const std::vector<std::byte>& got) {
  return std::memcmp(src.bytes() + off, got.data(), got.size()) == 0;
}

// Reads the |count| 64 KiB blocks from |first| on, each of which prefetch must have loaded:
// right bytes, no miss, and nothing loaded ahead thrown away unread.
void reads_all_prefetched(BlockCache& cache, const MemorySource& src, std::uint64_t first,
                          std::uint64_t count, StreamHint hint) {
  const auto before = cache.stats();
  std::vector<std::byte> buf(64u << 10);
  for (std::uint64_t b = first; b < first + count; ++b) {
    cache.read(b << 16, buf, hint);
    REQUIRE(same(src, b << 16, buf));
  }
  const auto after = cache.stats();
  CHECK(after.misses == before.misses);
  CHECK(after.prefetch_hits - before.prefetch_hits == count);
  CHECK(after.prefetch_wasted == 0);
}

// Prefetch and prefault are asynchronous: waits (up to |seconds|, for a loaded machine) until
// |done| holds.
template <typename Done>
bool eventually(Done done, int seconds = 5) {
  for (int i = 0; i < 100 * seconds; ++i) {
    if (done()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return done();
}

}  // namespace

TEST_CASE("reads across block boundaries return the source bytes") {
  MemorySource src(1'000'003);  // not a multiple of the block size: a short last block
  BlockCache cache(src, 64u << 10 << 5, 64u << 10);
  std::mt19937 rng(3);
  for (int i = 0; i < 500; ++i) {
    std::uint64_t off = rng() % src.size();
    std::vector<std::byte> buf(std::min<std::uint64_t>(rng() % 300000, src.size() - off));
    cache.read(off, buf);
    REQUIRE(same(src, off, buf));
  }
  std::vector<std::byte> tail(3);
  cache.read(src.size() - 3, tail);
  CHECK(same(src, src.size() - 3, tail));
  std::vector<std::byte> past(4);
  CHECK_THROWS_AS(cache.read(src.size() - 3, past), IoError);
}

TEST_CASE("the budget holds: eviction keeps resident bytes within the limit") {
  MemorySource src(8u << 20);
  const std::uint64_t limit = 2u << 20;
  BlockCache cache(src, limit, 64u << 10);
  std::vector<std::byte> buf(100000);
  for (std::uint64_t off = 0; off + buf.size() <= src.size(); off += buf.size()) {
    cache.read(off, buf);
    REQUIRE(same(src, off, buf));
    REQUIRE(cache.stats().resident_bytes <= limit);
  }
  auto s = cache.stats();
  CHECK(s.evictions > 0);
  CHECK(s.bytes_read >= src.size() - buf.size());
  CHECK(s.blocks == limit / (64u << 10));
}

TEST_CASE("hits: a second read of a cached range does not touch the source") {
  MemorySource src(1u << 20);
  BlockCache cache(src, 4u << 20, 64u << 10);
  std::vector<std::byte> buf(200000);
  cache.read(1000, buf);
  int reads = src.reads;
  cache.read(1000, buf);
  CHECK(src.reads == reads);
  auto s = cache.stats();
  CHECK(s.hits >= 4);
  CHECK(s.hits + s.misses >= 8);
}

TEST_CASE("single flight: concurrent readers of one block read the source once") {
  MemorySource src(1u << 20);
  src.delay_ms = 50;
  BlockCache cache(src, 4u << 20, 64u << 10);
  std::vector<std::thread> threads;
  std::atomic<int> ok{0};
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      std::vector<std::byte> buf(100);
      cache.read(70000, buf);
      if (same(src, 70000, buf)) ++ok;
    });
  }
  for (auto& t : threads) t.join();
  CHECK(ok == 8);
  CHECK(src.reads == 1);
}

TEST_CASE("a failed load is reported and not cached; the next read retries") {
  MemorySource src(1u << 20);
  BlockCache cache(src, 4u << 20, 64u << 10);
  std::vector<std::byte> buf(10);
  src.fail = true;
  CHECK_THROWS_AS(cache.read(0, buf), IoError);
  CHECK(cache.stats().read_errors == 1);
  src.fail = false;
  cache.read(0, buf);
  CHECK(same(src, 0, buf));
}

TEST_CASE("many threads, tiny cache: every byte right, no deadlock") {
  MemorySource src(4u << 20);
  BlockCache cache(src, 64u << 10 << 5, 64u << 10);  // 32 blocks of 64 KiB
  std::atomic<int> bad{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 12; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(static_cast<unsigned>(t));
      std::vector<std::byte> buf;
      for (int i = 0; i < 400; ++i) {
        std::uint64_t off = rng() % src.size();
        buf.resize(std::min<std::uint64_t>(rng() % 200000, src.size() - off));
        cache.read(off, buf);
        if (!same(src, off, buf)) ++bad;
      }
    });
  }
  for (auto& t : threads) t.join();
  CHECK(bad == 0);
  auto s = cache.stats();
  CHECK(s.resident_bytes <= 64u << 10 << 5);
}

TEST_CASE("one big sequential scan does not flush a block that keeps being read") {
  MemorySource src(16u << 20);
  BlockCache cache(src, 64u << 10 << 5, 64u << 10);  // 32 blocks
  std::vector<std::byte> hot(100);
  std::vector<std::byte> buf(64u << 10);
  cache.read(0, hot);
  cache.read(0, hot);  // read twice: it has earned its second chance
  const int reads_before = src.reads;
  int hot_misses = 0;
  int step = 0;
  for (std::uint64_t off = 1u << 20; off + buf.size() <= src.size(); off += buf.size()) {
    cache.read(off, buf);    // a scan of 240 blocks, each read once
    if (++step % 16 == 0) {  // the hot block is read far less often than blocks stream by
      int before = src.reads;
      cache.read(0, hot);
      hot_misses += src.reads - before;
    }
  }
  CHECK(hot_misses == 0);
  CHECK(src.reads - reads_before == 240);
  CHECK(same(src, 0, hot));
}

TEST_CASE("prefetch: a sequential reader finds the next blocks loaded, bytes unchanged") {
  MemorySource src(8u << 20);
  src.delay_ms = 2;  // a slow source: the reader's own work overlaps the prefetch
  BlockCache cache(src, 64u << 10 << 5, 64u << 10);  // 32 blocks
  cache.enable_prefetch(4);
  std::vector<std::byte> buf(64u << 10);
  for (std::uint64_t off = 0; off + buf.size() <= src.size(); off += buf.size()) {
    cache.read(off, buf);
    REQUIRE(same(src, off, buf));
    std::this_thread::sleep_for(std::chrono::milliseconds(3));  // the reader's work
  }
  auto s = cache.stats();
  // Of 128 blocks; the thresholds leave room for a loaded machine starving the thread.
  CHECK(s.prefetched > 16);
  CHECK(s.prefetch_hits > 16);
  CHECK(s.hits + s.misses >= 128);
  CHECK(s.resident_bytes <= (64u << 10 << 5));
}

TEST_CASE("prefetch never takes a pinned block, nor one that keeps being read") {
  MemorySource src(16u << 20);
  src.delay_ms = 1;  // give the prefetch thread time to run between the reader's steps
  BlockCache cache(src, 64u << 10 << 5, 64u << 10);  // 32 blocks
  cache.enable_prefetch(4);
  std::vector<std::byte> hot(100);
  cache.read(0, hot);
  cache.read(0, hot);  // re-read: referenced
  BlockCache::Pin pinned = cache.pin(5u << 20);
  std::vector<std::byte> buf(64u << 10);
  int hot_misses = 0;
  for (std::uint64_t off = 1u << 20; off + buf.size() <= (4u << 20); off += buf.size()) {
    cache.read(off, buf);
    REQUIRE(same(src, off, buf));
    // Reader misses only: the source's read count also moves with the prefetch thread.
    const auto before = cache.stats().misses;
    cache.read(0, hot);
    hot_misses += static_cast<int>(cache.stats().misses - before);
  }
  CHECK(hot_misses == 0);
  CHECK(std::memcmp(pinned.at(5u << 20), src.bytes() + (5u << 20), 4096) == 0);
  // The test means something only if prefetch ran; it is asynchronous, so allow it time.
  for (int i = 0; i < 200 && cache.stats().prefetched == 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  CHECK(cache.stats().prefetched > 0);
}

TEST_CASE("prefetch with many threads and a tiny cache: every byte right, clean shutdown") {
  MemorySource src(4u << 20);
  {
    BlockCache cache(src, 64u << 10 << 5, 64u << 10);
    cache.enable_prefetch(8);
    std::vector<std::thread> threads;
    std::atomic<int> bad{0};
    for (int t = 0; t < 6; ++t) {
      threads.emplace_back([&, t] {
        std::vector<std::byte> buf(10000);
        const std::uint64_t start = static_cast<std::uint64_t>(t) * (600u << 10);
        for (std::uint64_t off = start; off + buf.size() <= src.size(); off += buf.size()) {
          cache.read(off, buf);
          if (!same(src, off, buf)) ++bad;
        }
      });
    }
    for (auto& th : threads) th.join();
    CHECK(bad == 0);
  }  // the destructor stops the prefetch thread
}

TEST_CASE("prefetch stays inside a stream's record, then goes where its reader goes next") {
  constexpr std::uint64_t kBlock = 64u << 10;
  MemorySource src(8u << 20);                  // 128 blocks
  BlockCache cache(src, kBlock << 5, kBlock);  // 32 blocks
  cache.enable_prefetch(4);
  // Record 1 is blocks 0-9; the reader's next record is blocks 64-67, far away in the file
  // (as torch's data/2 is from data/1). Blocks 10-63 belong to nobody this reader wants.
  const StreamHint first{.end = 10 * kBlock, .next_begin = 64 * kBlock, .next_end = 68 * kBlock};
  std::vector<std::byte> buf(kBlock);
  for (std::uint64_t b = 0; b < 10; ++b) {
    cache.read(b * kBlock, buf, first);
    REQUIRE(same(src, b * kBlock, buf));
  }
  REQUIRE(eventually([&] {
    return src.block_read(64) && src.block_read(65) && src.block_read(66) && src.block_read(67);
  }));
  for (std::uint64_t b : src.blocks_read()) CHECK((b < 10 || (b >= 64 && b < 68)));
  // The reader then finds the next record loaded.
  reads_all_prefetched(cache, src, 64, 4, StreamHint{.end = 68 * kBlock});
}

TEST_CASE("prefetch: a read that starts a stream loads ahead at once, within its record") {
  constexpr std::uint64_t kBlock = 64u << 10;
  MemorySource src(4u << 20);
  BlockCache cache(src, kBlock << 5, kBlock);
  cache.enable_prefetch(4);
  std::vector<std::byte> buf(100);
  // One read, no second block in order yet: the hint alone says a stream begins. Its record
  // ends inside block 3, so blocks 1-3 are loaded and nothing past them.
  cache.read(0, buf, StreamHint{.end = 3 * kBlock + 10, .starts = true});
  REQUIRE(eventually([&] { return src.reads == 4; }));
  std::this_thread::sleep_for(std::chrono::milliseconds(50));  // room for a stray load
  auto blocks = src.blocks_read();
  std::sort(blocks.begin(), blocks.end());
  CHECK(blocks == std::vector<std::uint64_t>{0, 1, 2, 3});
}

TEST_CASE("a block loaded ahead outlives the misses of other readers until its own comes") {
  constexpr std::uint64_t kBlock = 64u << 10;
  MemorySource src(16u << 20);                 // 256 blocks
  BlockCache cache(src, kBlock << 5, kBlock);  // 32 blocks
  cache.enable_prefetch(4);
  std::vector<std::byte> buf(100);
  // Fill every slot with blocks read once, none in order (every other block).
  for (std::uint64_t b = 0; b < 64; b += 2) cache.read(b * kBlock, buf);
  // A stream opens at block 100: 101-104 are loaded ahead into the slots the CLOCK hand is
  // about to visit.
  cache.read(100 * kBlock, buf, StreamHint{.starts = true});
  REQUIRE(eventually([&] { return src.reads == 32 + 1 + 4; }));
  // Other readers miss four times (blocks out of order): without a second chance for blocks
  // loaded ahead, each miss would take one of them.
  for (std::uint64_t b = 200; b < 208; b += 2) cache.read(b * kBlock, buf);
  reads_all_prefetched(cache, src, 101, 4, StreamHint{});
}

TEST_CASE("try_pin gives loaded blocks only, and never reads the source") {
  MemorySource src(1'000'003);
  BlockCache cache(src, 64u << 10 << 5, 64u << 10);
  CHECK_FALSE(cache.try_pin(100).has_value());
  CHECK(src.reads == 0);
  { BlockCache::Pin loaded = cache.pin(70'000); }  // loads the second block
  CHECK(src.reads == 1);
  std::optional<BlockCache::Pin> again = cache.try_pin(65'536 + 7);
  REQUIRE(again.has_value());
  CHECK(again->begin() == 65'536);
  CHECK(std::memcmp(again->at(70'000), src.bytes() + 70'000, 1000) == 0);
  CHECK_FALSE(cache.try_pin(0).has_value());           // the first block was never loaded
  CHECK_FALSE(cache.try_pin(src.size()).has_value());  // past the end: no block, no throw
  CHECK(src.reads == 1);
  CHECK(cache.stats().hits == 1);
}

TEST_CASE("a block pinned by try_pin is not evicted while held") {
  MemorySource src(64u << 10 << 6);  // 64 blocks through a 32-block cache
  BlockCache cache(src, 64u << 10 << 5, 64u << 10);
  { BlockCache::Pin first = cache.pin(0); }
  std::optional<BlockCache::Pin> held = cache.try_pin(0);
  REQUIRE(held.has_value());
  std::vector<std::byte> buf(64u << 10);
  for (std::uint64_t b = 1; b < 64; ++b)
    cache.read(b * buf.size(), buf);  // every other slot cycles
  CHECK(std::memcmp(held->at(0), src.bytes(), 64u << 10) == 0);
  held.reset();
  CHECK(cache.stats().evictions > 0);
}

TEST_CASE("prefault backs the whole arena and leaves loaded blocks as they were") {
  MemorySource src(8u << 20);
  BlockCache cache(src, 4u << 20, 64u << 10);  // 64 blocks, two huge pages
  std::vector<std::byte> buf(64u << 10);
  for (std::uint64_t b = 0; b < 40; ++b) cache.read(b << 16, buf);
  const auto loaded = cache.stats();
  REQUIRE(loaded.prefaulted_bytes == 0);
  cache.start_prefault();
  // SCHED_IDLE: on a machine busy with other tests it may wait long for a free CPU.
  REQUIRE(eventually([&] { return cache.stats().prefault_finished; }, 60));
  const auto done = cache.stats();
  REQUIRE(done.prefaulted_bytes == done.blocks * done.block_size);
  // The blocks loaded before still hold the source's bytes, and are still cached.
  for (std::uint64_t b = 0; b < 40; ++b) {
    cache.read(b << 16, buf);
    REQUIRE(same(src, b << 16, buf));
  }
  CHECK(cache.stats().misses == loaded.misses);
}

TEST_CASE("prefault while many threads read: every byte right, clean shutdown") {
  MemorySource src(16u << 20);
  for (int round = 0; round < 3; ++round) {
    BlockCache cache(src, 8u << 20, 64u << 10);
    cache.start_prefault();
    std::atomic<int> wrong{0};
    std::vector<std::thread> readers;
    readers.reserve(4);
    for (int t = 0; t < 4; ++t) {
      readers.emplace_back([&, t] {
        std::mt19937 rng(t + 10 * round);
        std::vector<std::byte> buf(100'000);
        for (int i = 0; i < 200; ++i) {
          const std::uint64_t off = rng() % (src.size() - buf.size());
          cache.read(off, buf);
          if (!same(src, off, buf)) ++wrong;
        }
      });
    }
    for (auto& r : readers) r.join();
    CHECK(wrong == 0);
    // The cache is destroyed here, prefault finished or not: the thread stops before the
    // arena is unmapped (ASan/TSan runs catch it if not).
  }
}
