// KnownInodes: which inodes the kernel holds, as far as the replies and FORGETs tell.
//
// The kernel refuses to store pages for an inode it has not made (notify_store: -ENOENT), and
// it makes one only from a LOOKUP or READDIRPLUS reply, dropping it with a FORGET. A reader
// that listed a directory holds every file of it before opening any, and those files can be
// stored ahead of it; one that did not holds nothing past the file it opened. One bit per
// inode says which: set by each reply that hands an inode out, cleared by its FORGET.
//
// A hint, not a lookup count: a FORGET handled after a later LOOKUP's reply (two request
// threads) clears a bit the kernel still holds, which costs that file its preload; a bit set
// for a reply the kernel then refused costs one store that fails. Neither touches a byte the
// kernel serves.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>

namespace ckptfs {

class KnownInodes {
 public:
  // Inodes 1 .. |inodes|; any other is never known.
  explicit KnownInodes(std::uint64_t inodes)
      : inodes_(inodes), words_(std::make_unique<std::atomic<std::uint64_t>[]>(inodes / 64 + 1)) {}

  void add(std::uint64_t ino) noexcept {
    if (ino >= 1 && ino <= inodes_) words_[ino / 64].fetch_or(bit(ino), std::memory_order_relaxed);
  }
  void forget(std::uint64_t ino) noexcept {
    if (ino >= 1 && ino <= inodes_)
      words_[ino / 64].fetch_and(~bit(ino), std::memory_order_relaxed);
  }
  bool contains(std::uint64_t ino) const noexcept {
    return ino >= 1 && ino <= inodes_ &&
           (words_[ino / 64].load(std::memory_order_relaxed) & bit(ino)) != 0;
  }

 private:
  static std::uint64_t bit(std::uint64_t ino) { return std::uint64_t{1} << (ino % 64); }

  std::uint64_t inodes_;
  std::unique_ptr<std::atomic<std::uint64_t>[]> words_;
};

}  // namespace ckptfs
