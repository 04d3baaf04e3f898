// safetensors: an 8-byte little-endian header length, a JSON header mapping each tensor name
// to {dtype, shape, data_offsets}, then the data. Every tensor is already contiguous and
// little-endian at a known offset.
#pragma once

#include <optional>
#include <string_view>

#include "byte_source.h"
#include "catalog.h"

namespace ckptfs {

// True when |source| looks like a safetensors file (plausible header length, then '{').
bool looks_like_safetensors(const ByteSource& source);

// safetensors' name for a torch dtype ("float32" -> "F32"), if the format has one.
std::optional<std::string_view> safetensors_dtype_of(std::string_view torch_name);

// Throws FormatError with a one-line message when the header is malformed or hostile.
TensorCatalog load_safetensors(const ByteSource& source);

}  // namespace ckptfs
