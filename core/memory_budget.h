// How --limit-mb is shared between the daemon's block cache and the pages the kernel caches
// for the mounted files. The daemon's copy only needs to cover requests in flight and recent
// blocks; the pages readers map (numpy.memmap, mmap) are the kernel's. A quarter for the
// daemon leaves most of the budget where readers see it.
#pragma once

#include <algorithm>
#include <cstdint>

namespace ckptfs {

struct MemoryBudget {
  std::uint64_t cache_bytes;   // the BlockCache arena
  std::uint64_t kernel_bytes;  // pages served to the kernel and not yet invalidated
};

inline constexpr std::uint64_t kMinLimitBytes = 8ull << 20;

inline MemoryBudget split_memory_budget(std::uint64_t limit_bytes) {
  limit_bytes = std::max(limit_bytes, kMinLimitBytes);
  std::uint64_t cache =
      std::max<std::uint64_t>(limit_bytes / 4, 2ull << 20);  // 32 blocks of 64 KiB
  return {cache, limit_bytes - cache};
}

}  // namespace ckptfs
