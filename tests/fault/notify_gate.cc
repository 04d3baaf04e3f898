// An LD_PRELOAD library that holds one of the daemon's page-cache invalidations at a gate, so a
// test can make an invalidation be in progress at the moment the daemon is told to stop, with
// readers waiting on the pages it covers. Such an invalidation waits for the READs of those
// pages; a shutdown that stopped answering requests before it ended would wait forever. It
// lives in the tests, never in the daemon.
//
//   CKPTFS_NOTIFY_GATE=DIR   once DIR/armed exists, the next FUSE_NOTIFY_INVAL_INODE creates
//                            DIR/held, waits until DIR/go exists, is widened to the whole file
//                            (so that it surely covers a page a reader is waiting for), and is
//                            sent; DIR/passed then records the write's result. Later ones pass.
#include <dlfcn.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>

namespace {

using WritevFn = ssize_t (*)(int, const iovec*, int);

bool exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}

void create(const std::string& path, const std::string& text) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return;
  (void)!::write(fd, text.data(), text.size());
  ::close(fd);
}

bool is_inval_inode(const iovec* iov, int count) {
  if (count != 2 || iov[0].iov_len < sizeof(fuse_out_header) ||
      iov[1].iov_len != sizeof(fuse_notify_inval_inode_out)) {
    return false;
  }
  fuse_out_header header{};
  std::memcpy(&header, iov[0].iov_base, sizeof header);
  return header.unique == 0 && header.error == FUSE_NOTIFY_INVAL_INODE;
}

std::atomic<bool> used{false};

}  // namespace

extern "C" ssize_t writev(int fd, const iovec* iov, int count) {
  static auto real = reinterpret_cast<WritevFn>(::dlsym(RTLD_NEXT, "writev"));
  // The daemon sets no variable once its threads run (TZ is set before any exist).
  const char* dir = std::getenv("CKPTFS_NOTIFY_GATE");  // NOLINT(concurrency-mt-unsafe)
  if (dir == nullptr || used.load() || !is_inval_inode(iov, count) ||
      !exists(std::string(dir) + "/armed") || used.exchange(true)) {
    return real(fd, iov, count);
  }
  const std::string base(dir);
  create(base + "/held", "");
  while (!exists(base + "/go")) ::usleep(1000);
  fuse_notify_inval_inode_out whole{};
  std::memcpy(&whole, iov[1].iov_base, sizeof whole);
  whole.off = 0;
  whole.len = 0;  // to the end of the file
  const std::array<iovec, 2> widened{iov[0], iovec{&whole, sizeof whole}};
  const ssize_t rc = real(fd, widened.data(), 2);
  const int saved = errno;
  create(base + "/passed", rc < 0 ? "errno " + std::to_string(saved) : std::to_string(rc));
  errno = saved;
  return rc;
}
