#include "block_cache.h"

#include <fmt/format.h>
#include <pthread.h>
#include <sched.h>
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
  // Each block's first load touches fresh memory, a fault per 4 KiB page on these VMs: huge
  // pages make that one fault per 2 MiB. Best effort; the arena never exceeds the budget.
  ::madvise(p, bytes, MADV_HUGEPAGE);
}

MappedRegion::~MappedRegion() {
  ::munmap(data_, size_);
}

bool MappedRegion::populate(std::size_t offset, std::size_t length) const {
  return ::madvise(data_ + offset, length, MADV_POPULATE_WRITE) == 0;
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
  // CLOCK: skip pinned and loading slots, give referenced ones a second chance. (A block loaded
  // ahead starts with that chance: see prefetch_loop.)
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

std::uint32_t BlockCache::acquire(std::uint64_t block, StreamHint stream) {
  std::unique_lock lock(mu_);
  for (;;) {
    if (auto it = index_.find(block); it != index_.end()) {
      if (slots_[it->second].state == SlotState::Ready) {
        pin_ready(it->second, block, stream);
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
    claim(victim, block);
    ++stats_.misses;
    note_access(block, stream);
    load(lock, victim, block);
    return victim;
  }
}

void BlockCache::pin_ready(std::uint32_t slot, std::uint64_t block, StreamHint stream) {
  Slot& s = slots_[slot];
  ++s.pins;
  if (s.prefetched) {
    // Its first use: from now on it is an ordinary block (no second chance yet: the one it
    // was loaded with is spent).
    s.prefetched = false;
    s.referenced = false;
    --prefetched_unused_;
    ++stats_.prefetch_hits;
  } else {
    s.referenced = true;
  }
  ++stats_.hits;
  note_access(block, stream);
}

void BlockCache::claim(std::uint32_t slot, std::uint64_t block) {
  Slot& s = slots_[slot];
  if (s.state == SlotState::Ready) {
    index_.erase(s.block);
    stats_.resident_bytes -= s.length;
    ++stats_.evictions;
  }
  if (s.prefetched) {
    --prefetched_unused_;
    ++stats_.prefetch_wasted;
  }
  s.block = block;
  s.state = SlotState::Loading;
  s.pins = 1;
  // A block earns its second chance only when read again: one big sequential scan then
  // recycles its own blocks first instead of flushing everything else.
  s.referenced = false;
  s.prefetched = false;
  index_[block] = slot;
}

void BlockCache::load(std::unique_lock<std::mutex>& lock, std::uint32_t slot, std::uint64_t block) {
  Slot& s = slots_[slot];
  lock.unlock();
  const std::uint64_t offset = block * block_size_;
  const auto length =
      static_cast<std::uint32_t>(std::min<std::uint64_t>(block_size_, source_.size() - offset));
  std::byte* dst = arena_.data() + static_cast<std::size_t>(slot) * block_size_;
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
}

void BlockCache::note_access(std::uint64_t block, StreamHint stream) {
  if (prefetch_depth_ == 0) return;
  const bool sequential = stream.starts || (block > 0 && std::find(recent_.begin(), recent_.end(),
                                                                   block - 1) != recent_.end());
  // Several requests fall in one block: remember it once, so that the ring spans more blocks
  // (and more concurrent streams).
  const auto last =
      static_cast<std::uint32_t>((recent_next_ + recent_.size() - 1) % recent_.size());
  if (recent_[last] != block) {
    recent_[recent_next_] = block;
    recent_next_ = (recent_next_ + 1) % recent_.size();
  }
  if (!sequential) return;
  bool queued = false;
  const auto queue = [&](std::uint64_t next) {
    if (index_.contains(next) ||
        std::find(prefetch_queue_.begin(), prefetch_queue_.end(), next) != prefetch_queue_.end()) {
      return;
    }
    if (prefetch_queue_.size() >= std::size_t{4} * prefetch_depth_)
      prefetch_queue_.pop_front();  // stale
    prefetch_queue_.push_back(next);
    queued = true;
  };
  const auto last_of = [this](std::uint64_t end) {
    return (std::min(source_.size(), std::max(end, std::uint64_t{1})) - 1) / block_size_;
  };
  std::uint32_t k = 1;
  for (const std::uint64_t last = last_of(stream.end); k <= prefetch_depth_ && block + k <= last;
       ++k) {
    queue(block + k);
  }
  // The stream ends within reach: the rest of the depth goes where its reader goes next.
  if (k <= prefetch_depth_ && stream.next_end > stream.next_begin &&
      stream.next_begin < source_.size()) {
    const std::uint64_t last = last_of(stream.next_end);
    for (std::uint64_t b = stream.next_begin / block_size_; k <= prefetch_depth_ && b <= last;
         ++k, ++b) {
      queue(b);
    }
  }
  if (queued) prefetch_wake_.notify_one();
}

std::uint32_t BlockCache::find_prefetch_slot() {
  const auto n = static_cast<std::uint32_t>(slots_.size());
  for (std::uint32_t step = 0; step < n; ++step) {
    const std::uint32_t i = (hand_ + step) % n;
    const Slot& s = slots_[i];
    if (s.state == SlotState::Free) return i;
    // Not a block in use: pinned, re-read, loaded ahead and waiting, or asked for lately
    // (CLOCK may just have cleared its bit before the reader's next visit).
    if (s.state == SlotState::Ready && s.pins == 0 && !s.referenced && !s.prefetched &&
        std::find(recent_.begin(), recent_.end(), s.block) == recent_.end()) {
      return i;
    }
  }
  return kNoSlot;
}

void BlockCache::enable_prefetch(std::uint32_t depth) {
  std::lock_guard lock(mu_);
  if (prefetch_depth_ != 0 || depth == 0) return;
  prefetch_depth_ = depth;
  prefetcher_ = std::thread([this] {
    pthread_setname_np(pthread_self(), "ckptfs-prefetch");  // for top -H, perf and tests
    prefetch_loop();
  });
}

void BlockCache::start_prefault() {
  if (prefaulter_.joinable()) return;
  prefaulter_ = std::thread([this] {
    pthread_setname_np(pthread_self(), "ckptfs-prefault");
    prefault_loop();
  });
}

void BlockCache::prefault_loop() {
  // SCHED_IDLE: any other thread that wants the CPU gets it first. Preempted inside a step,
  // this thread still holds the mapping lock (shared) that creating a thread (its stack)
  // needs exclusively, until an idle moment lets it finish: steps are one huge page (the
  // arena asks for them) to keep that short. From slot 0: the CLOCK hand hands out free
  // slots in that order, so what is backed first is what the first loads use.
  sched_param param{};
  pthread_setschedparam(pthread_self(), SCHED_IDLE, &param);
  constexpr std::size_t kStep = std::size_t{2} << 20;
  for (std::size_t offset = 0; offset < arena_.size(); offset += kStep) {
    if (prefault_stop_.load(std::memory_order_relaxed)) break;
    const std::size_t length = std::min(kStep, arena_.size() - offset);
    if (!arena_.populate(offset, length)) break;
    prefaulted_bytes_.fetch_add(length, std::memory_order_relaxed);
  }
  prefault_finished_.store(true);
}

void BlockCache::prefetch_loop() {
  std::unique_lock lock(mu_);
  for (;;) {
    prefetch_wake_.wait(lock, [this] { return stopping_ || !prefetch_queue_.empty(); });
    if (stopping_) return;
    const std::uint64_t block = prefetch_queue_.front();
    prefetch_queue_.pop_front();
    if (index_.contains(block) || prefetched_unused_ >= slots_.size() / 4) continue;
    const std::uint32_t slot = find_prefetch_slot();
    if (slot == kNoSlot) continue;
    claim(slot, block);
    // Prefetch takes a slot near the hand, the next place a miss looks for a victim. Without a
    // second chance the block would often be thrown away before its reader comes, and that
    // reader's miss would then take the next prefetched block, and so on (244 of 2137 blocks
    // read twice in a 2 GiB stream). With it, a block nobody asks for still ages out, so
    // prefetch never stalls on its quarter of the cache.
    slots_[slot].prefetched = true;
    slots_[slot].referenced = true;
    ++prefetched_unused_;
    ++stats_.prefetched;
    try {
      load(lock, slot, block);
    } catch (const std::exception&) {
      continue;  // the reader that wants it will read it itself, and see the error
    }
    if (--slots_[slot].pins == 0) changed_.notify_all();
  }
}

BlockCache::~BlockCache() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  prefetch_wake_.notify_all();
  if (prefetcher_.joinable()) prefetcher_.join();
  prefault_stop_.store(true);
  if (prefaulter_.joinable()) prefaulter_.join();  // before the arena is unmapped
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

BlockCache::Pin BlockCache::make_pin(std::uint32_t slot, std::uint64_t block,
                                     std::uint32_t length) {
  return Pin(this, slot, block * block_size_,
             std::span<const std::byte>(
                 arena_.data() + static_cast<std::size_t>(slot) * block_size_, length));
}

BlockCache::Pin BlockCache::pin(std::uint64_t offset, StreamHint stream) {
  if (offset >= source_.size()) {
    throw IoError(fmt::format("offset {} is outside {}", offset, source_.describe()), EIO);
  }
  const std::uint64_t block = offset / block_size_;
  const std::uint32_t slot = acquire(block, stream);
  std::uint32_t length;
  {
    std::lock_guard lock(mu_);
    length = slots_[slot].length;
  }
  return make_pin(slot, block, length);
}

std::optional<BlockCache::Pin> BlockCache::try_pin(std::uint64_t offset, StreamHint stream) {
  if (offset >= source_.size()) return std::nullopt;
  const std::uint64_t block = offset / block_size_;
  std::lock_guard lock(mu_);
  auto it = index_.find(block);
  if (it == index_.end() || slots_[it->second].state != SlotState::Ready) return std::nullopt;
  pin_ready(it->second, block, stream);
  return make_pin(it->second, block, slots_[it->second].length);
}

void BlockCache::read(std::uint64_t offset, std::span<std::byte> dst, StreamHint stream) {
  if (offset > source_.size() || dst.size() > source_.size() - offset) {
    throw IoError(
        fmt::format("read of {} bytes at {} is outside {}", dst.size(), offset, source_.describe()),
        EIO);
  }
  std::size_t done = 0;
  while (done < dst.size()) {
    Pin p = pin(offset + done, stream);
    std::size_t n = static_cast<std::size_t>(
        std::min<std::uint64_t>(p.end() - (offset + done), dst.size() - done));
    std::memcpy(dst.data() + done, p.at(offset + done), n);
    done += n;
  }
}

BlockCache::Stats BlockCache::stats() const {
  std::lock_guard lock(mu_);
  Stats out = stats_;
  out.prefault_finished = prefault_finished_.load();
  out.prefaulted_bytes = prefaulted_bytes_.load(std::memory_order_relaxed);
  return out;
}

}  // namespace ckptfs
