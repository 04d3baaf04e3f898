#include "cli_options.h"

#include <fmt/format.h>
#include <getopt.h>

#include <algorithm>
#include <charconv>
#include <cstdio>

#include "memory_budget.h"
#include "version.h"

namespace ckptfs {

std::string usage_text() {
  return R"(usage: ckptfs [options] CHECKPOINT... MOUNTPOINT
       ckptfs ls [--json] CHECKPOINT [PATTERN]    list tensors without mounting
       ckptfs info CHECKPOINT                     summarize without mounting
       ckptfs convert [--limit-mb N] [--root PATH] CHECKPOINT OUT.safetensors
                                                  write every tensor as one safetensors file

Mounts a PyTorch checkpoint (torch.save zip or legacy format, or safetensors) read-only
at MOUNTPOINT. Several checkpoints merge into one tree (a clear error if two hold the same
key); a shard index (*.bin.index.json, *.safetensors.index.json) or a directory holding one
mounts every shard it names, each tensor served from its shard. In the tree, every tensor
becomes a raw file (C order, little-endian, its own dtype) with a NAME.json sidecar, and
every other value a .json file. /.ckptfs/index.json lists
all tensors; /.ckptfs/model.safetensors is every tensor as one safetensors file (cp it
to convert); /.ckptfs/stats shows the memory budget and the cache.

options:
  --limit-mb N      memory budget in MiB (default 1024, at least 8): the daemon's cache plus
                    the kernel's cached pages of the mounted files (see docs/memory.md)
  --root PATH       mount only the sub-tree at PATH (e.g. state_dict of a Lightning
                    checkpoint); index.json then lists only its tensors
  --readahead-kb N  kernel readahead for the mount (root only): 1024 makes sequential and
                    memmap reads arrive as 1 MiB requests; default 1024 as root with
                    --limit-mb 256 or more, else the kernel's 128
  --no-xattrs       no user.ckptfs.* attributes: the kernel then stops asking, and tools
                    that copy attributes (cp -a, rsync -X) skip a round trip per file
  --no-preload      do not store the first MiBs of a tensor file (256 KiB or more) in the
                    page cache when it is looked up, nor the next listed files when a
                    listed one is first read: a walk that stats many tensor files and reads
                    none then reads nothing (streaming many files is slower)
  --prelist N       after mounting, list up to N entries of the tree (breadth-first; root
                    only) so that the kernel holds them: opening one then asks the daemon
                    nothing, and a stream of them is stored ahead. About 1.2 KiB of kernel
                    memory each, reclaimable; default 16 per MiB of --limit-mb (8192 at 512),
                    at most 65536; 0: list nothing
  -f, --foreground  stay in the foreground (default: detach once the mount is ready)
  -d, --debug       log every FUSE request to stderr (implies -f)
  -o OPTIONS        comma-separated mount options passed to FUSE (e.g. allow_other);
                    limit_mb=N and root=PATH there mean --limit-mb and --root; rw is
                    overridden (the mount is always read-only)
  -h, --help        show this help and exit
  -V, --version     show the version and exit

Unmount with `fusermount3 -u MOUNTPOINT`, or stop the daemon with SIGINT/SIGTERM.
)";
}

namespace {

// |text| as a whole decimal number from |lo| to |hi|, or nothing (any other character, or
// out of range).
std::optional<std::uint64_t> parse_number(std::string_view text, std::uint64_t lo,
                                          std::uint64_t hi) {
  std::uint64_t n = 0;
  auto r = std::from_chars(text.data(), text.data() + text.size(), n);
  if (r.ec != std::errc() || r.ptr != text.data() + text.size() || n < lo || n > hi) {
    return std::nullopt;
  }
  return n;
}

}  // namespace

std::optional<std::uint64_t> parse_limit_mb(std::string_view text) {
  return parse_number(text, kMinLimitBytes >> 20, 1u << 24);
}

std::uint64_t prelist_entries_for(const CliOptions& opts) {
  return opts.prelist.value_or(std::min(kMaxDefaultPrelist, opts.limit_mb * 16));
}

CliParse parse_cli(int argc, char** argv) {
  enum { kLimitMb = 1000, kRoot, kReadahead, kNoXattrs, kNoPreload, kPrelist };
  static const option kLong[] = {
      {"limit-mb", required_argument, nullptr, kLimitMb},
      {"root", required_argument, nullptr, kRoot},
      {"readahead-kb", required_argument, nullptr, kReadahead},
      {"no-xattrs", no_argument, nullptr, kNoXattrs},
      {"no-preload", no_argument, nullptr, kNoPreload},
      {"prelist", required_argument, nullptr, kPrelist},
      {"foreground", no_argument, nullptr, 'f'},
      {"debug", no_argument, nullptr, 'd'},
      {"help", no_argument, nullptr, 'h'},
      {"version", no_argument, nullptr, 'V'},
      {nullptr, 0, nullptr, 0},
  };
  CliOptions opts;
  optind = 1;
  opterr = 0;
  int c;
  // getopt_long runs once at start-up, before any thread exists.
  // NOLINTNEXTLINE(concurrency-mt-unsafe)
  while ((c = getopt_long(argc, argv, ":fdo:hV", kLong, nullptr)) != -1) {
    switch (c) {
      case kLimitMb: {
        auto n = parse_limit_mb(optarg);
        if (!n) {
          std::fprintf(stderr, "ckptfs: --limit-mb needs %s, not '%s'\n", kLimitMbRule, optarg);
          return {std::nullopt, 2};
        }
        opts.limit_mb = *n;
        break;
      }
      case kRoot:
        opts.root = optarg;
        break;
      case kReadahead: {
        auto n = parse_number(optarg, 4, 65536);
        if (!n) {
          std::fprintf(stderr,
                       "ckptfs: --readahead-kb needs a number of KiB from 4 to 65536, not '%s'\n",
                       optarg);
          return {std::nullopt, 2};
        }
        opts.readahead_kb = static_cast<std::uint32_t>(*n);
        break;
      }
      case kNoXattrs:
        opts.xattrs = false;
        break;
      case kNoPreload:
        opts.preload = false;
        break;
      case kPrelist: {
        auto n = parse_number(optarg, 0, std::uint64_t{1} << 24);
        if (!n) {
          std::fprintf(stderr,
                       "ckptfs: --prelist needs a number of entries from 0 to 16777216, not '%s'\n",
                       optarg);
          return {std::nullopt, 2};
        }
        opts.prelist = *n;
        break;
      }
      case 'f':
        opts.foreground = true;
        break;
      case 'd':
        opts.debug = true;
        opts.foreground = true;
        break;
      case 'o': {
        // mount(8) via mount.fuse3 (`mount -t fuse.ckptfs`, fstab) passes ckptfs's own settings
        // inside -o: take limit_mb= and root= out, pass the rest to FUSE.
        std::string rest;
        std::string_view list = optarg;
        while (!list.empty()) {
          std::size_t comma = list.find(',');
          std::string_view item = list.substr(0, comma);
          list = comma == std::string_view::npos ? std::string_view{} : list.substr(comma + 1);
          if (item.starts_with("limit_mb=")) {
            std::string_view v = item.substr(9);
            std::uint64_t n = 0;
            auto r = std::from_chars(v.data(), v.data() + v.size(), n);
            if (r.ec != std::errc() || r.ptr != v.data() + v.size() || n < 8 || n > (1u << 24)) {
              std::fprintf(stderr,
                           "ckptfs: limit_mb needs a whole number of MiB from 8 to 16777216\n");
              return {std::nullopt, 2};
            }
            opts.limit_mb = n;
          } else if (item.starts_with("root=")) {
            opts.root = std::string(item.substr(5));
          } else if (!item.empty()) {
            rest += (rest.empty() ? "" : ",") + std::string(item);
          }
        }
        if (!rest.empty()) opts.fuse_options.push_back(rest);
        break;
      }
      case 'h':
        std::fputs(usage_text().c_str(), stdout);
        return {std::nullopt, 0};
      case 'V':
        std::printf("ckptfs %s\n", kCkptfsVersion);
        return {std::nullopt, 0};
      case ':':
        std::fprintf(stderr, "ckptfs: option '%s' needs a value (see ckptfs --help)\n",
                     argv[optind - 1]);
        return {std::nullopt, 2};
      default:
        std::fprintf(stderr, "ckptfs: unknown option '%s' (see ckptfs --help)\n", argv[optind - 1]);
        return {std::nullopt, 2};
    }
  }
  if (argc - optind < 2) {
    std::fprintf(stderr, "ckptfs: expected CHECKPOINT and MOUNTPOINT (see ckptfs --help)\n");
    return {std::nullopt, 2};
  }
  opts.checkpoints.assign(argv + optind, argv + argc - 1);
  opts.mountpoint = argv[argc - 1];
  return {std::move(opts), 0};
}

}  // namespace ckptfs
