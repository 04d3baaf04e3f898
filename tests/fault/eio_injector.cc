// An LD_PRELOAD library that makes pread(2) of one file fail with EIO over one byte range, so
// the fault tests can show what the daemon does when the disk under a checkpoint fails. It
// lives in the tests, never in the daemon.
//
//   CKPTFS_FAULT_FILE=/path/to/checkpoint    the file (matched by device and inode)
//   CKPTFS_FAULT_RANGE=OFFSET:LENGTH         reads overlapping this range fail
#include <dlfcn.h>
#include <sys/stat.h>
#include <sys/types.h>

#include <cerrno>
#include <cstdint>
#include <cstdlib>

namespace {

using PreadFn = ssize_t (*)(int, void*, size_t, off_t);

struct Fault {
  bool armed = false;
  dev_t dev = 0;
  ino_t ino = 0;
  std::uint64_t begin = 0;
  std::uint64_t end = 0;
};

Fault load_fault() {
  Fault f;
  const char* file = std::getenv("CKPTFS_FAULT_FILE");
  const char* range = std::getenv("CKPTFS_FAULT_RANGE");
  struct stat st {};
  if (file == nullptr || range == nullptr || ::stat(file, &st) != 0) return f;
  char* rest = nullptr;
  f.begin = std::strtoull(range, &rest, 10);
  if (rest == nullptr || *rest != ':') return f;
  f.end = f.begin + std::strtoull(rest + 1, nullptr, 10);
  f.dev = st.st_dev;
  f.ino = st.st_ino;
  f.armed = true;
  return f;
}

const Fault& fault() {
  static const Fault f = load_fault();
  return f;
}

bool hits(int fd, off_t offset, size_t count) {
  const Fault& f = fault();
  if (!f.armed) return false;
  struct stat st {};
  if (::fstat(fd, &st) != 0 || st.st_dev != f.dev || st.st_ino != f.ino) return false;
  auto begin = static_cast<std::uint64_t>(offset);
  return begin < f.end && begin + count > f.begin;
}

ssize_t forward(const char* name, int fd, void* buf, size_t count, off_t offset) {
  static auto real = reinterpret_cast<PreadFn>(::dlsym(RTLD_NEXT, name));
  if (hits(fd, offset, count)) {
    errno = EIO;
    return -1;
  }
  return real(fd, buf, count, offset);
}

}  // namespace

extern "C" ssize_t pread(int fd, void* buf, size_t count, off_t offset) {
  return forward("pread", fd, buf, count, offset);
}

extern "C" ssize_t pread64(int fd, void* buf, size_t count, off_t offset) {
  return forward("pread64", fd, buf, count, offset);
}
