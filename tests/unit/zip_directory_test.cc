// Zip archives are written here with libzip itself (an independent writer), then read back.
#include "zip_directory.h"

#include <unistd.h>
#include <zip.h>

#include <array>
#include <catch2/catch.hpp>
#include <cstdio>
#include <fstream>
#include <string>
#include <thread>

#include "byte_source.h"
#include "errors.h"

using namespace ckptfs;

namespace {

struct TempZip {
  std::string path;
  TempZip() {
    char tmpl[] = "/tmp/ckptfs-zip-XXXXXX";
    int fd = mkstemp(tmpl);
    close(fd);
    path = tmpl;
    std::remove(path.c_str());
  }
  ~TempZip() { std::remove(path.c_str()); }
  // A new, empty archive at |path|, written by zip_close.
  zip_t* create() {
    int err = 0;
    zip_t* z = zip_open(path.c_str(), ZIP_CREATE | ZIP_TRUNCATE, &err);
    REQUIRE(z != nullptr);
    return z;
  }
  void add(zip_t* z, const std::string& name, const std::string& content, bool compress) {
    // libzip copies the buffer only at zip_close; keep it alive until then.
    kept.push_back(content);
    zip_source_t* s = zip_source_buffer(z, kept.back().data(), kept.back().size(), 0);
    zip_int64_t i = zip_file_add(z, name.c_str(), s, ZIP_FL_ENC_UTF_8);
    REQUIRE(i >= 0);
    zip_set_file_compression(z, static_cast<zip_uint64_t>(i),
                             compress ? ZIP_CM_DEFLATE : ZIP_CM_STORE, 0);
  }
  std::vector<std::string> kept;
};

// |n| bytes that differ from their neighbours (byte i is i * step), so a misplaced read shows.
std::string patterned(std::size_t n, unsigned step) {
  std::string out(n, '\0');
  for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<char>(i * step);
  return out;
}

bool any_name(std::string_view /*name*/) {
  return true;
}

// The bytes of the file at |path|.
std::string file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

// Calls |check| with a source over |whole| cut short: empty, inside the first header, halfway,
// one byte short of the end.
template <class Check>
void for_each_truncation(const std::string& whole, Check check) {
  for (std::size_t cut : {std::size_t{0}, std::size_t{10}, whole.size() / 2, whole.size() - 1}) {
    TempZip part;
    std::ofstream(part.path, std::ios::binary) << whole.substr(0, cut);
    LocalFileSource src(part.path);
    check(src);
  }
}

}  // namespace

TEST_CASE("stored entries are found at their data offset; deflated ones are decompressed") {
  TempZip tz;
  tz.kept.reserve(8);
  zip_t* z = tz.create();
  const std::string payload = patterned(100000, 7);
  tz.add(z, "archive/data.pkl", "pickle bytes", false);
  tz.add(z, "archive/data/0", payload, false);
  tz.add(z, "archive/packed", std::string(5000, 'z'), true);
  REQUIRE(zip_close(z) == 0);

  LocalFileSource src(tz.path);
  ZipDirectory dir(src);
  REQUIRE(dir.entries().size() == 3);
  const ZipEntry* e = dir.find("archive/data/0");
  REQUIRE(e != nullptr);
  CHECK(e->method == 0);
  CHECK(e->size == payload.size());
  std::string got(payload.size(), '\0');
  src.read_at(dir.data_offset(*e), std::as_writable_bytes(std::span(got)));
  CHECK(got == payload);
  CHECK(dir.read_entry(*dir.find("archive/data.pkl"), 1000) == "pickle bytes");
  const ZipEntry* packed = dir.find("archive/packed");
  REQUIRE(packed != nullptr);
  CHECK(packed->method == ZIP_CM_DEFLATE);
  CHECK(dir.read_entry(*packed, 10000) == std::string(5000, 'z'));
  CHECK_THROWS_AS(dir.read_entry(*packed, 100), FormatError);
  CHECK(dir.find("archive/nope") == nullptr);

  // Released: the directory, offsets and stored records stay; compressed ones are refused.
  dir.release_archive();
  CHECK(dir.entries().size() == 3);
  CHECK(dir.data_offset(*dir.find("archive/data/0")) == dir.data_offset(*e));
  CHECK(dir.read_entry(*dir.find("archive/data.pkl"), 1000) == "pickle bytes");
  CHECK_THROWS_AS(dir.read_entry(*packed, 10000), FormatError);
  dir.release_archive();  // twice is harmless
}

TEST_CASE("a local header is checked against the central directory and the end of the file") {
  TempZip tz;
  tz.kept.reserve(4);
  zip_t* z = tz.create();
  tz.add(z, "archive/data.pkl", "pickle bytes", false);
  tz.add(z, "archive/data/0", std::string(1000, 'x'), false);
  REQUIRE(zip_close(z) == 0);

  LocalFileSource src(tz.path);
  ZipDirectory dir(src);
  const ZipEntry* e = dir.find("archive/data/0");
  REQUIRE(e != nullptr);
  const LocalHeaderRef ref = dir.local_header_ref(*e);
  CHECK(ref.offset == e->local_header_offset);
  CHECK(ref.name_size == e->name.size());
  // Only the central directory follows the last record: far less than 64 KiB of room.
  CHECK(ref.max_extra < 1000);
  std::array<std::byte, LocalHeaderRef::kSize> h{};
  src.read_at(ref.offset, h);
  CHECK(data_offset_from_local_header(h, ref, e->name) == dir.data_offset(*e));

  auto with_u16 = [&](std::size_t at, std::uint16_t v) {
    std::array<std::byte, LocalHeaderRef::kSize> copy = h;
    copy[at] = static_cast<std::byte>(v & 0xff);
    copy[at + 1] = static_cast<std::byte>(v >> 8);
    return copy;
  };
  // An extra field that still leaves room for the data; one byte more runs past the end.
  CHECK(data_offset_from_local_header(with_u16(28, ref.max_extra), ref, e->name) ==
        ref.offset + LocalHeaderRef::kSize + ref.name_size + ref.max_extra);
  CHECK_THROWS_WITH(data_offset_from_local_header(with_u16(28, ref.max_extra + 1), ref, e->name),
                    Catch::Contains("runs past the end"));
  CHECK_THROWS_WITH(data_offset_from_local_header(with_u16(26, 3), ref, e->name),
                    Catch::Contains("name length (3)"));
  CHECK_THROWS_WITH(data_offset_from_local_header(with_u16(0, 0), ref, e->name),
                    Catch::Contains("corrupt local header"));
}

// The central directory's uncompressed size of |name|, rewritten in the file.
static void claim_size(const std::string& path, const std::string& name, std::uint32_t size) {
  std::ifstream in(path, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  for (std::size_t at = bytes.find("PK\x01\x02"); at != std::string::npos;
       at = bytes.find("PK\x01\x02", at + 4)) {
    std::uint16_t name_len = static_cast<unsigned char>(bytes[at + 28]) |
                             static_cast<unsigned char>(bytes[at + 29]) << 8;
    if (bytes.compare(at + 46, name_len, name) != 0) continue;
    for (int i = 0; i < 4; ++i) bytes[at + 24 + i] = static_cast<char>((size >> (8 * i)) & 0xFF);
  }
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
}

TEST_CASE("a record claiming more bytes than it can hold is refused before allocating") {
  TempZip tz;
  tz.kept.reserve(4);
  zip_t* z = tz.create();
  tz.add(z, "archive/data.pkl", "pickle bytes", false);
  tz.add(z, "archive/packed", std::string(5000, 'z'), true);
  REQUIRE(zip_close(z) == 0);
  // 1.5 GiB claimed by a file of a few hundred bytes: each is a one-line error, and the
  // allocation the claim would take (which fuzz_checkpoint caught) never happens.
  claim_size(tz.path, "archive/data.pkl", 1536u << 20);
  claim_size(tz.path, "archive/packed", 1536u << 20);
  LocalFileSource src(tz.path);
  ZipDirectory dir(src);
  REQUIRE(dir.find("archive/data.pkl")->size == (1536u << 20));
  CHECK_THROWS_WITH(dir.read_entry(*dir.find("archive/data.pkl"), 2ull << 30),
                    Catch::Contains("declares 1610612736 bytes but stores 12"));
  CHECK_THROWS_WITH(dir.read_entry(*dir.find("archive/packed"), 2ull << 30),
                    Catch::Contains("more than deflate can produce"));
}

// |path|'s bytes, changed by |edit| and written back.
template <class Edit>
static void edit_file(const std::string& path, Edit edit) {
  std::string bytes;
  {
    std::ifstream in(path, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), {});
  }
  edit(bytes);
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
}

TEST_CASE("encrypted records and split archives are refused, not misread") {
  TempZip tz;
  tz.kept.reserve(4);
  zip_t* z = tz.create();
  tz.add(z, "archive/data.pkl", "pickle bytes", false);
  tz.add(z, "archive/data/0", std::string(100, 'x'), false);
  REQUIRE(zip_close(z) == 0);
  std::string original;
  edit_file(tz.path, [&](std::string& b) { original = b; });

  // Bit 0 of a central directory entry's flags: its bytes are ciphertext.
  edit_file(tz.path, [](std::string& b) {
    const std::size_t at = b.find("PK\x01\x02");
    REQUIRE(at != std::string::npos);
    REQUIRE(b.compare(at + 46, 16, "archive/data.pkl") == 0);
    b[at + 8] = static_cast<char>(b[at + 8] | 1);
  });
  {
    LocalFileSource src(tz.path);
    ZipDirectory dir(src);
    CHECK(dir.find("archive/data.pkl")->encrypted());
    CHECK_FALSE(dir.find("archive/data/0")->encrypted());
    CHECK_THROWS_WITH(dir.read_entry(*dir.find("archive/data.pkl"), 1000),
                      Catch::Contains("is encrypted"));
  }

  // The end record says this is disk 1 of a split archive (zip -s).
  edit_file(tz.path, [&](std::string& b) {
    b = original;
    const std::size_t at = b.rfind("PK\x05\x06");
    REQUIRE(at != std::string::npos);
    b[at + 4] = 1;
  });
  LocalFileSource src(tz.path);
  CHECK_THROWS_WITH(ZipDirectory(src), Catch::Contains("split across several files"));
}

TEST_CASE("truncated and non-zip files are FormatErrors") {
  TempZip tz;
  zip_t* z = tz.create();
  tz.add(z, "a/data.pkl", std::string(3000, 'p'), false);
  REQUIRE(zip_close(z) == 0);
  for_each_truncation(file_bytes(tz.path), [](const ByteSource& src) {
    CHECK_THROWS_AS(ZipDirectory(src), FormatError);
  });
}

TEST_CASE("the first record is read alone only when it is stored, sound and small enough") {
  TempZip tz;
  tz.kept.reserve(8);
  zip_t* z = tz.create();
  const std::string pickle = patterned(70000, 13);
  tz.add(z, "archive/data.pkl", pickle, false);
  tz.add(z, "archive/data/0", std::string(4096, 'd'), false);
  REQUIRE(zip_close(z) == 0);
  LocalFileSource src(tz.path);
  // In two steps, as the loader does: the first record before the directory is indexed.
  ZipDirectory two(src, ZipDirectory::Deferred{});
  const auto first = two.read_first_stored_record(1u << 20, any_name);
  REQUIRE(first.has_value());
  CHECK(first->name == "archive/data.pkl");
  CHECK(first->size == pickle.size());
  CHECK(first->bytes == pickle);
  // Indexed on another thread: the same directory, record and bytes as in one step.
  std::thread([&] { two.index(); }).join();
  ZipDirectory dir(src);
  const ZipEntry* e = dir.find("archive/data.pkl");
  REQUIRE(e != nullptr);
  CHECK(e->local_header_offset == first->local_header_offset);
  CHECK(dir.read_entry(*e, 1u << 20) == first->bytes);
  REQUIRE(two.entries().size() == dir.entries().size());
  for (std::size_t i = 0; i < dir.entries().size(); ++i) {
    CHECK(two.entries()[i].name == dir.entries()[i].name);
    CHECK(two.find(dir.entries()[i].name) == &two.entries()[i]);
    CHECK(two.data_offset(two.entries()[i]) == dir.data_offset(dir.entries()[i]));
  }
  // Not wanted: nothing more is read.
  CHECK_FALSE(two.read_first_stored_record(1u << 20, [](std::string_view) { return false; }));
  // Over the limit: left to the directory, which refuses it with a message.
  CHECK_FALSE(two.read_first_stored_record(pickle.size() - 1, any_name).has_value());

  TempZip deflated;
  deflated.kept.reserve(8);
  z = deflated.create();
  deflated.add(z, "archive/data.pkl", std::string(5000, 'p'), true);
  REQUIRE(zip_close(z) == 0);
  LocalFileSource packed(deflated.path);
  CHECK_FALSE(ZipDirectory(packed, ZipDirectory::Deferred{})
                  .read_first_stored_record(1u << 20, any_name)
                  .has_value());

  // Damage gives nullopt or the directory's own error, never wrong bytes. Cut short, the end
  // record is gone: the first step already refuses the archive.
  const std::string whole = file_bytes(tz.path);
  for_each_truncation(whole, [](const ByteSource& part) {
    CHECK_THROWS_AS(ZipDirectory(part, ZipDirectory::Deferred{}), FormatError);
  });
  // The first directory entry corrupt: nullopt, and index() says what is wrong.
  TempZip bad_entry;
  std::string broken = whole;
  const std::size_t central = broken.find(std::string("PK\x01\x02", 4));
  REQUIRE(central != std::string::npos);
  broken[central + 3] = '\x7f';
  std::ofstream(bad_entry.path, std::ios::binary) << broken;
  LocalFileSource src_entry(bad_entry.path);
  ZipDirectory broken_dir(src_entry, ZipDirectory::Deferred{});
  CHECK_FALSE(broken_dir.read_first_stored_record(1u << 20, any_name).has_value());
  CHECK_THROWS_WITH(broken_dir.index(), Catch::Contains("entry 0 is corrupt"));
  // A local header that disagrees with the central directory (its name length changed).
  TempZip bad;
  std::string changed = whole;
  changed[26] = static_cast<char>(changed[26] + 1);
  std::ofstream(bad.path, std::ios::binary) << changed;
  LocalFileSource src_bad(bad.path);
  ZipDirectory bad_dir(src_bad);
  CHECK_FALSE(bad_dir.read_first_stored_record(1u << 20, any_name).has_value());
  CHECK_THROWS_WITH(bad_dir.read_entry(*bad_dir.find("archive/data.pkl"), 1u << 20),
                    Catch::Contains("name length"));
}
