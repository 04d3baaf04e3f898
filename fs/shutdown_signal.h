// ShutdownSignal: SIGINT, SIGTERM and SIGHUP end the mount in an order that cannot hang.
//
// libfuse's own handlers (fuse_set_signal_handlers) end the request loop at once. But the
// KernelNotifier may then be in the middle of an invalidation, which the kernel handles by
// waiting for the lock of every page in the range, including pages whose READ is still queued:
// with the loop gone, nobody answers that READ, the notifier's write to /dev/fuse never returns,
// and because that write holds a reference to the device, closing it at the unmount cannot
// abort the connection either. The daemon then never exits, not even on SIGKILL (seen in
// test_signals_under_load: ckptfs-notifier in D state in __folio_lock under
// invalidate_inode_pages2_range; made certain by the tests' notify_gate library).
//
// So here a signal only wakes a thread, which runs |before_exit| (the notifier's quiesce) while
// requests are still being answered, and only then ends the loop.
#pragma once

#define FUSE_USE_VERSION 314
#include <fuse_lowlevel.h>
#include <pthread.h>
#include <signal.h>

#include <array>
#include <atomic>
#include <functional>
#include <thread>

#include "unique_fd.h"

namespace ckptfs {

class ShutdownSignal {
 public:
  // The signals that end the mount, then SIGPIPE, which is caught and dropped.
  static constexpr std::array<int, 4> kSignals{SIGHUP, SIGINT, SIGTERM, SIGPIPE};

  // Installs the handlers, in place of libfuse's: like those, only for signals not ignored
  // (nohup, a shell's background job), and SIGPIPE is caught and dropped. Throws
  // std::system_error when a handler cannot be installed, std::logic_error if another
  // ShutdownSignal exists (the handlers are process-wide).
  ShutdownSignal(fuse_session* session, std::function<void()> before_exit);
  ~ShutdownSignal();
  ShutdownSignal(const ShutdownSignal&) = delete;
  ShutdownSignal& operator=(const ShutdownSignal&) = delete;

  // Starts the thread. Call from the thread that will run the request loop, which is the one
  // the thread interrupts once the loop should end.
  void start();
  // Call once the request loop has returned: ends and joins the thread.
  void stop();

 private:
  void run();
  // Puts back the handlers that were there before; the handler no longer reaches wake_.
  void restore();
  // Waits up to |timeout_ms| (-1: for ever) for a signal or stop(), and consumes the wake-up;
  // false when there was none (timeout, or poll interrupted).
  bool wait(int timeout_ms);

  fuse_session* session_;
  std::function<void()> before_exit_;
  UniqueFd wake_;  // an eventfd: the handler's only action, as it must be async-signal-safe
  std::array<struct sigaction, kSignals.size()> previous_{};
  std::array<bool, kSignals.size()> installed_{};
  int wake_signal_ = 0;  // one of ours, sent to interrupt the loop's wait
  pthread_t loop_thread_{};
  std::atomic<bool> stop_requested_{false};
  std::thread thread_;
};

// Blocks the signals that end the mount (not SIGPIPE) in the calling thread while it lives. Threads
// created meanwhile inherit the mask, so a signal reaches only the thread running the request loop,
// never a helper thread whose system call it would interrupt.
class ShutdownSignalsBlocked {
 public:
  ShutdownSignalsBlocked();
  ~ShutdownSignalsBlocked();
  ShutdownSignalsBlocked(const ShutdownSignalsBlocked&) = delete;
  ShutdownSignalsBlocked& operator=(const ShutdownSignalsBlocked&) = delete;

 private:
  sigset_t previous_{};
};

}  // namespace ckptfs
