// libFuzzer target: the pickle VM on arbitrary bytes. Anything but a FormatError (a crash, a
// sanitizer report, a leak, another exception, an allocation past the fuzzer's limit) is a bug.
#include <cstddef>
#include <cstdint>
#include <span>

#include "errors.h"
#include "pickle_reader.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  ckptfs::ValueArena arena;
  ckptfs::PickleReader reader(
      std::span<const std::byte>(reinterpret_cast<const std::byte*>(data), size), arena);
  try {
    // Legacy files concatenate pickles: keep reading while the previous one ended cleanly.
    for (int i = 0; i < 8 && reader.position() < size; ++i) reader.read();
  } catch (const ckptfs::FormatError&) {
  }
  return 0;
}
