#include "scheduler_slice.h"

#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

namespace ckptfs {
namespace {

// The kernel's struct sched_attr (linux/sched/types.h, which clashes with glibc's sched.h);
// glibc 2.36 has no wrappers for sched_getattr/sched_setattr either.
struct SchedAttr {
  std::uint32_t size = sizeof(SchedAttr);
  std::uint32_t policy = 0;
  std::uint64_t flags = 0;
  std::int32_t nice = 0;
  std::uint32_t priority = 0;
  std::uint64_t runtime = 0;  // for SCHED_OTHER since 6.12: the slice
  std::uint64_t deadline = 0;
  std::uint64_t period = 0;
  std::uint32_t util_min = 0;
  std::uint32_t util_max = 0;
};
constexpr std::uint64_t kFlagResetOnFork = 0x01;  // SCHED_FLAG_RESET_ON_FORK

bool get_attr(SchedAttr& attr) {
  attr = SchedAttr{};
  return syscall(SYS_sched_getattr, 0, &attr, sizeof attr, 0) == 0;
}

}  // namespace

std::chrono::nanoseconds request_scheduler_slice(std::chrono::nanoseconds slice) {
  SchedAttr current;
  if (!get_attr(current) || current.policy != SCHED_OTHER) return {};
  SchedAttr wanted;
  wanted.policy = SCHED_OTHER;
  wanted.flags = current.flags & kFlagResetOnFork;
  wanted.nice = current.nice;
  wanted.runtime = static_cast<std::uint64_t>(slice.count());
  SchedAttr now;
  if (syscall(SYS_sched_setattr, 0, &wanted, 0) != 0 || !get_attr(now)) return {};
  return std::chrono::nanoseconds(now.runtime);
}

}  // namespace ckptfs
