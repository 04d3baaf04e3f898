// The central directory of a zip archive, read through a ByteSource.
//
// A small walker of our own reads the central directory: names, sizes, methods and local-header
// offsets (libzip 1.7 has no call for the absolute offset of an entry's data, which the block
// cache needs to serve stored records). Stored records are read by that offset. libzip reads
// compressed records only, through a zip_source over the ByteSource (no local fd assumed); it
// is opened on the first such read, and its view of the directory is then cross-checked with
// ours, so a malformed archive cannot mean one thing to libzip and another to us. Opening it
// for every archive cost a 262,144-record checkpoint 0.13-0.2 s and 65 MB (an allocation and
// a mktime per entry) for records that are all stored.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "byte_source.h"
#include "name_map.h"

struct zip;  // libzip's zip_t

namespace ckptfs {

struct ZipEntry {
  // In the directory's own buffer, NUL-terminated (valid as long as the ZipDirectory).
  std::string_view name;
  std::uint64_t local_header_offset = 0;
  std::uint64_t compressed_size = 0;
  std::uint64_t size = 0;
  std::uint16_t method = 0;  // 0 = stored, 8 = deflate, ...
  std::uint16_t flags = 0;   // the general purpose bit flag
  // Its bytes are ciphertext: serving them would be wrong data.
  bool encrypted() const { return (flags & 1) != 0; }
};

// Where a stored record's data starts is only known from its local header: torch pads that
// header's extra field so the data is 64-byte aligned, and the central directory does not repeat
// the padding. Reading every local header at load time means reading the whole checkpoint when
// its records are small (one header per 4 KiB tensor), so loaders keep this reference instead
// and resolve it when the record is first read.
struct LocalHeaderRef {
  static constexpr std::size_t kSize = 30;  // the fixed part of a local header
  std::uint64_t offset = 0;                 // of the local header
  std::uint16_t name_size = 0;              // the central directory's (the local one must match)
  // The most extra-field bytes the header may declare before the record would run past the end
  // of the file (capped at the field's 65,535).
  std::uint16_t max_extra = 0;
};

// The offset of the record's first data byte, from the kSize bytes of its local header.
// Throws FormatError (naming |record|) when the header is not a local header, or disagrees
// with the central directory, or places the data past the end of the file.
std::uint64_t data_offset_from_local_header(
    std::span<const std::byte, LocalHeaderRef::kSize> header, const LocalHeaderRef& ref,
    std::string_view record);

// An archive's first record, read on its own (ZipDirectory::read_first_stored_record).
struct FirstRecord {
  std::string name;
  std::uint64_t local_header_offset = 0;
  std::uint64_t size = 0;
  std::string bytes;
};
class ZipDirectory {
 public:
  // Throws FormatError if |source| is not a readable zip archive.
  explicit ZipDirectory(const ByteSource& source);
  // In two steps, for a caller that indexes on another thread: this constructor reads the end
  // record and allocates every table (FormatError if there is no sound end record); index()
  // then reads the directory and fills them (FormatError for a bad entry), allocating nothing
  // but that error, since what a thread allocates stays in its own malloc arena, whose free top
  // glibc does not give back (12 MB more resident after mounting 262,144 tensors). Nothing else
  // may be called before index() returns.
  struct Deferred {};
  ZipDirectory(const ByteSource& source, Deferred);
  void index();

  // The archive's first record, read from its first directory entry alone (a few small reads),
  // for a caller that wants it before, or while, index() runs: torch writes its data.pkl there.
  // Callable from the constructor on; call it before starting index() on another thread.
  // nullopt unless |wanted| accepts its name (asked before anything else is read) and it is
  // stored, unencrypted, at most |max_bytes| long, with sound headers; damage also gives
  // nullopt (index() or read_entry() then says what is wrong). The bytes are those
  // read_entry() reads for it.
  std::optional<FirstRecord> read_first_stored_record(std::uint64_t max_bytes,
                                                      bool (*wanted)(std::string_view name)) const;
  ~ZipDirectory();
  ZipDirectory(const ZipDirectory&) = delete;
  ZipDirectory& operator=(const ZipDirectory&) = delete;

  const std::vector<ZipEntry>& entries() const { return entries_; }
  const ZipEntry* find(std::string_view name) const;

  // Absolute offset of the entry's first data byte (read from its local header, whose extra
  // field length differs from the central one because torch pads it for alignment).
  // Throws FormatError if the local header is malformed or the data runs past the file.
  // Not thread-safe (headers are read through a read-ahead window); use at load time only.
  std::uint64_t data_offset(const ZipEntry& entry) const;
  // What data_offset() needs, without reading anything. Throws FormatError when the record
  // cannot fit in the file whatever its local header says.
  LocalHeaderRef local_header_ref(const ZipEntry& entry) const;

  // The whole (decompressed) content of a small record. Throws FormatError if it is larger
  // than |max_bytes|. Not thread-safe (libzip handles are not); use at load time only.
  std::string read_entry(const ZipEntry& entry, std::uint64_t max_bytes) const;

  // Frees libzip's copy of the central directory if a compressed record opened it (a few
  // hundred bytes per entry: ~65 MB for 262,144 records), once the records that need it
  // (read_entry of compressed ones) are read.
  // entries(), find() and data_offset() keep working; read_entry() of a compressed record
  // then throws FormatError.
  void release_archive();

 private:
  struct LibzipState;
  void cross_check_with_libzip() const;
  // libzip's handle, opened (and cross-checked) on first use. Throws FormatError after
  // release_archive(), or if libzip cannot read the archive.
  ::zip* libzip_archive(const ZipEntry& entry) const;

  const ByteSource& source_;
  std::unique_ptr<LibzipState> libzip_;
  // The raw central directory, from the constructor until index() has walked it.
  std::unique_ptr<std::byte[]> cd_;
  std::uint64_t cd_offset_ = 0;
  std::uint64_t cd_size_ = 0;
  std::uint64_t count_ = 0;
  // Every entry's name, NUL-terminated, one after another: one allocation, not one per entry.
  std::unique_ptr<char[]> names_;
  std::vector<ZipEntry> entries_;
  // Index into entries_ by name (a flat table: no heap node per entry).
  NameMap<std::uint32_t> by_name_;
};

}  // namespace ckptfs
