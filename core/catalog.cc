#include "catalog.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cstring>

#include "errors.h"
#include "json_text.h"
#include "zip_directory.h"

namespace ckptfs {

void append_json_key(std::string& out, std::span<const KeyPart> key) {
  out.push_back('[');
  for (std::size_t i = 0; i < key.size(); ++i) {
    if (i) out += ", ";
    if (key[i].is_number()) {
      out += fmt::format("{}", key[i].number());
    } else {
      append_json_string(out, key[i].text());
    }
  }
  out.push_back(']');
}

NodeIndex TensorCatalog::lookup(NodeIndex dir, std::string_view name) const {
  const auto kids = children(dir);
  auto find = [&](std::string_view n) {
    auto it =
        std::lower_bound(kids.begin(), kids.end(), n,
                         [this](NodeIndex i, std::string_view v) { return nodes_[i].stem() < v; });
    return it != kids.end() && nodes_[*it].stem() == n ? *it : kNoNode;
  };
  if (NodeIndex stored = find(name); stored != kNoNode) return stored;
  // A derived sidecar or view: "<raw file>.json" / ".npy", unless a clash renamed it (then it
  // is stored and found above, and its derived name belongs to no file).
  for (const NameSuffix suffix : {NameSuffix::Json, NameSuffix::Npy}) {
    const std::string_view ext = suffix_text(suffix);
    if (!name.ends_with(ext)) continue;
    const NodeIndex raw = find(name.substr(0, name.size() - ext.size()));
    if (raw == kNoNode || nodes_[raw].kind != NodeKind::TensorData) return kNoNode;
    return derived(nodes_[raw].tensor(), suffix);
  }
  return kNoNode;
}

NodeIndex TensorCatalog::derived(std::uint32_t tensor, NameSuffix suffix) const {
  const TensorInfo& t = tensors_[tensor];
  if (suffix == NameSuffix::Json) return t.sidecar_apart ? kNoNode : derived_base() + 2 * tensor;
  return t.npy_apart ? kNoNode : derived_base() + 2 * tensor + 1;
}

Node TensorCatalog::derived_node(std::size_t k) const {
  Node n = nodes_[tensors_[k / 2].data_node];
  n.kind = k % 2 == 0 ? NodeKind::TensorSidecar : NodeKind::NpyView;
  n.suffix = k % 2 == 0 ? NameSuffix::Json : NameSuffix::Npy;
  return n;
}

NodeIndex TensorCatalog::entry(NodeIndex dir, std::size_t slot) const {
  const NodeIndex child = children(dir)[slot / 3];
  if (slot % 3 == 0) return child;
  const Node& n = nodes_[child];
  if (n.kind != NodeKind::TensorData) return kNoNode;
  return derived(n.tensor(), slot % 3 == 1 ? NameSuffix::Json : NameSuffix::Npy);
}

NodeIndex TensorCatalog::sidecar_node(std::uint32_t tensor) const {
  const NodeIndex d = derived(tensor, NameSuffix::Json);
  return d != kNoNode ? d : apart_.at(2 * tensor);
}

NodeIndex TensorCatalog::npy_node(std::uint32_t tensor) const {
  const NodeIndex d = derived(tensor, NameSuffix::Npy);
  return d != kNoNode ? d : apart_.at(2 * tensor + 1);
}

std::string TensorCatalog::relative_path(NodeIndex i) const {
  const std::string_view suffix = suffix_text(node(i).suffix);
  // A derived file's path is its raw file's, plus the suffix.
  const NodeIndex stored = i < derived_base() ? i : tensors_[(i - derived_base()) / 2].data_node;
  std::size_t size = suffix.size();
  for (NodeIndex n = stored; n != kRoot && n != kNoNode; n = nodes_[n].parent)
    size += nodes_[n].stem().size() + 1;
  if (size == 0) return {};
  // Filled from the end: the walk goes from the file up to the root.
  std::string out(size - 1, '/');
  std::size_t end = out.size() - suffix.size();
  std::memcpy(out.data() + end, suffix.data(), suffix.size());
  for (NodeIndex n = stored; n != kRoot && n != kNoNode; n = nodes_[n].parent) {
    const Node& node = nodes_[n];
    const std::string_view stem = node.stem();
    end -= stem.size();
    std::memcpy(out.data() + end, stem.data(), stem.size());
    if (end > 0) --end;
  }
  return out;
}

NodeIndex TensorCatalog::add_node(NodeKind kind, NodeIndex parent, std::string_view name,
                                  std::uint32_t ref) {
  Node n;
  if (ref > Node::kMaxRef)
    throw FormatError(fmt::format("more than {} tensors or directories", Node::kMaxRef));
  n.stem_data = name.data();
  n.parent = parent;
  n.ref = ref;
  n.kind = kind;
  nodes_.push_back(n);
  return static_cast<NodeIndex>(nodes_.size() - 1);
}

NodeIndex TensorCatalog::add_directory(NodeIndex parent, std::string_view name) {
  children_.emplace_back();
  return add_node(NodeKind::Directory, parent, name,
                  static_cast<std::uint32_t>(children_.size() - 1));
}

NodeIndex TensorCatalog::add_json(NodeIndex parent, std::string_view name, std::string text) {
  texts_.push_back(std::move(text));
  return add_node(NodeKind::JsonValue, parent, name, static_cast<std::uint32_t>(texts_.size() - 1));
}

std::size_t TensorCatalog::metadata_bytes() const {
  std::size_t n = nodes_.capacity() * sizeof(Node) + tensors_.capacity() * sizeof(TensorInfo) +
                  storages_.capacity() * sizeof(StorageInfo) + arena_->bytes_reserved() +
                  locations_.capacity() * sizeof(std::string_view) +
                  children_.capacity() * sizeof(children_[0]) + listed_.capacity() * 4 +
                  tensor_parts_.capacity() * 4 + sidecar_sizes_.size() * 4 +
                  resolved_offsets_.size() * 8 +
                  apart_.size() * (sizeof(std::pair<std::uint32_t, NodeIndex>) + 16);
  for (const auto& a : part_arenas_) n += a->bytes_reserved();
  for (const auto& c : children_) n += c.capacity() * sizeof(NodeIndex);
  for (const auto& t : texts_) n += t.capacity() + sizeof(t);
  return n;
}

std::string TensorCatalog::sidecar_json(const TensorInfo& t) const {
  return render_sidecar(t, true);
}

namespace {

// What a storage whose offset is a zip local header knows of that header (its name is the
// storage's record).
LocalHeaderRef local_header_of(const StorageInfo& s) {
  LocalHeaderRef ref;
  ref.offset = s.offset;
  ref.name_size = static_cast<std::uint16_t>(s.record_size());
  ref.max_extra = s.max_local_extra();
  return ref;
}

}  // namespace

void TensorCatalog::append_file_offset(std::string& out, std::uint32_t i, bool resolve) const {
  const StorageInfo& s = storages_[i];
  if (!s.offset_is_local_header()) {
    out += fmt::format("{}", s.offset);
    return;
  }
  // Right-aligned to the width of the largest offset the header allows, so that the sidecar's
  // size is known without reading the header (stat of every sidecar in a big directory would
  // otherwise read the whole checkpoint). JSON allows the blanks.
  const LocalHeaderRef ref = local_header_of(s);
  const std::uint64_t largest = ref.offset + LocalHeaderRef::kSize + ref.name_size + ref.max_extra;
  const std::size_t width = std::max<std::size_t>(4, fmt::formatted_size("{}", largest));
  if (!resolve) {
    out.append(width, ' ');
    return;
  }
  try {
    out += fmt::format("{:>{}}", data_offset(i), width);
  } catch (const CkptError&) {
    out += fmt::format("{:>{}}", "null", width);  // reads of the tensor fail and say why
  }
}

void TensorCatalog::set_source_reader(SourceReader reader) {
  source_reader_ = std::move(reader);
  if (resolved_offsets_.size() != storages_.size()) {
    resolved_offsets_ = std::vector<std::atomic<std::uint64_t>>(storages_.size());
  }
}

TensorCatalog::SourceSpan TensorCatalog::record_span(std::uint32_t i) const {
  const StorageInfo& s = storages_[i];
  if (data_offset_known(i)) {
    const std::uint64_t at = data_offset(i);
    return {at, at + s.nbytes};
  }
  const LocalHeaderRef ref = local_header_of(s);
  return {s.offset, s.offset + LocalHeaderRef::kSize + ref.name_size + ref.max_extra + s.nbytes};
}

std::uint64_t TensorCatalog::data_offset(std::uint32_t i, bool stream_follows) const {
  const StorageInfo& s = storages_[i];
  if (!s.offset_is_local_header()) return s.offset;
  if (i >= resolved_offsets_.size() || !source_reader_) {
    throw FormatError("internal error: a zip local header is read before the catalog has a source");
  }
  std::atomic<std::uint64_t>& known = resolved_offsets_[i];
  if (std::uint64_t at = known.load(std::memory_order_acquire); at != 0) return at;
  // Two threads may both read the header; they store the same value.
  std::array<std::byte, LocalHeaderRef::kSize> header{};
  // A header read for anything but the data after it (a sidecar's file_offset) wants nothing
  // beyond the header.
  const StreamHint hint = stream_follows ? StreamHint{.end = record_span(i).end, .starts = true}
                                         : StreamHint{.end = s.offset + LocalHeaderRef::kSize};
  source_reader_(s.offset, header, hint);
  const std::uint64_t at = data_offset_from_local_header(header, local_header_of(s), s.record());
  known.store(at, std::memory_order_release);
  return at;
}

std::string TensorCatalog::render_sidecar(const TensorInfo& t, bool resolve) const {
  std::string out = "{\n  \"key\": ";
  append_json_key(out, t.key());
  out += ",\n  \"path\": ";
  append_json_string(out, path_of(t));
  out += ",\n  \"dtype\": ";
  append_json_string(out, t.dtype().name);
  out += ",\n  \"numpy_dtype\": ";
  append_json_string(out, t.dtype().numpy_dtype);
  out += ",\n  \"shape\": ";
  append_json_int_array(out, t.shape());
  out += fmt::format(",\n  \"nbytes\": {}", t.nbytes());
  out += fmt::format(",\n  \"requires_grad\": {}", t.requires_grad ? "true" : "false");
  if (!t.wrapper().empty()) {
    out += ",\n  \"wrapper\": ";
    append_json_string(out, t.wrapper());
  }
  out += ",\n  \"byteorder\": \"little\"";
  if (big_endian_) out += ",\n  \"byteswapped\": \"stored big-endian; served little-endian\"";
  if (t.conj || t.neg) {
    out += fmt::format(
        ",\n  \"math_bits\": \"{}{}{}: served with them applied, as resolve_conj()/resolve_neg() "
        "would\"",
        t.conj ? "conj" : "", t.conj && t.neg ? "+" : "", t.neg ? "neg" : "");
  }
  if (t.dtype().name == "bfloat16") {
    out +=
        ",\n  \"note\": \"numpy has no bfloat16: read as <u2 raw bits; float32 = "
        "(bits.astype('<u4') << 16).view('<f4')\"";
  }
  out += ",\n  \"source\": {\n    \"format\": ";
  append_json_string(out, format_);
  if (t.storage != kNoStorage) {
    const StorageInfo& s = storages_[t.storage];
    out += ",\n    \"storage\": ";
    append_json_string(out, s.key());
    out += ",\n    \"record\": ";
    append_json_string(out, s.record());
    out += ",\n    \"location\": ";
    append_json_string(out, location(s));
    out += ",\n    \"file_offset\": ";
    append_file_offset(out, t.storage, resolve);
    out += fmt::format(",\n    \"storage_nbytes\": {}", s.nbytes);
  }
  out += fmt::format(",\n    \"storage_offset\": {},\n    \"stride\": ", t.storage_offset);
  append_json_int_array(out, t.stride());
  out += fmt::format(",\n    \"contiguous\": {}\n  }}",
                     t.error().empty() && t.layout().contiguous() ? "true" : "false");
  if (!t.error().empty()) {
    out += ",\n  \"error\": ";
    append_json_string(out, t.error());
  }
  out += "\n}\n";
  return out;
}

std::string TensorCatalog::npy_header(const TensorInfo& t) {
  std::string dict =
      fmt::format("{{'descr': '{}', 'fortran_order': False, 'shape': (", t.dtype().numpy_dtype);
  for (std::size_t i = 0; i < t.shape().size(); ++i)
    dict += fmt::format("{}{}", t.shape()[i],
                        t.shape().size() == 1      ? ","
                        : i + 1 < t.shape().size() ? ", "
                                                   : "");
  dict += "), }";
  // The header (magic, version, length field, dict) is padded with spaces to a multiple of 64
  // and ends in a newline, as numpy writes it; version 2.0 when the dict exceeds 65535 bytes.
  const bool v2 = dict.size() + 1 + 10 + 63 > 0xFFFF;
  const std::size_t prefix = v2 ? 12 : 10;
  std::size_t total = (prefix + dict.size() + 1 + 63) / 64 * 64;
  dict.append(total - prefix - dict.size() - 1, ' ');
  dict.push_back('\n');
  std::string out = "\x93NUMPY";
  out.push_back(static_cast<char>(v2 ? 2 : 1));
  out.push_back('\0');
  std::uint32_t len = static_cast<std::uint32_t>(dict.size());
  for (std::size_t i = 0; i < (v2 ? 4u : 2u); ++i)
    out.push_back(static_cast<char>((len >> (8 * i)) & 0xFF));
  return out + dict;
}

std::vector<std::uint32_t> TensorCatalog::listed() const {
  if (rerooted_) return listed_;
  std::vector<std::uint32_t> all(tensors_.size());
  for (std::uint32_t i = 0; i < all.size(); ++i) all[i] = i;
  return all;
}

std::string TensorCatalog::render_index(const std::vector<std::uint32_t>& subset) const {
  std::string out = "{\n\"format\": ";
  append_json_string(out, format_);
  out += ",\n\"tensors\": [";
  for (std::size_t i = 0; i < subset.size(); ++i) {
    const std::uint32_t index = subset[i];
    const TensorInfo& t = tensors_[index];
    out += i ? ",\n" : "\n";
    out += "{\"key\": ";
    append_json_key(out, t.key());
    out += ", \"path\": ";
    append_json_string(out, path_of(t));
    out += ", \"sidecar\": ";
    append_json_string(out, relative_path(sidecar_node(index)));
    out += ", \"npy\": ";
    append_json_string(out, relative_path(npy_node(index)));
    out += ", \"dtype\": ";
    append_json_string(out, t.dtype().name);
    out += ", \"shape\": ";
    append_json_int_array(out, t.shape());
    out += fmt::format(", \"nbytes\": {}", t.nbytes());
    if (!t.error().empty()) {
      out += ", \"error\": ";
      append_json_string(out, t.error());
    }
    out += "}";
  }
  out += "\n]\n}\n";
  return out;
}

const std::string& TensorCatalog::index_json() const {
  std::call_once(*index_once_, [this] { index_json_ = render_index(listed()); });
  return index_json_;
}

void TensorCatalog::reroot(const std::string& path) {
  NodeIndex target = kRoot;
  std::size_t start = 0;
  while (start < path.size()) {
    std::size_t slash = path.find('/', start);
    std::string part =
        path.substr(start, slash == std::string::npos ? std::string::npos : slash - start);
    if (!part.empty()) {
      target = node(target).kind == NodeKind::Directory ? lookup(target, part) : kNoNode;
      if (target == kNoNode)
        throw FormatError(
            fmt::format("--root '{}': no such directory in the checkpoint's tree", path));
    }
    if (slash == std::string::npos) break;
    start = slash + 1;
  }
  if (node(target).kind != NodeKind::Directory) {
    throw FormatError(fmt::format("--root '{}' is a file, not a directory of the tree", path));
  }
  if (target == kRoot) return;
  const std::string prefix = relative_path(target) + "/";  // in the tree as it was
  const NodeIndex meta = lookup(kRoot, ".ckptfs");
  // The new root takes index 0 (inode 1). The rest of the old tree becomes unreachable and is
  // left as it is; only the new root's children and /.ckptfs are relinked.
  std::swap(nodes_[kRoot], nodes_[target]);
  nodes_[kRoot].parent = kNoNode;
  for (NodeIndex c : children(kRoot)) nodes_[c].parent = kRoot;
  children_of(target).clear();
  nodes_[meta].parent = kRoot;
  auto& rc = children_of(kRoot);
  rc.push_back(meta);
  std::sort(rc.begin(), rc.end(),
            [this](NodeIndex a, NodeIndex b) { return nodes_[a].stem() < nodes_[b].stem(); });
  // Keep the tensors under the new root, with paths relative to it.
  std::vector<NodeIndex> stack = {kRoot};
  std::vector<bool> reachable(tensors_.size(), false);
  while (!stack.empty()) {
    NodeIndex n = stack.back();
    stack.pop_back();
    for (NodeIndex c : children(n)) {
      const Node& node = nodes_[c];
      if (node.kind == NodeKind::Directory) {
        stack.push_back(c);
      } else if (node.kind == NodeKind::TensorData) {
        reachable[node.tensor()] = true;
      }
    }
  }
  rerooted_ = true;
  listed_.clear();
  for (std::uint32_t i = 0; i < tensors_.size(); ++i) {
    if (reachable[i]) listed_.push_back(i);
  }
  std::vector<NoRawForm> below;
  for (NoRawForm& t : no_raw_form_) {
    if (t.path.starts_with(prefix))
      below.push_back({t.path.substr(prefix.size()), std::move(t.what)});
  }
  no_raw_form_ = std::move(below);
}

void TensorCatalog::finish() {
  const NodeIndex meta = add_directory(kRoot, ".ckptfs");
  // Children in name order.
  children_of(meta) = {add_node(NodeKind::IndexFile, meta, "index.json", 0),
                       add_node(NodeKind::SafetensorsFile, meta, "model.safetensors", 0),
                       add_node(NodeKind::StatsFile, meta, "stats", 0)};
  auto& rc = children_of(kRoot);
  rc.insert(std::lower_bound(
                rc.begin(), rc.end(), meta,
                [this](NodeIndex a, NodeIndex b) { return nodes_[a].stem() < nodes_[b].stem(); }),
            meta);
  arena_->stop_interning();
  sidecar_sizes_ = std::vector<std::atomic<std::uint32_t>>(tensors_.size());
}

std::uint64_t TensorCatalog::generated_size(NodeIndex i) const {
  const Node n = node(i);
  switch (n.kind) {
    case NodeKind::TensorSidecar: {
      std::atomic<std::uint32_t>& cached = sidecar_sizes_[n.tensor()];
      std::uint32_t size = cached.load(std::memory_order_relaxed);
      if (size == 0) {
        size = static_cast<std::uint32_t>(render_sidecar(tensors_[n.tensor()], false).size());
        cached.store(size, std::memory_order_relaxed);
      }
      return size;
    }
    case NodeKind::JsonValue:
      return texts_[n.ref].size();
    case NodeKind::IndexFile:
      return index_json().size();
    default:
      return 0;
  }
}

}  // namespace ckptfs
