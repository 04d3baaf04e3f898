// The FUSE low-level adapter: maps inode numbers to catalog nodes and requests to the core.
// This is the only place where core exceptions become errno values.
#pragma once

#define FUSE_USE_VERSION 314
#include <fuse_lowlevel.h>

#include <atomic>
#include <ctime>

#include "block_cache.h"
#include "catalog.h"
#include "tensor_reader.h"

namespace ckptfs {

struct MountState {
  const TensorCatalog& catalog;
  BlockCache& cache;
  TensorReader reader;
  std::timespec mtime{};
  uid_t uid = 0;
  gid_t gid = 0;
  std::atomic<std::uint64_t> read_errors{0};
  std::atomic<std::uint64_t> logged_errors{0};

  MountState(const TensorCatalog& c, BlockCache& b) : catalog(c), cache(b), reader(c, b) {}
};

// The operation table; the session's userdata must be a MountState*.
const fuse_lowlevel_ops& fuse_operations();

// The JSON served at /.ckptfs/stats.
std::string render_stats(const MountState& state);

}  // namespace ckptfs
