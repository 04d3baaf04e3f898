// TensorCatalog::merge: the shards of a checkpoint (or several checkpoints given together)
// as one tree.
#include <fmt/format.h>

#include <algorithm>
#include <unordered_map>

#include "catalog.h"
#include "errors.h"

namespace ckptfs {

TensorCatalog TensorCatalog::merge(std::vector<TensorCatalog> parts,
                                   const std::vector<std::uint64_t>& storage_bases,
                                   const std::vector<std::string>& part_names) {
  TensorCatalog out;
  out.add_directory(kNoNode, "");          // the root directory
  std::vector<std::uint32_t> owner = {0};  // which part put each node there (for messages)
  // (directory, name) -> node, for the directories of |out| as they fill.
  std::unordered_map<std::string, NodeIndex> by_name;
  auto slot = [](NodeIndex dir, std::string_view name) { return fmt::format("{}/{}", dir, name); };
  std::vector<std::string> formats;
  for (std::size_t p = 0; p < parts.size(); ++p) {
    TensorCatalog& part = parts[p];
    if (p > 0 && part.big_endian_ != out.big_endian_) {
      throw FormatError(
          fmt::format("'{}' and '{}' disagree on byte order", part_names[0], part_names[p]));
    }
    out.big_endian_ = part.big_endian_;
    const auto tensor_base = static_cast<std::uint32_t>(out.tensors_.size());
    const auto storage_base = static_cast<std::uint32_t>(out.storages_.size());
    // Depth-first over the part's tree; /.ckptfs is rebuilt for the whole by finish().
    std::vector<std::pair<NodeIndex, NodeIndex>> stack = {{kRoot, kRoot}};  // (part, out)
    while (!stack.empty()) {
      // Not a structured binding: the lambda below captures to_dir, which clang 14 refuses.
      const NodeIndex from_dir = stack.back().first;
      const NodeIndex to_dir = stack.back().second;
      stack.pop_back();
      for (NodeIndex c : part.children(from_dir)) {
        const Node& n = part.nodes_[c];
        if (from_dir == kRoot && n.stem() == ".ckptfs") continue;
        // A clash is an error: for a raw file, also of its derived sidecar's and view's names.
        auto claim = [&](std::string_view name, std::string_view what) {
          auto [it, fresh] = by_name.emplace(slot(to_dir, name), kNoNode);
          if (!fresh && !(n.kind == NodeKind::Directory &&
                          out.nodes_[it->second].kind == NodeKind::Directory)) {
            throw FormatError(fmt::format("'{}{}' is in both '{}' and '{}'", part.relative_path(c),
                                          what, part_names[owner[it->second]], part_names[p]));
          }
          return std::pair{it, fresh};
        };
        auto [it, fresh] = claim(n.stem(), "");
        if (!fresh) {  // two directories: merged
          stack.emplace_back(c, it->second);
          continue;
        }
        // The name stays in the part's arena, which |out| keeps.
        Node copy = n;
        copy.parent = to_dir;
        if (n.kind == NodeKind::Directory) {
          copy.ref = static_cast<std::uint32_t>(out.children_.size());
          out.children_.emplace_back();
        } else if (n.kind == NodeKind::JsonValue) {
          copy.ref = static_cast<std::uint32_t>(out.texts_.size());
          out.texts_.push_back(std::move(part.texts_[n.ref]));
        } else {
          copy.ref = n.ref + tensor_base;
        }
        if (out.children_.size() > Node::kMaxRef || out.texts_.size() > Node::kMaxRef ||
            std::uint64_t{n.ref} + tensor_base > Node::kMaxRef) {
          throw FormatError(fmt::format("more than {} tensors or directories", Node::kMaxRef));
        }
        it->second = static_cast<NodeIndex>(out.nodes_.size());
        out.nodes_.push_back(copy);
        owner.push_back(static_cast<std::uint32_t>(p));
        out.children_of(to_dir).push_back(it->second);
        if (n.kind == NodeKind::Directory) stack.emplace_back(c, it->second);
        if (n.kind == NodeKind::TensorData) {
          const TensorInfo& t = part.tensors_[n.tensor()];
          // Derived names point at the raw file, whose part is the one to name in a message.
          for (auto [apart, ext] : {std::pair{t.sidecar_apart, std::string_view(".json")},
                                    std::pair{t.npy_apart, std::string_view(".npy")}}) {
            if (!apart) claim(fmt::format("{}{}", n.stem(), ext), ext).first->second = it->second;
          }
        }
      }
    }
    out.part_arenas_.push_back(std::move(part.arena_));
    for (auto& a : part.part_arenas_) out.part_arenas_.push_back(std::move(a));
    for (StorageInfo& s : part.storages_) {
      s.offset += storage_bases[p];
      const std::string_view where = part.locations_[s.location];
      auto known = std::find(out.locations_.begin(), out.locations_.end(), where);
      s.location = static_cast<std::uint32_t>(known - out.locations_.begin());
      if (known == out.locations_.end()) out.locations_.push_back(where);
      out.storages_.push_back(s);
    }
    for (TensorInfo& t : part.tensors_) {
      if (t.storage != kNoStorage) t.storage += storage_base;
      out.tensors_.push_back(t);
      out.tensor_parts_.push_back(static_cast<std::uint32_t>(p));
    }
    for (std::string& w : part.warnings_) out.warnings_.push_back(part_names[p] + ": " + w);
    for (NoRawForm& t : part.no_raw_form_) out.no_raw_form_.push_back(std::move(t));
    for (std::string& f : part.provenance_) out.provenance_.push_back(part_names[p] + ": " + f);
    if (std::find(formats.begin(), formats.end(), part.format_) == formats.end())
      formats.push_back(part.format_);
  }
  for (auto& children : out.children_) {
    std::sort(children.begin(), children.end(), [&out](NodeIndex a, NodeIndex b) {
      return out.nodes_[a].stem() < out.nodes_[b].stem();
    });
  }
  // File nodes are the merged tree's.
  for (NodeIndex i = 0; i < out.nodes_.size(); ++i) {
    const Node& n = out.nodes_[i];
    if (n.kind == NodeKind::TensorData) {
      out.tensors_[n.tensor()].data_node = i;
    } else if (n.kind == NodeKind::TensorSidecar) {
      out.apart_[2 * n.tensor()] = i;
    } else if (n.kind == NodeKind::NpyView) {
      out.apart_[2 * n.tensor() + 1] = i;
    }
  }
  std::string joined;
  for (const std::string& f : formats) joined += (joined.empty() ? "" : " + ") + f;
  out.format_ = fmt::format("{} ({} files)", joined, parts.size());
  out.finish();
  return out;
}

}  // namespace ckptfs
