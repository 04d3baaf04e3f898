#include "safetensors_view.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <unordered_set>

#include "errors.h"
#include "json_text.h"
#include "safetensors_loader.h"

namespace ckptfs {
namespace {

// The reference reader refuses larger headers (safetensors MAX_HEADER_SIZE).
constexpr std::uint64_t kMaxHeader = 100'000'000;

// The key path below the mount root, joined with '.': as many trailing key parts as the
// file's path has components (--root drops the leading ones).
std::string dotted_key(const TensorCatalog& c, const TensorInfo& t) {
  std::size_t depth = 0;
  for (NodeIndex n = t.data_node; n != TensorCatalog::kRoot; n = c.node(n).parent) ++depth;
  if (t.key().size() < depth) return c.path_of(t);  // the root object itself is the tensor
  std::string out;
  for (std::size_t i = t.key().size() - depth; i < t.key().size(); ++i) {
    if (!out.empty()) out.push_back('.');
    out += t.key()[i].str();
  }
  return out;
}

}  // namespace

SafetensorsView::SafetensorsView(const TensorCatalog& catalog, const std::string& source)
    : catalog_(catalog) {
  struct Candidate {
    std::uint32_t tensor;
    std::string key;
    std::string_view dtype;
  };
  std::vector<Candidate> chosen;
  std::unordered_set<std::string> keys;
  for (std::uint32_t i : catalog.listed()) {
    const TensorInfo& t = catalog.tensors()[i];
    std::string key = dotted_key(catalog, t);
    auto st = safetensors_dtype_of(t.dtype().name);
    if (!t.error().empty()) {
      skipped_.push_back(fmt::format("{}: {}", key, t.error()));
    } else if (!st) {
      skipped_.push_back(
          fmt::format("{}: safetensors has no dtype for torch.{}", key, t.dtype().name));
    } else if (key == "__metadata__" || !keys.insert(key).second) {
      skipped_.push_back(fmt::format("{}: another tensor already has this dotted key", key));
    } else {
      chosen.push_back({i, std::move(key), *st});
    }
  }
  // Tensors without a raw file (quantized, sparse, nested) are not in tensors() at all.
  for (const auto& t : catalog.no_raw_form()) {
    std::string key = t.path;
    std::replace(key.begin(), key.end(), '/', '.');
    skipped_.push_back(fmt::format("{}: {}, no raw form", key, t.what));
  }
  // First every tensor whose size is a multiple of 8 (each then starts 8-byte aligned), then
  // the rest by element size, largest first (each aligned to its own element size).
  auto rank = [&](const Candidate& c) {
    const TensorInfo& t = catalog.tensors()[c.tensor];
    return std::pair(t.nbytes() % 8 != 0, 16 - t.dtype().itemsize);
  };
  std::stable_sort(chosen.begin(), chosen.end(),
                   [&](const Candidate& a, const Candidate& b) { return rank(a) < rank(b); });

  std::string json = "{\"__metadata__\": {\"format\": \"pt\", \"source\": ";
  append_json_string(json, source);
  json += ", \"converted_by\": ";
  append_json_string(json, "ckptfs " CKPTFS_VERSION);
  if (!skipped_.empty()) {
    std::string list = "[";
    for (std::size_t i = 0; i < skipped_.size(); ++i) {
      if (i) list += ", ";
      append_json_string(list, skipped_[i]);
    }
    list += "]";
    json += ", \"skipped\": ";  // __metadata__ values must be strings: a JSON list, as text
    append_json_string(json, list);
  }
  json += "}";
  std::uint64_t data = 0;
  entries_.reserve(chosen.size());
  for (const Candidate& c : chosen) {
    const TensorInfo& t = catalog.tensors()[c.tensor];
    json += ", ";
    append_json_string(json, c.key);
    json += ": {\"dtype\": \"";
    json += c.dtype;
    json += "\", \"shape\": ";
    append_json_int_array(json, t.shape());
    json += fmt::format(", \"data_offsets\": [{}, {}]}}", data, data + t.nbytes());
    entries_.push_back({c.tensor, data, data + t.nbytes()});
    data += t.nbytes();
  }
  json += "}";
  json.append((8 - json.size() % 8) % 8, ' ');
  if (json.size() > kMaxHeader) {
    throw FormatError(fmt::format(
        "a safetensors header for these {} tensors would take {} bytes, more than readers "
        "accept ({})",
        entries_.size(), json.size(), kMaxHeader));
  }
  prefix_.resize(8);
  const std::uint64_t n = json.size();
  for (int i = 0; i < 8; ++i) prefix_[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
  prefix_ += json;
  for (Entry& e : entries_) {
    e.begin += prefix_.size();
    e.end += prefix_.size();
  }
  size_ = prefix_.size() + data;
}

void SafetensorsView::read(std::uint64_t offset, std::span<std::byte> dst,
                           const TensorReader& reader) const {
  if (offset > size_ || dst.size() > size_ - offset) {
    throw FormatError(fmt::format("read of {} bytes at {} is past the end of the safetensors view",
                                  dst.size(), offset));
  }
  std::size_t done = 0;
  if (offset < prefix_.size()) {
    done = std::min<std::size_t>(dst.size(), prefix_.size() - offset);
    std::memcpy(dst.data(), prefix_.data() + offset, done);
  }
  // The first entry that ends after the position: entries are sorted by offset.
  auto it = std::upper_bound(entries_.begin(), entries_.end(), offset + done,
                             [](std::uint64_t pos, const Entry& e) { return pos < e.end; });
  while (done < dst.size()) {
    const std::uint64_t pos = offset + done;
    if (it == entries_.end()) {
      throw FormatError(fmt::format("safetensors view: no tensor at offset {}", pos));
    }
    const std::size_t n =
        static_cast<std::size_t>(std::min<std::uint64_t>(dst.size() - done, it->end - pos));
    if (n > 0) reader.read(catalog_.tensors()[it->tensor], pos - it->begin, dst.subspan(done, n));
    done += n;
    ++it;
  }
}

}  // namespace ckptfs
