#include "kernel_invalidator.h"

#include <chrono>

namespace ckptfs {

void KernelInvalidator::start() {
  thread_ = std::thread([this] { run(); });
}

void KernelInvalidator::stop() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

bool KernelInvalidator::quiesce(std::chrono::milliseconds wait) {
  std::unique_lock lock(mu_);
  stopping_ = true;
  cv_.notify_all();
  return cv_.wait_for(lock, wait, [this] { return !busy_; });
}

void KernelInvalidator::wake() {
  {
    std::lock_guard lock(mu_);
    pending_ = true;
  }
  cv_.notify_one();
}

void KernelInvalidator::run() {
  for (;;) {
    {
      std::unique_lock lock(mu_);
      // The timeout is a safety net only; replies over budget wake the thread at once.
      cv_.wait_for(lock, std::chrono::milliseconds(200), [this] { return pending_ || stopping_; });
      if (stopping_) return;
      pending_ = false;
      busy_ = true;
    }
    // No lock is held from here on: the ledger hands out ranges it already took off its
    // record, so replies recorded meanwhile are accounted afresh.
    for (const auto& r : ledger_.take_excess()) {
      {
        std::lock_guard lock(mu_);
        if (stopping_) break;  // quiesce(): the session is about to be unmounted
      }
      int rc = fuse_lowlevel_notify_inval_inode(session_, r.inode, static_cast<off_t>(r.offset),
                                                static_cast<off_t>(r.length));
      // -ENOENT: the kernel has already forgotten the inode, and its pages with it.
      if (rc == 0 || rc == -ENOENT) {
        ++invalidations_;
        invalidated_bytes_ += r.length;
      }
    }
    {
      std::lock_guard lock(mu_);
      busy_ = false;
    }
    cv_.notify_all();
  }
}

}  // namespace ckptfs
