// Turns the value graph of a checkpoint's pickle into a TensorCatalog.
//
// Containers become directories (dict keys and attribute names as names, list items as 0, 1,
// ...), tensors become raw files with .json sidecars, and every other value becomes a .json
// file. Opaque objects (a pickled nn.Module, argparse.Namespace, ...) become directories when
// tensors are reachable through their state or arguments, else a .json rendering.
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "catalog.h"
#include "dtype.h"
#include "name_map.h"
#include "pickle_value.h"

namespace ckptfs {

// A storage as a loader finds it; the builder copies it into the catalog (as a StorageInfo).
struct StorageSpec {
  std::string key;           // the persistent-id key, e.g. "0"
  std::string record;        // e.g. "archive/data/0"
  std::string location;      // e.g. "cpu", "cuda:0" (metadata only)
  std::uint64_t offset = 0;  // or, with |local_header|, the zip local header's
  std::uint64_t nbytes = 0;
  // The data starts after a zip local header at |offset|, read when first needed (see
  // StorageInfo::set_local_header); |max_local_extra| bounds its extra field.
  bool local_header = false;
  std::uint16_t max_local_extra = 0;
};

// What a storage persistent id resolves to: a storage of the catalog and the element type of
// its pickled storage class; or |error| saying why it cannot be served.
struct ResolvedStorage {
  StorageSpec storage;  // |storage.key| identifies it; the builder registers each key once
  const DType* dtype = &kNoDType;
  std::string error;
};
using StorageResolver = std::function<ResolvedStorage(ValueId persistent_id)>;

class CatalogBuilder {
 public:
  CatalogBuilder(const ValueArena& arena, TensorCatalog& catalog, StorageResolver resolver);

  // Builds the whole tree under the root directory. Throws FormatError when the graph is
  // too deep or would expand into too many files.
  void build(ValueId root, std::string format, bool big_endian);

 private:
  struct Child {
    KeyPart key;
    ValueId value;
  };
  struct ParsedTensor {
    TensorInfo info;
    bool quantized = false;
  };

  std::optional<ParsedTensor> parse_tensor(ValueId v, int depth);
  std::uint32_t register_storage(const StorageSpec& s);
  // Copies into the catalog's arena: |keep| for one-off strings, |shared| for repeated ones.
  std::string_view keep(std::string_view s) { return catalog_.arena_->add(s); }
  std::string_view shared(std::string_view s) { return catalog_.arena_->intern(s); }
  std::span<const std::int64_t> shared(std::span<const std::int64_t> v) {
    return catalog_.arena_->intern(v);
  }
  // |k| with its text in the arena, sharing |name|'s bytes when they are equal.
  KeyPart stable_key(const KeyPart& k, std::string_view name);
  std::optional<ParsedTensor> parse_rebuild(std::string_view fn, ValueId args, int depth);
  bool contains_tensor(ValueId v, int depth);
  bool is_container(ValueId v) const;
  std::vector<Child> children_of(ValueId v);
  KeyPart key_part(ValueId key);
  void fill_directory(NodeIndex dir, ValueId v, std::vector<KeyPart>& key, int depth);
  // Names and adds |kids| (already deduplicated) to |dir|.
  void fill_entries(NodeIndex dir, const std::vector<Child>& kids, std::vector<KeyPart>& key,
                    int depth);
  void check_node_limit() const;
  void render(std::string& out, ValueId v, int depth, std::vector<ValueId>& on_path);
  std::string render_json(ValueId v);

  const ValueArena& arena_;
  TensorCatalog& catalog_;
  StorageResolver resolve_;
  std::unordered_map<ValueId, std::int8_t> has_tensor_;  // 1 yes, 0 no, -1 being computed
  // Storages by key: an array for keys that are canonical numbers below |max_numbered_|
  // (torch's 0, 1, 2, ...), the map for the rest (reserved on its first use).
  std::vector<std::uint32_t> storage_by_number_;
  std::size_t max_numbered_ = 0;
  std::size_t expected_storages_ = 0;
  NameMap<std::uint32_t> storage_index_;   // keys in the arena
  NameMap<std::uint32_t> location_index_;  // into locations_
};

}  // namespace ckptfs
