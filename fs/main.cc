// ckptfs daemon: open the checkpoint, build the catalog, mount, serve until unmounted.
//
// Everything that can fail because of the input happens before the mount, so a bad
// checkpoint gives one line on stderr and no mount. The mount happens before detaching, so
// `ckptfs a.pt m && ls m` works and the exit code carries mount errors.
#include <malloc.h>
#include <pthread.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "byte_source.h"
#include "checkpoint_set.h"
#include "cli_options.h"
#include "convert_command.h"
#include "errors.h"
#include "fuse_server.h"
#include "inspect_commands.h"
#include "kernel_notifier.h"
#include "memory_budget.h"
#include "mount_lister.h"
#include "scheduler_slice.h"
#include "shutdown_signal.h"

namespace ckptfs {
namespace {

constexpr std::size_t kMaxWarningLines = 20;

struct FuseArgs {
  std::vector<std::string> storage;
  std::vector<char*> argv;
  fuse_args args{};
  explicit FuseArgs(std::vector<std::string> a) : storage(std::move(a)) {
    for (auto& s : storage) argv.push_back(s.data());
    args = FUSE_ARGS_INIT(static_cast<int>(argv.size()), argv.data());
  }
  ~FuseArgs() { fuse_opt_free_args(&args); }
  FuseArgs(const FuseArgs&) = delete;
  FuseArgs& operator=(const FuseArgs&) = delete;
};

struct SessionDeleter {
  void operator()(fuse_session* se) const { fuse_session_destroy(se); }
};
using SessionPtr = std::unique_ptr<fuse_session, SessionDeleter>;

// Unmounts on every exit path once mounted.
class MountGuard {
 public:
  explicit MountGuard(fuse_session* se) : se_(se) {}
  ~MountGuard() { unmount(); }
  void unmount() {
    if (se_ == nullptr) return;
    fuse_session_unmount(se_);
    se_ = nullptr;
  }
  MountGuard(const MountGuard&) = delete;
  MountGuard& operator=(const MountGuard&) = delete;

 private:
  fuse_session* se_;
};

// One line of /proc/self/mountinfo: the device number ("major:minor") and the mountpoint.
struct MountTableEntry {
  std::string device;
  std::string mountpoint;
};

// The mount table as /proc/self/mountinfo lists it, never from stat(): before the request loop
// runs, any access to our own mount would wait for this very thread.
std::vector<MountTableEntry> read_mount_table() {
  auto unescape = [](const std::string& s) {  // mountinfo writes ' ', '\t', '\n', '\\' as \ooo
    std::string out;
    for (std::size_t i = 0; i < s.size(); ++i) {
      auto octal = [&](std::size_t k) { return s[k] >= '0' && s[k] <= '7'; };
      if (s[i] == '\\' && i + 3 < s.size() && octal(i + 1) && octal(i + 2) && octal(i + 3)) {
        out.push_back(
            static_cast<char>((s[i + 1] - '0') * 64 + (s[i + 2] - '0') * 8 + (s[i + 3] - '0')));
        i += 3;
      } else {
        out.push_back(s[i]);
      }
    }
    return out;
  };
  std::vector<MountTableEntry> table;
  if (std::FILE* f = std::fopen("/proc/self/mountinfo", "r")) {
    char line[8192];
    while (std::fgets(line, sizeof line, f) != nullptr) {
      // id parent major:minor root mountpoint ...
      char dev[64], root[4096], point[4096];
      if (std::sscanf(line, "%*s %*s %63s %4095s %4095s", dev, root, point) == 3)
        table.push_back({dev, unescape(point)});
    }
    std::fclose(f);
  }
  return table;
}

// Our mount's device number; |canonical| is the mountpoint resolved before mounting. The last
// entry on that path is the newest mount there. "" if not found.
std::string mount_device(const std::string& canonical) {
  std::string device;
  for (const MountTableEntry& e : read_mount_table()) {
    if (e.mountpoint == canonical) device = e.device;
  }
  return device;
}

// Whether the mount with |device| is still attached (a lazy unmount detaches it at once).
bool device_mounted(const std::string& device) {
  const auto table = read_mount_table();
  return std::any_of(table.begin(), table.end(),
                     [&](const MountTableEntry& e) { return e.device == device; });
}

// Makes |bdi|'s read_ahead_kb |kb| (writing only when it differs); true when it reads back so.
bool set_readahead(const std::string& bdi, std::uint32_t kb) {
  const std::string path = bdi + "/read_ahead_kb";
  auto current = [&path] {
    unsigned now = 0;
    std::FILE* r = std::fopen(path.c_str(), "r");
    bool ok = r != nullptr && std::fscanf(r, "%u", &now) == 1;
    if (r != nullptr) std::fclose(r);
    return ok ? now : 0u;
  };
  if (current() == kb) return true;
  std::FILE* f = std::fopen(path.c_str(), "w");
  if (f == nullptr) return false;
  bool written = std::fprintf(f, "%u\n", kb) > 0;
  written = (std::fclose(f) == 0) && written;
  return written && current() == kb;
}

// The kernel sets the readahead from the INIT reply, which the request loop sends: the value is
// written after that, from a helper thread that never touches the mount.
// Blocks loaded ahead of a sequential reader: enough to hide the source's latency behind
// the copies of the blocks before (docs/benchmarks.md), a few MiB at most.
constexpr std::uint32_t kPrefetchBlocks = 4;
// How long a signal waits for the notifier to finish, while requests are still answered. A
// notification waits only for READs in flight, which the loop answers: milliseconds.
constexpr std::chrono::milliseconds kQuiesceWhileServing{5000};

// |warn|: the user asked for |kb| (the default is set quietly, and only as root). |stop| ends
// the thread early: a mount that ends within its first seconds must not wait for it.
std::thread readahead_setter(const MountState& state, std::string bdi, std::uint32_t kb, bool warn,
                             const std::atomic<bool>& stop) {
  return std::thread([&state, &stop, bdi = std::move(bdi), kb, warn] {
    pthread_setname_np(pthread_self(), "ckptfs-readahd");
    for (int i = 0; i < 500 && !state.initialized && !stop; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    // The kernel applies the INIT reply just after it is sent; keep the value in place for a
    // moment so that a late application cannot undo it.
    bool took = false;
    for (int tick = 0; !bdi.empty() && tick < 200 && state.initialized && !stop; ++tick) {
      took = set_readahead(bdi, kb) || took;  // fails harmlessly once unmounted
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    if (took || !warn || stop) return;
    std::fprintf(stderr, "ckptfs: warning: could not set --readahead-kb %u (needs root)\n", kb);
  });
}

// Without --readahead-kb, a root daemon whose budget is large enough asks the kernel for 1 MiB
// READs: streams then cost an eighth of the round trips (a cold memmap + bf16 loop ran ~15 %
// faster here: docs/benchmarks.md). Below 256 MiB the kernel's 128 KiB stays, because every
// worker's reply buffer and in-flight reply grow to the request size (32 MiB in all at 1 MiB,
// docs/memory.md), which a small budget should not carry.
constexpr std::uint32_t kDefaultReadaheadKb = 1024;
constexpr std::uint64_t kDefaultReadaheadMinLimitMb = 256;

std::uint32_t readahead_kb_for(const CliOptions& opts) {
  if (opts.readahead_kb != 0) return opts.readahead_kb;
  if (::geteuid() == 0 && opts.limit_mb >= kDefaultReadaheadMinLimitMb) return kDefaultReadaheadKb;
  return 0;  // the kernel's
}

std::string fsname_for(const std::string& path) {
  std::string s = path;
  for (char& c : s) {
    if (c == ',' || c == '\\') c = '_';  // commas separate mount options
  }
  return s;
}

int run(const CliOptions& opts) {
  const std::string what = CheckpointSet::describe(opts.checkpoints);
  std::unique_ptr<CheckpointSet> set;
  try {
    set = std::make_unique<CheckpointSet>(opts.checkpoints);
    if (!opts.root.empty()) set->catalog().reroot(opts.root);
  } catch (const CkptError& e) {
    std::fprintf(stderr, "ckptfs: %s: %s\n", what.c_str(), e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "ckptfs: %s: out of memory while reading the checkpoint\n", what.c_str());
    return 1;
  }
  // The pickle's value graph is gone; give its heap back before serving for hours.
  ::malloc_trim(0);
  const TensorCatalog& catalog = set->catalog();
  // Tensor bytes come from the file(s), plus inflated records where some were deflated.
  const ByteSource& data = set->data();
  const auto& warnings = catalog.warnings();
  for (std::size_t i = 0; i < warnings.size() && i < kMaxWarningLines; ++i) {
    std::fprintf(stderr, "ckptfs: warning: %s\n", warnings[i].c_str());
  }
  if (warnings.size() > kMaxWarningLines) {
    std::fprintf(stderr, "ckptfs: warning: ... and %zu more (see the sidecars' \"error\" fields)\n",
                 warnings.size() - kMaxWarningLines);
  }

  struct stat mst {};
  if (::stat(opts.mountpoint.c_str(), &mst) != 0) {
    std::fprintf(stderr, "ckptfs: mountpoint '%s': %s\n", opts.mountpoint.c_str(),
                 errno_text(errno).c_str());
    return 1;
  }
  if (!S_ISDIR(mst.st_mode)) {
    std::fprintf(stderr, "ckptfs: mountpoint '%s' is not a directory\n", opts.mountpoint.c_str());
    return 1;
  }
  // Resolved now, while resolving it cannot enter our own (not yet served) mount.
  std::string canonical_mountpoint = opts.mountpoint;
  if (std::unique_ptr<char, decltype(&std::free)> real(::realpath(opts.mountpoint.c_str(), nullptr),
                                                       &std::free);
      real) {
    canonical_mountpoint = real.get();
  }

  // The small metadata reads (the end record, local headers, the byteorder record) left
  // checkpoint pages in the page cache (large ones drop their own); from now on block reads
  // bypass it (O_DIRECT) or drop what they read.
  set->drop_cache();

  // The cache memory is reserved (not touched) before forking: no threads exist yet.
  const MemoryBudget budget = split_memory_budget(opts.limit_mb << 20);
  std::unique_ptr<BlockCache> cache;
  try {
    cache = std::make_unique<BlockCache>(data, budget.cache_bytes);
  } catch (const CkptError& e) {
    std::fprintf(stderr, "ckptfs: %s\n", e.what());
    return 1;
  }
  // Local headers are read through the cache: the block holding one also holds the data that
  // follows it, and the page cache of the checkpoint stays empty.
  set->catalog().set_source_reader([c = cache.get()](std::uint64_t at, std::span<std::byte> dst,
                                                     StreamHint hint) { c->read(at, dst, hint); });
  KernelPageLedger ledger(budget.kernel_bytes);
  MountState state(catalog, data, *cache, ledger);
  state.limit_bytes = opts.limit_mb << 20;
  state.xattrs = opts.xattrs;
  // Up to KernelNotifier::kMaxQueuedLookups + 1 looked-up files are stored ahead of their
  // readers at a time, and ahead of a listing reader files adding up to this at most, plus
  // one: a sixteenth of the kernel's share each keeps them well inside it. 8 MiB stores whole
  // the 4 MiB files that docs/benchmarks.md streams; of a larger file, the first MiBs are what
  // its first faults would wait for, and the kernel's readahead follows on from there.
  state.preload_bytes =
      opts.preload ? std::min<std::uint64_t>(std::uint64_t{8} << 20, budget.kernel_bytes / 16) : 0;
  state.mtime = data.mtime();
  state.uid = ::getuid();
  state.gid = ::getgid();

  std::vector<std::string> args = {"ckptfs", "-o",
                                   "ro,subtype=ckptfs,fsname=" + fsname_for(set->name())};
  for (const auto& o : opts.fuse_options) {
    args.push_back("-o");
    args.push_back(o);
  }
  // Read-only whatever -o said: the kernel opens files without asking the daemon (op_init in
  // fuse_server.cc), so a writable mount would let a write open succeed; the last option wins.
  args.insert(args.end(), {"-o", "ro"});
  if (opts.debug) args.push_back("-d");
  FuseArgs fargs(std::move(args));

  SessionPtr se(
      fuse_session_new(&fargs.args, &fuse_operations(), sizeof(fuse_lowlevel_ops), &state));
  if (!se) {
    std::fprintf(stderr, "ckptfs: could not start a FUSE session (bad -o option?)\n");
    return 1;
  }
  // Declared before the guard: on every exit path the mount goes first, then the thread. No
  // notification is left waiting by then: a signal ends the loop only once the notifier is
  // quiet (ShutdownSignal), and an unmount that ends the loop ends the connection with it.
  KernelNotifier notifier(
      se.get(), ledger,
      [&state](std::uint64_t ino, std::uint64_t offset, std::span<std::byte> out) {
        return read_for_preload(state, ino, offset, out);
      });
  state.notifier = &notifier;
  // The listing after mounting is requests to this daemon: a signal stops it while they are
  // still answered; any other end of the loop waits for the unmount (below).
  MountLister lister(canonical_mountpoint, prelist_entries_for(opts));
  state.lister = &lister;
  // A signal ends the loop only after the notifier has finished what it was doing, while
  // requests are still answered (see shutdown_signal.h for the hang this prevents).
  std::optional<ShutdownSignal> shutdown;
  try {
    shutdown.emplace(se.get(), [&notifier, &lister] {
      lister.stop();
      if (!notifier.quiesce(kQuiesceWhileServing)) {
        std::fprintf(stderr,
                     "ckptfs: a page-cache notification is still waiting after %lld ms; "
                     "unmounting anyway\n",
                     static_cast<long long>(kQuiesceWhileServing.count()));
      }
    });
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ckptfs: could not install signal handlers: %s\n", e.what());
    return 1;
  }
  // By its absolute path: libfuse unmounts by the path it mounted, after fuse_daemonize has
  // changed to "/", and a relative one would then name nothing (the mount was left behind).
  if (fuse_session_mount(se.get(), canonical_mountpoint.c_str()) != 0) {
    std::fprintf(
        stderr,
        "ckptfs: could not mount on '%s' (is /dev/fuse available and fusermount3 installed?)\n",
        opts.mountpoint.c_str());
    return 1;
  }
  MountGuard guard(se.get());
  const std::uint32_t readahead_kb = readahead_kb_for(opts);
  const std::string device = mount_device(canonical_mountpoint);
  // The kernel sizes buffered and mmap READs by the mount's bdi readahead (128 KiB by default);
  // only root may raise it, through sysfs, once the mount exists.
  const std::string bdi = readahead_kb != 0 && !device.empty() ? "/sys/class/bdi/" + device : "";
  if (fuse_daemonize(opts.foreground ? 1 : 0) != 0) {
    std::fprintf(stderr, "ckptfs: could not detach\n");
    return 1;
  }

  std::thread readahead;
  std::atomic<bool> readahead_stop{false};
  {
    // After fuse_daemonize: threads do not survive its fork. None of them takes the signals.
    const ShutdownSignalsBlocked blocked;
    notifier.start();
    cache->enable_prefetch(kPrefetchBlocks);
    cache->start_prefault();
    if (readahead_kb != 0) {
      readahead = readahead_setter(state, bdi, readahead_kb, /*warn=*/opts.readahead_kb != 0,
                                   readahead_stop);
    }
    shutdown->start();
    lister.start();
  }

  // Last, after the helper threads (notifier, prefetcher, prefaulter) exist: only libfuse's
  // request threads, which this thread creates next, inherit the short slice.
  state.request_slice_ns =
      static_cast<std::uint64_t>(request_scheduler_slice(kRequestThreadSlice).count());
  fuse_loop_config* cfg = fuse_loop_cfg_create();
  fuse_loop_cfg_set_clone_fd(cfg, 0);
  fuse_loop_cfg_set_max_threads(cfg, 16);
  int rc = fuse_session_loop_mt(se.get(), cfg);
  shutdown->stop();
  // When a lazily unmounted (fusermount3 -u -z) filesystem's last file closes, the kernel ends
  // the connection, and reading /dev/fuse then fails with ENODEV (which libfuse takes as the
  // end) or, in ~7 % of teardowns on kernel 6.18, ECONNABORTED (which it reports as an error,
  // after printing "fuse: reading device: ..."). A mount that is gone has ended cleanly; an
  // abort of one still attached (fusectl's abort) stays an error.
  if (rc == -ECONNABORTED && !device.empty() && !device_mounted(device)) rc = 0;
  fuse_loop_cfg_destroy(cfg);
  readahead_stop = true;
  if (readahead.joinable()) readahead.join();
  // The unmount closes the session's fd: the notifier must not start a notification on it
  // after that (found by TSan: close() racing the notifier's writev()). After a signal it is
  // quiet already; after an unmount the kernel fails its notifications at once.
  notifier.quiesce(std::chrono::milliseconds(500));
  guard.unmount();
  // After the unmount closed /dev/fuse: a request of the listing child still waiting (the loop
  // ended some other way than a signal, which stops the listing first) now fails at once.
  lister.stop();
  notifier.stop();
  // Negative values are errors; a signal or an unmount is a clean end.
  return rc < 0 ? 1 : 0;
}

}  // namespace
}  // namespace ckptfs

namespace {

// Loading a checkpoint of many tensors allocates its catalog in millions of small pieces, and
// on these VMs each first touch of a 4 KiB page is a costly fault. glibc's malloc can back its
// heap with transparent huge pages, but reads that setting (a tunable) only at start-up: so
// ckptfs re-executes itself once with it set (262,144 tensors: 7.3 s -> 4.8 s, page faults
// 300K -> 9K). CKPTFS_SMALL_PAGES=1, or any GLIBC_TUNABLES naming hugetlb, leaves it alone.
void use_huge_pages(char** argv) {
  const char* tunables = std::getenv("GLIBC_TUNABLES");
  if (std::getenv("CKPTFS_SMALL_PAGES") != nullptr ||
      (tunables != nullptr && std::strstr(tunables, "glibc.malloc.hugetlb") != nullptr)) {
    return;
  }
  std::string value = tunables != nullptr && *tunables != '\0'
                          ? std::string(tunables) + ":glibc.malloc.hugetlb=1"
                          : std::string("glibc.malloc.hugetlb=1");
  if (::setenv("GLIBC_TUNABLES", value.c_str(), 1) != 0) return;
  // By its own path, not /proc/self/exe: the process is named after the file it executes, and
  // `pgrep ckptfs`, `killall ckptfs` and top look for "ckptfs", not "exe".
  std::array<char, 4096> self{};
  const ssize_t len = ::readlink("/proc/self/exe", self.data(), self.size() - 1);
  if (len > 0) ::execv(self.data(), argv);
  ::execv("/proc/self/exe", argv);  // e.g. the file was replaced since it started
  ::unsetenv("GLIBC_TUNABLES");     // no /proc: go on with small pages
  if (tunables != nullptr) ::setenv("GLIBC_TUNABLES", tunables, 1);
}

}  // namespace

int main(int argc, char** argv) {
  // The daemon's listing child (mount_lister.h): first, it needs nothing of the rest.
  if (argc == 3 && std::string_view(argv[1]) == ckptfs::MountLister::kChildFlag) {
    return ckptfs::run_prelist_child(argv[2]);
  }
  use_huge_pages(argv);
  // libzip converts every entry's DOS time with mktime(), and glibc re-reads /etc/localtime
  // on each call when TZ is unset: a system call per zip entry. ckptfs shows no local times.
  ::setenv("TZ", "UTC0", 0);
  if (argc >= 2 && (std::string_view(argv[1]) == "ls" || std::string_view(argv[1]) == "info")) {
    return ckptfs::run_inspect_command(argc, argv);
  }
  if (argc >= 2 && std::string_view(argv[1]) == "convert") {
    return ckptfs::run_convert_command(argc, argv);
  }
  ckptfs::CliParse parsed = ckptfs::parse_cli(argc, argv);
  if (!parsed.options) return parsed.exit_code;
  return ckptfs::run(*parsed.options);
}
