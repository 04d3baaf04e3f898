// Serves byte ranges of a tensor file (the tensor's logical C-order, little-endian image)
// from the block cache: gathers strided views and byte-swaps big-endian checkpoints.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

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

  // The same bytes as pieces of cache blocks, pinned (in |pins|) until the caller drops them:
  // a reply can then hand the kernel the cache's memory, without a copy of our own. Only when
  // every block is already loaded (no waiting while holding pins), no byte needs transforming
  // (byte swap, math bits) and it takes at most |max_pieces| pieces; otherwise returns false
  // with nothing pinned, and read() is the way. |pins| and |pieces| are appended to (reused
  // by the caller).
  bool pin_pieces(const TensorInfo& t, std::uint64_t offset, std::uint64_t length,
                  std::vector<BlockCache::Pin>& pins,
                  std::vector<std::span<const std::byte>>& pieces, std::size_t max_pieces) const;

 private:
  // Throws what read() documents: the tensor has an error, or the range is not in its file.
  void check_range(const TensorInfo& t, std::uint64_t offset, std::uint64_t length) const;
  // The bytes a big-endian swap reverses: the element, or each half of a complex one.
  static std::uint32_t swap_unit(const TensorInfo& t);
  // Whether the served bytes differ from the stored ones (byte swap, math bits).
  bool transformed(const TensorInfo& t) const;
  void gather(const TensorInfo& t, const TensorLayout& layout, std::uint64_t offset,
              std::span<std::byte> dst) const;
  // The cache stream of a read of |length| bytes at |offset| of |t|, whose storage starts at
  // source offset |base|: prefetch stays inside the storage's record, and a large read at the
  // start of the file opens a stream.
  StreamHint stream_of(const TensorInfo& t, std::uint64_t base, std::uint64_t offset,
                       std::uint64_t length) const;
  // A read this large at offset 0 is a reader taking the whole file (the kernel's readahead or
  // a streaming read()), not a peek at its first bytes: the kernel's own first readahead
  // window for a small read is a few pages.
  static constexpr std::uint64_t kStreamStartBytes = std::uint64_t{128} << 10;
  static bool opens_stream(std::uint64_t offset, std::uint64_t length) {
    return offset == 0 && length >= kStreamStartBytes;
  }

  const TensorCatalog& catalog_;
  BlockCache& cache_;
};

}  // namespace ckptfs
