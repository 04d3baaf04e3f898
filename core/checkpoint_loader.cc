#include "checkpoint_loader.h"

#include <fmt/format.h>

#include <array>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <optional>
#include <thread>
#include <unordered_map>
#include <variant>
#include <vector>

#include "catalog_builder.h"
#include "decimal_key.h"
#include "errors.h"
#include "little_endian.h"
#include "pickle_reader.h"
#include "safetensors_loader.h"
#include "segmented_source.h"
#include "zip_directory.h"

namespace ckptfs {
namespace {

constexpr std::uint64_t kMaxPickleBytes = 2ull << 30;
// Protocol-2 pickle of torch's legacy magic number 0x1950a86a20f9469cfc6c.
constexpr std::array<unsigned char, 15> kLegacyMagic = {
    0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, 0x2e};

// The fields of a ('storage', type, key, location, numel[, view_metadata]) persistent id.
struct StoragePid {
  const DType* dtype = &kNoDType;
  std::string key;
  std::string location;
  std::int64_t numel = -1;
  ValueId view = kNoValue;  // legacy (view_key, offset, size), in elements
};

std::variant<StoragePid, std::string> parse_storage_pid(const ValueArena& arena, ValueId pid) {
  const Value& t = arena[pid];
  if (t.kind != ValueKind::Tuple || t.items().size() < 5 ||
      arena[t.items()[0]].kind != ValueKind::Str || arena[t.items()[0]].text() != "storage" ||
      arena[t.items()[1]].kind != ValueKind::Global || arena[t.items()[2]].kind != ValueKind::Str) {
    return std::string(
        "unrecognised persistent id (not a ('storage', type, key, location, numel) tuple)");
  }
  auto dt = dtype_of_storage_class(arena[t.items()[1]].text());
  if (!dt) return fmt::format("unknown storage type '{}'", arena[t.items()[1]].text());
  StoragePid p{dt, std::string(arena[t.items()[2]].text()), "", -1, kNoValue};
  if (arena[t.items()[3]].kind == ValueKind::Str) p.location = arena[t.items()[3]].text();
  if (arena[t.items()[4]].kind == ValueKind::Int) p.numel = arena[t.items()[4]].integer();
  if (t.items().size() > 5 && arena[t.items()[5]].kind == ValueKind::Tuple) p.view = t.items()[5];
  return p;
}

constexpr std::uint32_t kUnnumbered = std::numeric_limits<std::uint32_t>::max();

// torch names its storage records "<prefix>data/<key>" with keys 0, 1, 2, ... in the order the
// pickle first uses them, while the zip holds them sorted as text ("0", "1", "10", ...). An
// array indexed by the key finds a record without hashing its name: one hash probe per storage
// that misses the cache (7 % of loading 262,144 tensors). Indices into zip.entries(); keys
// beyond twice the entry count are left to the name lookup.
std::vector<std::uint32_t> numbered_records(const ZipDirectory& zip, std::string_view data_dir) {
  const auto& entries = zip.entries();
  std::vector<std::uint32_t> out;
  for (std::size_t i = 0; i < entries.size(); ++i) {
    std::string_view name = entries[i].name;
    if (!name.starts_with(data_dir)) continue;
    auto n = canonical_decimal(name.substr(data_dir.size()));
    if (!n || *n >= 2 * entries.size()) continue;
    if (*n >= out.size())
      out.resize(std::min(2 * entries.size(), 2 * (std::size_t{*n} + 1)), kUnnumbered);
    out[*n] = static_cast<std::uint32_t>(i);
  }
  return out;
}

LoadedCheckpoint load_torch_zip(const ByteSource& source) {
  // Indexing the directory of a many-tensor checkpoint takes about as long as parsing its
  // pickle (262,144 tensors: 55-110 ms against 130 ms), and the pickle is one record: torch
  // writes <prefix>data.pkl first, stored. So that record is parsed while another thread
  // indexes the directory. The directory has the last word: the parse is used only if the
  // directory's data.pkl is that very record, and the directory's errors and checks come
  // before the pickle's, as when the two ran in turn.
  ValueArena arena;
  ValueId root = kNoValue;
  std::exception_ptr pickle_error;
  // Allocated here, filled by index() (on the indexer thread, which must allocate nothing).
  ZipDirectory zip(source, ZipDirectory::Deferred{});
  std::optional<FirstRecord> early =
      zip.read_first_stored_record(kMaxPickleBytes, [](std::string_view name) {
        const auto slash = name.find('/');
        return slash != std::string_view::npos && name.substr(slash + 1) == "data.pkl";
      });
  if (early) {
    std::exception_ptr directory_error;
    std::jthread indexer([&] {
      try {
        zip.index();
      } catch (...) {
        directory_error = std::current_exception();
      }
    });
    try {
      PickleReader reader(std::as_bytes(std::span(early->bytes)), arena);
      root = reader.read();
    } catch (...) {
      pickle_error = std::current_exception();
    }
    std::string().swap(early->bytes);
    indexer.join();
    if (directory_error) std::rethrow_exception(directory_error);
  } else {
    zip.index();
  }
  if (zip.entries().empty()) throw FormatError("zip archive is empty, not a torch.save checkpoint");
  // torch takes the record prefix from the first entry, whatever the file is called now.
  const std::string_view first = zip.entries().front().name;
  auto slash = first.find('/');
  if (slash == std::string::npos) {
    throw FormatError(
        "zip archive is not a torch.save checkpoint (its first entry has no directory prefix)");
  }
  const std::string prefix(first.substr(0, slash + 1));
  // TorchScript archives also hold a data.pkl (with __torch__ classes); torch itself tells
  // them apart by constants.pkl.
  if (zip.find(prefix + "constants.pkl") != nullptr) {
    throw FormatError(
        "this is a TorchScript archive (torch.jit.save), not a torch.save checkpoint");
  }
  const ZipEntry* pkl = zip.find(prefix + "data.pkl");
  if (pkl == nullptr) {
    throw FormatError(
        fmt::format("zip archive has no '{}data.pkl': not a torch.save checkpoint", prefix));
  }

  TensorCatalog catalog;
  bool big_endian = false;
  if (const ZipEntry* bo = zip.find(prefix + "byteorder")) {
    std::string order = zip.read_entry(*bo, 64);
    while (!order.empty() && (order.back() == '\n' || order.back() == ' ')) order.pop_back();
    if (order == "big") {
      big_endian = true;
    } else if (order != "little") {
      throw FormatError(fmt::format("unknown byteorder record '{}'", order));
    }
  }

  if (early && pkl->name == early->name && pkl->local_header_offset == early->local_header_offset &&
      pkl->method == 0 && !pkl->encrypted() && pkl->size == early->size &&
      pkl->compressed_size == early->size) {
    if (pickle_error) std::rethrow_exception(pickle_error);
  } else {
    arena = ValueArena();
    std::string pickle = zip.read_entry(*pkl, kMaxPickleBytes);
    zip.release_archive();  // its memory goes to the pickle's values instead of fresh pages
    PickleReader reader(std::as_bytes(std::span(pickle)), arena);
    root = reader.read();
    // The values own their bytes: give the pickle's memory back for the catalog to reuse
    // (fresh pages are what loading many tensors costs).
    std::string().swap(pickle);
  }

  std::unique_ptr<SegmentedSource> segmented;  // only when some record is deflated
  // A stored record's local header is not read here: the catalog reads it when the record is
  // first served (LocalHeaderRef says why), so locating a record is a lookup in the central
  // directory, repeated for each reference to it (the builder keeps the first). A deflated
  // record is inflated through a segment of its own, made once per key.
  struct Inflated {
    std::uint64_t offset = 0;
    std::uint64_t nbytes = 0;
  };
  std::unordered_map<std::string_view, Inflated> inflated;  // keys: texts in |arena|
  const std::vector<std::uint32_t> numbered = numbered_records(zip, prefix + "data/");
  auto resolver = [&](ValueId pid) -> ResolvedStorage {
    ResolvedStorage r;
    const Value& t = arena[pid];
    if (t.kind != ValueKind::Tuple || t.items().size() < 5 ||
        arena[t.items()[0]].kind != ValueKind::Str || arena[t.items()[0]].text() != "storage" ||
        arena[t.items()[1]].kind != ValueKind::Global ||
        arena[t.items()[2]].kind != ValueKind::Str) {
      r.error = "unrecognised persistent id (not a ('storage', type, key, location, numel) tuple)";
      return r;
    }
    auto dt = dtype_of_storage_class(arena[t.items()[1]].text());
    if (!dt) {
      r.error = fmt::format("unknown storage type '{}'", arena[t.items()[1]].text());
      return r;
    }
    const std::string_view key = arena[t.items()[2]].text();
    r.dtype = dt;  // each reference names its own element type
    std::string record = prefix + "data/";
    record += key;
    r.storage.key = key;
    r.storage.record = record;
    r.storage.location =
        arena[t.items()[3]].kind == ValueKind::Str ? arena[t.items()[3]].text() : "";
    if (auto it = inflated.find(key); it != inflated.end()) {
      r.storage.offset = it->second.offset;
      r.storage.nbytes = it->second.nbytes;
      r.storage.record += " (deflated)";
      return r;
    }
    const ZipEntry* e = nullptr;
    if (auto n = canonical_decimal(key); n && *n < numbered.size() && numbered[*n] != kUnnumbered) {
      e = &zip.entries()[numbered[*n]];
    } else {
      e = zip.find(record);
    }
    if (e == nullptr) {
      r.error = fmt::format("storage record '{}' is missing from the archive", record);
    } else if (e->encrypted()) {
      r.error = fmt::format("storage record '{}' is encrypted", record);
    } else if (e->method != 0 && e->method != 8) {
      r.error = fmt::format(
          "storage record '{}' is compressed with zip method {}; only stored and deflated records "
          "are served",
          record, e->method);
    } else {
      try {
        if (e->method == 8) {
          // Re-zipped by some tool: inflate on demand, behind the same block cache.
          std::uint64_t data = zip.data_offset(*e);
          if (!segmented) segmented = std::make_unique<SegmentedSource>(source);
          r.storage.offset = segmented->append(
              std::make_unique<InflatedRecord>(source, data, e->compressed_size, e->size, record));
          r.storage.record = record + " (deflated)";
        } else {
          const LocalHeaderRef ref = zip.local_header_ref(*e);
          r.storage.offset = ref.offset;
          r.storage.local_header = true;
          r.storage.max_local_extra = ref.max_extra;
        }
        r.storage.nbytes = e->size;
        // torch sizes the storage by the numel it declares, not by the record: a declared size
        // below the record's limits what views may use (torch.load refuses larger views too).
        if (arena[t.items()[4]].kind == ValueKind::Int && arena[t.items()[4]].integer() >= 0) {
          std::uint64_t declared = 0;
          if (!__builtin_mul_overflow(static_cast<std::uint64_t>(arena[t.items()[4]].integer()),
                                      std::uint64_t{dt->itemsize}, &declared)) {
            r.storage.nbytes = std::min(r.storage.nbytes, declared);
          }
        }
      } catch (const FormatError& err) {
        r.error = err.what();
      }
    }
    if (r.error.empty() && e->method == 8) {
      inflated.emplace(key, Inflated{r.storage.offset, r.storage.nbytes});
    }
    return r;
  };

  CatalogBuilder builder(arena, catalog, resolver);
  builder.build(root, "torch zip", big_endian);
  catalog.add_provenance(fmt::format("zip record prefix '{}'", prefix));
  if (zip.find(prefix + ".format_version") != nullptr) {
    catalog.add_provenance(".format_version record: written by torch >= 2.7");
  } else if (zip.find(prefix + "byteorder") != nullptr) {
    catalog.add_provenance("byteorder record: written by torch >= 2.1");
  } else {
    catalog.add_provenance("no byteorder record: written by torch 1.6 - 2.0 (or with it disabled)");
  }
  if (zip.find(prefix + ".data/serialization_id") != nullptr)
    catalog.add_provenance(".data/serialization_id record (torch >= 2.2)");
  if (big_endian) catalog.add_provenance("big-endian writer: tensors are byte-swapped when read");
  if (segmented)
    catalog.add_provenance("some storage records are deflated (re-zipped by another tool)");
  return {std::move(catalog), std::move(segmented)};
}

// The legacy stream (torch < 1.6, or _use_new_zipfile_serialization=False): pickles of the
// magic number, the protocol version, sys_info, the object, and the storage keys; then each
// storage as an int64 element count and its bytes, in key-list order.
LoadedCheckpoint load_torch_legacy(const ByteSource& source) {
  constexpr std::uint64_t kFirstPrefix = 1u << 20;
  ValueArena arena;
  std::string head;
  ValueId root = kNoValue;
  ValueId keys = kNoValue;
  std::uint64_t data_start = 0;
  // The pickles come first and have no length field: parse a prefix, growing it only when a
  // pickle ran out of input.
  for (std::uint64_t want = std::min(source.size(), kFirstPrefix);;
       want = std::min(source.size(), want * 4)) {
    head.resize(want);
    source.read_at(0, std::as_writable_bytes(std::span(head)));
    arena = ValueArena();
    PickleReader reader(std::as_bytes(std::span(head)), arena);
    bool magic_read = false;
    try {
      ValueId magic = kNoValue;
      try {
        magic = reader.read();
      } catch (const TruncatedPickle&) {
        throw;
      } catch (const FormatError& e) {
        // Only the first bytes looked like a pickle (a random file starting with 'L', say).
        throw FormatError(
            fmt::format("not a PyTorch checkpoint (no legacy magic number: {})", e.what()));
      }
      magic_read = true;
      const Value& m = arena[magic];
      if (m.kind != ValueKind::BigInt || m.text() != "119547037146038801333356") {
        throw FormatError("not a PyTorch checkpoint (legacy magic number missing)");
      }
      ValueId proto = reader.read();
      if (arena[proto].kind != ValueKind::Int || arena[proto].integer() != 1001) {
        throw FormatError("unsupported legacy torch.save protocol version");
      }
      reader.read();  // sys_info: informational; the storage section is little-endian
      root = reader.read();
      keys = reader.read();
      data_start = reader.position();
      break;
    } catch (const TruncatedPickle&) {
      if (want >= source.size() || want >= kMaxPickleBytes) {
        throw FormatError(magic_read
                              ? "legacy torch.save file ends inside its pickles (truncated?)"
                              : "not a PyTorch checkpoint (no legacy magic number: the file ends "
                                "inside its first pickle)");
      }
    }
  }
  head.clear();
  head.shrink_to_fit();
  if (arena[keys].kind != ValueKind::List)
    throw FormatError("legacy torch.save file has no storage key list");

  // Element size of each storage: the type of its first reference (what torch.load uses).
  std::unordered_map<std::string, StoragePid> first_ref;
  for (ValueId i = 0; i < arena.size(); ++i) {
    if (arena[i].kind != ValueKind::PersistentRef) continue;
    auto parsed = parse_storage_pid(arena, arena[i].items()[0]);
    if (auto* sp = std::get_if<StoragePid>(&parsed)) first_ref.emplace(sp->key, *sp);
  }
  // One pass over the 8-byte headers; the data itself is not read.
  std::unordered_map<std::string, StorageSpec> located;
  std::uint64_t pos = data_start;
  for (ValueId k : arena[keys].items()) {
    if (arena[k].kind != ValueKind::Str) throw FormatError("legacy storage key is not a string");
    const std::string key(arena[k].text());
    auto ref = first_ref.find(key);
    if (ref == first_ref.end())
      throw FormatError(fmt::format("legacy storage '{}' is never referenced", key));
    std::array<std::byte, 8> count_bytes{};
    if (pos > source.size() || source.size() - pos < 8) {
      throw FormatError(
          fmt::format("legacy storage '{}' lies past the end of the file (truncated?)", key));
    }
    source.read_at(pos, count_bytes);
    std::uint64_t count = load_le<std::uint64_t>(count_bytes.data());
    std::uint64_t nbytes = 0;
    if (__builtin_mul_overflow(count, std::uint64_t{ref->second.dtype->itemsize}, &nbytes) ||
        nbytes > source.size() - pos - 8) {
      throw FormatError(fmt::format(
          "legacy storage '{}' declares {} elements, more than the file holds", key, count));
    }
    StorageSpec s;
    s.key = key;
    s.record = fmt::format("storage {} (legacy stream)", key);
    s.location = ref->second.location;
    s.offset = pos + 8;
    s.nbytes = nbytes;
    located.emplace(key, s);
    pos += 8 + nbytes;
  }

  auto resolver = [&](ValueId pid) -> ResolvedStorage {
    ResolvedStorage r;
    auto parsed = parse_storage_pid(arena, pid);
    if (auto* err = std::get_if<std::string>(&parsed)) {
      r.error = *err;
      return r;
    }
    const StoragePid& sp = std::get<StoragePid>(parsed);
    r.dtype = sp.dtype;
    auto it = located.find(sp.key);
    if (it == located.end()) {
      r.error = fmt::format("legacy storage '{}' is not in the storage section", sp.key);
      return r;
    }
    r.storage = it->second;
    if (sp.view != kNoValue) {
      // A pre-1.0 storage view: (view_key, offset, size) in elements of the root storage.
      const auto& v = arena[sp.view].items();
      if (v.size() != 3 || arena[v[1]].kind != ValueKind::Int ||
          arena[v[2]].kind != ValueKind::Int || arena[v[1]].integer() < 0 ||
          arena[v[2]].integer() < 0) {
        r.error = "malformed legacy storage view";
        return r;
      }
      std::uint64_t off = static_cast<std::uint64_t>(arena[v[1]].integer()) * sp.dtype->itemsize;
      std::uint64_t len = static_cast<std::uint64_t>(arena[v[2]].integer()) * sp.dtype->itemsize;
      if (off > r.storage.nbytes || len > r.storage.nbytes - off) {
        r.error = "legacy storage view reaches outside its storage";
        return r;
      }
      r.storage.key = fmt::format("{}[{}:{}]", sp.key, off, off + len);
      r.storage.offset += off;
      r.storage.nbytes = len;
    }
    return r;
  };
  TensorCatalog catalog;
  CatalogBuilder builder(arena, catalog, resolver);
  builder.build(root, "torch legacy", false);
  catalog.add_provenance(
      "legacy stream: written by torch < 1.6, or with _use_new_zipfile_serialization=False");
  return {std::move(catalog), nullptr};
}

LoadedCheckpoint load_by_format(const ByteSource& source) {
  std::array<unsigned char, 16> head{};
  std::uint64_t n = std::min<std::uint64_t>(source.size(), head.size());
  if (n == 0) throw FormatError("the file is empty");
  source.read_at(0, std::as_writable_bytes(std::span(head.data(), n)));
  if (n >= 4 && std::memcmp(head.data(), "PK\x03\x04", 4) == 0) return load_torch_zip(source);
  if (n >= 4 && std::memcmp(head.data(), "PK\x05\x06", 4) == 0) return load_torch_zip(source);
  // Legacy streams start with a pickle of the magic number: protocol 2 (the default) has
  // fixed bytes; other protocols start with PROTO or a text LONG.
  if ((n >= kLegacyMagic.size() &&
       std::memcmp(head.data(), kLegacyMagic.data(), kLegacyMagic.size()) == 0) ||
      (head[0] == 0x80 && n > 1 && head[1] <= 5) || head[0] == 'L') {
    return load_torch_legacy(source);
  }
  if (source.size() > 262) {
    std::array<std::byte, 5> ustar{};
    source.read_at(257, ustar);
    if (std::memcmp(ustar.data(), "ustar", 5) == 0) {
      throw FormatError(
          "this is a tar-format torch checkpoint (torch < 0.1.10), which ckptfs does not read");
    }
  }
  if (looks_like_safetensors(source)) return {load_safetensors(source), nullptr};
  throw FormatError(
      fmt::format("not a PyTorch checkpoint (unrecognised header {:02x} {:02x} {:02x} {:02x})",
                  head[0], n > 1 ? head[1] : 0, n > 2 ? head[2] : 0, n > 3 ? head[3] : 0));
}

}  // namespace

LoadedCheckpoint load_checkpoint(const ByteSource& source) {
  LoadedCheckpoint loaded = load_by_format(source);
  const ByteSource& data = loaded.data ? *loaded.data : source;
  loaded.catalog.set_source_reader(
      [&data](std::uint64_t at, std::span<std::byte> dst, StreamHint) { data.read_at(at, dst); });
  return loaded;
}

}  // namespace ckptfs
