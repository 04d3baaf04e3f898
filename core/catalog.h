// TensorCatalog: the immutable tree a mount serves, built once from a checkpoint.
//
// Nodes sit in one vector; a node's index is its inode number minus one, so lookups need no
// map and no lock. Tensor files refer to TensorInfo, which says which storage the bytes come
// from and how the view maps onto it. Names, key paths, shapes and the other per-file strings
// live in the catalog's CatalogArena; nodes, tensors and storages hold views into it, so a
// catalog of many small tensors is a few flat tables rather than millions of heap blocks.
#pragma once

#include <atomic>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "catalog_arena.h"
#include "dtype.h"
#include "tensor_layout.h"

namespace ckptfs {

using NodeIndex = std::uint32_t;
inline constexpr NodeIndex kNoNode = std::numeric_limits<NodeIndex>::max();
inline constexpr std::uint32_t kNoStorage = std::numeric_limits<std::uint32_t>::max();

// One step of a tensor's key path from the root object: a dict key or attribute name, or an
// int dict key / list index. In a catalog, |text| points into its arena.
struct KeyPart {
  bool is_number = false;
  std::int64_t number = 0;
  std::string_view text;

  // As Python would print the key: the number in decimal, or the text.
  std::string str() const { return is_number ? std::to_string(number) : std::string(text); }
};

// |key| as a JSON array: numbers as numbers, texts as strings (sidecars, index.json, xattrs).
void append_json_key(std::string& out, std::span<const KeyPart> key);

// A contiguous run of checkpoint bytes holding one storage. The strings are in the arena.
struct StorageInfo {
  std::string_view key;       // the persistent-id key, e.g. "0"
  std::string_view record;    // e.g. "archive/data/0"
  std::string_view location;  // e.g. "cpu", "cuda:0" (metadata only)
  std::uint64_t offset = 0;   // absolute offset in the checkpoint
  std::uint64_t nbytes = 0;
};

// Spans and strings point into the catalog's arena (shapes, strides and wrapper names are
// shared between tensors that have equal ones).
struct TensorInfo {
  std::span<const KeyPart> key;
  // Its three files (raw, .json sidecar, .npy view); their paths come from the tree when
  // needed (TensorCatalog::relative_path), rather than strings per tensor.
  NodeIndex data_node = kNoNode;
  NodeIndex sidecar_node = kNoNode;
  NodeIndex npy_node = kNoNode;
  std::uint32_t storage = kNoStorage;
  const DType* dtype = &kNoDType;
  std::span<const std::int64_t> shape;
  std::span<const std::int64_t> stride;
  std::int64_t storage_offset = 0;  // in elements
  std::uint64_t nbytes = 0;
  bool requires_grad = false;
  // Math bits of newer torch (_rebuild_tensor_v2/v3 metadata): the stored values are to be
  // conjugated / negated; the file holds the logical values.
  bool conj = false;
  bool neg = false;
  std::string_view wrapper;  // e.g. "torch.nn.parameter.Parameter", or a tensor subclass
  // Non-empty: the file exists but reads fail (EIO); says why. Empty: the view was validated
  // against its storage, so layout() is safe to build.
  std::string_view error;

  // Built on demand (per read): most tensors are contiguous, and a stored layout would cost
  // every tensor its size.
  TensorLayout layout() const {
    return TensorLayout(shape, stride, storage_offset, dtype->itemsize);
  }
};

enum class NodeKind : std::uint8_t {
  Directory,
  TensorData,       // raw bytes of |tensor|
  TensorSidecar,    // JSON metadata of |tensor|
  NpyView,          // |tensor| behind an NPY header, for np.load(..., mmap_mode='r')
  JsonValue,        // |text| is the file's JSON content
  IndexFile,        // /.ckptfs/index.json
  StatsFile,        // /.ckptfs/stats, rendered by the daemon on every read
  SafetensorsFile,  // /.ckptfs/model.safetensors: every tensor as one safetensors file
};

// 24 bytes: a checkpoint of many small tensors has three of these per tensor.
struct Node {
  const char* name_data = "";  // in the arena, NUL-terminated
  std::uint32_t name_size = 0;
  NodeIndex parent = kNoNode;
  // TensorData, TensorSidecar, NpyView: the tensor's index. Directory: its slot in the
  // children table; JsonValue: its slot in the texts table (TensorCatalog::children / text).
  std::uint32_t ref = 0;
  NodeKind kind = NodeKind::Directory;

  std::string_view name() const { return {name_data, name_size}; }
  std::uint32_t tensor() const { return ref; }
};
static_assert(sizeof(Node) == 24);

class TensorCatalog {
 public:
  TensorCatalog() = default;
  TensorCatalog(TensorCatalog&&) noexcept = default;
  TensorCatalog& operator=(TensorCatalog&&) noexcept = default;

  static constexpr NodeIndex kRoot = 0;

  const Node& node(NodeIndex i) const { return nodes_[i]; }
  std::size_t node_count() const { return nodes_.size(); }
  // A directory's entries, sorted by name.
  std::span<const NodeIndex> children(NodeIndex dir) const {
    if (nodes_[dir].kind != NodeKind::Directory) return {};
    return children_[nodes_[dir].ref];
  }
  // A JsonValue file's content.
  std::string_view text(NodeIndex i) const {
    if (nodes_[i].kind != NodeKind::JsonValue) return {};
    return texts_[nodes_[i].ref];
  }
  NodeIndex lookup(NodeIndex dir, std::string_view name) const;

  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const std::vector<StorageInfo>& storages() const { return storages_; }
  const std::string& format() const { return format_; }
  bool big_endian() const { return big_endian_; }
  const std::vector<std::string>& warnings() const { return warnings_; }
  // Tensors with no single raw image (quantized, sparse, nested, ...): where their .json is
  // (the key's path, relative to the mount root) and what they are.
  struct NoRawForm {
    std::string path;
    std::string what;  // e.g. "quantized tensor (torch.qint8)"
  };
  const std::vector<NoRawForm>& no_raw_form() const { return no_raw_form_; }
  // What the container says about its writer ("byteorder record: written by torch >= 2.1").
  const std::vector<std::string>& provenance() const { return provenance_; }
  void add_provenance(std::string fact) { provenance_.push_back(std::move(fact)); }

  std::string sidecar_json(const TensorInfo& t) const;
  // The NPY (format 1.0, or 2.0 for huge headers) header of |t|'s .npy view; the data follows.
  static std::string npy_header(const TensorInfo& t);
  // Rendered on first use and kept: it is large for big checkpoints and read rarely.
  const std::string& index_json() const;
  // Makes the directory at |path| (a path in the tree, e.g. "state_dict") the root; /.ckptfs
  // moves under it and only the tensors beneath it stay listed. Throws FormatError if |path|
  // is not a directory of the tree.
  void reroot(const std::string& path);
  // Tensors reachable from the root (all, unless rerooted), in checkpoint order.
  const std::vector<std::uint32_t>& listed() const { return listed_; }

  // The same JSON for a subset of tensors (indices into tensors()).
  std::string render_index(const std::vector<std::uint32_t>& subset) const;

  // One tree from several checkpoints (shards): part i's storage offsets move by
  // |storage_bases[i]| (where its bytes sit in the combined source). Directories with the same
  // path merge; two files at one path throw FormatError naming both |part_names|.
  static TensorCatalog merge(std::vector<TensorCatalog> parts,
                             const std::vector<std::uint64_t>& storage_bases,
                             const std::vector<std::string>& part_names);
  // Which part (index into merge()'s parts) each tensor came from; empty unless merged.
  const std::vector<std::uint32_t>& tensor_parts() const { return tensor_parts_; }

  // Bytes a file's stat reports for generated (non-tensor) files.
  std::uint64_t generated_size(NodeIndex i) const;
  std::string relative_path(NodeIndex i) const;
  // Where the raw file of |t| is, relative to the mount root.
  std::string path_of(const TensorInfo& t) const { return relative_path(t.data_node); }
  // Bytes held for the tree and its tables (not the daemon's other memory).
  std::size_t metadata_bytes() const;

 private:
  friend class CatalogBuilder;

  // Adds /.ckptfs (index.json, model.safetensors, stats) to the root, in name order, and sizes
  // the per-tensor tables; the last step of building a tree.
  void finish();
  // |name| is kept as a view: text in the arena or a literal (NUL-terminated, outliving us).
  NodeIndex add_node(NodeKind kind, NodeIndex parent, std::string_view name, std::uint32_t ref);
  NodeIndex add_directory(NodeIndex parent, std::string_view name);
  NodeIndex add_json(NodeIndex parent, std::string_view name, std::string text);
  std::vector<NodeIndex>& children_of(NodeIndex dir) { return children_[nodes_[dir].ref]; }

  std::unique_ptr<CatalogArena> arena_ = std::make_unique<CatalogArena>();
  // Merged catalogs keep their parts' arenas alive (their views are moved, not copied).
  std::vector<std::unique_ptr<CatalogArena>> part_arenas_;
  std::vector<Node> nodes_;
  std::vector<std::vector<NodeIndex>> children_;  // by Directory node's ref
  std::vector<std::string> texts_;                // by JsonValue node's ref
  std::vector<TensorInfo> tensors_;
  std::vector<StorageInfo> storages_;
  std::string format_;
  bool big_endian_ = false;
  std::vector<std::string> warnings_;
  std::vector<NoRawForm> no_raw_form_;
  std::vector<std::string> provenance_;
  std::vector<std::uint32_t> listed_;
  std::vector<std::uint32_t> tensor_parts_;
  // Sidecar sizes, computed on first stat: stat of every file in a directory of many tensors
  // must not render every sidecar each time. 0 = not yet known.
  mutable std::vector<std::atomic<std::uint32_t>> sidecar_sizes_;
  mutable std::unique_ptr<std::once_flag> index_once_ = std::make_unique<std::once_flag>();
  mutable std::string index_json_;
};

}  // namespace ckptfs
