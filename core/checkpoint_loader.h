// Opens a checkpoint and builds its catalog: format detection, the torch zip container,
// data.pkl, storage records.
#pragma once

#include "byte_source.h"
#include "catalog.h"

namespace ckptfs {

// Throws FormatError with a one-line, user-facing message when the input is not a checkpoint
// ckptfs can serve; IoError when it cannot be read.
TensorCatalog load_checkpoint(const ByteSource& source);

}  // namespace ckptfs
