// `ckptfs convert`: writes a checkpoint's tensors as one safetensors file, streaming them
// through a budgeted block cache (the same SafetensorsView the mount serves).
#pragma once

namespace ckptfs {

// Runs `ckptfs convert ...` (argv[1] is "convert"); returns the exit code.
int run_convert_command(int argc, char** argv);

}  // namespace ckptfs
