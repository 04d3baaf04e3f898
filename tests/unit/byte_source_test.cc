#include "byte_source.h"

#include <fcntl.h>
#include <linux/magic.h>
#include <sys/mman.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "errors.h"
#include "unique_fd.h"

using namespace ckptfs;

namespace {

// A file in the working directory (the build tree, on disk: tmpfs keeps every page).
struct TempFile {
  std::string path;
  explicit TempFile(const std::string& bytes) {
    char tmpl[] = "ckptfs-bytes-XXXXXX";
    const UniqueFd fd(mkstemp(tmpl));
    REQUIRE(fd);
    path = tmpl;
    REQUIRE(::write(fd.get(), bytes.data(), bytes.size()) == static_cast<ssize_t>(bytes.size()));
    REQUIRE(::fsync(fd.get()) == 0);  // dirty pages cannot be dropped
  }
  ~TempFile() { std::remove(path.c_str()); }
};

// Pages of |path| in [offset, offset + length) that are in the page cache.
std::size_t cached_pages(const std::string& path, std::size_t offset, std::size_t length) {
  const long page = sysconf(_SC_PAGESIZE);
  const std::size_t mapped = offset + length;
  void* map = MAP_FAILED;
  {
    const UniqueFd fd(::open(path.c_str(), O_RDONLY));
    REQUIRE(fd);
    map = ::mmap(nullptr, mapped, PROT_READ, MAP_SHARED, fd.get(), 0);
  }
  REQUIRE(map != MAP_FAILED);
  const auto unmap = [mapped](void* p) { ::munmap(p, mapped); };
  const std::unique_ptr<void, decltype(unmap)> mapping(map, unmap);
  std::vector<unsigned char> in((mapped + page - 1) / page);
  REQUIRE(::mincore(map, mapped, in.data()) == 0);
  std::size_t n = 0;
  for (std::size_t i = offset / page; i < in.size(); ++i) n += in[i] & 1;
  return n;
}

bool on_tmpfs(const std::string& path) {
  struct statfs fs {};
  REQUIRE(::statfs(path.c_str(), &fs) == 0);
  return fs.f_type == TMPFS_MAGIC || fs.f_type == RAMFS_MAGIC;
}

std::string patterned(std::size_t n) {
  std::string s(n, '\0');
  for (std::size_t i = 0; i < n; ++i) s[i] = static_cast<char>((i * 131 + i / 4093) & 0xff);
  return s;
}

}  // namespace

TEST_CASE("LocalFileSource: a large read drops the pages it copied; small reads keep theirs") {
  constexpr std::size_t kMiB = 1u << 20;
  static_assert(LocalFileSource::kDropAfterRead <= 4 * kMiB);
  const std::string bytes = patterned(8 * kMiB + std::size_t{3} * 4096);
  TempFile file(bytes);
  LocalFileSource src(file.path);
  REQUIRE(src.size() == bytes.size());

  // Small reads through the page cache, all of them cached afterwards.
  std::string small(64 << 10, '\0');
  for (std::size_t at = 0; at < bytes.size(); at += small.size()) {
    std::span<std::byte> dst = std::as_writable_bytes(std::span(small));
    dst = dst.first(std::min(small.size(), bytes.size() - at));
    src.read_at(at, dst);
    CHECK(std::equal(dst.begin(), dst.end(), std::as_bytes(std::span(bytes)).begin() + at));
  }
  const bool tmpfs = on_tmpfs(file.path);
  if (tmpfs) WARN("the working directory is on tmpfs: page-cache residency is not checked");
  const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  if (!tmpfs) REQUIRE(cached_pages(file.path, 0, bytes.size()) == bytes.size() / page);

  // One large read at an unaligned offset: the right bytes, and its pages are gone. The page
  // cache may hold a file in folios of up to 2 MiB, and a folio that reaches past the read stays,
  // so only [2 MiB, 6 MiB) must be gone; everything after the read must stay.
  const std::size_t at = kMiB + 100;
  std::string got(5 * kMiB + 5000, '\0');
  src.read_at(at, std::as_writable_bytes(std::span(got)));
  CHECK(got == bytes.substr(at, got.size()));
  if (!tmpfs) {
    CHECK(cached_pages(file.path, 2 * kMiB, 4 * kMiB) == 0);
    const std::size_t after = (at + got.size() + page - 1) / page * page;
    CHECK(cached_pages(file.path, after, bytes.size() - after) == (bytes.size() - after) / page);
  }

  // A read just under the threshold keeps its pages.
  std::string under(LocalFileSource::kDropAfterRead - 1, '\0');
  src.read_at(0, std::as_writable_bytes(std::span(under)));
  CHECK(under == bytes.substr(0, under.size()));
  if (!tmpfs) CHECK(cached_pages(file.path, 0, under.size() / page * page) == under.size() / page);

  // Reads past the end are still refused, large or not.
  std::string past(LocalFileSource::kDropAfterRead, '\0');
  CHECK_THROWS_AS(src.read_at(bytes.size() - 10, std::as_writable_bytes(std::span(past))), IoError);
}
