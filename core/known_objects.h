// Readable JSON for well-known pickled objects that are values, not tensors: numpy scalars
// and arrays, numpy dtypes, torch.Size / device / dtype / layout. Nothing is executed: the
// values are decoded from the pickled arguments.
#pragma once

#include <optional>
#include <string>

#include "pickle_value.h"

namespace ckptfs {

// The JSON text for |v| if it is one of the known objects, else nullopt.
std::optional<std::string> render_known_object(const ValueArena& arena, ValueId v);

}  // namespace ckptfs
