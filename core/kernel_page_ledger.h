// KernelPageLedger: what the daemon has handed to the kernel's page cache and not yet taken
// back. Every cached page of a FUSE file arrived in a READ reply, so recording the replies
// gives an upper bound of the kernel's pages for the mount (the kernel may drop pages on its
// own; the bound then over-counts, which is safe). When the bound exceeds the budget, the
// least recently served chunks are handed out for invalidation.
//
// No FUSE here: fs/ turns the ranges into fuse_lowlevel_notify_inval_inode calls.
#pragma once

#include <cstdint>
#include <list>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace ckptfs {

class KernelPageLedger {
 public:
  static constexpr std::uint64_t kPage = 4096;
  static constexpr std::uint64_t kChunk = 64 * kPage;  // one bit per page in a 64-bit mask

  struct Range {
    std::uint64_t inode;
    std::uint64_t offset;
    std::uint64_t length;  // whole chunks: what to invalidate
    std::uint64_t served;  // the bytes of the pages on record in it (a 64 KiB file: 64 KiB)
  };

  explicit KernelPageLedger(std::uint64_t budget_bytes) : budget_(budget_bytes) {}

  // Records that [offset, offset + length) of |inode| was just replied to the kernel.
  // Returns true when the pages on record now exceed the budget.
  bool record(std::uint64_t inode, std::uint64_t offset, std::uint64_t length);

  // Takes the least recently served chunks off the record until the total is a little below
  // the budget (so that invalidations come in batches), merged into ranges per inode.
  std::vector<Range> take_excess();

  std::uint64_t served_bytes() const;
  std::uint64_t budget() const { return budget_; }

 private:
  struct Key {
    std::uint64_t inode;
    std::uint64_t chunk;
    bool operator==(const Key&) const = default;
  };
  struct KeyHash {
    std::size_t operator()(const Key& k) const noexcept {
      return std::hash<std::uint64_t>()(k.inode * 0x9E3779B97F4A7C15ull ^ k.chunk);
    }
  };
  struct Chunk {
    Key key;
    std::uint64_t pages = 0;  // bit i: page i of the chunk was served
  };

  const std::uint64_t budget_;
  mutable std::mutex mu_;
  std::list<Chunk> lru_;  // front = least recently served
  std::unordered_map<Key, std::list<Chunk>::iterator, KeyHash> index_;
  std::uint64_t served_ = 0;
};

}  // namespace ckptfs
