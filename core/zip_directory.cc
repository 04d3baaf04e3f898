#include "zip_directory.h"

#include <fmt/format.h>
#include <zip.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "errors.h"
#include "little_endian.h"
#include "read_ahead.h"

namespace ckptfs {
namespace {

constexpr std::uint32_t kLocalHeaderSig = 0x04034b50;
constexpr std::uint32_t kCentralHeaderSig = 0x02014b50;
constexpr std::uint32_t kEndOfCentralDirSig = 0x06054b50;
constexpr std::uint32_t kZip64LocatorSig = 0x07064b50;
constexpr std::uint32_t kZip64EndSig = 0x06064b50;
constexpr std::size_t kEocdSize = 22;
constexpr std::size_t kZip64LocatorSize = 20;
constexpr std::size_t kZip64EndSize = 56;
constexpr std::size_t kCentralHeaderSize = 46;
constexpr std::size_t kLocalHeaderSize = LocalHeaderRef::kSize;
constexpr std::uint64_t kMaxEntries = 16u << 20;

// libzip calls back into this to read the archive through the ByteSource. A central
// directory too large for libzip's tail buffer is read entry by entry, in two small reads
// each: the read-ahead window turns those into one source read per 256 KiB (a 262,144-entry
// archive otherwise costs half a million system calls to open).
struct SourceContext {
  explicit SourceContext(const ByteSource& s) : source(&s), reader(s) {}
  const ByteSource* source;
  ReadAhead reader;
  std::uint64_t position = 0;
  zip_error_t error{};
};

zip_int64_t source_callback(void* userdata, void* data, zip_uint64_t len, zip_source_cmd_t cmd) {
  auto* ctx = static_cast<SourceContext*>(userdata);
  switch (cmd) {
    case ZIP_SOURCE_OPEN:
      ctx->position = 0;
      return 0;
    case ZIP_SOURCE_READ: {
      std::uint64_t size = ctx->source->size();
      std::uint64_t n =
          ctx->position >= size ? 0 : std::min<std::uint64_t>(len, size - ctx->position);
      try {
        ctx->reader.read(ctx->position, std::span<std::byte>(static_cast<std::byte*>(data), n));
      } catch (const IoError& e) {
        zip_error_set(&ctx->error, ZIP_ER_READ, e.error_number());
        return -1;
      }
      ctx->position += n;
      return static_cast<zip_int64_t>(n);
    }
    case ZIP_SOURCE_CLOSE:
    case ZIP_SOURCE_FREE:
      return 0;
    case ZIP_SOURCE_STAT: {
      auto* st = static_cast<zip_stat_t*>(data);
      zip_stat_init(st);
      st->size = ctx->source->size();
      st->valid |= ZIP_STAT_SIZE;
      return sizeof(*st);
    }
    case ZIP_SOURCE_ERROR:
      return zip_error_to_data(&ctx->error, data, len);
    case ZIP_SOURCE_SEEK: {
      zip_int64_t pos = zip_source_seek_compute_offset(ctx->position, ctx->source->size(), data,
                                                       len, &ctx->error);
      if (pos < 0) {
        return -1;
      }
      ctx->position = static_cast<std::uint64_t>(pos);
      return 0;
    }
    case ZIP_SOURCE_TELL:
      return static_cast<zip_int64_t>(ctx->position);
    case ZIP_SOURCE_SUPPORTS:
      return zip_source_make_command_bitmap(
          ZIP_SOURCE_OPEN, ZIP_SOURCE_READ, ZIP_SOURCE_CLOSE, ZIP_SOURCE_STAT, ZIP_SOURCE_ERROR,
          ZIP_SOURCE_FREE, ZIP_SOURCE_SEEK, ZIP_SOURCE_TELL, ZIP_SOURCE_SUPPORTS, -1);
    default:
      zip_error_set(&ctx->error, ZIP_ER_OPNOTSUPP, 0);
      return -1;
  }
}

std::string libzip_message(zip_error_t* error) {
  return zip_error_strerror(error);
}

}  // namespace

struct ZipDirectory::LibzipState {
  explicit LibzipState(const ByteSource& source) : context(source), headers(source) {
    zip_error_init(&context.error);
  }
  SourceContext context;
  ReadAhead headers;  // local headers, read in record order by data_offset()
  zip_t* archive = nullptr;
  bool released = false;
  ~LibzipState() {
    if (archive != nullptr) {
      zip_discard(archive);
    }
    zip_error_fini(&context.error);
  }
};

::zip* ZipDirectory::libzip_archive(const ZipEntry& entry) const {
  if (libzip_->archive != nullptr) return libzip_->archive;
  if (libzip_->released) {
    throw FormatError(
        fmt::format("zip entry '{}' is compressed and the archive was released", entry.name));
  }
  zip_error_t error;
  zip_error_init(&error);
  zip_source_t* zs = zip_source_function_create(source_callback, &libzip_->context, &error);
  if (zs == nullptr) {
    std::string msg = libzip_message(&error);
    zip_error_fini(&error);
    throw FormatError("cannot read zip: " + msg);
  }
  libzip_->archive = zip_open_from_source(zs, ZIP_RDONLY, &error);
  if (libzip_->archive == nullptr) {
    zip_source_free(zs);
    std::string msg = libzip_message(&error);
    zip_error_fini(&error);
    throw FormatError("not a readable zip archive (" + msg + ")");
  }
  zip_error_fini(&error);
  cross_check_with_libzip();
  return libzip_->archive;
}

ZipDirectory::~ZipDirectory() = default;

const ZipEntry* ZipDirectory::find(std::string_view name) const {
  const std::uint32_t* i = by_name_.find(name);
  return i == nullptr ? nullptr : &entries_[*i];
}

namespace {

struct CentralDirectorySpan {
  std::uint64_t offset = 0;
  std::uint64_t size = 0;
  std::uint64_t count = 0;
};

// Where the central directory is, from the end record (and its zip64 form). Throws FormatError.
CentralDirectorySpan locate_central_directory(const ByteSource& source) {
  const std::uint64_t file_size = source.size();
  if (file_size < kEocdSize) {
    throw FormatError("zip is too small to hold an end-of-central-directory record");
  }
  // The EOCD is followed by a comment of at most 65535 bytes.
  std::uint64_t tail_len = std::min<std::uint64_t>(file_size, kEocdSize + 0xFFFF);
  std::vector<std::byte> tail(tail_len);
  source.read_at(file_size - tail_len, tail);
  std::int64_t eocd_in_tail = -1;
  for (std::int64_t i = static_cast<std::int64_t>(tail_len - kEocdSize); i >= 0; --i) {
    if (load_le<std::uint32_t>(tail.data() + i) == kEndOfCentralDirSig) {
      eocd_in_tail = i;
      break;
    }
  }
  if (eocd_in_tail < 0) {
    throw FormatError("zip end-of-central-directory record not found");
  }
  const std::byte* eocd = tail.data() + eocd_in_tail;
  const std::uint64_t eocd_pos = file_size - tail_len + static_cast<std::uint64_t>(eocd_in_tail);
  std::uint64_t disk = load_le<std::uint16_t>(eocd + 4);
  std::uint64_t cd_disk = load_le<std::uint16_t>(eocd + 6);
  std::uint64_t count_here = load_le<std::uint16_t>(eocd + 8);
  std::uint64_t count = load_le<std::uint16_t>(eocd + 10);
  std::uint64_t cd_size = load_le<std::uint32_t>(eocd + 12);
  std::uint64_t cd_offset = load_le<std::uint32_t>(eocd + 16);

  if (eocd_pos >= kZip64LocatorSize) {
    std::array<std::byte, kZip64LocatorSize> loc{};
    source.read_at(eocd_pos - kZip64LocatorSize, loc);
    if (load_le<std::uint32_t>(loc.data()) == kZip64LocatorSig) {
      std::uint64_t z64_pos = load_le<std::uint64_t>(loc.data() + 8);
      if (z64_pos > file_size || file_size - z64_pos < kZip64EndSize) {
        throw FormatError("zip64 end-of-central-directory offset lies outside the file");
      }
      std::array<std::byte, kZip64EndSize> z64{};
      source.read_at(z64_pos, z64);
      if (load_le<std::uint32_t>(z64.data()) != kZip64EndSig) {
        throw FormatError("zip64 end-of-central-directory record is corrupt");
      }
      disk = load_le<std::uint32_t>(z64.data() + 16);
      cd_disk = load_le<std::uint32_t>(z64.data() + 20);
      count_here = load_le<std::uint64_t>(z64.data() + 24);
      count = load_le<std::uint64_t>(z64.data() + 32);
      cd_size = load_le<std::uint64_t>(z64.data() + 40);
      cd_offset = load_le<std::uint64_t>(z64.data() + 48);
    }
  }
  // Split archives (zip -s) keep part of the directory or the data in other files.
  if (disk != 0 || cd_disk != 0 || count_here != count) {
    throw FormatError("zip archive is split across several files (multi-disk), not supported");
  }
  if (cd_offset > file_size || cd_size > file_size - cd_offset) {
    throw FormatError("zip central directory lies outside the file");
  }
  if (count > kMaxEntries || count * kCentralHeaderSize > cd_size) {
    throw FormatError(
        fmt::format("zip declares {} entries, more than its directory can hold", count));
  }
  return {cd_offset, cd_size, count};
}

// The central-directory entry |index| at the start of |h| (|available| bytes of directory
// left), zip64 sizes and offset applied. Its name views |h|. Sets |entry_len| to the bytes
// the entry takes. Throws FormatError when it is corrupt or truncated.
ZipEntry parse_central_entry(const std::byte* h, std::size_t available, std::uint64_t index,
                             std::size_t& entry_len) {
  if (available < kCentralHeaderSize || load_le<std::uint32_t>(h) != kCentralHeaderSig) {
    throw FormatError(fmt::format("zip central directory entry {} is corrupt", index));
  }
  ZipEntry e;
  e.flags = load_le<std::uint16_t>(h + 8);
  e.method = load_le<std::uint16_t>(h + 10);
  e.compressed_size = load_le<std::uint32_t>(h + 20);
  e.size = load_le<std::uint32_t>(h + 24);
  const std::size_t name_len = load_le<std::uint16_t>(h + 28);
  const std::size_t extra_len = load_le<std::uint16_t>(h + 30);
  const std::size_t comment_len = load_le<std::uint16_t>(h + 32);
  e.local_header_offset = load_le<std::uint32_t>(h + 42);
  const std::size_t var_len = name_len + extra_len + comment_len;
  if (available - kCentralHeaderSize < var_len) {
    throw FormatError(fmt::format("zip central directory entry {} is truncated", index));
  }
  const std::byte* name = h + kCentralHeaderSize;
  e.name = std::string_view(reinterpret_cast<const char*>(name), name_len);
  // ZIP64 extra field: the 64-bit values follow in a fixed order, present only for the
  // fields whose 32-bit slot is saturated.
  const std::byte* extra = name + name_len;
  std::size_t x = 0;
  while (x + 4 <= extra_len) {
    std::uint16_t id = load_le<std::uint16_t>(extra + x);
    std::uint16_t len = load_le<std::uint16_t>(extra + x + 2);
    if (x + 4 + len > extra_len) {
      break;
    }
    if (id == 0x0001) {
      const std::byte* p = extra + x + 4;
      std::size_t left = len;
      auto take = [&](std::uint64_t& field) {
        if (field == 0xFFFFFFFFu) {
          if (left < 8) {
            throw FormatError(fmt::format("zip64 extra field of '{}' is truncated", e.name));
          }
          field = load_le<std::uint64_t>(p);
          p += 8;
          left -= 8;
        }
      };
      take(e.size);
      take(e.compressed_size);
      take(e.local_header_offset);
    }
    x += 4 + len;
  }
  entry_len = kCentralHeaderSize + var_len;
  return e;
}

// What data_offset_from_local_header() needs for a record, from the central directory alone.
// Throws FormatError when the record cannot fit in the file whatever its local header says.
LocalHeaderRef header_ref(std::uint64_t file_size, const ZipEntry& entry) {
  if (entry.local_header_offset > file_size ||
      file_size - entry.local_header_offset < kLocalHeaderSize) {
    throw FormatError(fmt::format("zip entry '{}' points outside the file", entry.name));
  }
  // Room after the fixed header for the name, the extra field and the data.
  const std::uint64_t room = file_size - entry.local_header_offset - kLocalHeaderSize;
  if (entry.name.size() > 0xffff || entry.compressed_size > room ||
      room - entry.compressed_size < entry.name.size()) {
    throw FormatError(
        fmt::format("zip entry '{}' runs past the end of the file (truncated?)", entry.name));
  }
  LocalHeaderRef ref;
  ref.offset = entry.local_header_offset;
  ref.name_size = static_cast<std::uint16_t>(entry.name.size());
  ref.max_extra = static_cast<std::uint16_t>(
      std::min<std::uint64_t>(0xffff, room - entry.compressed_size - entry.name.size()));
  return ref;
}

}  // namespace

ZipDirectory::ZipDirectory(const ByteSource& source) : ZipDirectory(source, Deferred{}) {
  index();
}

ZipDirectory::ZipDirectory(const ByteSource& source, Deferred)
    : source_(source), libzip_(std::make_unique<LibzipState>(source)) {
  const CentralDirectorySpan cd = locate_central_directory(source_);
  cd_offset_ = cd.offset;
  count_ = cd.count;
  // Allocated here, touched by index(). Not zeroed: the read fills it (first touches of fresh
  // memory are what loading costs).
  cd_ = std::make_unique_for_overwrite<std::byte[]>(cd.size);
  cd_size_ = cd.size;
  // The names take less than the directory that holds them.
  names_ = std::make_unique_for_overwrite<char[]>(cd.size);
  entries_.reserve(cd.count);
  by_name_.reserve(cd.count);
}

void ZipDirectory::index() {
  source_.read_at(cd_offset_, std::span(cd_.get(), cd_size_));
  std::size_t names_used = 0;
  std::size_t pos = 0;
  for (std::uint64_t i = 0; i < count_; ++i) {
    std::size_t len = 0;
    ZipEntry e = parse_central_entry(cd_.get() + pos, cd_size_ - pos, i, len);
    // Each entry holds its name after a 46-byte header, inside |cd_size_|: the names and their
    // NULs fit in |cd_size_| bytes.
    char* kept = names_.get() + names_used;
    std::memcpy(kept, e.name.data(), e.name.size());
    kept[e.name.size()] = '\0';
    names_used += e.name.size() + 1;
    e.name = std::string_view(kept, e.name.size());
    entries_.push_back(e);
    pos += len;
  }
  for (std::size_t i = 0; i < entries_.size(); ++i) {
    bool added = false;
    by_name_.add(entries_[i].name, static_cast<std::uint32_t>(i), &added);
    if (!added) throw FormatError(fmt::format("zip has two entries named '{}'", entries_[i].name));
  }
  cd_.reset();
}

void ZipDirectory::cross_check_with_libzip() const {
  zip_int64_t n = zip_get_num_entries(libzip_->archive, 0);
  if (n < 0 || static_cast<std::uint64_t>(n) != entries_.size()) {
    throw FormatError("zip central directory is inconsistent (entry count)");
  }
  for (std::size_t i = 0; i < entries_.size(); ++i) {
    zip_stat_t st;
    if (zip_stat_index(libzip_->archive, i, ZIP_FL_ENC_RAW, &st) != 0 ||
        (st.valid & ZIP_STAT_NAME) == 0 || entries_[i].name != st.name ||
        ((st.valid & ZIP_STAT_SIZE) != 0 && st.size != entries_[i].size) ||
        ((st.valid & ZIP_STAT_COMP_SIZE) != 0 && st.comp_size != entries_[i].compressed_size)) {
      throw FormatError(fmt::format("zip central directory is inconsistent at entry {}", i));
    }
  }
}

std::uint64_t data_offset_from_local_header(
    std::span<const std::byte, LocalHeaderRef::kSize> header, const LocalHeaderRef& ref,
    std::string_view record) {
  if (load_le<std::uint32_t>(header.data()) != kLocalHeaderSig) {
    throw FormatError(fmt::format("zip entry '{}' has a corrupt local header", record));
  }
  const auto name_size = load_le<std::uint16_t>(header.data() + 26);
  const auto extra_size = load_le<std::uint16_t>(header.data() + 28);
  if (name_size != ref.name_size) {
    throw FormatError(fmt::format(
        "zip entry '{}' has a local header whose name length ({}) differs from the central "
        "directory's ({})",
        record, name_size, ref.name_size));
  }
  if (extra_size > ref.max_extra) {
    throw FormatError(
        fmt::format("zip entry '{}' runs past the end of the file (truncated?)", record));
  }
  return ref.offset + kLocalHeaderSize + name_size + extra_size;
}

LocalHeaderRef ZipDirectory::local_header_ref(const ZipEntry& entry) const {
  return header_ref(source_.size(), entry);
}

std::uint64_t ZipDirectory::data_offset(const ZipEntry& entry) const {
  const LocalHeaderRef ref = local_header_ref(entry);
  std::array<std::byte, kLocalHeaderSize> h{};
  libzip_->headers.read(ref.offset, h);
  return data_offset_from_local_header(h, ref, entry.name);
}

std::string ZipDirectory::read_entry(const ZipEntry& entry, std::uint64_t max_bytes) const {
  if (entry.size > max_bytes) {
    throw FormatError(fmt::format("zip entry '{}' is {} bytes, over the limit of {}", entry.name,
                                  entry.size, max_bytes));
  }
  if (entry.encrypted()) throw FormatError(fmt::format("zip entry '{}' is encrypted", entry.name));
  // Nothing is allocated on the word of the central directory alone: a 1 KiB file could
  // otherwise claim a 2 GiB data.pkl (found by fuzz_checkpoint).
  if (entry.method == 0) {
    // Stored: read it directly, which also tolerates the bogus CRCs some torch versions write.
    const std::uint64_t data = data_offset(entry);  // checks the stored bytes are in the file
    if (entry.size > entry.compressed_size) {
      throw FormatError(fmt::format("zip entry '{}' declares {} bytes but stores {}", entry.name,
                                    entry.size, entry.compressed_size));
    }
    std::string out(entry.size, '\0');
    source_.read_at(data, std::as_writable_bytes(std::span(out)));
    return out;
  }
  // Deflate expands at most 1032:1; a larger claim cannot be honest.
  if (entry.method == 8 && entry.size / 1032 > entry.compressed_size) {
    throw FormatError(fmt::format(
        "zip entry '{}' claims {} bytes from {} deflated bytes, more than deflate can produce",
        entry.name, entry.size, entry.compressed_size));
  }
  zip_t* archive = libzip_archive(entry);
  // entry.name is NUL-terminated (see ZipEntry).
  zip_int64_t index = zip_name_locate(archive, entry.name.data(), ZIP_FL_ENC_RAW);
  std::unique_ptr<zip_file_t, decltype(&zip_fclose)> f(
      index < 0 ? nullptr : zip_fopen_index(archive, index, 0), &zip_fclose);
  if (f == nullptr) {
    throw FormatError(
        fmt::format("cannot open zip entry '{}': {}", entry.name, zip_strerror(archive)));
  }
  // Grown as bytes arrive (other methods have no useful ratio bound): memory follows what the
  // record really holds, not what it claims.
  constexpr std::uint64_t kStep = 16u << 20;
  std::string out;
  std::uint64_t done = 0;
  while (done < entry.size) {
    if (out.size() == done) out.resize(std::min(entry.size, std::max(done * 2, kStep)));
    zip_int64_t n = zip_fread(f.get(), out.data() + done, out.size() - done);
    if (n <= 0) {
      throw FormatError(
          fmt::format("cannot read zip entry '{}': {}", entry.name, zip_file_strerror(f.get())));
    }
    done += static_cast<std::uint64_t>(n);
  }
  return out;
}

std::optional<FirstRecord> ZipDirectory::read_first_stored_record(
    std::uint64_t max_bytes, bool (*wanted)(std::string_view name)) const {
  try {
    if (count_ == 0 || cd_size_ < kCentralHeaderSize) return std::nullopt;
    std::array<std::byte, kCentralHeaderSize> fixed{};
    source_.read_at(cd_offset_, fixed);
    const std::size_t var_len = std::size_t{load_le<std::uint16_t>(fixed.data() + 28)} +
                                load_le<std::uint16_t>(fixed.data() + 30) +
                                load_le<std::uint16_t>(fixed.data() + 32);
    std::vector<std::byte> raw(std::min<std::uint64_t>(cd_size_, kCentralHeaderSize + var_len));
    source_.read_at(cd_offset_, raw);
    std::size_t len = 0;
    const ZipEntry e = parse_central_entry(raw.data(), raw.size(), 0, len);
    // Only what read_entry() would read straight from the file, under the same checks.
    if (!wanted(e.name) || e.method != 0 || e.encrypted() || e.size != e.compressed_size ||
        e.size > max_bytes) {
      return std::nullopt;
    }
    const LocalHeaderRef ref = header_ref(source_.size(), e);
    // Not through libzip_->headers: index() may run meanwhile, and a read-ahead window is not
    // thread-safe.
    std::array<std::byte, kLocalHeaderSize> local{};
    source_.read_at(ref.offset, local);
    const std::uint64_t data = data_offset_from_local_header(local, ref, e.name);
    FirstRecord out;
    out.name = e.name;
    out.local_header_offset = e.local_header_offset;
    out.size = e.size;
    out.bytes.resize(e.size);
    source_.read_at(data, std::as_writable_bytes(std::span(out.bytes)));
    return out;
  } catch (const CkptError&) {
    return std::nullopt;  // index() or read_entry() says what is wrong
  }
}

void ZipDirectory::release_archive() {
  if (libzip_->archive != nullptr) {
    zip_discard(libzip_->archive);
    libzip_->archive = nullptr;
  }
  libzip_->released = true;
}

}  // namespace ckptfs
