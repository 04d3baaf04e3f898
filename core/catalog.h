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
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "catalog_arena.h"
#include "dtype.h"
#include "stream_hint.h"
#include "tensor_layout.h"

namespace ckptfs {

using NodeIndex = std::uint32_t;
inline constexpr NodeIndex kNoNode = std::numeric_limits<NodeIndex>::max();
inline constexpr std::uint32_t kNoStorage = std::numeric_limits<std::uint32_t>::max();

// One step of a tensor's key path from the root object: a dict key or attribute name, or an
// int dict key / list index. In a catalog, the text points into its arena. 16 bytes: every
// tensor's key path holds one per level.
class KeyPart {
 public:
  KeyPart() = default;
  static KeyPart of_number(std::int64_t n) {
    KeyPart k;
    k.is_number_ = true;
    k.number_ = n;
    return k;
  }
  // |text| is viewed, not copied, and must be under 4 GiB (CatalogBuilder::key_part checks).
  static KeyPart of_text(std::string_view text) {
    KeyPart k;
    k.text_ = text.data();
    k.size_ = static_cast<std::uint32_t>(text.size());
    return k;
  }

  bool is_number() const { return is_number_; }
  std::int64_t number() const { return is_number_ ? number_ : 0; }
  std::string_view text() const {
    return is_number_ ? std::string_view() : std::string_view(text_, size_);
  }
  // As Python would print the key: the number in decimal, or the text.
  std::string str() const { return is_number_ ? std::to_string(number_) : std::string(text()); }

 private:
  union {
    std::int64_t number_;
    const char* text_ = "";
  };
  std::uint32_t size_ = 0;
  bool is_number_ = false;
};
static_assert(sizeof(KeyPart) == 16);

// |key| as a JSON array: numbers as numbers, texts as strings (sidecars, index.json, xattrs).
void append_json_key(std::string& out, std::span<const KeyPart> key);

// A contiguous run of checkpoint bytes holding one storage, in 40 bytes. Its texts are
// NUL-terminated, in the arena or literals.
class StorageInfo {
  const char* key_ = "";
  // The record's name; or, when it is the shared part before the key (zip records are
  // "<archive>/data/<key>": the prefix is stored once, not once per storage), |record_is_prefix_|.
  const char* record_ = "";

 public:
  std::string_view key() const { return key_; }  // the persistent-id key, e.g. "0"
  std::string record() const {                   // e.g. "archive/data/0"
    std::string out(record_);
    if (record_is_prefix_) out += key_;
    return out;
  }
  std::size_t record_size() const {  // record().size(), without building it
    return std::strlen(record_) + (record_is_prefix_ ? std::strlen(key_) : 0);
  }
  void set_texts(std::string_view key, std::string_view record, bool record_is_prefix) {
    key_ = key.data();
    record_ = record.data();
    record_is_prefix_ = record_is_prefix;
  }

  // The absolute offset of the storage's first byte in the checkpoint; for a zip record whose
  // local header is not read yet (offset_is_local_header()), that header's offset: use
  // TensorCatalog::data_offset(), which reads the header on first use.
  std::uint64_t offset = 0;
  std::uint64_t nbytes = 0;
  // Where torch had it ("cpu", "cuda:0": metadata only), as TensorCatalog::location() gives it.
  std::uint32_t location = 0;

  bool offset_is_local_header() const { return offset_is_local_header_; }
  // For a local header: the most extra-field bytes it may declare (see LocalHeaderRef). Its
  // name is record(), and the data is nbytes long.
  std::uint16_t max_local_extra() const { return max_local_extra_; }
  void set_local_header(std::uint64_t header_offset, std::uint16_t max_extra) {
    offset = header_offset;
    offset_is_local_header_ = true;
    max_local_extra_ = max_extra;
  }

 private:
  bool record_is_prefix_ = false;
  bool offset_is_local_header_ = false;
  std::uint16_t max_local_extra_ = 0;
};
static_assert(sizeof(StorageInfo) == 40);

// One tensor file, in 64 bytes: a checkpoint of many small tensors has one per tensor. The
// arrays and texts are in the catalog's arena (shapes, strides and wrapper names shared between
// tensors that have equal ones); the accessors give them as spans and views.
class TensorInfo {
  // First: the pointers, then the public numbers, then the small fields (no padding holes).
  const KeyPart* key_data_ = nullptr;
  const std::int64_t* shape_data_ = nullptr;
  const std::int64_t* stride_data_ = nullptr;
  const char* wrapper_ = nullptr;
  const char* error_ = nullptr;

 public:
  std::span<const KeyPart> key() const { return {key_data_, key_size_}; }
  std::span<const std::int64_t> shape() const { return {shape_data_, ndim_}; }
  // Empty when the pickle's stride did not match the shape (the tensor then has an error()).
  std::span<const std::int64_t> stride() const {
    return stride_data_ ? std::span(stride_data_, ndim_) : std::span<const std::int64_t>();
  }
  const DType& dtype() const { return dtype_from_id(dtype_id_); }
  // e.g. "torch.nn.parameter.Parameter", or a tensor subclass; empty for a plain tensor.
  std::string_view wrapper() const { return wrapper_ ? wrapper_ : ""; }
  // Non-empty: the file exists but reads fail (EIO); says why. Empty: the view was validated
  // against its storage, so layout() is safe to build.
  std::string_view error() const { return error_ ? error_ : ""; }

  // |key| at most 65,535 parts (the builder's depth limit is far lower).
  void set_key(std::span<const KeyPart> key) {
    key_data_ = key.data();
    key_size_ = static_cast<std::uint16_t>(key.size());
  }
  // Returns false (storing neither) unless |shape| and |stride| have the same length, at most
  // kMaxDims.
  bool set_shape(std::span<const std::int64_t> shape, std::span<const std::int64_t> stride) {
    if (shape.size() != stride.size() || shape.size() > kMaxDims) return false;
    shape_data_ = shape.data();
    stride_data_ = stride.data();
    ndim_ = static_cast<std::uint16_t>(shape.size());
    return true;
  }
  void set_dtype(const DType& d) { dtype_id_ = dtype_id(d); }
  // Texts must be NUL-terminated and outlive the catalog: literals, or the arena's copies.
  void set_wrapper(std::string_view w) { wrapper_ = w.data(); }
  void set_error(std::string_view e) { error_ = e.data(); }

  static constexpr std::size_t kMaxDims = 65535;

  // Built on demand (per read): most tensors are contiguous, and a stored layout would cost
  // every tensor its size.
  TensorLayout layout() const {
    return TensorLayout(shape(), stride(), storage_offset, dtype().itemsize);
  }

  // The raw file's size: the logical shape's bytes (0 when that overflows, or with no dtype).
  // Computed, not stored: a few multiplications per call, 8 bytes less per tensor.
  std::uint64_t nbytes() const {
    std::uint64_t n = dtype().itemsize;
    for (const std::int64_t d : shape()) {
      if (d < 0 || __builtin_mul_overflow(n, static_cast<std::uint64_t>(d), &n)) return 0;
    }
    return n;
  }

  std::int64_t storage_offset = 0;  // in elements
  // Its raw file. Its .json sidecar and .npy view have no nodes of their own unless a name
  // clash renamed them (|sidecar_apart|, |npy_apart|): TensorCatalog::sidecar_node/npy_node.
  // Paths come from the tree when needed (TensorCatalog::relative_path), not strings per tensor.
  NodeIndex data_node = kNoNode;
  std::uint32_t storage = kNoStorage;
  bool requires_grad : 1 = false;
  // Math bits of newer torch (_rebuild_tensor_v2/v3 metadata): the stored values are to be
  // conjugated / negated; the file holds the logical values.
  bool conj : 1 = false;
  bool neg : 1 = false;
  // The sidecar / view is not named "<raw file>.json" / ".npy" (a clash gave it a "~N"), so it
  // is a node of the tree like any other file.
  bool sidecar_apart : 1 = false;
  bool npy_apart : 1 = false;

 private:
  std::uint16_t key_size_ = 0;
  std::uint16_t ndim_ = 0;
  std::uint8_t dtype_id_ = 0;
};
static_assert(sizeof(TensorInfo) == 64);

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

// What a derived file's name adds to its tensor's raw file name.
enum class NameSuffix : std::uint8_t { None, Json, Npy };
constexpr std::string_view suffix_text(NameSuffix s) {
  return s == NameSuffix::Json ? ".json" : s == NameSuffix::Npy ? ".npy" : "";
}

// 16 bytes: a checkpoint of many small tensors has one of these per tensor (the raw file).
// A tensor's sidecar and .npy view are derived: TensorCatalog::node() makes their Node on
// demand, with the raw file's name as |stem| and a |suffix|.
struct Node {
  // Below 2^27, so that the kind and suffix share the word (TensorCatalog checks).
  static constexpr std::uint32_t kMaxRef = (1u << 27) - 1;

  // In the arena or a literal, NUL-terminated (names never hold a NUL: it is escaped as %00),
  // so no size is stored.
  const char* stem_data = "";
  NodeIndex parent = kNoNode;
  // TensorData, TensorSidecar, NpyView: the tensor's index. Directory: its slot in the
  // children table; JsonValue: its slot in the texts table (TensorCatalog::children / text).
  std::uint32_t ref : 27 = 0;
  NodeKind kind : 3 = NodeKind::Directory;
  NameSuffix suffix : 2 = NameSuffix::None;

  // The name is |stem| + suffix_text(); only derived nodes have a suffix.
  std::string_view stem() const { return stem_data; }
  std::string name() const {
    std::string out(stem());
    out += suffix_text(suffix);
    return out;
  }
  std::uint32_t tensor() const { return ref; }
};
static_assert(sizeof(Node) == 16);
static_assert(static_cast<int>(NodeKind::SafetensorsFile) < 8, "NodeKind must fit in 3 bits");

class TensorCatalog {
 public:
  TensorCatalog() = default;
  TensorCatalog(TensorCatalog&&) noexcept = default;
  TensorCatalog& operator=(TensorCatalog&&) noexcept = default;

  static constexpr NodeIndex kRoot = 0;

  // Nodes are numbered 0 .. node_count() - 1: the stored ones, then two derived ones (sidecar,
  // view) per tensor. Returned by value: a derived node is made on the spot.
  Node node(NodeIndex i) const {
    return i < derived_base() ? nodes_[i] : derived_node(i - derived_base());
  }
  std::size_t node_count() const { return derived_base() + 2 * tensors_.size(); }
  // A directory's stored entries, sorted by name (derived files are not among them: see
  // entry()).
  std::span<const NodeIndex> children(NodeIndex dir) const {
    if (dir >= derived_base() || nodes_[dir].kind != NodeKind::Directory) return {};
    return children_[nodes_[dir].ref];
  }
  // A directory's listing: slot 3k is its k-th child, 3k+1 and 3k+2 that child's derived
  // sidecar and view if it is a tensor's raw file (kNoNode otherwise). Slots run from 0 to
  // entry_slots(dir) - 1, so a listing resumes from a slot number.
  std::size_t entry_slots(NodeIndex dir) const { return 3 * children(dir).size(); }
  NodeIndex entry(NodeIndex dir, std::size_t slot) const;
  // Where a tensor's sidecar and .npy view are (derived, or stored when renamed by a clash).
  NodeIndex sidecar_node(std::uint32_t tensor) const;
  NodeIndex npy_node(std::uint32_t tensor) const;
  // A JsonValue file's content.
  std::string_view text(NodeIndex i) const {
    if (i >= derived_base() || nodes_[i].kind != NodeKind::JsonValue) return {};
    return texts_[nodes_[i].ref];
  }
  NodeIndex lookup(NodeIndex dir, std::string_view name) const;

  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const std::vector<StorageInfo>& storages() const { return storages_; }

  // Reads checkpoint bytes (offsets as in the storages) for data_offset(): loaders set the
  // source they read; a mount sets its block cache, so that a header costs no read of its own
  // (it shares the block of the data after it) and leaves nothing in the page cache. The hint
  // says whether the record's data is about to be streamed (a cache may then load it ahead) or
  // only the header is wanted. Not thread-safe: set it before serving.
  using SourceReader =
      std::function<void(std::uint64_t offset, std::span<std::byte> dst, StreamHint hint)>;
  void set_source_reader(SourceReader reader);
  // Where storage |i|'s bytes start. A zip record's local header is read (through the source
  // reader) on first use and remembered; |stream_follows| says the caller is about to read the
  // data from its start. Thread-safe. Throws FormatError for a header that disagrees with the
  // central directory, IoError when it cannot be read.
  std::uint64_t data_offset(std::uint32_t i, bool stream_follows = false) const;
  // The source bytes storage |i| may occupy, its local header included while that is unread,
  // known without reading anything: a bound for what prefetch loads for it.
  struct SourceSpan {
    std::uint64_t begin = 0;
    std::uint64_t end = 0;
  };
  SourceSpan record_span(std::uint32_t i) const;
  // Whether data_offset(i) returns without reading anything.
  bool data_offset_known(std::uint32_t i) const {
    return !storages_[i].offset_is_local_header() ||
           (i < resolved_offsets_.size() &&
            resolved_offsets_[i].load(std::memory_order_acquire) != 0);
  }
  // The storages' locations ("cpu", "cuda:0": metadata only), each once.
  std::string_view location(const StorageInfo& s) const { return locations_[s.location]; }
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
  // (A copy: unless rerooted, that is every tensor, and no table is kept for it.)
  std::vector<std::uint32_t> listed() const;

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
  // Throws FormatError if |ref| exceeds Node::kMaxRef.
  NodeIndex add_node(NodeKind kind, NodeIndex parent, std::string_view name, std::uint32_t ref);
  NodeIndex add_directory(NodeIndex parent, std::string_view name);
  NodeIndex add_json(NodeIndex parent, std::string_view name, std::string text);
  std::vector<NodeIndex>& children_of(NodeIndex dir) { return children_[nodes_[dir].ref]; }
  // The first derived node's index: derived nodes are numbered after the stored ones.
  NodeIndex derived_base() const { return static_cast<NodeIndex>(nodes_.size()); }
  // |k|: 2 * tensor (+ 1 for the view) from derived_base().
  Node derived_node(std::size_t k) const;
  // The derived sidecar (Json) or view (Npy) of |tensor|; kNoNode when a clash stored it apart.
  NodeIndex derived(std::uint32_t tensor, NameSuffix suffix) const;
  // The sidecar; with |resolve| false, blanks where the file offset goes (same size).
  std::string render_sidecar(const TensorInfo& t, bool resolve) const;
  void append_file_offset(std::string& out, std::uint32_t storage, bool resolve) const;

  std::unique_ptr<CatalogArena> arena_ = std::make_unique<CatalogArena>();
  // Merged catalogs keep their parts' arenas alive (their views are moved, not copied).
  std::vector<std::unique_ptr<CatalogArena>> part_arenas_;
  std::vector<Node> nodes_;
  // Sidecars and views stored apart (renamed by a clash): 2 * tensor (+ 1 for a view) -> node.
  std::unordered_map<std::uint32_t, NodeIndex> apart_;
  std::vector<std::vector<NodeIndex>> children_;  // by Directory node's ref
  std::vector<std::string> texts_;                // by JsonValue node's ref
  std::vector<TensorInfo> tensors_;
  std::vector<StorageInfo> storages_;
  std::vector<std::string_view> locations_;  // in the arena
  std::string format_;
  bool big_endian_ = false;
  std::vector<std::string> warnings_;
  std::vector<NoRawForm> no_raw_form_;
  std::vector<std::string> provenance_;
  bool rerooted_ = false;
  std::vector<std::uint32_t> listed_;  // only when rerooted_
  std::vector<std::uint32_t> tensor_parts_;
  // Sidecar sizes, computed on first stat: stat of every file in a directory of many tensors
  // must not render every sidecar each time. 0 = not yet known.
  mutable std::vector<std::atomic<std::uint32_t>> sidecar_sizes_;
  SourceReader source_reader_;
  // data_offset() of storages whose offset is a local header, once read; 0 = not yet (a data
  // offset is never 0: the header comes first).
  mutable std::vector<std::atomic<std::uint64_t>> resolved_offsets_;
  mutable std::unique_ptr<std::once_flag> index_once_ = std::make_unique<std::once_flag>();
  mutable std::string index_json_;
};

}  // namespace ckptfs
