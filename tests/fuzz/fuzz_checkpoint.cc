// libFuzzer target: the whole checkpoint opener (format detection, torch zip, legacy stream,
// safetensors, catalog building), then everything a mount would serve from the result: the
// index, every sidecar and NPY header, every path, and the bytes of every small tensor read
// through the block cache. Only CkptError (FormatError / IoError) is an acceptable outcome.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "block_cache.h"
#include "checkpoint_loader.h"
#include "errors.h"
#include "memory_source.h"
#include "tensor_reader.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace ckptfs;
  MemorySource source(data, size);
  try {
    LoadedCheckpoint loaded = load_checkpoint(source);
    const TensorCatalog& catalog = loaded.catalog;
    (void)catalog.index_json();
    for (NodeIndex i = 0; i < catalog.node_count(); ++i) {
      (void)catalog.relative_path(i);
      (void)catalog.generated_size(i);
    }
    const ByteSource& bytes = loaded.data ? *loaded.data : source;
    BlockCache cache(bytes, 256u << 10, 16u << 10);
    TensorReader reader(catalog, cache);
    std::vector<std::byte> buffer;
    for (const TensorInfo& t : catalog.tensors()) {
      (void)catalog.sidecar_json(t);
      (void)TensorCatalog::npy_header(t);
      if (!t.error().empty() || t.nbytes() == 0 || t.nbytes() > (1u << 20)) continue;
      buffer.resize(t.nbytes());
      try {
        reader.read(t, 0, buffer);
        // An unaligned window too, as the kernel asks for pieces of a file.
        if (t.nbytes() > 3) reader.read(t, 1, std::span(buffer).first(t.nbytes() - 2));
      } catch (const CkptError&) {
      }
    }
  } catch (const CkptError&) {
  }
  return 0;
}
