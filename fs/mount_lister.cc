#include "mount_lister.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <charconv>
#include <cstddef>
#include <cstring>
#include <deque>
#include <string_view>
#include <utility>

#include "unique_fd.h"

namespace ckptfs {

namespace {

// One getdents64 call: the kernel fills it from READDIRPLUS replies, so a directory of 1,536
// entries is a handful of requests.
constexpr std::size_t kBatchBytes = std::size_t{64} << 10;

// Owns a posix_spawn_file_actions_t.
class SpawnActions {
 public:
  SpawnActions() { ::posix_spawn_file_actions_init(&actions_); }
  ~SpawnActions() { ::posix_spawn_file_actions_destroy(&actions_); }
  SpawnActions(const SpawnActions&) = delete;
  SpawnActions& operator=(const SpawnActions&) = delete;
  posix_spawn_file_actions_t* get() { return &actions_; }

 private:
  posix_spawn_file_actions_t actions_{};
};

}  // namespace

MountLister::MountLister(std::string mountpoint, std::uint64_t max_entries)
    : mountpoint_(std::move(mountpoint)), max_entries_(max_entries) {}

MountLister::~MountLister() {
  stop();
}

void MountLister::start() {
  if (max_entries_ == 0) {
    finished_.store(true, std::memory_order_release);
    return;
  }
  thread_ = std::thread([this] { run(); });
}

void MountLister::stop() {
  {
    const std::lock_guard lock(mutex_);
    stopped_ = true;
    if (child_ > 0) ::kill(child_, SIGKILL);
  }
  if (thread_.joinable()) thread_.join();
}

void MountLister::run() {
  pthread_setname_np(pthread_self(), "ckptfs-prelist");
  const auto done = [this] { finished_.store(true, std::memory_order_release); };
  // Finding the mount's root asks the daemon nothing (the kernel holds it from the mount on).
  const UniqueFd tree(static_cast<int>(
      ::open_tree(AT_FDCWD, mountpoint_.c_str(), OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC)));
  std::array<int, 2> pipe_fds{-1, -1};
  if (!tree || ::pipe2(pipe_fds.data(), O_CLOEXEC) != 0) return done();
  UniqueFd from_child(pipe_fds[0]);
  UniqueFd to_parent(pipe_fds[1]);
  // The child starts in the clone's root and keeps nothing else of ours: no descriptor past
  // stdout (the pipe) and stderr, above all not /dev/fuse. The path it was given is not in its
  // command line, where `pgrep -f ckptfs.*MOUNTPOINT` would take it for the daemon.
  SpawnActions actions;
  const std::string count = std::to_string(max_entries_);
  std::array<char*, 4> argv{const_cast<char*>("ckptfs-prelist"),  // NOLINT: posix_spawn's type
                            const_cast<char*>(kChildFlag), const_cast<char*>(count.c_str()),
                            nullptr};
  if (::posix_spawn_file_actions_adddup2(actions.get(), to_parent.get(), STDOUT_FILENO) != 0 ||
      ::posix_spawn_file_actions_addfchdir_np(actions.get(), tree.get()) != 0 ||
      ::posix_spawn_file_actions_addclosefrom_np(actions.get(), STDERR_FILENO + 1) != 0) {
    return done();
  }
  {
    const std::lock_guard lock(mutex_);
    if (stopped_) return done();
    pid_t pid = -1;
    // The signals that end the mount stay blocked in the child, as in this thread: a terminal's
    // ^C reaches the daemon, which then kills the child itself.
    if (::posix_spawn(&pid, "/proc/self/exe", actions.get(), nullptr, argv.data(), environ) != 0) {
      return done();
    }
    child_ = pid;
  }
  to_parent.reset();
  std::array<char, 32> text{};
  std::size_t got = 0;
  for (;;) {
    const ssize_t n = ::read(from_child.get(), text.data() + got, text.size() - 1 - got);
    if (n > 0) {
      got += static_cast<std::size_t>(n);
      if (got < text.size() - 1) continue;
    } else if (n < 0 && errno == EINTR) {
      continue;
    }
    break;
  }
  std::uint64_t listed = 0;
  std::from_chars(text.data(), text.data() + got, listed);
  {
    const std::lock_guard lock(mutex_);
    int status = 0;
    while (::waitpid(child_, &status, 0) < 0 && errno == EINTR) {
    }
    child_ = -1;
  }
  listed_.store(listed, std::memory_order_relaxed);
  done();
}

int run_prelist_child(const char* max_entries) {
  ::prctl(PR_SET_NAME, "ckptfs-prelist");
  std::uint64_t cap = 0;
  const std::string_view arg = max_entries != nullptr ? max_entries : "";
  if (std::from_chars(arg.data(), arg.data() + arg.size(), cap).ec != std::errc()) return 2;
  std::uint64_t listed = 0;
  // Breadth-first: the root's entries are the ones most readers open, and its subdirectories
  // (modules of a state dict) come in the order a walk of the tree reaches them.
  std::deque<std::string> dirs{"."};
  std::array<std::byte, kBatchBytes> buf{};
  while (!dirs.empty() && listed < cap) {
    const std::string dir = std::move(dirs.front());
    dirs.pop_front();
    const UniqueFd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (!fd) continue;
    while (listed < cap) {
      const ssize_t n = ::getdents64(fd.get(), buf.data(), buf.size());
      if (n <= 0) break;
      // Records are read field by field: they are packed, not aligned as struct dirent64.
      for (ssize_t at = 0; at < n && listed < cap;) {
        const std::byte* record = buf.data() + at;
        std::uint16_t reclen = 0;
        std::memcpy(&reclen, record + offsetof(dirent64, d_reclen), sizeof reclen);
        const auto type = static_cast<unsigned char>(record[offsetof(dirent64, d_type)]);
        const std::string_view name(
            reinterpret_cast<const char*>(record + offsetof(dirent64, d_name)));
        if (reclen == 0) break;
        at += reclen;
        if (name == "." || name == "..") continue;
        ++listed;
        // /.ckptfs holds the daemon's own files, which no stream reads.
        if (type == DT_DIR && !(dir == "." && name == ".ckptfs")) {
          dirs.push_back(dir == "." ? std::string(name) : dir + "/" + std::string(name));
        }
      }
    }
  }
  const std::string out = std::to_string(listed);
  return ::write(STDOUT_FILENO, out.data(), out.size()) == static_cast<ssize_t>(out.size()) ? 0 : 1;
}

}  // namespace ckptfs
