// BlockCache: a budgeted cache of fixed-size blocks of a ByteSource.
//
// All block memory is one anonymous mapping made at construction and reused forever: on these
// VMs first-touching fresh memory is far slower than the I/O, so nothing is allocated per miss.
// Loads are single-flight (two readers of one block cause one read of the source) and happen
// outside the lock; a block is pinned while a reply copies from it, so eviction (CLOCK) never
// recycles memory in use.
#pragma once

#include <array>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <mutex>
#include <optional>
#include <span>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "byte_source.h"
#include "stream_hint.h"

namespace ckptfs {

// An anonymous private mapping, unmapped on destruction.
class MappedRegion {
 public:
  explicit MappedRegion(std::size_t bytes);
  ~MappedRegion();
  MappedRegion(const MappedRegion&) = delete;
  MappedRegion& operator=(const MappedRegion&) = delete;
  std::byte* data() const { return data_; }
  std::size_t size() const { return size_; }
  // Backs [offset, offset + length) with memory as a write would, without writing: bytes
  // already there stay as they are, so it may run while blocks load. False if the kernel
  // cannot (before 5.14) or has no memory left.
  bool populate(std::size_t offset, std::size_t length) const;

 private:
  std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

class BlockCache {
 public:
  struct Stats {
    std::uint64_t limit_bytes = 0;
    std::uint64_t block_size = 0;
    std::uint64_t blocks = 0;
    std::uint64_t resident_bytes = 0;
    std::uint64_t hits = 0;
    std::uint64_t misses = 0;
    std::uint64_t evictions = 0;
    std::uint64_t bytes_read = 0;
    std::uint64_t read_errors = 0;
    std::uint64_t prefetched = 0;        // blocks loaded ahead of a sequential reader
    std::uint64_t prefetch_hits = 0;     // ... and then asked for
    std::uint64_t prefetch_wasted = 0;   // ... or evicted before anyone asked for them
    std::uint64_t prefaulted_bytes = 0;  // of the arena, backed by start_prefault()
    bool prefault_finished = false;      // ... which backs no more (all of it, or it failed)
  };

  // |capacity_bytes| is the budget; |block_size| 0 picks a size that gives at least
  // kMinBlocks blocks (at most 1 MiB, at least 64 KiB).
  BlockCache(const ByteSource& source, std::uint64_t capacity_bytes, std::uint32_t block_size = 0);
  BlockCache(const BlockCache&) = delete;
  BlockCache& operator=(const BlockCache&) = delete;
  ~BlockCache();

  // Readers that go through the source in order (a block asked for right after the one
  // before it, or a read whose StreamHint opens a stream) then get the next |depth| blocks
  // loaded ahead, by one background thread, so the source's latency overlaps their work: up
  // to the hint's end, then from its next_begin. Prefetch only takes free slots or blocks
  // nobody has re-read, never a pinned one nor another prefetched block not yet used, and
  // holds at most a quarter of the cache. Call once, before serving.
  void enable_prefetch(std::uint32_t depth);

  // Backs the arena with memory from a background thread at SCHED_IDLE, in the order the
  // slots are first filled, so that loads do not pay for the first touch of fresh memory
  // (slow on these VMs: about 1 GB/s, against 30 GB/s once touched) while a reader waits.
  // It only runs on a CPU nobody else wants; whatever it has not reached (or could not back:
  // kernels before 5.14) is backed by the loads themselves, as before. Call once, before
  // serving (after any fork).
  void start_prefault();

  // A block held in the cache while its owner copies from it (RAII: unpinned on destruction).
  class Pin {
   public:
    Pin(Pin&& other) noexcept
        : cache_(std::exchange(other.cache_, nullptr)),
          slot_(other.slot_),
          begin_(other.begin_),
          bytes_(other.bytes_) {}
    Pin& operator=(Pin&& other) noexcept;
    Pin(const Pin&) = delete;
    Pin& operator=(const Pin&) = delete;
    ~Pin() { reset(); }

    std::uint64_t begin() const { return begin_; }  // source offset of byte 0
    std::uint64_t end() const { return begin_ + bytes_.size(); }
    bool contains(std::uint64_t offset, std::uint64_t length) const {
      return offset >= begin_ && offset + length <= end();
    }
    const std::byte* at(std::uint64_t offset) const { return bytes_.data() + (offset - begin_); }

   private:
    friend class BlockCache;
    Pin(BlockCache* cache, std::uint32_t slot, std::uint64_t begin,
        std::span<const std::byte> bytes)
        : cache_(cache), slot_(slot), begin_(begin), bytes_(bytes) {}
    void reset();
    BlockCache* cache_;
    std::uint32_t slot_;
    std::uint64_t begin_;
    std::span<const std::byte> bytes_;
  };

  // Pins the block holding source byte |offset| (loading it if needed). Thread-safe. Throws
  // IoError if the source fails (nothing is cached for that block).
  Pin pin(std::uint64_t offset, StreamHint stream = {});
  // The same, but only if that block is already loaded; never loads, never waits. For callers
  // that already hold pins: waiting for a free slot while holding one could deadlock.
  std::optional<Pin> try_pin(std::uint64_t offset, StreamHint stream = {});

  // Copies source bytes [offset, offset + dst.size()) into |dst| through the cache.
  void read(std::uint64_t offset, std::span<std::byte> dst, StreamHint stream = {});

  Stats stats() const;
  std::uint32_t block_size() const { return block_size_; }

  static constexpr std::uint32_t kMinBlocks = 32;

 private:
  enum class SlotState : std::uint8_t { Free, Loading, Ready };
  struct Slot {
    std::uint64_t block = 0;
    std::uint32_t length = 0;
    std::uint32_t pins = 0;
    SlotState state = SlotState::Free;
    bool referenced = false;
    bool prefetched = false;  // loaded ahead and not yet asked for
  };
  static constexpr std::uint32_t kNoSlot = UINT32_MAX;

  std::uint32_t acquire(std::uint64_t block, StreamHint stream);
  // Pins Ready |slot| for |block|, counting a hit. Requires mu_.
  void pin_ready(std::uint32_t slot, std::uint64_t block, StreamHint stream);
  Pin make_pin(std::uint32_t slot, std::uint64_t block, std::uint32_t length);
  void release(std::uint32_t slot);
  std::uint32_t find_victim();  // requires mu_
  // Claims |slot| for |block| (evicting what it held), marked Loading and pinned. Requires mu_.
  void claim(std::uint32_t slot, std::uint64_t block);
  // Reads |block| into its claimed |slot| with mu_ released; Ready on success, Free (and the
  // exception rethrown) on failure.
  void load(std::unique_lock<std::mutex>& lock, std::uint32_t slot, std::uint64_t block);
  void note_access(std::uint64_t block,
                   StreamHint stream);  // requires mu_: spots sequential streams
  std::uint32_t find_prefetch_slot();   // requires mu_; clears no reference bit
  void prefetch_loop();

  const ByteSource& source_;
  std::uint32_t block_size_;
  MappedRegion arena_;
  mutable std::mutex mu_;
  std::condition_variable changed_;
  std::vector<Slot> slots_;
  std::unordered_map<std::uint64_t, std::uint32_t> index_;
  std::uint32_t hand_ = 0;
  Stats stats_;

  // Prefetch (all under mu_ except the thread itself).
  std::uint32_t prefetch_depth_ = 0;
  std::uint32_t prefetched_unused_ = 0;
  std::array<std::uint64_t, 16> recent_{};  // last blocks asked for, to spot streams
  std::uint32_t recent_next_ = 0;
  std::deque<std::uint64_t> prefetch_queue_;
  std::condition_variable prefetch_wake_;
  bool stopping_ = false;
  std::thread prefetcher_;

  // Prefault (atomics: its thread takes no lock).
  void prefault_loop();
  std::atomic<bool> prefault_stop_{false};
  std::atomic<bool> prefault_finished_{false};
  std::atomic<std::uint64_t> prefaulted_bytes_{0};
  std::thread prefaulter_;
};

}  // namespace ckptfs
