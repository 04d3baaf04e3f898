// KernelInvalidator: the one thread that tells the kernel to drop cached pages of the mount.
//
// fuse_lowlevel_notify_inval_inode is handled synchronously by the kernel and waits for the
// locks of pages whose READ is still in flight. Called from a request handler (or while
// holding a lock a handler needs) it can deadlock: the READ it waits for would never be
// answered. So it only ever runs here, on a dedicated thread that holds no lock while it
// notifies; request handlers only record replies and wake this thread, never wait for it.
#pragma once

#define FUSE_USE_VERSION 314
#include <fuse_lowlevel.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>

#include "kernel_page_ledger.h"

namespace ckptfs {

class KernelInvalidator {
 public:
  KernelInvalidator(fuse_session* session, KernelPageLedger& ledger)
      : session_(session), ledger_(ledger) {}
  ~KernelInvalidator() { stop(); }
  KernelInvalidator(const KernelInvalidator&) = delete;
  KernelInvalidator& operator=(const KernelInvalidator&) = delete;

  void start();
  // Before unmounting (which closes the session's fd): no notification starts after this
  // returns. Waits up to |wait| for one in progress to end and returns whether none is left;
  // one that is still waiting (for a READ the stopped loop will never answer) is ended by the
  // unmount, and the thread then never touches the session again.
  bool quiesce(std::chrono::milliseconds wait);
  // Stops and joins the thread. Call after the filesystem is unmounted, so a notification in
  // progress cannot wait for a READ that will never be answered.
  void stop();
  // Non-blocking: asks the thread to bring the ledger back within its budget.
  void wake();

  std::uint64_t invalidations() const { return invalidations_.load(); }
  std::uint64_t invalidated_bytes() const { return invalidated_bytes_.load(); }

 private:
  void run();

  fuse_session* session_;
  KernelPageLedger& ledger_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool pending_ = false;
  bool stopping_ = false;
  bool busy_ = false;  // notifying, without mu_ held
  std::thread thread_;
  std::atomic<std::uint64_t> invalidations_{0};
  std::atomic<std::uint64_t> invalidated_bytes_{0};
};

}  // namespace ckptfs
