// How --limit-mb is shared between the daemon's block cache and the pages the kernel caches
// for the mounted files. The daemon's copy only needs to cover requests in flight, prefetch
// and recent blocks; the pages readers map (numpy.memmap, mmap) are the kernel's. A quarter
// for the daemon, at most 256 MiB, leaves most of the budget where readers see it: with
// --limit-mb at least the checkpoint's size plus 256, every page a reader touched stays
// cached, and a second pass never goes back to the daemon.
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
  std::uint64_t cache = std::clamp<std::uint64_t>(limit_bytes / 4, 2ull << 20,  // 32 x 64 KiB
                                                  256ull << 20);
  return {cache, limit_bytes - cache};
}

}  // namespace ckptfs
