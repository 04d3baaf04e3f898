#include "block_cache.h"

#include <fmt/format.h>
#include <sys/mman.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>

#include "errors.h"

namespace ckptfs {

MappedRegion::MappedRegion(std::size_t bytes) : size_(bytes) {
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    int err = errno;
    throw IoError(
        fmt::format("cannot reserve {} bytes for the block cache: {}", bytes, errno_text(err)),
        err);
  }
  data_ = static_cast<std::byte*>(p);
}

MappedRegion::~MappedRegion() {
  ::munmap(data_, size_);
}

namespace {

std::uint32_t pick_block_size(std::uint64_t capacity, std::uint32_t requested) {
  if (requested != 0) return requested;
  std::uint64_t per_block = std::max<std::uint64_t>(capacity / BlockCache::kMinBlocks, 1);
  std::uint64_t size = std::bit_floor(per_block);
  return static_cast<std::uint32_t>(std::clamp<std::uint64_t>(size, 64u << 10, 1u << 20));
}

std::uint64_t slot_count(std::uint64_t capacity, std::uint32_t block) {
  return std::max<std::uint64_t>(capacity / block, BlockCache::kMinBlocks);
}

}  // namespace

BlockCache::BlockCache(const ByteSource& source, std::uint64_t capacity_bytes,
                       std::uint32_t block_size)
    : source_(source),
      block_size_(pick_block_size(capacity_bytes, block_size)),
      arena_(slot_count(capacity_bytes, block_size_) * block_size_),
      slots_(slot_count(capacity_bytes, block_size_)) {
  stats_.limit_bytes = capacity_bytes;
  stats_.block_size = block_size_;
  stats_.blocks = slots_.size();
}

std::uint32_t BlockCache::find_victim() {
  // CLOCK: skip pinned and loading slots, give referenced ones a second chance.
  const auto n = static_cast<std::uint32_t>(slots_.size());
  for (std::uint32_t step = 0; step < 2 * n; ++step) {
    std::uint32_t i = hand_;
    hand_ = (hand_ + 1) % n;
    Slot& s = slots_[i];
    if (s.state == SlotState::Free) return i;
    if (s.state != SlotState::Ready || s.pins != 0) continue;
    if (s.referenced) {
      s.referenced = false;
      continue;
    }
    return i;
  }
  return kNoSlot;
}

std::uint32_t BlockCache::acquire(std::uint64_t block) {
  std::unique_lock lock(mu_);
  for (;;) {
    if (auto it = index_.find(block); it != index_.end()) {
      Slot& s = slots_[it->second];
      if (s.state == SlotState::Ready) {
        ++s.pins;
        s.referenced = true;
        ++stats_.hits;
        return it->second;
      }
      changed_.wait(lock);  // another thread is loading it: wait, never read twice
      continue;
    }
    std::uint32_t victim = find_victim();
    if (victim == kNoSlot) {
      changed_.wait(lock);  // every block is pinned or loading
      continue;
    }
    Slot& s = slots_[victim];
    if (s.state == SlotState::Ready) {
      index_.erase(s.block);
      stats_.resident_bytes -= s.length;
      ++stats_.evictions;
    }
    s.block = block;
    s.state = SlotState::Loading;
    s.pins = 1;
    // A block earns its second chance only when read again: one big sequential scan then
    // recycles its own blocks first instead of flushing everything else.
    s.referenced = false;
    index_[block] = victim;
    ++stats_.misses;
    lock.unlock();

    const std::uint64_t offset = block * block_size_;
    const auto length =
        static_cast<std::uint32_t>(std::min<std::uint64_t>(block_size_, source_.size() - offset));
    std::byte* dst = arena_.data() + static_cast<std::size_t>(victim) * block_size_;
    try {
      source_.read_block(offset, std::span(dst, block_size_), length);
    } catch (...) {
      lock.lock();
      index_.erase(block);
      s.state = SlotState::Free;
      s.pins = 0;
      ++stats_.read_errors;
      changed_.notify_all();
      throw;
    }
    lock.lock();
    s.state = SlotState::Ready;
    s.length = length;
    stats_.resident_bytes += length;
    stats_.bytes_read += length;
    changed_.notify_all();
    return victim;
  }
}

void BlockCache::release(std::uint32_t slot) {
  std::lock_guard lock(mu_);
  if (--slots_[slot].pins == 0) changed_.notify_all();
}

BlockCache::Pin& BlockCache::Pin::operator=(Pin&& other) noexcept {
  if (this != &other) {
    reset();
    cache_ = std::exchange(other.cache_, nullptr);
    slot_ = other.slot_;
    begin_ = other.begin_;
    bytes_ = other.bytes_;
  }
  return *this;
}

void BlockCache::Pin::reset() {
  if (cache_ != nullptr) std::exchange(cache_, nullptr)->release(slot_);
}

BlockCache::Pin BlockCache::pin(std::uint64_t offset) {
  if (offset >= source_.size()) {
    throw IoError(fmt::format("offset {} is outside {}", offset, source_.describe()), EIO);
  }
  const std::uint64_t block = offset / block_size_;
  const std::uint32_t slot = acquire(block);
  std::uint32_t length;
  {
    std::lock_guard lock(mu_);
    length = slots_[slot].length;
  }
  return Pin(this, slot, block * block_size_,
             std::span<const std::byte>(
                 arena_.data() + static_cast<std::size_t>(slot) * block_size_, length));
}

void BlockCache::read(std::uint64_t offset, std::span<std::byte> dst) {
  if (offset > source_.size() || dst.size() > source_.size() - offset) {
    throw IoError(
        fmt::format("read of {} bytes at {} is outside {}", dst.size(), offset, source_.describe()),
        EIO);
  }
  std::size_t done = 0;
  while (done < dst.size()) {
    Pin p = pin(offset + done);
    std::size_t n = static_cast<std::size_t>(
        std::min<std::uint64_t>(p.end() - (offset + done), dst.size() - done));
    std::memcpy(dst.data() + done, p.at(offset + done), n);
    done += n;
  }
}

BlockCache::Stats BlockCache::stats() const {
  std::lock_guard lock(mu_);
  return stats_;
}

}  // namespace ckptfs
