#include "safetensors_loader.h"

#include <fmt/format.h>

#include <array>
#include <cctype>
#include <nlohmann/json.hpp>
#include <unordered_map>

#include "catalog_builder.h"
#include "errors.h"
#include "little_endian.h"
#include "pickle_value.h"

namespace ckptfs {
namespace {

// The reference reader's limit (safetensors MAX_HEADER_SIZE).
constexpr std::uint64_t kMaxHeader = 100'000'000;

// safetensors dtype -> torch dtype name. Sub-byte types (F4, F6_*) have no byte-addressable
// elements and are refused per tensor.
const std::unordered_map<std::string, std::string>& dtype_names() {
  static const std::unordered_map<std::string, std::string> m = {
      {"BOOL", "bool"},
      {"U8", "uint8"},
      {"I8", "int8"},
      {"I16", "int16"},
      {"U16", "uint16"},
      {"F16", "float16"},
      {"BF16", "bfloat16"},
      {"I32", "int32"},
      {"U32", "uint32"},
      {"F32", "float32"},
      {"F64", "float64"},
      {"I64", "int64"},
      {"U64", "uint64"},
      {"C64", "complex64"},
      {"F8_E5M2", "float8_e5m2"},
      {"F8_E4M3", "float8_e4m3fn"},
      {"F8_E5M2FNUZ", "float8_e5m2fnuz"},
      {"F8_E4M3FNUZ", "float8_e4m3fnuz"},
  };
  return m;
}

}  // namespace

std::optional<std::string_view> safetensors_dtype_of(std::string_view torch_name) {
  for (const auto& [st, torch] : dtype_names()) {
    if (torch == torch_name) return std::string_view(st);
  }
  return std::nullopt;
}

namespace {

std::uint64_t header_length(const ByteSource& source) {
  std::array<std::byte, 8> b{};
  source.read_at(0, b);
  return load_le<std::uint64_t>(b.data());
}

}  // namespace

bool looks_like_safetensors(const ByteSource& source) {
  if (source.size() < 10) return false;
  std::uint64_t n = header_length(source);
  if (n < 2 || n > kMaxHeader || n > source.size() - 8) return false;
  std::array<std::byte, 64> head{};
  std::uint64_t k = std::min<std::uint64_t>(n, head.size());
  source.read_at(8, std::span(head.data(), k));
  for (std::uint64_t i = 0; i < k; ++i) {
    auto c = static_cast<char>(head[i]);
    if (c == '{') return true;
    if (!std::isspace(static_cast<unsigned char>(c))) return false;
  }
  return false;
}

TensorCatalog load_safetensors(const ByteSource& source) {
  const std::uint64_t n = header_length(source);
  if (n > kMaxHeader || n > source.size() - 8) {
    throw FormatError(
        fmt::format("safetensors header length {} is larger than the file allows", n));
  }
  std::string text(n, '\0');
  source.read_at(8, std::as_writable_bytes(std::span(text)));
  const std::uint64_t data_start = 8 + n;
  const std::uint64_t data_size = source.size() - data_start;
  nlohmann::ordered_json header;
  try {
    header = nlohmann::ordered_json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(fmt::format("safetensors header is not valid JSON ({})", e.what()));
  }
  if (!header.is_object()) throw FormatError("safetensors header is not a JSON object");

  // The header is turned into the value graph a pickle of {name: tensor} would have given
  // (each tensor a _rebuild_tensor_v3 over its own storage), so naming, sidecars and
  // index.json are exactly those of torch files.
  ValueArena arena;
  auto str = [&](std::string_view s) {
    NewValue v;
    v.kind = ValueKind::Str;
    v.text = arena.keep(s);
    return arena.add(v);
  };
  auto integer = [&](std::int64_t i) {
    NewValue v;
    v.kind = ValueKind::Int;
    v.integer = i;
    return arena.add(v);
  };
  auto global = [&](std::string_view name) {
    NewValue v;
    v.kind = ValueKind::Global;
    v.text = arena.keep(name);
    return arena.add(v);
  };
  auto tuple = [&](std::vector<ValueId> items) {
    NewValue v;
    v.kind = ValueKind::Tuple;
    v.items = std::move(items);
    return arena.add(v);
  };
  NewValue root;
  root.kind = ValueKind::Dict;
  std::unordered_map<std::string, StorageSpec> storages;
  std::unordered_map<std::string, std::string> tensor_errors;
  const ValueId rebuild = global("torch._utils._rebuild_tensor_v3");
  const ValueId untyped = global("torch.UntypedStorage");

  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const auto& spec = it.value();
    if (name == "__metadata__") {
      NewValue meta;
      meta.kind = ValueKind::Dict;
      if (spec.is_object()) {
        for (auto m = spec.begin(); m != spec.end(); ++m) {
          meta.items.push_back(str(m.key()));
          meta.items.push_back(
              str(m.value().is_string() ? m.value().get<std::string>() : m.value().dump()));
        }
      }
      root.items.push_back(str(name));
      root.items.push_back(arena.add(meta));
      continue;
    }
    if (!spec.is_object() || !spec.contains("dtype") || !spec["dtype"].is_string() ||
        !spec.contains("shape") || !spec["shape"].is_array() || !spec.contains("data_offsets") ||
        !spec["data_offsets"].is_array() || spec["data_offsets"].size() != 2) {
      throw FormatError(
          fmt::format("safetensors entry '{}' lacks dtype, shape or data_offsets", name));
    }
    std::vector<ValueId> shape_items;
    std::vector<std::int64_t> shape;
    for (const auto& d : spec["shape"]) {
      if (!d.is_number_unsigned())
        throw FormatError(fmt::format("safetensors entry '{}' has a bad shape", name));
      shape.push_back(
          static_cast<std::int64_t>(std::min<std::uint64_t>(d.get<std::uint64_t>(), INT64_MAX)));
      shape_items.push_back(integer(shape.back()));
    }
    const auto& offs = spec["data_offsets"];
    if (!offs[0].is_number_unsigned() || !offs[1].is_number_unsigned()) {
      throw FormatError(fmt::format("safetensors entry '{}' has bad data_offsets", name));
    }
    const std::uint64_t begin = offs[0].get<std::uint64_t>();
    const std::uint64_t end = offs[1].get<std::uint64_t>();
    if (begin > end || end > data_size) {
      throw FormatError(
          fmt::format("safetensors entry '{}' points outside the data ({}..{} of {} bytes)", name,
                      begin, end, data_size));
    }
    std::string st_dtype = spec["dtype"].get<std::string>();
    auto dn = dtype_names().find(st_dtype);
    const DType* dt = dn == dtype_names().end() ? nullptr : dtype_by_name(dn->second);
    // C-contiguous strides, checked: the layout validation refuses what does not fit.
    std::vector<ValueId> stride_items(shape.size());
    std::int64_t run = 1;
    for (std::size_t d = shape.size(); d-- > 0;) {
      stride_items[d] = integer(run);
      if (__builtin_mul_overflow(run, std::max<std::int64_t>(shape[d], 1), &run)) run = INT64_MAX;
    }
    std::string key = name;  // one storage per tensor, named after it
    StorageSpec s;
    s.key = key;
    s.record = fmt::format("safetensors data [{}, {})", begin, end);
    s.location = "cpu";
    s.offset = data_start + begin;
    s.nbytes = end - begin;
    storages.emplace(key, s);
    if (!dt) {
      tensor_errors.emplace(key, fmt::format("safetensors dtype {} is not supported", st_dtype));
      dt = dtype_by_name("uint8");
    } else {
      std::uint64_t numel = 1;
      bool overflow = false;
      for (auto d : shape)
        overflow |= __builtin_mul_overflow(numel, static_cast<std::uint64_t>(d), &numel);
      if (overflow || numel * dt->itemsize != end - begin) {
        throw FormatError(fmt::format(
            "safetensors entry '{}': shape and dtype need a different size than its {} bytes", name,
            end - begin));
      }
    }
    ValueId pid = tuple({str("storage"), untyped, str(key), str("cpu"),
                         integer(static_cast<std::int64_t>(end - begin))});
    NewValue ref;
    ref.kind = ValueKind::PersistentRef;
    ref.items = {pid};
    ValueId ref_id = arena.add(ref);
    NewValue no_hooks;
    no_hooks.kind = ValueKind::Dict;
    NewValue no;
    no.kind = ValueKind::Bool;
    ValueId args =
        tuple({ref_id, integer(0), tuple(shape_items), tuple(stride_items), arena.add(no),
               arena.add(no_hooks), global(std::string("torch.") + std::string(dt->name))});
    NewValue call;
    call.kind = ValueKind::Object;
    call.cls = rebuild;
    call.args = args;
    root.items.push_back(str(name));
    root.items.push_back(arena.add(call));
  }
  ValueId root_id = arena.add(root);

  auto resolver = [&](ValueId pid) -> ResolvedStorage {
    ResolvedStorage r;
    const std::string key(arena[arena[pid].items()[2]].text());
    r.storage = storages.at(key);
    r.dtype = dtype_by_name("uint8");
    if (auto e = tensor_errors.find(key); e != tensor_errors.end()) r.error = e->second;
    return r;
  };
  TensorCatalog catalog;
  CatalogBuilder builder(arena, catalog, resolver);
  builder.build(root_id, "safetensors", false);
  return catalog;
}

}  // namespace ckptfs
