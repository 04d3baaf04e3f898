// KernelNotifier: the one thread that tells the kernel what to drop from, and what to store
// in, the page cache of the mount.
//
// fuse_lowlevel_notify_inval_inode and fuse_lowlevel_notify_store are handled synchronously by
// the kernel, and both wait for the locks of pages whose READ is still in flight. Called from a
// request handler (or while holding a lock or a cache pin a handler may need) they can
// deadlock: the READ they wait for would never be answered. So they only ever run here, on a
// dedicated thread that holds no lock and no pin while it notifies; request handlers only
// record replies and queue requests, and never wait for this thread.
//
// Every page it stores is recorded in the ledger like a READ reply, right after the store and
// on this same thread, so stores and invalidations never interleave and the ledger stays an
// upper bound of the kernel's pages.
#pragma once

#define FUSE_USE_VERSION 314
#include <fuse_lowlevel.h>

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <span>
#include <thread>
#include <vector>

#include "kernel_page_ledger.h"

namespace ckptfs {

class KernelNotifier {
 public:
  // Copies the bytes of file |inode| at |offset| into |out| (the file as a READ would serve
  // it) and returns how many it copied; 0 when there is nothing to store. May throw: the
  // preload of that file then stops, and its READs report the error.
  using FileReader = std::function<std::size_t(std::uint64_t inode, std::uint64_t offset,
                                               std::span<std::byte> out)>;

  // How many LOOKUP preloads wait at most: a newer one pushes out the oldest, whose reader has
  // most likely got ahead of it by then (the kernel reads what it needs itself). Few: a walk
  // that stats many files and reads none would otherwise have that many read behind it.
  static constexpr std::size_t kMaxQueuedLookups = 4;
  // The most files stored ahead of one READ (fuse_server.cc's preload_ahead says how many),
  // and the most that wait ahead of readers, the oldest pushed out the same way.
  static constexpr std::size_t kMaxAheadFiles = 64;
  // One store: the size of the kernel's largest READ here, and of the reused buffer.
  static constexpr std::size_t kStoreBytes = std::size_t{1} << 20;

  KernelNotifier(fuse_session* session, KernelPageLedger& ledger, FileReader read_file = {})
      : session_(session), ledger_(ledger), read_file_(std::move(read_file)) {}
  ~KernelNotifier() { stop(); }
  KernelNotifier(const KernelNotifier&) = delete;
  KernelNotifier& operator=(const KernelNotifier&) = delete;

  void start();
  // Before the request loop ends (ShutdownSignal) and again before unmounting (which closes
  // the session's fd): no notification starts after this returns. Waits up to |wait| for one
  // in progress to end and returns whether none is left. A notification can only end while
  // the loop answers the READs it waits for: once the loop has stopped, one still waiting
  // holds /dev/fuse, so even the unmount's close cannot abort the connection for it.
  bool quiesce(std::chrono::milliseconds wait);
  // Stops and joins the thread, after quiesce() and the unmount.
  void stop();
  // Non-blocking: asks the thread to bring the ledger back within its budget.
  void wake();
  // Non-blocking: asks the thread to store the first |length| bytes of |inode|, a file a LOOKUP
  // has just answered, in the kernel's page cache (in kStoreBytes steps, each recorded and kept
  // within the budget like a reply).
  void preload(std::uint64_t inode, std::uint64_t length);
  struct AheadFile {
    std::uint64_t inode;
    std::uint64_t length;
  };
  // Non-blocking: the same for each of |files|, ahead of a reader, under one lock, but none that
  // waits already or was taken among the last kMaxAheadFiles; and a waiting preload of
  // |reading|, the file the reader has reached on its own, is dropped.
  void preload_ahead(std::uint64_t reading, std::span<const AheadFile> files);

  std::uint64_t invalidations() const { return invalidations_.load(); }
  std::uint64_t invalidated_bytes() const { return invalidated_bytes_.load(); }
  std::uint64_t preloaded_files() const { return preloaded_files_.load(); }
  std::uint64_t preloaded_bytes() const { return preloaded_bytes_.load(); }
  std::uint64_t store_retries() const { return store_retries_.load(); }
  std::uint64_t preloaded_ahead() const { return preloaded_ahead_.load(); }
  // Preloads whose first store the kernel refused for want of the inode: forgotten since a
  // listing handed it out, or not made yet (a LOOKUP's after all its retries, or one answered
  // a moment before the READ that stores ahead).
  std::uint64_t preloads_refused() const { return refused_.load(); }

 private:
  // Whom a preload is for: the file a LOOKUP has just answered (the kernel makes its inode
  // once the looking-up task wakes, so a first store may come too early and is retried), or a
  // file ahead of a reader, which the kernel already holds (KnownInodes): not retried.
  enum class PreloadFor { kLookedUp, kAhead };
  struct Preload {
    std::uint64_t inode;
    std::uint64_t length;
    PreloadFor why;
  };

  void run();
  // With mu_ held: queues |p| unless it waits already (a LOOKUP's request keeps its retries).
  bool enqueue(const Preload& p);
  // Whether quiesce() or stop() was called.
  bool stopping();
  void invalidate_excess();
  void store_file(const Preload& p);
  // Stores |length| bytes of buffer_ at |offset| of |inode|; the notify's result.
  int store(std::uint64_t inode, std::uint64_t offset, std::size_t length, bool new_inode);
  static constexpr int kNewInodeRetries = 40;

  fuse_session* session_;
  KernelPageLedger& ledger_;
  FileReader read_file_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool pending_ = false;
  bool stopping_ = false;
  bool busy_ = false;  // notifying, without mu_ held
  std::deque<Preload> preloads_;
  // The inodes of the last preloads taken (0: none): a reader that got ahead of the thread
  // asks again for files it has stored, or is storing.
  std::array<std::uint64_t, kMaxAheadFiles> recent_{};
  std::size_t recent_next_ = 0;
  std::vector<std::byte> buffer_;  // one store's bytes, allocated at the first preload
  std::thread thread_;
  std::atomic<std::uint64_t> invalidations_{0};
  std::atomic<std::uint64_t> invalidated_bytes_{0};
  std::atomic<std::uint64_t> preloaded_files_{0};
  std::atomic<std::uint64_t> preloaded_bytes_{0};
  std::atomic<std::uint64_t> store_retries_{0};
  std::atomic<std::uint64_t> preloaded_ahead_{0};  // files, of preloaded_files_
  std::atomic<std::uint64_t> refused_{0};
};

}  // namespace ckptfs
