#include "shutdown_signal.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <stdexcept>
#include <system_error>

namespace ckptfs {
namespace {

// What the handler reaches: a handler gets no argument but the signal number.
std::atomic<int> g_wake_fd{-1};
// Set once the shutdown has begun: the signals sent to interrupt the loop's wait then do nothing.
std::atomic<bool> g_exiting{false};

void on_shutdown_signal(int /*signal*/) {
  if (g_exiting.load()) return;
  const int saved = errno;
  const std::uint64_t one = 1;
  (void)!::write(g_wake_fd.load(), &one, sizeof one);
  errno = saved;
}

void on_pipe_signal(int /*signal*/) {}  // a handler rather than SIG_IGN, which exec would pass on

}  // namespace

ShutdownSignal::ShutdownSignal(fuse_session* session, std::function<void()> before_exit)
    : session_(session),
      before_exit_(std::move(before_exit)),
      wake_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {
  if (!wake_) throw std::system_error(errno, std::generic_category(), "eventfd");
  int expected = -1;
  if (!g_wake_fd.compare_exchange_strong(expected, wake_.get())) {
    throw std::logic_error("ShutdownSignal: only one at a time");
  }
  g_exiting = false;
  for (std::size_t i = 0; i < kSignals.size(); ++i) {
    struct sigaction current {};
    if (::sigaction(kSignals[i], nullptr, &current) != 0 || current.sa_handler != SIG_DFL) {
      continue;  // ignored or already handled by whoever started us: leave it so
    }
    struct sigaction sa {};
    sa.sa_handler = kSignals[i] == SIGPIPE ? on_pipe_signal : on_shutdown_signal;
    sigemptyset(&sa.sa_mask);
    // No SA_RESTART: the loop's sem_wait must return with EINTR to notice the exit.
    sa.sa_flags = 0;
    if (::sigaction(kSignals[i], &sa, &previous_[i]) != 0) {
      const int err = errno;
      restore();
      throw std::system_error(err, std::generic_category(), "sigaction");
    }
    installed_[i] = true;
    if (wake_signal_ == 0 && kSignals[i] != SIGPIPE) wake_signal_ = kSignals[i];
  }
}

ShutdownSignal::~ShutdownSignal() {
  stop();
  restore();
}

void ShutdownSignal::restore() {
  for (std::size_t i = 0; i < kSignals.size(); ++i) {
    if (installed_[i]) ::sigaction(kSignals[i], &previous_[i], nullptr);
    installed_[i] = false;
  }
  int mine = wake_.get();
  g_wake_fd.compare_exchange_strong(mine, -1);
}

void ShutdownSignal::start() {
  loop_thread_ = ::pthread_self();
  thread_ = std::thread([this] {
    pthread_setname_np(pthread_self(), "ckptfs-shutdown");
    run();
  });
}

void ShutdownSignal::stop() {
  stop_requested_ = true;
  const std::uint64_t one = 1;
  (void)!::write(wake_.get(), &one, sizeof one);
  if (thread_.joinable()) thread_.join();
}

bool ShutdownSignal::wait(int timeout_ms) {
  pollfd pfd{wake_.get(), POLLIN, 0};
  std::uint64_t count = 0;
  return ::poll(&pfd, 1, timeout_ms) > 0 && ::read(wake_.get(), &count, sizeof count) > 0;
}

void ShutdownSignal::run() {
  while (!wait(-1)) {
  }
  // The loop ended on its own (unmounted), or no signal was ours to handle (all were ignored,
  // so none woke us).
  if (stop_requested_ || wake_signal_ == 0) return;
  g_exiting = true;
  before_exit_();
  fuse_session_exit(session_);
  // libfuse's loop (3.14) notices the exit when a signal interrupts its sem_wait, or after a
  // worker's next request. Sent again until the loop has returned: one sent just before the
  // loop enters sem_wait would be lost.
  while (!stop_requested_) {
    ::pthread_kill(loop_thread_, wake_signal_);
    wait(20);
  }
}

ShutdownSignalsBlocked::ShutdownSignalsBlocked() {
  sigset_t block;
  sigemptyset(&block);
  for (int s : ShutdownSignal::kSignals) {
    if (s != SIGPIPE) sigaddset(&block, s);
  }
  ::pthread_sigmask(SIG_BLOCK, &block, &previous_);
}

ShutdownSignalsBlocked::~ShutdownSignalsBlocked() {
  ::pthread_sigmask(SIG_SETMASK, &previous_, nullptr);
}

}  // namespace ckptfs
