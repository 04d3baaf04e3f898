#include "kernel_page_ledger.h"

#include <catch2/catch.hpp>

using namespace ckptfs;

namespace {
constexpr std::uint64_t kPage = KernelPageLedger::kPage;
constexpr std::uint64_t kChunk = KernelPageLedger::kChunk;
}  // namespace

TEST_CASE("served pages are counted once, whatever the overlap") {
  KernelPageLedger l(100 * kChunk);
  CHECK_FALSE(l.record(2, 0, 128 << 10));
  CHECK(l.served_bytes() == 128 << 10);
  l.record(2, 64 << 10, 128 << 10);  // half overlaps
  CHECK(l.served_bytes() == 192 << 10);
  l.record(2, 10, 1);  // a byte inside a counted page
  CHECK(l.served_bytes() == 192 << 10);
  l.record(3, 4095, 2);  // two pages of another inode, straddling a page boundary
  CHECK(l.served_bytes() == (192 << 10) + 2 * kPage);
  l.record(2, kChunk - kPage, 2 * kPage);  // straddles a chunk boundary
  CHECK(l.served_bytes() == (192 << 10) + 4 * kPage);
}

TEST_CASE("over budget: the least recently served chunks go, merged per inode") {
  KernelPageLedger l(4 * kChunk);
  for (std::uint64_t c = 0; c < 4; ++c) CHECK_FALSE(l.record(7, c * kChunk, kChunk));
  l.record(7, 0, kChunk);         // chunk 0 is now the most recent
  CHECK(l.record(9, 0, kChunk));  // 5 chunks > budget
  auto ranges = l.take_excess();
  // Down to budget minus a batch (one chunk here): chunks 1 and 2 of inode 7, merged.
  REQUIRE(ranges.size() == 1);
  CHECK(ranges[0].inode == 7);
  CHECK(ranges[0].offset == kChunk);
  CHECK(ranges[0].length == 2 * kChunk);
  CHECK(ranges[0].served == 2 * kChunk);
  CHECK(l.served_bytes() == 3 * kChunk);
  CHECK(l.take_excess().empty());
  // An invalidated range served again is counted again.
  CHECK_FALSE(l.record(7, kChunk, kPage));
  CHECK(l.served_bytes() == 3 * kChunk + kPage);
}

TEST_CASE("a chunk served in part is invalidated whole, and counted by its pages") {
  // A 64 KiB file fills a quarter of its chunk: /.ckptfs/stats' invalidated_bytes counted
  // 256 KiB for it (3.9 GB "invalidated" while streaming 1 GiB of such files).
  KernelPageLedger l(2 * kChunk);
  CHECK_FALSE(l.record(4, 0, 64 << 10));
  CHECK_FALSE(l.record(5, 0, kChunk));
  CHECK(l.record(6, 0, kChunk));
  auto ranges = l.take_excess();
  // Down to the budget minus a chunk: both older inodes go.
  REQUIRE(ranges.size() == 2);
  CHECK(ranges[0].inode == 4);
  CHECK(ranges[0].length == kChunk);
  CHECK(ranges[0].served == 64 << 10);
  CHECK(ranges[1].inode == 5);
  CHECK(ranges[1].served == kChunk);
  CHECK(l.served_bytes() == kChunk);
}
