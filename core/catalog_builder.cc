#include "catalog_builder.h"

#include <fmt/format.h>

#include <algorithm>

#include "decimal_key.h"
#include "errors.h"
#include "json_text.h"
#include "known_objects.h"
#include "name_escaping.h"
#include "name_map.h"

namespace ckptfs {
namespace {

constexpr int kMaxDepth = 400;
constexpr std::size_t kMaxNodes = 64u << 20;
constexpr std::size_t kMaxJsonBytes = 256u << 20;

bool is_tensor_function(std::string_view name) {
  return name == "torch._utils._rebuild_tensor_v2" || name == "torch._utils._rebuild_tensor" ||
         name == "torch._utils._rebuild_tensor_v3" || name == "torch._utils._rebuild_parameter" ||
         name == "torch._utils._rebuild_parameter_with_state" ||
         name == "torch.nn.parameter.Parameter" || name == "torch._tensor._rebuild_from_type_v2" ||
         name == "torch._tensor._rebuild_from_type" || name == "torch._utils._rebuild_qtensor" ||
         name == "torch._utils._rebuild_device_tensor_from_cpu_tensor";
}

// ('storage', type, key, location, numel[, view]) — the only persistent ids that are data.
// Legacy whole-module pickles also persist classes as ('module', cls, file, source).
bool is_storage_pid(const ValueArena& a, ValueId ref) {
  if (a[ref].kind != ValueKind::PersistentRef) return false;
  const Value& pid = a[a[ref].items()[0]];
  return pid.kind == ValueKind::Tuple && !pid.items().empty() &&
         a[pid.items()[0]].kind == ValueKind::Str && a[pid.items()[0]].text() == "storage";
}

// A class reference: a GLOBAL, or a legacy ('module', GLOBAL, file, source) persistent id.
ValueId class_global(const ValueArena& a, ValueId cls) {
  if (cls != kNoValue && a[cls].kind == ValueKind::PersistentRef) {
    const Value& pid = a[a[cls].items()[0]];
    if (pid.kind == ValueKind::Tuple && pid.items().size() >= 2 &&
        a[pid.items()[0]].kind == ValueKind::Str && a[pid.items()[0]].text() == "module" &&
        a[pid.items()[1]].kind == ValueKind::Global) {
      return pid.items()[1];
    }
  }
  return cls;
}

// Tensors that have no single raw image: their components (if any) are walked like any
// object, and a NAME.json says what they are.
const char* special_tensor_kind(std::string_view fn) {
  if (fn == "torch._utils._rebuild_sparse_tensor") return "sparse tensor";
  if (fn == "torch._utils._rebuild_nested_tensor") return "nested tensor";
  if (fn == "torch._utils._rebuild_meta_tensor_no_storage") return "meta tensor (no data)";
  if (fn == "torch._utils._rebuild_wrapper_subclass") return "tensor subclass without storage";
  return nullptr;
}

}  // namespace

CatalogBuilder::CatalogBuilder(const ValueArena& arena, TensorCatalog& catalog,
                               StorageResolver resolver)
    : arena_(arena), catalog_(catalog), resolve_(std::move(resolver)) {}

void CatalogBuilder::check_node_limit() const {
  // Files: the stored nodes and each tensor's two derived ones.
  if (catalog_.nodes_.size() + 2 * catalog_.tensors_.size() >= kMaxNodes) {
    throw FormatError(fmt::format(
        "checkpoint expands to more than {} files (shared objects referenced too often?)",
        kMaxNodes));
  }
}

KeyPart CatalogBuilder::stable_key(const KeyPart& k, std::string_view name) {
  if (k.is_number()) return k;
  return KeyPart::of_text(k.text() == name ? name : keep(k.text()));
}

bool CatalogBuilder::is_container(ValueId v) const {
  auto k = arena_[v].kind;
  return k == ValueKind::Dict || k == ValueKind::List || k == ValueKind::Tuple ||
         k == ValueKind::Set;
}

// Reads an int tuple, accepting torch.Size(tuple) too.
static std::optional<std::vector<std::int64_t>> int_tuple(const ValueArena& a, ValueId v) {
  if (v == kNoValue) return std::nullopt;
  const Value* t = &a[v];
  if (t->kind == ValueKind::Object && a.is_global(t->cls(), "torch.Size") &&
      t->args() != kNoValue && !a[t->args()].items().empty()) {
    t = &a[a[t->args()].items()[0]];
  }
  if (t->kind != ValueKind::Tuple && t->kind != ValueKind::List) return std::nullopt;
  std::vector<std::int64_t> out;
  out.reserve(t->items().size());
  for (ValueId i : t->items()) {
    if (a[i].kind != ValueKind::Int) return std::nullopt;
    out.push_back(a[i].integer());
  }
  return out;
}

std::optional<CatalogBuilder::ParsedTensor> CatalogBuilder::parse_rebuild(std::string_view fn,
                                                                          ValueId args_id,
                                                                          int depth) {
  if (args_id == kNoValue || depth > 8) return std::nullopt;
  const Value& args = arena_[args_id];
  if (args.kind != ValueKind::Tuple && args.kind != ValueKind::List) return std::nullopt;
  const auto& argv = args.items();

  if (fn == "torch._utils._rebuild_parameter" ||
      fn == "torch._utils._rebuild_parameter_with_state" || fn == "torch.nn.parameter.Parameter") {
    if (argv.empty()) return std::nullopt;
    auto inner = parse_tensor(argv[0], depth + 1);
    if (inner) {
      if (argv.size() > 1 && arena_[argv[1]].kind == ValueKind::Bool)
        inner->info.requires_grad = arena_[argv[1]].boolean;
      inner->info.set_wrapper("torch.nn.parameter.Parameter");
    }
    return inner;
  }
  if (fn == "torch._tensor._rebuild_from_type_v2" || fn == "torch._tensor._rebuild_from_type") {
    // (func, new_type, args, state): the tensor is func(*args); new_type is only recorded.
    if (argv.size() < 3 || arena_[argv[0]].kind != ValueKind::Global) return std::nullopt;
    auto inner = parse_rebuild(arena_[argv[0]].text(), argv[2], depth + 1);
    if (inner && arena_[argv[1]].kind == ValueKind::Global &&
        arena_[argv[1]].text() != "torch.Tensor" && inner->info.wrapper().empty()) {
      inner->info.set_wrapper(shared(arena_[argv[1]].text()));
    }
    return inner;
  }
  const bool v1 = fn == "torch._utils._rebuild_tensor";
  const bool v2 = fn == "torch._utils._rebuild_tensor_v2";
  const bool v3 = fn == "torch._utils._rebuild_tensor_v3";
  const bool quantized = fn == "torch._utils._rebuild_qtensor";
  if (!v1 && !v2 && !v3 && !quantized) return std::nullopt;
  if (argv.size() < 4) return std::nullopt;

  ParsedTensor p;
  p.quantized = quantized;
  TensorInfo& t = p.info;
  auto shape = int_tuple(arena_, argv[2]);
  auto stride = int_tuple(arena_, argv[3]);
  if (!shape || !stride || arena_[argv[1]].kind != ValueKind::Int) {
    t.set_error("tensor arguments are malformed (size, stride or offset)");
    return p;
  }
  // Checked with the view (last, as other errors take precedence): a shape and a stride that
  // do not fit together, or more dimensions than a TensorInfo holds.
  std::optional<std::string> shape_error;
  if (!t.set_shape(shared(std::span<const std::int64_t>(*shape)),
                   shared(std::span<const std::int64_t>(*stride)))) {
    shape_error =
        shape->size() != stride->size()
            ? fmt::format("shape has {} dims but stride has {}", shape->size(), stride->size())
            : fmt::format("tensor has {} dimensions; ckptfs serves at most {}", shape->size(),
                          TensorInfo::kMaxDims);
  }
  t.storage_offset = arena_[argv[1]].integer();
  if (!quantized && argv.size() > 4 && arena_[argv[4]].kind == ValueKind::Bool)
    t.requires_grad = arena_[argv[4]].boolean;

  if (arena_[argv[0]].kind != ValueKind::PersistentRef) {
    t.set_error("tensor storage is not a storage reference");
    return p;
  }
  ResolvedStorage rs = resolve_(arena_[argv[0]].items()[0]);
  t.set_dtype(*rs.dtype);
  if (v3) {
    const DType* dt = nullptr;
    if (argv.size() > 6 && arena_[argv[6]].kind == ValueKind::Global)
      dt = dtype_by_name(arena_[argv[6]].text());
    if (!dt) {
      t.set_error("unknown dtype in _rebuild_tensor_v3");
      return p;
    }
    t.set_dtype(*dt);
  }
  if (!rs.error.empty()) {
    t.set_error(keep(rs.error));
    return p;
  }
  t.storage = register_storage(rs.storage);
  // Math bits (conj/neg) change the logical values: the reader applies them as sign flips,
  // which is exact for IEEE-style floats and complex; anything else is refused.
  std::size_t meta_at = v2 ? 6 : v3 ? 7 : SIZE_MAX;
  if (meta_at < argv.size() && arena_[argv[meta_at]].kind == ValueKind::Dict) {
    const auto& kv = arena_[argv[meta_at]].items();
    for (std::size_t i = 0; i + 1 < kv.size(); i += 2) {
      const Value& k = arena_[kv[i]];
      const Value& val = arena_[kv[i + 1]];
      if (k.kind != ValueKind::Str || val.kind != ValueKind::Bool || !val.boolean) continue;
      if (k.text() == "conj") t.conj = true;
      if (k.text() == "neg") t.neg = true;
    }
    const std::string_view dn = t.dtype().name;
    const bool floating = dn.starts_with("float") || dn == "bfloat16" || t.dtype().is_complex;
    if (t.conj && !t.dtype().is_complex) t.conj = false;  // conj of a real tensor is a no-op
    if (t.neg && (!floating || dn.ends_with("fnuz"))) {
      t.set_error(keep(fmt::format(
          "tensor has the 'neg' bit set on {}, which ckptfs cannot apply exactly", dn)));
    }
  }
  if (shape_error) {
    t.set_error(keep(*shape_error));
    return p;
  }
  const StorageInfo& s = catalog_.storages_[t.storage];
  if (auto err = TensorLayout::validate(t.shape(), t.stride(), t.storage_offset, t.dtype().itemsize,
                                        s.nbytes)) {
    t.set_error(keep(*err));
    return p;
  }
  return p;
}

std::optional<CatalogBuilder::ParsedTensor> CatalogBuilder::parse_tensor(ValueId v, int depth) {
  const Value& val = arena_[v];
  if (is_storage_pid(arena_, v)) {
    // A bare storage (torch.save(storage)): expose it whole, as a 1-D tensor of its type.
    ResolvedStorage rs = resolve_(val.items()[0]);
    ParsedTensor p;
    p.info.set_dtype(*rs.dtype);
    p.info.set_wrapper("storage");
    if (!rs.error.empty()) {
      p.info.set_error(keep(rs.error));
      return p;
    }
    p.info.storage = register_storage(rs.storage);
    std::uint64_t nbytes = rs.storage.nbytes;
    const std::array<std::int64_t, 2> numel_and_one = {
        static_cast<std::int64_t>(nbytes / rs.dtype->itemsize), 1};
    p.info.set_shape(shared(std::span(numel_and_one.data(), 1)),
                     shared(std::span(numel_and_one.data() + 1, 1)));
    return p;
  }
  if (val.kind != ValueKind::Object || arena_[val.cls()].kind != ValueKind::Global)
    return std::nullopt;
  const std::string_view fn = arena_[val.cls()].text();
  if (!is_tensor_function(fn)) return std::nullopt;
  return parse_rebuild(fn, val.args(), depth);
}

std::uint32_t CatalogBuilder::register_storage(const StorageSpec& s) {
  const std::optional<std::uint32_t> number = canonical_decimal(s.key);
  const bool numbered = number && *number < max_numbered_;
  if (numbered) {
    if (*number < storage_by_number_.size() && storage_by_number_[*number] != kNoStorage)
      return storage_by_number_[*number];
  } else if (const std::uint32_t* known = storage_index_.find(s.key)) {
    return *known;
  }
  StorageInfo info;
  const std::string_view key = keep(s.key);
  // Zip records are "<archive>/data/<key>": the part before the key is shared.
  const bool ends_in_key = s.record.size() > s.key.size() && s.record.ends_with(s.key);
  info.set_texts(key,
                 ends_in_key
                     ? shared(std::string_view(s.record).substr(0, s.record.size() - s.key.size()))
                     : keep(s.record),
                 ends_in_key);
  const std::string_view location = shared(s.location);
  bool fresh = false;
  info.location =
      location_index_.add(location, static_cast<std::uint32_t>(catalog_.locations_.size()), &fresh);
  if (fresh) catalog_.locations_.push_back(location);
  if (s.local_header) {
    info.set_local_header(s.offset, s.max_local_extra);
  } else {
    info.offset = s.offset;
  }
  info.nbytes = s.nbytes;
  const auto index = static_cast<std::uint32_t>(catalog_.storages_.size());
  catalog_.storages_.push_back(info);
  if (numbered) {
    if (*number >= storage_by_number_.size()) {
      storage_by_number_.resize(std::min(max_numbered_, std::max(2 * storage_by_number_.size(),
                                                                 std::size_t{*number} + 1)),
                                kNoStorage);
    }
    storage_by_number_[*number] = index;
  } else {
    if (storage_index_.size() == 0) storage_index_.reserve(expected_storages_);
    storage_index_.add(key, index);
  }
  return index;
}

bool CatalogBuilder::contains_tensor(ValueId v, int depth) {
  if (depth > kMaxDepth)
    throw FormatError(fmt::format("objects nested deeper than {} levels", kMaxDepth));
  const Value& val = arena_[v];
  if (val.kind == ValueKind::PersistentRef) return is_storage_pid(arena_, v);
  if (val.kind != ValueKind::Object && !is_container(v)) return false;
  auto [it, inserted] = has_tensor_.emplace(v, -1);
  if (!inserted) return it->second == 1;  // -1: a cycle back to an ancestor adds nothing
  bool found = false;
  if (val.kind == ValueKind::Object && arena_[val.cls()].kind == ValueKind::Global &&
      is_tensor_function(arena_[val.cls()].text())) {
    found = true;
  } else {
    for (const Child& c : children_of(v)) {
      if (contains_tensor(c.value, depth + 1)) {
        found = true;
        break;
      }
    }
  }
  has_tensor_[v] = found ? 1 : 0;
  return found;
}

// The text of a Str key views the pickle's value (alive while building); made-up texts go to
// the arena.
KeyPart CatalogBuilder::key_part(ValueId key) {
  const Value& k = arena_[key];
  switch (k.kind) {
    case ValueKind::Str:
    case ValueKind::BigInt:
      if (k.text().size() > std::numeric_limits<std::uint32_t>::max())
        throw FormatError("a dict key or attribute name is longer than 4 GiB");
      return KeyPart::of_text(k.text());
    case ValueKind::Int:
      return KeyPart::of_number(k.integer());
    case ValueKind::Bool:
      return KeyPart::of_text(k.boolean ? "True" : "False");
    case ValueKind::None:
      return KeyPart::of_text("None");
    case ValueKind::Float:
      return KeyPart::of_text(keep(fmt::format("{}", k.real())));
    case ValueKind::Tuple: {
      std::string text = "(";
      for (std::size_t i = 0; i < k.items().size(); ++i) {
        KeyPart sub = key_part(k.items()[i]);
        if (i) text += ", ";
        text += sub.str();
      }
      text += k.items().size() == 1 ? ",)" : ")";
      return KeyPart::of_text(keep(text));
    }
    default:
      return KeyPart::of_text(keep(fmt::format("<{}>", static_cast<int>(k.kind))));
  }
}

std::vector<CatalogBuilder::Child> CatalogBuilder::children_of(ValueId v) {
  const Value& val = arena_[v];
  std::vector<Child> out;
  auto number = [](std::size_t i) { return KeyPart::of_number(static_cast<std::int64_t>(i)); };
  auto named = [](std::string_view s) { return KeyPart::of_text(s); };
  auto add_dict = [&](ValueId d) {
    const auto& kv = arena_[d].items();
    for (std::size_t i = 0; i + 1 < kv.size(); i += 2) out.push_back({key_part(kv[i]), kv[i + 1]});
  };
  switch (val.kind) {
    case ValueKind::Dict:
      add_dict(v);
      break;
    case ValueKind::List:
    case ValueKind::Tuple:
    case ValueKind::Set:
      for (std::size_t i = 0; i < val.items().size(); ++i)
        out.push_back({number(i), val.items()[i]});
      break;
    case ValueKind::Object: {
      out.push_back({named("__class__"), class_global(arena_, val.cls())});
      if (val.state() != kNoValue) {
        const Value& st = arena_[val.state()];
        if (st.kind == ValueKind::Dict) {
          add_dict(val.state());
        } else if (st.kind == ValueKind::Tuple && st.items().size() == 2 &&
                   (arena_[st.items()[0]].kind == ValueKind::Dict ||
                    arena_[st.items()[0]].kind == ValueKind::None) &&
                   arena_[st.items()[1]].kind == ValueKind::Dict) {
          if (arena_[st.items()[0]].kind == ValueKind::Dict) add_dict(st.items()[0]);
          add_dict(st.items()[1]);  // (__dict__, __slots__ values)
        } else {
          out.push_back({named("__state__"), val.state()});
        }
      }
      if (val.args() != kNoValue && !arena_[val.args()].items().empty())
        out.push_back({named("__args__"), val.args()});
      // A dict or list subclass (Lightning's AttributeDict, ...) shows its items directly,
      // as they are what the object holds.
      if (val.dict_items() != kNoValue) add_dict(val.dict_items());
      if (val.list_items() != kNoValue) {
        const auto& items = arena_[val.list_items()].items();
        for (std::size_t i = 0; i < items.size(); ++i) out.push_back({number(i), items[i]});
      }
      break;
    }
    default:
      break;
  }
  return out;
}

void CatalogBuilder::fill_directory(NodeIndex dir, ValueId v, std::vector<KeyPart>& key,
                                    int depth) {
  if (depth > kMaxDepth)
    throw FormatError(fmt::format("objects nested deeper than {} levels", kMaxDepth));
  std::vector<Child> kids = children_of(v);

  // A dict that sets one key twice keeps the last value at the first position, as Python does.
  if (arena_[v].kind == ValueKind::Dict) {
    NameMap<std::size_t> seen_text(kids.size());  // views into |kids|
    std::unordered_map<std::int64_t, std::size_t> seen_number;
    std::vector<std::size_t> first_of(kids.size());
    bool duplicates = false;
    for (std::size_t i = 0; i < kids.size(); ++i) {
      const KeyPart& k = kids[i].key;
      bool fresh = false;
      if (k.is_number()) {
        auto [it, added] = seen_number.emplace(k.number(), i);
        first_of[i] = it->second;
        fresh = added;
      } else {
        first_of[i] = seen_text.add(k.text(), i, &fresh);
      }
      duplicates |= !fresh;
    }
    if (duplicates) {
      std::vector<Child> unique;
      std::vector<std::size_t> position(kids.size());
      for (std::size_t i = 0; i < kids.size(); ++i) {
        if (first_of[i] == i) {
          position[i] = unique.size();
          unique.push_back(kids[i]);
        } else {
          unique[position[first_of[i]]].value = kids[i].value;
        }
      }
      kids = std::move(unique);
    }
  }

  fill_entries(dir, kids, key, depth);
}

void CatalogBuilder::fill_entries(NodeIndex dir, const std::vector<Child>& kids,
                                  std::vector<KeyPart>& key, int depth) {
  struct Pending {
    const Child* child;
    enum { Tensor, Dir, Json } what;
    std::optional<ParsedTensor> tensor;
    std::string_view primary;  // in the arena
    // A tensor without a raw file: what it is ("quantized tensor"; a literal).
    std::string_view special;
  };
  std::vector<Pending> entries;
  entries.reserve(kids.size());
  for (const Child& c : kids) {
    Pending p{&c, Pending::Json, parse_tensor(c.value, 0), {}, {}};
    const Value& cv = arena_[c.value];
    if (p.tensor && p.tensor->quantized) {
      p.special = "quantized tensor";
    } else if (cv.kind == ValueKind::Object && arena_[cv.cls()].kind == ValueKind::Global) {
      if (const char* kind = special_tensor_kind(arena_[cv.cls()].text())) p.special = kind;
    }
    if (p.tensor && !p.tensor->quantized) {
      p.what = Pending::Tensor;
    } else if (!p.tensor && (is_container(c.value) ||
                             (cv.kind == ValueKind::Object && contains_tensor(c.value, depth)))) {
      p.what = Pending::Dir;
    }
    entries.push_back(p);
  }

  // Names: raw files and directories first (so a sidecar never shadows a tensor), then the
  // .json files; a clash appends ~1, ~2, ... before any ".json".
  // Claimed names go straight to the catalog's arena, where their nodes will point. A tensor's
  // "<raw>.json" and "<raw>.npy" are not copied: <raw>'s entry says they are taken.
  constexpr std::uint8_t kTaken = 1;        // the name is a file's or directory's
  constexpr std::uint8_t kJsonDerived = 2;  // "<name>.json" is the derived sidecar of <name>
  constexpr std::uint8_t kNpyDerived = 4;   // "<name>.npy" is the derived view of <name>
  // First the name each entry wants: its key, escaped (+ ".json" for a value's file).
  for (Pending& p : entries) {
    std::string wanted = escape_name(p.child->key.str());
    if (p.what == Pending::Json) wanted += ".json";
    p.primary = keep(wanted);
  }
  // Most directories cannot clash: no two entries want one name, no file or directory wants a
  // name ending in ".json" or ".npy", and no value's "<key>.json" has a file or directory
  // "<key>" beside it. Then every entry gets the name it wants and every tensor its derived
  // sidecar and view: one probe per entry, where claiming costs a tensor six (a quarter of
  // loading 262,144 tensors). Otherwise the names are claimed one by one below.
  NameMap<std::uint8_t> names(entries.size() + 1);
  if (dir == TensorCatalog::kRoot) names.add(".ckptfs") |= kTaken;
  bool clash = false;
  for (const Pending& p : entries) {
    bool added = false;
    names.add(p.primary, kTaken, &added);
    clash =
        clash || !added ||
        (p.what != Pending::Json && (p.primary.ends_with(".json") || p.primary.ends_with(".npy")));
  }
  for (const Pending& p : entries) {
    if (clash) break;
    if (p.what == Pending::Json)
      clash = names.find(p.primary.substr(0, p.primary.size() - 5)) != nullptr;
  }
  if (clash) {
    names = NameMap<std::uint8_t>(entries.size() + 1);
    if (dir == TensorCatalog::kRoot) names.add(".ckptfs") |= kTaken;
  }
  auto is_taken = [&](std::string_view name) {
    if (const std::uint8_t* f = names.find(name); f != nullptr && (*f & kTaken) != 0) return true;
    for (auto [ext, bit] : {std::pair{std::string_view(".json"), kJsonDerived},
                            std::pair{std::string_view(".npy"), kNpyDerived}}) {
      if (!name.ends_with(ext)) continue;
      const std::uint8_t* f = names.find(name.substr(0, name.size() - ext.size()));
      if (f != nullptr && (*f & bit) != 0) return true;
    }
    return false;
  };
  std::string candidate;
  auto claim = [&](std::string_view base, std::string_view ext) {
    candidate.assign(base);
    candidate += ext;
    for (int n = 1; is_taken(candidate); ++n) candidate = fmt::format("{}~{}{}", base, n, ext);
    std::string_view name = keep(candidate);
    names.add(name) |= kTaken;
    return name;
  };
  // A tensor's sidecar or view: derived (true) when "<raw><ext>" is free; else stored under
  // the name claim() gives it (returned in |apart_name|).
  auto claim_derived = [&](std::string_view raw, std::string_view ext, std::uint8_t bit,
                           std::string_view& apart_name) {
    candidate.assign(raw);
    candidate += ext;
    if (!is_taken(candidate)) {
      names.add(raw) |= bit;
      return true;
    }
    apart_name = claim(raw, ext);
    return false;
  };
  auto add_json = [&](std::string_view name, std::string text) {
    check_node_limit();
    NodeIndex n = catalog_.add_json(dir, name, std::move(text));
    catalog_.children_of(dir).push_back(n);
    return n;
  };
  // What a tensor without a raw file is, and where its parts are (if it has any).
  auto describe = [&](const Pending& p, const std::string& json_path, const std::string& parts) {
    std::string what =
        json_path.substr(0, json_path.size() - 5);  // the key's path, without ".json"
    std::string dtype = p.tensor ? fmt::format(" (torch.{})", p.tensor->info.dtype().name) : "";
    std::string why =
        parts.empty()
            ? fmt::format("{} '{}'{}: no raw file, see {}", p.special, what, dtype, json_path)
            : fmt::format("{} '{}'{}: no raw file; its component tensors are under {}/, see {}",
                          p.special, what, dtype, parts, json_path);
    std::string out = "{\"kind\": ";
    append_json_string(out, p.special);
    if (p.tensor) {
      out += ", \"dtype\": ";
      append_json_string(out, p.tensor->info.dtype().name);
      out += ", \"shape\": ";
      append_json_int_array(out, p.tensor->info.shape());
    }
    out += ", \"note\": ";
    append_json_string(out, why);
    out += ", \"pickled\": " + render_json(p.child->value) + "}\n";
    catalog_.warnings_.push_back(why);
    catalog_.no_raw_form_.push_back({what, std::string(p.special) + dtype});
    return out;
  };
  for (Pending& p : entries) {
    if (clash && p.what != Pending::Json) p.primary = claim(p.primary, "");  // its wanted name
  }
  std::string dir_prefix = catalog_.relative_path(dir);
  if (!dir_prefix.empty()) dir_prefix.push_back('/');
  for (Pending& p : entries) {
    const KeyPart& k = p.child->key;
    if (p.what == Pending::Tensor) {
      TensorInfo info = p.tensor->info;
      std::string_view sidecar;
      std::string_view npy;
      if (clash) {
        info.sidecar_apart = !claim_derived(p.primary, ".json", kJsonDerived, sidecar);
        info.npy_apart = !claim_derived(p.primary, ".npy", kNpyDerived, npy);
      }
      auto tensor_index = static_cast<std::uint32_t>(catalog_.tensors_.size());
      auto add_tensor_file = [&](NodeKind kind, std::string_view name) {
        check_node_limit();
        NodeIndex index = catalog_.add_node(kind, dir, name, tensor_index);
        catalog_.children_of(dir).push_back(index);
        return index;
      };
      if (!info.error().empty()) {
        catalog_.warnings_.push_back(fmt::format(
            "tensor '{}{}': {} (reads return EIO; see {}{})", dir_prefix, p.primary, info.error(),
            dir_prefix,
            info.sidecar_apart ? std::string(sidecar) : fmt::format("{}.json", p.primary)));
      }
      info.data_node = add_tensor_file(NodeKind::TensorData, p.primary);
      if (info.sidecar_apart)
        catalog_.apart_[2 * tensor_index] = add_tensor_file(NodeKind::TensorSidecar, sidecar);
      if (info.npy_apart)
        catalog_.apart_[2 * tensor_index + 1] = add_tensor_file(NodeKind::NpyView, npy);
      key.push_back(stable_key(k, catalog_.nodes_[info.data_node].stem()));
      info.set_key(catalog_.arena_->add(std::span<const KeyPart>(key)));
      key.pop_back();
      catalog_.tensors_.push_back(info);
    } else if (p.what == Pending::Dir) {
      check_node_limit();
      NodeIndex child_dir = catalog_.add_directory(dir, p.primary);
      catalog_.children_of(dir).push_back(child_dir);
      key.push_back(stable_key(k, catalog_.nodes_[child_dir].stem()));
      fill_directory(child_dir, p.child->value, key, depth + 1);
      key.pop_back();
      if (!p.special.empty()) {
        std::string_view name =
            clash ? claim(p.primary, ".json") : keep(std::string(p.primary) + ".json");
        std::string parts = catalog_.relative_path(child_dir);
        NodeIndex n = add_json(name, "");
        catalog_.texts_[catalog_.nodes_[n].ref] = describe(p, catalog_.relative_path(n), parts);
      }
    } else {
      // |primary| is the wanted "<key>.json".
      std::string_view name =
          clash ? claim(p.primary.substr(0, p.primary.size() - 5), ".json") : p.primary;
      NodeIndex n = add_json(name, "");
      catalog_.texts_[catalog_.nodes_[n].ref] = p.special.empty()
                                                    ? render_json(p.child->value)
                                                    : describe(p, catalog_.relative_path(n), "");
    }
  }
  // Sorted by name for lookups.
  auto& ch = catalog_.children_of(dir);
  std::vector<std::pair<std::string_view, NodeIndex>> by_name;
  by_name.reserve(ch.size());
  for (NodeIndex c : ch) by_name.emplace_back(catalog_.nodes_[c].stem(), c);
  std::sort(by_name.begin(), by_name.end());
  for (std::size_t i = 0; i < ch.size(); ++i) ch[i] = by_name[i].second;
}

void CatalogBuilder::render(std::string& out, ValueId v, int depth, std::vector<ValueId>& on_path) {
  if (out.size() > kMaxJsonBytes)
    throw FormatError("a non-tensor value renders to more than 256 MiB of JSON");
  if (depth > kMaxDepth)
    throw FormatError(fmt::format("objects nested deeper than {} levels", kMaxDepth));
  const Value& val = arena_[v];
  bool compound = is_container(v) || val.kind == ValueKind::Object;
  if (compound && std::find(on_path.begin(), on_path.end(), v) != on_path.end()) {
    out += "{\"__cycle__\": true}";
    return;
  }
  if (auto known = render_known_object(arena_, v)) {
    out += *known;  // numpy scalars and arrays, torch.Size/device/dtype: their values
    return;
  }
  if (compound) on_path.push_back(v);
  auto render_list = [&](std::span<const ValueId> items) {
    out.push_back('[');
    for (std::size_t i = 0; i < items.size(); ++i) {
      if (i) out += ", ";
      render(out, items[i], depth + 1, on_path);
    }
    out.push_back(']');
  };
  switch (val.kind) {
    case ValueKind::None:
      out += "null";
      break;
    case ValueKind::Bool:
      out += val.boolean ? "true" : "false";
      break;
    case ValueKind::Int:
      out += fmt::format("{}", val.integer());
      break;
    case ValueKind::BigInt:
      out += val.text();
      break;
    case ValueKind::Float:
      append_json_number(out, val.real());
      break;
    case ValueKind::Str:
      append_json_string(out, val.text());
      break;
    case ValueKind::Bytes: {
      out += "{\"__bytes_hex__\": \"";
      for (char c : val.text()) out += fmt::format("{:02x}", static_cast<unsigned char>(c));
      out += "\"}";
      break;
    }
    case ValueKind::Tuple:
    case ValueKind::List:
    case ValueKind::Set:
      render_list(val.items());
      break;
    case ValueKind::Dict: {
      out.push_back('{');
      for (std::size_t i = 0; i + 1 < val.items().size(); i += 2) {
        if (i) out += ", ";
        KeyPart k = key_part(val.items()[i]);
        append_json_string(out, k.str());
        out += ": ";
        render(out, val.items()[i + 1], depth + 1, on_path);
      }
      out.push_back('}');
      break;
    }
    case ValueKind::Global:
      out += "{\"__global__\": ";
      append_json_string(out, val.text());
      out += "}";
      break;
    case ValueKind::PersistentRef:
      if (ValueId g = class_global(arena_, v); g != v) {
        render(out, g, depth + 1, on_path);  // a legacy persisted class: its name, not its source
        break;
      }
      out += "{\"__persistent_id__\": ";
      render(out, val.items()[0], depth + 1, on_path);
      out += "}";
      break;
    case ValueKind::Object: {
      out += "{\"__class__\": ";
      const Value& cls = arena_[class_global(arena_, val.cls())];
      if (cls.kind == ValueKind::Global) {
        append_json_string(out, cls.text());
      } else {
        render(out, val.cls(), depth + 1, on_path);
      }
      if (val.args() != kNoValue && !arena_[val.args()].items().empty()) {
        out += ", \"args\": ";
        render(out, val.args(), depth + 1, on_path);
      }
      if (val.state() != kNoValue) {
        out += ", \"state\": ";
        render(out, val.state(), depth + 1, on_path);
      }
      if (val.dict_items() != kNoValue) {
        out += ", \"items\": ";
        render(out, val.dict_items(), depth + 1, on_path);
      }
      if (val.list_items() != kNoValue) {
        out += ", \"list\": ";
        render(out, val.list_items(), depth + 1, on_path);
      }
      out += "}";
      break;
    }
  }
  if (compound) on_path.pop_back();
}

std::string CatalogBuilder::render_json(ValueId v) {
  std::string out;
  std::vector<ValueId> on_path;
  render(out, v, 0, on_path);
  out.push_back('\n');
  return out;
}

void CatalogBuilder::build(ValueId root, std::string format, bool big_endian) {
  catalog_.nodes_.clear();
  catalog_.children_.clear();
  catalog_.texts_.clear();
  // Size the tables once from a count of the tensor calls in the graph: growing them by
  // doubling would touch (and copy) about twice their final memory, and first touches are
  // what loading many tensors costs on these VMs.
  std::size_t calls = 0;
  for (ValueId v = 0; v < arena_.size(); ++v) {
    const Value& val = arena_[v];
    if (val.kind == ValueKind::Object && val.cls() != kNoValue &&
        arena_[val.cls()].kind == ValueKind::Global &&
        is_tensor_function(arena_[val.cls()].text())) {
      ++calls;
    }
  }
  calls = std::min(calls, kMaxNodes / 4);
  catalog_.nodes_.reserve(calls + 16);
  catalog_.tensors_.reserve(calls);
  catalog_.storages_.reserve(calls);
  // Keys past twice the calls cannot all be torch's numbering: those go to the map, so a
  // hostile key cannot size the array.
  max_numbered_ = 2 * calls + 1024;
  storage_by_number_.clear();
  expected_storages_ = calls;
  catalog_.format_ = std::move(format);
  catalog_.big_endian_ = big_endian;
  catalog_.add_directory(kNoNode, "");
  // The root object is rarely anything but a container; if it is a tensor or a leaf, the root
  // directory holds it as one entry, "tensor" or "value".
  std::vector<KeyPart> key_path;
  if (!is_container(root) && !(arena_[root].kind == ValueKind::Object && contains_tensor(root, 0) &&
                               !parse_tensor(root, 0))) {
    const KeyPart name = KeyPart::of_text(parse_tensor(root, 0) ? "tensor" : "value");
    fill_entries(TensorCatalog::kRoot, {Child{name, root}}, key_path, 0);
    // The synthetic name is not part of the checkpoint's key path.
    for (TensorInfo& t : catalog_.tensors_) t.set_key({});
  } else {
    fill_directory(TensorCatalog::kRoot, root, key_path, 0);
  }

  catalog_.finish();
}

}  // namespace ckptfs
