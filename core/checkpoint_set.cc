#include "checkpoint_set.h"

#include <dirent.h>
#include <fmt/format.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include <algorithm>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "checkpoint_loader.h"
#include "errors.h"

namespace ckptfs {
namespace {

constexpr std::uint64_t kMaxIndexBytes = 64u << 20;

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

std::string dir_of(const std::string& path) {
  auto slash = path.rfind('/');
  return slash == std::string::npos ? "." : path.substr(0, slash);
}

// The index a directory holds: a .safetensors one if both kinds are there (no pickle to run).
std::string index_in_directory(const std::string& dir) {
  std::unique_ptr<DIR, int (*)(DIR*)> d(::opendir(dir.c_str()), &::closedir);
  if (!d) {
    throw IoError(fmt::format("cannot open directory '{}': {}", dir, errno_text(errno)), errno);
  }
  std::vector<std::string> st;
  std::vector<std::string> bin;
  while (dirent* e = ::readdir(d.get())) {
    std::string n = e->d_name;
    if (ends_with(n, ".safetensors.index.json")) st.push_back(n);
    if (ends_with(n, ".bin.index.json") || ends_with(n, ".pt.index.json")) bin.push_back(n);
  }
  const auto& pick = st.empty() ? bin : st;
  if (pick.empty()) {
    throw FormatError(fmt::format(
        "directory '{}' has no *.safetensors.index.json or *.bin.index.json (to merge files "
        "without an index, name them all)",
        dir));
  }
  if (pick.size() > 1) {
    throw FormatError(fmt::format("directory '{}' has several indexes ({}, {}, ...): name one", dir,
                                  pick[0], pick[1]));
  }
  return dir + "/" + pick[0];
}

struct ShardIndex {
  std::vector<std::string> files;                               // in first-mention order
  std::vector<std::pair<std::string, std::string>> weight_map;  // key -> file (as listed)
};

ShardIndex read_index(const std::string& path) {
  LocalFileSource src(path);
  if (src.size() > kMaxIndexBytes) {
    throw FormatError(fmt::format("index '{}' is larger than {} MiB", path, kMaxIndexBytes >> 20));
  }
  std::string text(src.size(), '\0');
  src.read_at(0, std::as_writable_bytes(std::span(text)));
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object() || !j.contains("weight_map") ||
      !j["weight_map"].is_object()) {
    throw FormatError(
        fmt::format("'{}' is not a shard index (a JSON object with a \"weight_map\")", path));
  }
  ShardIndex idx;
  std::set<std::string> seen;
  for (const auto& [key, file] : j["weight_map"].items()) {
    if (!file.is_string()) {
      throw FormatError(fmt::format("'{}': weight_map[\"{}\"] is not a file name", path, key));
    }
    const std::string f = file.get<std::string>();
    if (f.empty() || f.find('/') != std::string::npos || f == "." || f == "..") {
      throw FormatError(
          fmt::format("'{}': shard '{}' is not a plain file name beside the index", path, f));
    }
    idx.weight_map.emplace_back(key, f);
    if (seen.insert(f).second) idx.files.push_back(f);
  }
  if (idx.files.empty()) throw FormatError(fmt::format("'{}': the weight_map is empty", path));
  return idx;
}

// Many shards keep two descriptors each open for the life of the mount.
void raise_fd_limit() {
  rlimit r{};
  if (::getrlimit(RLIMIT_NOFILE, &r) == 0 && r.rlim_cur < r.rlim_max) {
    r.rlim_cur = r.rlim_max;
    ::setrlimit(RLIMIT_NOFILE, &r);
  }
}

}  // namespace

std::string CheckpointSet::describe(const std::vector<std::string>& arguments) {
  return arguments.size() == 1 ? arguments[0] : fmt::format("{} files", arguments.size());
}

CheckpointSet::CheckpointSet(const std::vector<std::string>& arguments)
    : name_(describe(arguments)) {
  if (arguments.empty()) throw FormatError("no checkpoint given");
  // Each argument expands to files; an index also says which tensors each file must hold.
  std::vector<std::pair<std::string, std::string>> expected;  // (key, file path)
  for (const std::string& arg : arguments) {
    struct stat st {};
    std::string path = arg;
    if (::stat(arg.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) path = index_in_directory(arg);
    if (ends_with(path, ".index.json")) {
      ShardIndex idx = read_index(path);
      const std::string dir = dir_of(path);
      for (const std::string& f : idx.files) names_.push_back(dir + "/" + f);
      for (auto& [key, f] : idx.weight_map) expected.emplace_back(key, dir + "/" + f);
    } else {
      names_.push_back(path);
    }
  }
  if (std::set<std::string>(names_.begin(), names_.end()).size() != names_.size())
    throw FormatError("the same checkpoint file is named twice");
  if (names_.size() > 1) raise_fd_limit();

  std::vector<TensorCatalog> parts;
  for (const std::string& n : names_) {
    try {
      files_.push_back(std::make_unique<LocalFileSource>(n));
      LoadedCheckpoint loaded = load_checkpoint(*files_.back());
      parts.push_back(std::move(loaded.catalog));
      inflated_.push_back(std::move(loaded.data));
    } catch (const IoError& e) {
      throw IoError(names_.size() > 1 ? fmt::format("{}: {}", n, e.what()) : e.what(),
                    e.error_number());
    } catch (const FormatError& e) {
      throw FormatError(names_.size() > 1 ? fmt::format("{}: {}", n, e.what()) : e.what());
    }
  }
  auto source_of = [this](std::size_t i) -> const ByteSource& {
    return inflated_[i] ? *inflated_[i] : *files_[i];
  };
  if (parts.size() == 1) {
    catalog_ = std::move(parts[0]);
    data_ = &source_of(0);
  } else {
    combined_ = std::make_unique<SegmentedSource>(source_of(0));
    std::vector<std::uint64_t> bases = {0};
    for (std::size_t i = 1; i < parts.size(); ++i)
      bases.push_back(combined_->append_ref(source_of(i)));
    catalog_ = TensorCatalog::merge(std::move(parts), bases, names_);
    data_ = combined_.get();
    // The merged storages' offsets (local headers among them) are offsets in the combined
    // source.
    catalog_.set_source_reader([this](std::uint64_t at, std::span<std::byte> dst, StreamHint) {
      data_->read_at(at, dst);
    });
  }

  // What the index promised must be there, in the file it names.
  if (!expected.empty()) {
    std::map<std::string, std::uint32_t> part_of;  // top-level key -> file index
    const auto& tensors = catalog_.tensors();
    for (std::uint32_t t = 0; t < tensors.size(); ++t) {
      const auto key = tensors[t].key();
      if (key.size() != 1) continue;
      std::string k = key[0].str();
      part_of.emplace(k, catalog_.tensor_parts().empty() ? 0 : catalog_.tensor_parts()[t]);
    }
    for (const auto& [key, file] : expected) {
      auto it = part_of.find(key);
      auto want = static_cast<std::uint32_t>(std::find(names_.begin(), names_.end(), file) -
                                             names_.begin());
      if (it == part_of.end() || it->second != want) {
        throw FormatError(
            fmt::format("the index puts tensor '{}' in '{}', which does not hold it", key, file));
      }
    }
  }
}

std::uint64_t CheckpointSet::file_bytes() const {
  std::uint64_t total = 0;
  for (const auto& f : files_) total += f->size();
  return total;
}

void CheckpointSet::drop_cache() const {
  for (const auto& f : files_) f->drop_cache();
}

}  // namespace ckptfs
