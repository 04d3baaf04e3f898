#include "convert_command.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "block_cache.h"
#include "byte_source.h"
#include "checkpoint_set.h"
#include "cli_options.h"
#include "errors.h"
#include "memory_budget.h"
#include "safetensors_view.h"
#include "tensor_reader.h"
#include "unique_fd.h"

namespace ckptfs {
namespace {

constexpr const char* kUsage =
    "usage: ckptfs convert [--limit-mb N] [--root PATH] CHECKPOINT OUT.safetensors\n"
    "  Writes every tensor of CHECKPOINT (any format ckptfs mounts) as one safetensors file,\n"
    "  keyed by dotted key path, holding at most about N MiB (default 1024) of it in memory.\n"
    "  Tensors safetensors cannot hold are listed in the header's __metadata__ as skipped.\n";

std::string gib(std::uint64_t bytes) {
  return fmt::format("{:.2f} GiB", static_cast<double>(bytes) / (1ull << 30));
}

// Writes all of |data| at |offset|; throws IoError naming |path|.
void write_fully(int fd, const std::byte* data, std::size_t n, std::uint64_t offset,
                 const std::string& path) {
  std::size_t done = 0;
  while (done < n) {
    ssize_t w = ::pwrite(fd, data + done, n - done, static_cast<off_t>(offset + done));
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) {
      int err = errno;
      throw IoError(fmt::format("cannot write '{}': {}", path, errno_text(err)), err);
    }
    done += static_cast<std::size_t>(w);
  }
}

// Removes the temporary output unless the conversion completed.
struct TempFile {
  std::string path;
  bool keep = false;
  ~TempFile() {
    if (!keep && !path.empty()) ::unlink(path.c_str());
  }
};

}  // namespace

int run_convert_command(int argc, char** argv) {
  std::uint64_t limit_mb = 1024;
  std::string root;
  std::vector<std::string> rest;
  for (int i = 2; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "-h" || a == "--help") {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if ((a == "--limit-mb" || a == "--root") && i + 1 < argc) {
      std::string v = argv[++i];
      if (a == "--root") {
        root = v;
        continue;
      }
      auto n = parse_limit_mb(v);
      if (!n) {
        std::fprintf(stderr, "ckptfs convert: --limit-mb needs %s, not '%s'\n", kLimitMbRule,
                     v.c_str());
        return 2;
      }
      limit_mb = *n;
    } else if (a.starts_with("-")) {
      std::fprintf(stderr, "ckptfs convert: unknown option '%s'\n%s", a.c_str(), kUsage);
      return 2;
    } else {
      rest.push_back(a);
    }
  }
  if (rest.size() != 2) {
    std::fputs(kUsage, stderr);
    return 2;
  }
  const std::string& in = rest[0];
  const std::string& out = rest[1];
  const auto started = std::chrono::steady_clock::now();
  try {
    // The output first: a bad destination should fail before a long load.
    TempFile tmp{out + ".ckptfs-partial"};
    UniqueFd fd(::open(tmp.path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    if (!fd) {
      int err = errno;
      throw IoError(fmt::format("cannot create '{}': {}", tmp.path, errno_text(err)), err);
    }
    CheckpointSet set({in});
    if (!root.empty()) set.catalog().reroot(root);
    const ByteSource& data = set.data();
    SafetensorsView view(set.catalog(), in);
    for (const std::string& s : view.skipped())
      std::fprintf(stderr, "ckptfs convert: skipped %s\n", s.c_str());

    // Half the budget caches checkpoint blocks, an eighth (at most 8 MiB) is the copy buffer,
    // and the output's dirty pages are flushed and dropped every quarter (at most 64 MiB), so
    // neither side grows with the checkpoint.
    const std::uint64_t limit = limit_mb << 20;
    BlockCache cache(data, limit / 2);
    cache.enable_prefetch(4);  // convert reads in order: overlap the reads with the writes
    set.catalog().set_source_reader([&cache](std::uint64_t at, std::span<std::byte> dst,
                                             StreamHint hint) { cache.read(at, dst, hint); });
    TensorReader reader(set.catalog(), cache);
    const std::uint64_t flush_every = std::min<std::uint64_t>(limit / 4, 64ull << 20);

    const bool progress = ::isatty(STDERR_FILENO) != 0;
    std::vector<std::byte> buffer(std::clamp<std::uint64_t>(limit / 8, 1u << 20, 8u << 20));
    std::uint64_t pos = 0;
    std::uint64_t flushed = 0;
    auto last_report = started;
    while (pos < view.size()) {
      const auto n =
          static_cast<std::size_t>(std::min<std::uint64_t>(buffer.size(), view.size() - pos));
      view.read(pos, std::span(buffer.data(), n), reader);
      write_fully(fd.get(), buffer.data(), n, pos, tmp.path);
      pos += n;
      if (pos - flushed >= flush_every || pos == view.size()) {
        ::fdatasync(fd.get());
        ::posix_fadvise(fd.get(), 0, 0, POSIX_FADV_DONTNEED);
        flushed = pos;
      }
      const auto now = std::chrono::steady_clock::now();
      if (progress && (now - last_report > std::chrono::milliseconds(200) || pos == view.size())) {
        const double secs = std::chrono::duration<double>(now - started).count();
        std::fprintf(stderr, "\rckptfs convert: %3.0f%%  %s of %s  %.0f MiB/s   ",
                     100.0 * static_cast<double>(pos) / static_cast<double>(view.size()),
                     gib(pos).c_str(), gib(view.size()).c_str(),
                     static_cast<double>(pos) / (1 << 20) / std::max(secs, 1e-3));
        last_report = now;
      }
    }
    if (progress) std::fputs("\n", stderr);
    if (::fsync(fd.get()) != 0 || ::rename(tmp.path.c_str(), out.c_str()) != 0) {
      int err = errno;
      throw IoError(fmt::format("cannot finish '{}': {}", out, errno_text(err)), err);
    }
    tmp.keep = true;
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    std::printf(
        "%s: %zu tensors, %s in %.1f s%s\n", out.c_str(), view.tensor_count(),
        gib(view.size()).c_str(), secs,
        view.skipped().empty()
            ? ""
            : fmt::format("; {} skipped (listed in __metadata__)", view.skipped().size()).c_str());
  } catch (const CkptError& e) {
    std::fprintf(stderr, "ckptfs convert: %s: %s\n", in.c_str(), e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "ckptfs convert: %s: out of memory\n", in.c_str());
    return 1;
  }
  return 0;
}

}  // namespace ckptfs
