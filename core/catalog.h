// TensorCatalog: the immutable tree a mount serves, built once from a checkpoint.
//
// Nodes sit in one vector; a node's index is its inode number minus one, so lookups need no
// map and no lock. Tensor files refer to TensorInfo, which says which storage the bytes come
// from and how the view maps onto it.
#pragma once

#include <atomic>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "dtype.h"
#include "tensor_layout.h"

namespace ckptfs {

using NodeIndex = std::uint32_t;
inline constexpr NodeIndex kNoNode = std::numeric_limits<NodeIndex>::max();
inline constexpr std::uint32_t kNoStorage = std::numeric_limits<std::uint32_t>::max();

// One step of a tensor's key path from the root object: a dict key or attribute name, or an
// int dict key / list index.
struct KeyPart {
  bool is_number = false;
  std::int64_t number = 0;
  std::string text;
};

// A contiguous run of checkpoint bytes holding one storage.
struct StorageInfo {
  std::string key;           // the persistent-id key, e.g. "0"
  std::string record;        // e.g. "archive/data/0"
  std::string location;      // e.g. "cpu", "cuda:0" (metadata only)
  std::uint64_t offset = 0;  // absolute offset in the checkpoint
  std::uint64_t nbytes = 0;
};

struct TensorInfo {
  std::vector<KeyPart> key;
  std::string path;  // of the raw file, relative to the mount root
  // Its three files (raw, .json sidecar, .npy view); their paths come from the tree when
  // needed (index.json), rather than three strings per tensor.
  NodeIndex data_node = kNoNode;
  NodeIndex sidecar_node = kNoNode;
  NodeIndex npy_node = kNoNode;
  DType dtype{};
  std::vector<std::int64_t> shape;
  std::vector<std::int64_t> stride;
  std::int64_t storage_offset = 0;  // in elements
  std::uint32_t storage = kNoStorage;
  std::uint64_t nbytes = 0;
  bool requires_grad = false;
  // Math bits of newer torch (_rebuild_tensor_v2/v3 metadata): the stored values are to be
  // conjugated / negated; the file holds the logical values.
  bool conj = false;
  bool neg = false;
  std::string wrapper;                 // e.g. "torch.nn.parameter.Parameter", or a tensor subclass
  std::string error;                   // non-empty: the file exists but reads fail (EIO); says why
  std::optional<TensorLayout> layout;  // set when error is empty
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

struct Node {
  NodeKind kind = NodeKind::Directory;
  NodeIndex parent = kNoNode;
  std::string name;
  std::vector<NodeIndex> children;  // Directory: sorted by name
  std::uint32_t tensor = 0;         // TensorData, TensorSidecar, NpyView
  std::string text;                 // JsonValue
};

class TensorCatalog {
 public:
  TensorCatalog() = default;
  TensorCatalog(TensorCatalog&&) noexcept = default;
  TensorCatalog& operator=(TensorCatalog&&) noexcept = default;

  static constexpr NodeIndex kRoot = 0;

  const Node& node(NodeIndex i) const { return nodes_[i]; }
  std::size_t node_count() const { return nodes_.size(); }
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

 private:
  friend class CatalogBuilder;

  // Adds /.ckptfs (index.json, model.safetensors, stats) to the root, in name order, and sizes
  // the per-tensor tables; the last step of building a tree.
  void finish();

  std::vector<Node> nodes_;
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
