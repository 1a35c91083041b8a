// Flags of distributed runs for `longtune train` (DeepSpeed / FSDP / sequence parallel names).
#pragma once
#include <CLI/CLI.hpp>

#include "dist/dist_options.h"

namespace lt {

void add_dist_flags(CLI::App& app, DistOptions* d);

}  // namespace lt
