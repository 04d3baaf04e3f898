// The one interface through which checkpoint bytes reach ckptfs. Today it is a local file;
// shard sets and HTTP/object-store ranges will implement the same interface, so neither the
// block cache nor the catalog may assume a local fd.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <ctime>
#include <memory>
#include <span>
#include <string>

#include "unique_fd.h"

namespace ckptfs {

class ByteSource {
 public:
  virtual ~ByteSource() = default;

  // Total size in bytes; constant for the life of the source.
  virtual std::uint64_t size() const = 0;

  // Fills |dst| with the bytes at [offset, offset + dst.size()). Thread-safe. Throws IoError on
  // an I/O failure or when the range runs past the end (a short read is never returned).
  virtual void read_at(std::uint64_t offset, std::span<std::byte> dst) const = 0;

  // Modification time to show on the mounted files.
  virtual std::timespec mtime() const = 0;

  // Human-readable name for messages (a path, a URL).
  virtual std::string describe() const = 0;

  // Reads the |length| bytes at |offset| into the start of |block|, a cache block whose
  // capacity may exceed |length|. Sources that can bypass their own caching (O_DIRECT) do it
  // here, so checkpoint data is held once, in the block cache. Same errors as read_at.
  virtual void read_block(std::uint64_t offset, std::span<std::byte> block,
                          std::size_t length) const {
    read_at(offset, block.first(length));
  }

  // Drops any cached copy of the source's bytes that read_at() left behind (the metadata read
  // at mount). Best effort.
  virtual void drop_cache() const {}

  // How block reads avoid double caching, for /.ckptfs/stats.
  virtual std::string cache_mode() const { return "none"; }

  // True once the source was seen to change after it was opened; from then on every read
  // throws IoError, since the catalog no longer describes its bytes.
  virtual bool changed() const { return false; }
};

// A regular local file read with pread(2).
class LocalFileSource final : public ByteSource {
 public:
  // Throws IoError (with a message naming |path|) if it cannot be opened or is not a file.
  explicit LocalFileSource(const std::string& path);

  std::uint64_t size() const override { return size_; }
  void read_at(std::uint64_t offset, std::span<std::byte> dst) const override;
  std::timespec mtime() const override { return mtime_; }
  std::string describe() const override { return path_; }
  void read_block(std::uint64_t offset, std::span<std::byte> block,
                  std::size_t length) const override;
  void drop_cache() const override;
  // "O_DIRECT" when the filesystem takes direct I/O, else "fadvise(DONTNEED)".
  std::string cache_mode() const override { return direct_ok_ ? "O_DIRECT" : "fadvise(DONTNEED)"; }
  // A write to the file (size or mtime differ from open time) is noticed by the first read
  // that follows it. Unlinking or renaming the file is not a change: the open fd keeps the
  // same bytes. The check runs after each read, so bytes that raced with a write are refused.
  bool changed() const override { return changed_.load(std::memory_order_relaxed); }

  static constexpr std::size_t kDirectAlign = 4096;
  // read_at() of at least this many bytes drops the range's cached pages once it has copied
  // them: no one reads them twice.
  static constexpr std::size_t kDropAfterRead = 1u << 20;

 private:
  void pread_fully(int fd, std::uint64_t offset, std::span<std::byte> dst) const;
  // Drops the file's cached pages in [offset, offset + length); length 0: to the end.
  void drop_pages(std::uint64_t offset, std::uint64_t length) const;
  [[noreturn]] void throw_read_error(std::uint64_t at, int err) const;
  [[noreturn]] void throw_truncated(std::uint64_t at) const;
  void check_unchanged() const;

  std::string path_;
  UniqueFd fd_;
  UniqueFd direct_;  // the same file opened with O_DIRECT, when the filesystem allows it
  mutable std::atomic<bool> direct_ok_{false};
  mutable std::atomic<bool> changed_{false};
  std::uint64_t size_ = 0;
  std::timespec mtime_{};
};

}  // namespace ckptfs
