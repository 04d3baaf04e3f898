// Command-line options of the ckptfs daemon.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace ckptfs {

struct CliOptions {
  // Checkpoint files, shard indexes (*.index.json) or directories holding one: all merged
  // into one tree.
  std::vector<std::string> checkpoints;
  std::string mountpoint;
  std::uint64_t limit_mb = 1024;
  bool foreground = false;
  bool debug = false;
  std::vector<std::string> fuse_options;  // each a comma-separated -o list
  std::string root;                       // --root: a directory of the tree to mount as root
  std::uint32_t readahead_kb = 0;         // --readahead-kb: the mount's bdi readahead; 0 = kernel's
  bool xattrs = true;                     // --no-xattrs: no user.ckptfs.* (ls -l then never asks)
  bool preload = true;                    // --no-preload: a LOOKUP stores nothing in the page cache
  // --prelist: entries the daemon lists through the mount after mounting (mount_lister.h);
  // unset: prelist_entries_for()'s default.
  std::optional<std::uint64_t> prelist;
};

// What parsing decided: run with options, or exit now with |exit_code| (help, version, error).
struct CliParse {
  std::optional<CliOptions> options;
  int exit_code = 0;
};

CliParse parse_cli(int argc, char** argv);

// --limit-mb's value (the mount's and `ckptfs convert`'s): a whole number of MiB within
// kLimitMbRule, or nothing.
std::optional<std::uint64_t> parse_limit_mb(std::string_view text);
inline constexpr const char* kLimitMbRule = "a whole number of MiB from 8 to 16777216";
std::string usage_text();

// The entries MountLister lists: --prelist's, else 16 per MiB of the budget (8,192 at
// --limit-mb 512, about 10 MiB of the kernel's memory), at most kMaxDefaultPrelist.
inline constexpr std::uint64_t kMaxDefaultPrelist = 65536;
std::uint64_t prelist_entries_for(const CliOptions& opts);

}  // namespace ckptfs
