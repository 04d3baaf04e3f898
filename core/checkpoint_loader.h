// Opens a checkpoint and builds its catalog: format detection, the torch zip container,
// data.pkl, storage records.
#pragma once

#include <memory>

#include "byte_source.h"
#include "catalog.h"

namespace ckptfs {

struct LoadedCheckpoint {
  TensorCatalog catalog;
  // What tensor bytes are read from, when that is not the file itself (deflated zip records
  // are inflated through it). Refers to the file's source, which must outlive it.
  std::unique_ptr<ByteSource> data;
};

// Throws FormatError with a one-line, user-facing message when the input is not a checkpoint
// ckptfs can serve; IoError when it cannot be read.
LoadedCheckpoint load_checkpoint(const ByteSource& source);

}  // namespace ckptfs
