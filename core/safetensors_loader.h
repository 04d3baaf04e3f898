// safetensors: an 8-byte little-endian header length, a JSON header mapping each tensor name
// to {dtype, shape, data_offsets}, then the data. Every tensor is already contiguous and
// little-endian at a known offset.
#pragma once

#include "byte_source.h"
#include "catalog.h"

namespace ckptfs {

// True when |source| looks like a safetensors file (plausible header length, then '{').
bool looks_like_safetensors(const ByteSource& source);

// Throws FormatError with a one-line message when the header is malformed or hostile.
TensorCatalog load_safetensors(const ByteSource& source);

}  // namespace ckptfs
