#include "inspect_commands.h"

#include <fmt/format.h>
#include <fnmatch.h>

#include <cstdio>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "byte_source.h"
#include "checkpoint_set.h"
#include "errors.h"

namespace ckptfs {
namespace {

std::string human(std::uint64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024 && u < 4) {
    v /= 1024;
    ++u;
  }
  return u == 0 ? fmt::format("{} B", bytes) : fmt::format("{:.1f} {}", v, units[u]);
}

std::string shape_text(std::span<const std::int64_t> shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += fmt::format("{}{}", i ? ", " : "", shape[i]);
  return s + "]";
}

// A pattern with glob characters is matched against the whole path; otherwise it is a prefix.
bool matches(const std::string& pattern, const std::string& path) {
  if (pattern.empty()) return true;
  if (pattern.find_first_of("*?[") != std::string::npos)
    return fnmatch(pattern.c_str(), path.c_str(), 0) == 0;
  return path.compare(0, pattern.size(), pattern) == 0;
}

constexpr const char* kUsage =
    "usage: ckptfs ls [--json] CHECKPOINT [PATTERN]   one line per tensor (PATTERN: glob or path "
    "prefix)\n"
    "       ckptfs info CHECKPOINT                    format, writer hints, counts, bytes per "
    "dtype\n";

}  // namespace

int run_inspect_command(int argc, char** argv) {
  const std::string command = argv[1];
  bool json = false;
  std::vector<std::string> rest;
  for (int i = 2; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--json" && command == "ls") {
      json = true;
    } else if (a == "-h" || a == "--help") {
      std::fputs(kUsage, stdout);
      return 0;
    } else if (a.starts_with("-")) {
      std::fprintf(stderr, "ckptfs %s: unknown option '%s'\n%s", command.c_str(), a.c_str(),
                   kUsage);
      return 2;
    } else {
      rest.push_back(a);
    }
  }
  if (rest.empty() || rest.size() > (command == "ls" ? 2u : 1u)) {
    std::fputs(kUsage, stderr);
    return 2;
  }
  const std::string& path = rest[0];
  std::unique_ptr<CheckpointSet> set;
  try {
    set = std::make_unique<CheckpointSet>(std::vector<std::string>{path});
  } catch (const CkptError& e) {
    std::fprintf(stderr, "ckptfs: %s: %s\n", path.c_str(), e.what());
    return 1;
  }
  const TensorCatalog& c = set->catalog();
  const auto& tensors = c.tensors();

  if (command == "info") {
    std::uint64_t total = 0;
    std::map<std::string, std::pair<std::uint64_t, std::uint64_t>> per_dtype;  // count, bytes
    for (const auto& t : tensors) {
      total += t.nbytes();
      auto& d = per_dtype[std::string(t.dtype().name)];
      ++d.first;
      d.second += t.nbytes();
    }
    const std::uint64_t file_bytes = set->file_bytes();
    const std::string files =
        set->files().size() == 1 ? path : fmt::format("{} ({} files)", path, set->files().size());
    std::fputs(
        fmt::format("file:      {} ({})\nformat:    {}\n", files, human(file_bytes), c.format())
            .c_str(),
        stdout);
    for (const auto& fact : c.provenance())
      std::fputs(fmt::format("writer:    {}\n", fact).c_str(), stdout);
    std::fputs(fmt::format("tensors:   {} ({}), {} storages\n", tensors.size(), human(total),
                           c.storages().size())
                   .c_str(),
               stdout);
    for (const auto& [name, d] : per_dtype) {
      std::fputs(
          fmt::format("  {:<14} {:>8} tensors {:>12}\n", name, d.first, human(d.second)).c_str(),
          stdout);
    }
    std::vector<std::string> values;
    for (NodeIndex child : c.children(TensorCatalog::kRoot)) {
      const Node n = c.node(child);
      if (n.kind == NodeKind::JsonValue || (n.kind == NodeKind::Directory && n.name() != ".ckptfs"))
        values.emplace_back(n.name());
    }
    std::string joined;
    for (const auto& v : values) joined += (joined.empty() ? "" : ", ") + v;
    std::fputs(fmt::format("top level: {}\n", joined.empty() ? "(tensors only)" : joined).c_str(),
               stdout);
    if (!c.warnings().empty()) {
      std::fputs(fmt::format("notes:     {} (see below)\n", c.warnings().size()).c_str(), stdout);
      for (const auto& w : c.warnings()) std::fputs(fmt::format("  {}\n", w).c_str(), stdout);
    }
    return 0;
  }

  const std::string pattern = rest.size() > 1 ? rest[1] : "";
  std::vector<std::uint32_t> selected;
  std::vector<std::string> paths;  // of |selected|
  for (std::uint32_t i = 0; i < tensors.size(); ++i) {
    std::string path = c.path_of(tensors[i]);
    if (!matches(pattern, path)) continue;
    selected.push_back(i);
    if (!json) paths.push_back(std::move(path));
  }
  if (json) {
    std::fputs(c.render_index(selected).c_str(), stdout);
    return 0;
  }
  std::size_t wpath = 4, wdtype = 5, wshape = 5;
  for (std::size_t k = 0; k < selected.size(); ++k) {
    const std::uint32_t i = selected[k];
    wpath = std::max(wpath, paths[k].size());
    wdtype = std::max(wdtype, tensors[i].dtype().name.size());
    wshape = std::max(wshape, shape_text(tensors[i].shape()).size());
  }
  std::string out;
  out += fmt::format("{:<{}}  {:<{}}  {:<{}}  {:>10}\n", "path", wpath, "dtype", wdtype, "shape",
                     wshape, "size");
  std::uint64_t total = 0;
  for (std::size_t k = 0; k < selected.size(); ++k) {
    const TensorInfo& t = tensors[selected[k]];
    total += t.nbytes();
    out += fmt::format("{:<{}}  {:<{}}  {:<{}}  {:>10}{}\n", paths[k], wpath, t.dtype().name,
                       wdtype, shape_text(t.shape()), wshape, human(t.nbytes()),
                       t.error().empty() ? "" : fmt::format("  (unreadable: {})", t.error()));
  }
  out += fmt::format("{} tensors, {} ({} bytes)\n", selected.size(), human(total), total);
  std::fputs(out.c_str(), stdout);
  return 0;
}

}  // namespace ckptfs
