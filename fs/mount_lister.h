// MountLister: lists the new mount's tree once, so that the kernel holds its entries before any
// reader asks for them.
//
// A reader that opens files by name (numpy.memmap of each tensor, in a loop) sends a LOOKUP per
// file, a round trip the daemon cannot spare it; and since the kernel holds no inode past the
// file being read, nothing can be stored in the page cache ahead of it (KnownInodes). A listing
// hands out every entry with its attributes (READDIRPLUS), and the kernel keeps them: the
// reader's opens then ask nothing, and the READ at the start of each file it reaches cold
// stores the next files ahead (preload_ahead in fuse_server.cc). This is what a reader that
// lists first gets (docs/guide.md, "Reading fast"), for every reader.
//
// Two hazards of a daemon reading its own mount decide the shape:
// - An open directory of the mount is a use of it: an unmount meanwhile would fail with EBUSY.
//   So the listing goes through a detached clone of the mount (open_tree(OPEN_TREE_CLONE),
//   which needs CAP_SYS_ADMIN; without it nothing is listed): it shares the superblock and its
//   dentries but is another mount, so an unmount succeeds (the connection then lasts until the
//   listing lets go of the clone).
// - A thread of the daemon waiting for a reply of its own daemon cannot be killed: once a
//   request has reached a request thread, the kernel waits for its reply uninterruptibly, and
//   after a SIGKILL the dead request thread never replies, while the connection that would
//   fail the request closes only when every thread has exited (the tests' SIGKILL hung so).
//   So the listing runs in a child process (this executable again, `--prelist-child`), which
//   holds no descriptor of /dev/fuse: when the daemon dies the connection ends, and with it
//   the child's wait.
//
// The kernel's inode and dentry for an entry take about 1.2 KiB (slab, reclaimable: an unused
// entry goes when memory is short, and the kernel sends its FORGET), hence a cap on entries.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>

namespace ckptfs {

class MountLister {
 public:
  // The first argument that makes ckptfs the listing child; the next is the cap on entries.
  static constexpr const char* kChildFlag = "--prelist-child";

  // Lists at most |max_entries| entries of the tree mounted at |mountpoint| (an absolute
  // path), breadth-first from its root, once start() is called.
  MountLister(std::string mountpoint, std::uint64_t max_entries);
  ~MountLister();
  MountLister(const MountLister&) = delete;
  MountLister& operator=(const MountLister&) = delete;

  // Starts the child, from a thread that waits for it. Its requests are answered by the request
  // loop: call it with the loop about to run.
  void start();
  // Kills the child and joins the thread. A child's request that a request thread has taken is
  // still waited for: call it while requests are answered, or once the connection is gone (the
  // unmount closed /dev/fuse), never between the two.
  void stop();

  std::uint64_t listed() const noexcept { return listed_.load(std::memory_order_relaxed); }
  bool finished() const noexcept { return finished_.load(std::memory_order_acquire); }

 private:
  void run();

  const std::string mountpoint_;
  const std::uint64_t max_entries_;
  std::atomic<std::uint64_t> listed_{0};
  std::atomic<bool> finished_{false};
  std::mutex mutex_;  // the child's pid against stop(), which the signal thread and main() call
  pid_t child_ = -1;
  bool stopped_ = false;
  std::thread thread_;
};

// The child's whole work: lists the working directory (the clone's root) breadth-first, at most
// |max_entries| entries, and prints how many it listed. Returns the exit status.
int run_prelist_child(const char* max_entries);

}  // namespace ckptfs
