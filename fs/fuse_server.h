// The FUSE low-level adapter: maps inode numbers to catalog nodes and requests to the core.
// This is the only place where core exceptions become errno values.
#pragma once

#define FUSE_USE_VERSION 314
#include <fuse_lowlevel.h>

#include <algorithm>
#include <atomic>
#include <ctime>
#include <memory>
#include <mutex>
#include <span>
#include <string>

#include "block_cache.h"
#include "byte_source.h"
#include "catalog.h"
#include "kernel_notifier.h"
#include "kernel_page_ledger.h"
#include "known_inodes.h"
#include "mount_lister.h"
#include "safetensors_view.h"
#include "tensor_reader.h"

namespace ckptfs {

struct MountState {
  const TensorCatalog& catalog;
  const ByteSource& source;
  BlockCache& cache;
  KernelPageLedger& ledger;
  KernelNotifier* notifier = nullptr;  // set once the session exists
  // The most a LOOKUP of a tensor file has the notifier store of it ahead of the reader's first
  // read (op_lookup says why); 0: never (--no-preload).
  std::uint64_t preload_bytes = 0;
  std::uint64_t limit_bytes = 0;
  // The scheduler slice request threads run with (scheduler_slice.h); 0: unknown, the kernel's.
  std::uint64_t request_slice_ns = 0;
  TensorReader reader;
  std::timespec mtime{};
  uid_t uid = 0;
  gid_t gid = 0;
  std::atomic<std::uint64_t> read_errors{0};
  bool xattrs = true;  // false: getxattr/listxattr answer ENOSYS, which the kernel remembers
  std::atomic<bool> initialized{false};  // the kernel's INIT has been answered
  std::atomic<std::uint64_t> logged_errors{0};
  // A tensor known broken at load time must fail at open(), so OPEN requests are needed.
  const bool opens_needed;
  // Set at INIT: the kernel stops sending OPEN and RELEASE after the first open answers ENOSYS.
  std::atomic<bool> skip_opens{false};
  // The stats file's mtime: a new value on every getattr, so that the kernel drops its page.
  mutable std::atomic<std::int64_t> stats_mtime_ns{0};
  // The inodes the kernel holds: the files a preload ahead of a reader can store into.
  KnownInodes known;
  const MountLister* lister = nullptr;  // set before mounting; stats show what it listed

  MountState(const TensorCatalog& c, const ByteSource& src, BlockCache& b, KernelPageLedger& l)
      : catalog(c),
        source(src),
        cache(b),
        ledger(l),
        reader(c, b),
        opens_needed(std::ranges::any_of(c.tensors(),
                                         [](const TensorInfo& t) { return !t.error().empty(); })),
        known(c.node_count()) {}

  // /.ckptfs/model.safetensors, laid out on first use (its header is large for big
  // checkpoints, and most mounts never look at it). Throws FormatError if it cannot exist.
  const SafetensorsView& safetensors() const {
    std::call_once(safetensors_once_, [this] {
      safetensors_ = std::make_unique<SafetensorsView>(catalog, source.describe());
    });
    return *safetensors_;
  }

 private:
  mutable std::once_flag safetensors_once_;
  mutable std::unique_ptr<SafetensorsView> safetensors_;
};

// The operation table; the session's userdata must be a MountState*.
const fuse_lowlevel_ops& fuse_operations();

// Copies the bytes of file |ino| at |offset| into |out|, as a READ would serve them, for the
// notifier's preloads; returns how many (0 for anything but a tensor's raw and .npy files).
// Throws what reading the checkpoint throws.
std::size_t read_for_preload(MountState& s, std::uint64_t ino, std::uint64_t offset,
                             std::span<std::byte> out);

// The JSON served at /.ckptfs/stats.
std::string render_stats(const MountState& state);

}  // namespace ckptfs
