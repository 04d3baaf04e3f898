#include "kernel_notifier.h"

#include <pthread.h>

#include <algorithm>
#include <cerrno>
#include <chrono>

namespace ckptfs {

void KernelNotifier::start() {
  thread_ = std::thread([this] {
    // Named, for top -H and perf; and so that tests can tell it from the request threads.
    pthread_setname_np(pthread_self(), "ckptfs-notifier");
    run();
  });
}

void KernelNotifier::stop() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

bool KernelNotifier::quiesce(std::chrono::milliseconds wait) {
  std::unique_lock lock(mu_);
  stopping_ = true;
  cv_.notify_all();
  return cv_.wait_for(lock, wait, [this] { return !busy_; });
}

bool KernelNotifier::stopping() {
  std::lock_guard lock(mu_);
  return stopping_;
}

void KernelNotifier::wake() {
  {
    std::lock_guard lock(mu_);
    pending_ = true;
  }
  cv_.notify_one();
}

bool KernelNotifier::enqueue(const Preload& p) {
  for (Preload& q : preloads_) {
    if (q.inode != p.inode) continue;
    if (p.why == PreloadFor::kLookedUp) q.why = p.why;
    return false;
  }
  // Ahead of a reader, a file stored just now (or being stored) is not stored again: the READ
  // that asks again is one whose own file lost the race to its store.
  if (p.why == PreloadFor::kAhead &&
      std::find(recent_.begin(), recent_.end(), p.inode) != recent_.end())
    return false;
  const std::size_t cap = p.why == PreloadFor::kLookedUp ? kMaxQueuedLookups : kMaxAheadFiles;
  const auto same = [&p](const Preload& q) { return q.why == p.why; };
  if (static_cast<std::size_t>(std::ranges::count_if(preloads_, same)) >= cap)
    preloads_.erase(std::ranges::find_if(preloads_, same));
  preloads_.push_back(p);
  return true;
}

void KernelNotifier::preload(std::uint64_t inode, std::uint64_t length) {
  if (!read_file_ || length == 0) return;
  bool queued = false;
  {
    std::lock_guard lock(mu_);
    queued = enqueue(Preload{inode, length, PreloadFor::kLookedUp});
  }
  if (queued) cv_.notify_one();
}

void KernelNotifier::preload_ahead(std::uint64_t reading, std::span<const AheadFile> files) {
  if (!read_file_) return;
  bool queued = false;
  {
    std::lock_guard lock(mu_);
    std::erase_if(preloads_, [reading](const Preload& p) {
      return p.inode == reading && p.why == PreloadFor::kAhead;
    });
    for (const AheadFile& f : files)
      if (f.length != 0) queued |= enqueue(Preload{f.inode, f.length, PreloadFor::kAhead});
  }
  if (queued) cv_.notify_one();
}

void KernelNotifier::invalidate_excess() {
  // No lock is held here: the ledger hands out ranges it already took off its record, so
  // replies recorded meanwhile are accounted afresh.
  for (const auto& r : ledger_.take_excess()) {
    if (stopping()) return;  // quiesce(): the session is about to be unmounted
    int rc = fuse_lowlevel_notify_inval_inode(session_, r.inode, static_cast<off_t>(r.offset),
                                              static_cast<off_t>(r.length));
    // -ENOENT: the kernel has already forgotten the inode, and its pages with it.
    if (rc == 0 || rc == -ENOENT) {
      ++invalidations_;
      invalidated_bytes_ += r.served;
    }
  }
}

int KernelNotifier::store(std::uint64_t inode, std::uint64_t offset, std::size_t length,
                          bool new_inode) {
  fuse_bufvec buf = FUSE_BUFVEC_INIT(length);
  buf.buf[0].mem = buffer_.data();
  // -ENOENT: the kernel does not know the inode. Once it has forgotten it, nobody holds it any
  // more; but the LOOKUP that asked for the preload is answered before the kernel makes the
  // inode (the looking-up task does, once it wakes), so a first store may come too early.
  // Retried for up to ~2 ms (streaming 512 files cold: 14 retries in all, and every file
  // stored; without them, 472 were).
  int rc = 0;
  for (int attempt = 0;; ++attempt) {
    rc = fuse_lowlevel_notify_store(session_, inode, static_cast<off_t>(offset), &buf,
                                    static_cast<fuse_buf_copy_flags>(0));
    if (rc != -ENOENT || !new_inode || attempt == kNewInodeRetries || stopping()) return rc;
    ++store_retries_;
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

void KernelNotifier::store_file(const Preload& p) {
  // The bytes are copied out of the block cache first: a store may wait for a page whose READ
  // is in flight, and a pin held meanwhile could keep that READ's handler from a free block.
  // (Storing from pinned blocks when they were loaded saved no time: 2026-12-03, 73 % of the
  // steps pinned, daemon CPU per 2 GiB stream 0.92 s against 0.94 s, the loop no faster.)
  if (buffer_.empty()) buffer_.resize(kStoreBytes);
  bool stored = false;
  for (std::uint64_t offset = 0; offset < p.length; offset += kStoreBytes) {
    if (stopping()) return;
    const auto want =
        static_cast<std::size_t>(std::min<std::uint64_t>(kStoreBytes, p.length - offset));
    std::size_t got = 0;
    try {
      got = read_file_(p.inode, offset, std::span(buffer_.data(), want));
    } catch (...) {
      break;  // the reader's own READ of these bytes reports the error
    }
    if (got == 0) break;
    const bool new_inode = offset == 0 && p.why == PreloadFor::kLookedUp;
    if (const int rc = store(p.inode, offset, got, new_inode); rc != 0) {
      if (rc == -ENOENT && offset == 0) ++refused_;
      break;
    }
    stored = true;
    preloaded_bytes_ += got;
    // Recorded like a reply, and the budget restored before the next store: a long preload
    // never leaves the kernel's share exceeded, nor delays the invalidations replies asked for.
    ledger_.record(p.inode, offset, got);
    invalidate_excess();
    if (got < want) break;
  }
  if (stored) {
    ++preloaded_files_;
    if (p.why == PreloadFor::kAhead) ++preloaded_ahead_;
  }
}

void KernelNotifier::run() {
  for (;;) {
    Preload next{0, 0, PreloadFor::kLookedUp};
    {
      std::unique_lock lock(mu_);
      // The timeout is a safety net only; replies over budget wake the thread at once.
      cv_.wait_for(lock, std::chrono::milliseconds(200),
                   [this] { return pending_ || stopping_ || !preloads_.empty(); });
      if (stopping_) return;
      pending_ = false;
      if (!preloads_.empty()) {
        next = preloads_.front();
        preloads_.pop_front();
        recent_[recent_next_++ % recent_.size()] = next.inode;
      }
      busy_ = true;
    }
    invalidate_excess();
    if (next.length != 0) store_file(next);
    {
      std::lock_guard lock(mu_);
      busy_ = false;
    }
    cv_.notify_all();
  }
}

}  // namespace ckptfs
