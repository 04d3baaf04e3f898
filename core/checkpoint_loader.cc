#include "checkpoint_loader.h"

#include <fmt/format.h>

#include <array>
#include <cstring>
#include <unordered_map>

#include "catalog_builder.h"
#include "errors.h"
#include "pickle_reader.h"
#include "zip_directory.h"

namespace ckptfs {
namespace {

constexpr std::uint64_t kMaxPickleBytes = 2ull << 30;
// Protocol-2 pickle of torch's legacy magic number 0x1950a86a20f9469cfc6c.
constexpr std::array<unsigned char, 15> kLegacyMagic = {
    0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, 0x2e};

TensorCatalog load_torch_zip(const ByteSource& source) {
  ZipDirectory zip(source);
  if (zip.entries().empty()) throw FormatError("zip archive is empty, not a torch.save checkpoint");
  // torch takes the record prefix from the first entry, whatever the file is called now.
  const std::string& first = zip.entries().front().name;
  auto slash = first.find('/');
  if (slash == std::string::npos) {
    throw FormatError(
        "zip archive is not a torch.save checkpoint (its first entry has no directory prefix)");
  }
  const std::string prefix = first.substr(0, slash + 1);
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

  std::string pickle = zip.read_entry(*pkl, kMaxPickleBytes);
  ValueArena arena;
  PickleReader reader(std::as_bytes(std::span(pickle)), arena);
  ValueId root = reader.read();

  // Storage records are located once per key (their local header is read from the file).
  std::unordered_map<std::string, ResolvedStorage> by_key;
  auto resolver = [&](ValueId pid) -> ResolvedStorage {
    ResolvedStorage r;
    const Value& t = arena[pid];
    if (t.kind != ValueKind::Tuple || t.items.size() < 5 ||
        arena[t.items[0]].kind != ValueKind::Str || arena[t.items[0]].text != "storage" ||
        arena[t.items[1]].kind != ValueKind::Global || arena[t.items[2]].kind != ValueKind::Str) {
      r.error = "unrecognised persistent id (not a ('storage', type, key, location, numel) tuple)";
      return r;
    }
    auto dt = dtype_of_storage_class(arena[t.items[1]].text);
    if (!dt) {
      r.error = fmt::format("unknown storage type '{}'", arena[t.items[1]].text);
      return r;
    }
    const std::string& key = arena[t.items[2]].text;
    if (auto it = by_key.find(key); it != by_key.end()) {
      ResolvedStorage known = it->second;
      known.dtype = *dt;  // each reference names its own element type
      return known;
    }
    r.dtype = *dt;
    std::string record = prefix + "data/" + key;
    r.storage.key = key;
    r.storage.record = record;
    r.storage.location = arena[t.items[3]].kind == ValueKind::Str ? arena[t.items[3]].text : "";
    const ZipEntry* e = zip.find(record);
    if (e == nullptr) {
      r.error = fmt::format("storage record '{}' is missing from the archive", record);
    } else if (e->method != 0) {
      r.error = fmt::format(
          "storage record '{}' is compressed (zip method {}); only stored records are served yet",
          record, e->method);
    } else {
      try {
        r.storage.offset = zip.data_offset(*e);
        r.storage.nbytes = e->size;
      } catch (const FormatError& err) {
        r.error = err.what();
      }
    }
    by_key.emplace(key, r);
    return r;
  };

  CatalogBuilder builder(arena, catalog, resolver);
  builder.build(root, "torch zip", big_endian);
  return catalog;
}

}  // namespace

TensorCatalog load_checkpoint(const ByteSource& source) {
  std::array<unsigned char, 16> head{};
  std::uint64_t n = std::min<std::uint64_t>(source.size(), head.size());
  if (n == 0) throw FormatError("the file is empty");
  source.read_at(0, std::as_writable_bytes(std::span(head.data(), n)));
  if (n >= 4 && std::memcmp(head.data(), "PK\x03\x04", 4) == 0) return load_torch_zip(source);
  if (n >= 4 && std::memcmp(head.data(), "PK\x05\x06", 4) == 0) return load_torch_zip(source);
  if (n >= kLegacyMagic.size() &&
      std::memcmp(head.data(), kLegacyMagic.data(), kLegacyMagic.size()) == 0) {
    throw FormatError(
        "legacy torch.save format (torch < 1.6 or _use_new_zipfile_serialization=False) is not "
        "supported yet");
  }
  if (n >= 9 && head[8] == '{') {
    throw FormatError("safetensors files are not supported yet");
  }
  throw FormatError(
      fmt::format("not a PyTorch checkpoint (unrecognised header {:02x} {:02x} {:02x} {:02x})",
                  head[0], n > 1 ? head[1] : 0, n > 2 ? head[2] : 0, n > 3 ? head[3] : 0));
}

}  // namespace ckptfs
