#include "segmented_source.h"

#include <fmt/format.h>
#include <zlib.h>

#include <algorithm>
#include <cstring>

#include "errors.h"

namespace ckptfs {

std::uint64_t SegmentedSource::append(std::unique_ptr<ByteSource> segment) {
  std::uint64_t start = append_ref(*segment);
  segments_.back().owned = std::move(segment);
  return start;
}

std::uint64_t SegmentedSource::append_ref(const ByteSource& segment) {
  // Aligned starts: no cache block (at most kAlign bytes) ever spans two segments.
  std::uint64_t start = (size_ + kAlign - 1) / kAlign * kAlign;
  size_ = start + segment.size();
  segments_.push_back({start, &segment, nullptr});
  return start;
}

void SegmentedSource::drop_cache() const {
  file_.drop_cache();
  for (const Segment& s : segments_) s.source->drop_cache();
}

bool SegmentedSource::changed() const {
  return file_.changed() || std::any_of(segments_.begin(), segments_.end(),
                                        [](const Segment& s) { return s.source->changed(); });
}

void SegmentedSource::read_at(std::uint64_t offset, std::span<std::byte> dst) const {
  if (offset > size_ || dst.size() > size_ - offset) {
    throw IoError(
        fmt::format("read of {} bytes at {} is outside {}", dst.size(), offset, describe()), EIO);
  }
  std::size_t done = 0;
  while (done < dst.size()) {
    const std::uint64_t pos = offset + done;
    const std::size_t left = dst.size() - done;
    if (pos < file_.size()) {
      std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(left, file_.size() - pos));
      file_.read_at(pos, dst.subspan(done, n));
      done += n;
      continue;
    }
    // The segment holding |pos|, or the gap before the next one.
    auto it = std::upper_bound(segments_.begin(), segments_.end(), pos,
                               [](std::uint64_t p, const Segment& s) { return p < s.start; });
    if (it != segments_.begin()) {
      const Segment& s = *std::prev(it);
      if (pos < s.start + s.source->size()) {
        std::size_t n = static_cast<std::size_t>(
            std::min<std::uint64_t>(left, s.start + s.source->size() - pos));
        s.source->read_at(pos - s.start, dst.subspan(done, n));
        done += n;
        continue;
      }
    }
    std::uint64_t gap_end = it == segments_.end() ? size_ : it->start;
    std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(left, gap_end - pos));
    std::memset(dst.data() + done, 0, n);
    done += n;
  }
}

void SegmentedSource::read_block(std::uint64_t offset, std::span<std::byte> block,
                                 std::size_t length) const {
  if (offset + length <= file_.size()) {
    file_.read_block(offset, block, length);  // keeps O_DIRECT for the file itself
    return;
  }
  // A block inside one segment is that segment's block read (O_DIRECT for shard files).
  auto it = std::upper_bound(segments_.begin(), segments_.end(), offset,
                             [](std::uint64_t p, const Segment& s) { return p < s.start; });
  if (it != segments_.begin()) {
    const Segment& s = *std::prev(it);
    if (offset + length <= s.start + s.source->size()) {
      s.source->read_block(offset - s.start, block, length);
      return;
    }
  }
  read_at(offset, block.first(length));
}

struct InflatedRecord::Stream {
  z_stream z{};
  std::uint64_t out_pos = 0;  // bytes of the record produced so far
  std::uint64_t in_pos = 0;   // compressed bytes handed to zlib so far
  std::vector<Bytef> in;
  Stream() : in(64u << 10) {}
  ~Stream() { inflateEnd(&z); }
};

InflatedRecord::InflatedRecord(const ByteSource& file, std::uint64_t data_offset,
                               std::uint64_t compressed_size, std::uint64_t size, std::string name)
    : file_(file),
      data_offset_(data_offset),
      compressed_size_(compressed_size),
      size_(size),
      name_(std::move(name)) {}

InflatedRecord::~InflatedRecord() = default;

void InflatedRecord::restart() const {
  stream_ = std::make_unique<Stream>();
  // Raw deflate (no zlib header), as zip stores it.
  if (inflateInit2(&stream_->z, -MAX_WBITS) != Z_OK) {
    stream_.reset();
    throw IoError(fmt::format("cannot start inflating '{}'", name_), ENOMEM);
  }
}

void InflatedRecord::inflate_into(std::byte* dst, std::size_t n) const {
  Stream& s = *stream_;
  s.z.next_out = reinterpret_cast<Bytef*>(dst);
  s.z.avail_out = static_cast<uInt>(n);
  while (s.z.avail_out > 0) {
    if (s.z.avail_in == 0) {
      std::uint64_t chunk = std::min<std::uint64_t>(s.in.size(), compressed_size_ - s.in_pos);
      if (chunk == 0)
        throw IoError(fmt::format("deflated record '{}' ends early (corrupt?)", name_), EIO);
      file_.read_at(data_offset_ + s.in_pos, std::as_writable_bytes(std::span(s.in.data(), chunk)));
      s.in_pos += chunk;
      s.z.next_in = s.in.data();
      s.z.avail_in = static_cast<uInt>(chunk);
    }
    int rc = inflate(&s.z, Z_NO_FLUSH);
    if (rc == Z_STREAM_END && s.z.avail_out > 0) {
      throw IoError(fmt::format("deflated record '{}' is shorter than its declared size", name_),
                    EIO);
    }
    if (rc != Z_OK && rc != Z_STREAM_END) {
      throw IoError(fmt::format("deflated record '{}' is corrupt ({})", name_,
                                s.z.msg ? s.z.msg : "zlib error"),
                    EIO);
    }
  }
  s.out_pos += n;
}

void InflatedRecord::read_at(std::uint64_t offset, std::span<std::byte> dst) const {
  if (offset > size_ || dst.size() > size_ - offset) {
    throw IoError(fmt::format("read of {} bytes at {} is outside '{}'", dst.size(), offset, name_),
                  EIO);
  }
  std::lock_guard lock(mu_);
  try {
    if (!stream_ || offset < stream_->out_pos) restart();
    std::byte skip[16384];
    while (stream_->out_pos < offset) {
      inflate_into(skip, static_cast<std::size_t>(
                             std::min<std::uint64_t>(sizeof(skip), offset - stream_->out_pos)));
    }
    inflate_into(dst.data(), dst.size());
    if (stream_->out_pos == size_) stream_.reset();  // read to the end: free zlib's state
  } catch (...) {
    stream_.reset();
    throw;
  }
}

}  // namespace ckptfs
