#include "kernel_page_ledger.h"

#include <algorithm>
#include <bit>

namespace ckptfs {

bool KernelPageLedger::record(std::uint64_t inode, std::uint64_t offset, std::uint64_t length) {
  if (length == 0) return false;
  const std::uint64_t first_page = offset / kPage;
  const std::uint64_t last_page = (offset + length - 1) / kPage;
  std::lock_guard lock(mu_);
  for (std::uint64_t chunk = first_page / 64; chunk <= last_page / 64; ++chunk) {
    std::uint64_t lo = std::max(first_page, chunk * 64) - chunk * 64;
    std::uint64_t hi = std::min(last_page, chunk * 64 + 63) - chunk * 64;
    std::uint64_t mask = (hi - lo == 63) ? ~0ull : (((1ull << (hi - lo + 1)) - 1) << lo);
    Key key{inode, chunk};
    auto it = index_.find(key);
    if (it == index_.end()) {
      lru_.push_back(Chunk{key, 0});
      it = index_.emplace(key, std::prev(lru_.end())).first;
    } else {
      lru_.splice(lru_.end(), lru_, it->second);  // most recently served
    }
    Chunk& c = *it->second;
    served_ += static_cast<std::uint64_t>(std::popcount(mask & ~c.pages)) * kPage;
    c.pages |= mask;
  }
  return served_ > budget_;
}

std::vector<KernelPageLedger::Range> KernelPageLedger::take_excess() {
  std::vector<Range> out;
  {
    std::lock_guard lock(mu_);
    if (served_ <= budget_) return out;
    const std::uint64_t slack = std::max<std::uint64_t>(budget_ / 16, kChunk);
    const std::uint64_t target = budget_ > slack ? budget_ - slack : 0;
    while (served_ > target && !lru_.empty()) {
      const Chunk& c = lru_.front();
      const auto pages = static_cast<std::uint64_t>(std::popcount(c.pages)) * kPage;
      served_ -= pages;
      out.push_back(Range{c.key.inode, c.key.chunk * kChunk, kChunk, pages});
      index_.erase(c.key);
      lru_.pop_front();
    }
  }
  std::sort(out.begin(), out.end(), [](const Range& a, const Range& b) {
    return a.inode != b.inode ? a.inode < b.inode : a.offset < b.offset;
  });
  std::vector<Range> merged;
  for (const Range& r : out) {
    if (!merged.empty() && merged.back().inode == r.inode &&
        merged.back().offset + merged.back().length == r.offset) {
      merged.back().length += r.length;
      merged.back().served += r.served;
    } else {
      merged.push_back(r);
    }
  }
  return merged;
}

std::uint64_t KernelPageLedger::served_bytes() const {
  std::lock_guard lock(mu_);
  return served_;
}

}  // namespace ckptfs
