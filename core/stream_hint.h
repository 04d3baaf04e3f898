// StreamHint: what a reader knows of the stream a read of checkpoint bytes belongs to, passed
// down to the block cache so that its prefetch reads only what that stream may want.
#pragma once

#include <cstdint>

namespace ckptfs {

// Records are not stored in the order readers take them (torch sorts its record names as
// text: data/1 is followed by data/10), so prefetch must not run on past a stream's record
// into whatever the file holds next.
struct StreamHint {
  std::uint64_t end = UINT64_MAX;  // source offset where the stream's bytes end
  // The read opens a stream (a large read at the start of a file, or the local header read
  // just before one): load ahead now, beside the reader's own miss, instead of after a second
  // block in order.
  bool starts = false;
  // Where the reader is likely to go once this stream ends: the next record in the
  // checkpoint's own order (a loop over a state dict reads data/7 after data/6, which the file
  // does not hold next). Prefetch reaching |end| goes on from there. Empty: nowhere known.
  std::uint64_t next_begin = 0;
  std::uint64_t next_end = 0;
};

}  // namespace ckptfs
