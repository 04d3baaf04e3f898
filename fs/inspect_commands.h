// `ckptfs ls` and `ckptfs info`: inspect a checkpoint without mounting it.
#pragma once

namespace ckptfs {

// Runs `ckptfs ls ...` or `ckptfs info ...` (argv[1] is the subcommand); returns the exit code.
int run_inspect_command(int argc, char** argv);

}  // namespace ckptfs
