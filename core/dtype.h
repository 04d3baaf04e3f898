// torch dtypes as ckptfs knows them: names, sizes, numpy spellings, pickled storage classes.
#pragma once

#include <cstdint>
#include <string_view>

namespace ckptfs {

struct DType {
  std::string_view name;         // torch's canonical name, e.g. "float32"
  std::uint32_t itemsize;        // bytes per element
  std::string_view numpy_dtype;  // what to hand numpy, e.g. "<f4"
  bool is_complex = false;       // byte-swapping swaps each half separately
  bool is_quantized = false;     // raw integer codes; needs scale/zero point to mean anything
};

// What a tensor whose element type could not be determined reports (its reads fail anyway).
extern const DType kNoDType;

// A one-byte handle for compact records: 0 is kNoDType, others index the static table.
std::uint8_t dtype_id(const DType& d);
const DType& dtype_from_id(std::uint8_t id);

// The lookups return entries of one static table (nullptr: unknown), so a tensor holds its
// dtype as a pointer rather than a copy.

// Looks a dtype up by torch name ("float32") or by the GLOBAL that pickles it ("torch.float32").
const DType* dtype_by_name(std::string_view name);

// Maps a pickled storage class (e.g. "torch.FloatStorage", "torch.cuda.HalfStorage",
// "torch.UntypedStorage") to the element type of that storage. Like torch, only the class name
// matters, not the module.
const DType* dtype_of_storage_class(std::string_view global_name);

}  // namespace ckptfs
