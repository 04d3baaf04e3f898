// SegmentedSource: one address space over several byte providers, so that the block cache
// and the catalog only ever deal in offsets. The checkpoint file sits at [0, size); further
// segments (deflated zip records inflated on demand; the other files of a sharded checkpoint)
// follow at 1 MiB-aligned offsets. Gaps between segments read as zeros and are never referenced.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "byte_source.h"

namespace ckptfs {

class SegmentedSource final : public ByteSource {
 public:
  explicit SegmentedSource(const ByteSource& file) : file_(file), size_(file.size()) {}

  // Adds |segment| after the others; returns the offset where its byte 0 now lives.
  // Not thread-safe: build the source before serving from it.
  std::uint64_t append(std::unique_ptr<ByteSource> segment);
  // The same for a source owned elsewhere, which must outlive this one.
  std::uint64_t append_ref(const ByteSource& segment);

  std::uint64_t size() const override { return size_; }
  void read_at(std::uint64_t offset, std::span<std::byte> dst) const override;
  void read_block(std::uint64_t offset, std::span<std::byte> block,
                  std::size_t length) const override;
  std::timespec mtime() const override { return file_.mtime(); }
  std::string describe() const override { return file_.describe(); }
  void drop_cache() const override;
  std::string cache_mode() const override { return file_.cache_mode(); }
  bool changed() const override;

  static constexpr std::uint64_t kAlign = 1u << 20;

 private:
  struct Segment {
    std::uint64_t start;
    const ByteSource* source;
    std::unique_ptr<ByteSource> owned;  // null when the segment is owned elsewhere
  };
  const ByteSource& file_;
  std::vector<Segment> segments_;
  std::uint64_t size_;
};

// A deflated zip record, inflated on demand with zlib. Reads that move forward continue the
// stream; a read before the current position restarts it from the record's first byte (the
// cost of random access into deflate, documented in docs/formats.md). The stream is released
// once the record has been read to its end.
class InflatedRecord final : public ByteSource {
 public:
  InflatedRecord(const ByteSource& file, std::uint64_t data_offset, std::uint64_t compressed_size,
                 std::uint64_t size, std::string name);
  ~InflatedRecord() override;

  std::uint64_t size() const override { return size_; }
  void read_at(std::uint64_t offset, std::span<std::byte> dst) const override;
  std::timespec mtime() const override { return file_.mtime(); }
  std::string describe() const override { return name_; }

 private:
  struct Stream;
  void restart() const;
  void inflate_into(std::byte* dst, std::size_t n) const;  // requires mu_

  const ByteSource& file_;
  std::uint64_t data_offset_;
  std::uint64_t compressed_size_;
  std::uint64_t size_;
  std::string name_;
  mutable std::mutex mu_;
  mutable std::unique_ptr<Stream> stream_;
};

}  // namespace ckptfs
