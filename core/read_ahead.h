// ReadAhead: many small reads at increasing offsets (a zip's central directory entry by entry,
// the local headers of its records in order) served from one window of the source, refilled
// only when a read falls outside it: one source read per 256 KiB instead of one per header, or
// one small read per header when they are far apart.
// Not thread-safe: for loading, before anything is served.
#pragma once

#include <algorithm>
#include <cstring>
#include <span>
#include <vector>

#include "byte_source.h"

namespace ckptfs {

class ReadAhead {
 public:
  static constexpr std::size_t kWindow = 256u << 10;
  static constexpr std::size_t kSparseWindow = 4u << 10;

  explicit ReadAhead(const ByteSource& source) : source_(source) {}

  // Same contract as ByteSource::read_at.
  void read(std::uint64_t at, std::span<std::byte> dst) {
    if (dst.empty()) return;
    if (at >= start_ && dst.size() <= window_.size() &&
        at - start_ <= window_.size() - dst.size()) {
      std::memcpy(dst.data(), window_.data() + (at - start_), dst.size());
      return;
    }
    if (dst.size() >= kWindow || at >= source_.size()) {
      source_.read_at(at, dst);  // large, or past the end: the source reports it
      return;
    }
    // A read a whole window past the last one means sparse headers (large records between
    // them): fetch a page, not 256 KiB of tensor data nobody asked for (a checkpoint of 512
    // records of 4 MiB otherwise reads 128 MiB to mount).
    const bool sparse = !window_.empty() && at >= start_ + window_.size() + kWindow;
    const std::size_t want = sparse ? std::max(dst.size(), kSparseWindow) : kWindow;
    window_.resize(static_cast<std::size_t>(std::min<std::uint64_t>(want, source_.size() - at)));
    source_.read_at(at, window_);
    start_ = at;
    if (dst.size() > window_.size()) {
      source_.read_at(at, dst);  // runs past the end: let the source say so
      return;
    }
    std::memcpy(dst.data(), window_.data(), dst.size());
  }

 private:
  const ByteSource& source_;
  std::vector<std::byte> window_;
  std::uint64_t start_ = 0;
};

}  // namespace ckptfs
