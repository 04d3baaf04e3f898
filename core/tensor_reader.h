// Serves byte ranges of a tensor file (the tensor's logical C-order, little-endian image)
// from the block cache: gathers strided views and byte-swaps big-endian checkpoints.
#pragma once

#include <cstdint>
#include <span>

#include "block_cache.h"
#include "catalog.h"

namespace ckptfs {

class TensorReader {
 public:
  TensorReader(const TensorCatalog& catalog, BlockCache& cache)
      : catalog_(catalog), cache_(cache) {}

  // Fills |dst| with bytes [offset, offset + dst.size()) of |t|'s file, which must lie within
  // t.nbytes(). Throws FormatError for a tensor with an error, IoError if the source fails.
  void read(const TensorInfo& t, std::uint64_t offset, std::span<std::byte> dst) const;

 private:
  void gather(const TensorInfo& t, const TensorLayout& layout, std::uint64_t offset,
              std::span<std::byte> dst) const;

  const TensorCatalog& catalog_;
  BlockCache& cache_;
};

}  // namespace ckptfs
