// Shorter scheduler time slices for the threads that answer FUSE requests.
//
// A reader blocked on a LOOKUP or an IOCTL waits for a request thread to be woken. With two
// CPUs, that thread is often woken onto the CPU where the notifier is copying a preload into
// the page cache, and Linux's EEVDF scheduler (6.6+) lets the running thread finish its slice
// (1.4 ms on two CPUs) before the woken one runs: the reader then waits that long for a reply
// that takes microseconds. Since 6.12 a SCHED_OTHER thread may ask for a shorter slice
// (sched_attr.sched_runtime), which gives it an earlier deadline, so the scheduler lets it
// preempt such a thread when it wakes. docs/design.md has the measurements.
#pragma once

#include <chrono>

namespace ckptfs {

// How long a request thread may run before the scheduler may preempt it: longer than copying
// one 1 MiB READ reply here (about 0.2 ms), so a reply is rarely cut, and well under the
// default slice.
inline constexpr std::chrono::microseconds kRequestThreadSlice{300};

// Asks the kernel to run the calling thread with time slices of |slice|; threads it creates
// afterwards inherit them. Its nice value and policy stay as they are, and a thread that is
// not SCHED_OTHER (chrt, SCHED_IDLE, ...) is left alone. Returns the slice the thread now
// runs with as the kernel reports it (|slice| clamped to 0.1-100 ms), or 0 when the thread was
// left alone, the call failed, or the kernel has no per-thread slice (before 6.12, which
// accepts the request and ignores it).
std::chrono::nanoseconds request_scheduler_slice(std::chrono::nanoseconds slice);

}  // namespace ckptfs
