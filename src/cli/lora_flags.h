// LoRA / QLoRA flags of `longtune train` (PEFT and LongLoRA names).
#pragma once
#include <CLI/CLI.hpp>

#include "model/lora.h"

namespace lt {

void add_lora_flags(CLI::App& app, LoraOptions* o);

}  // namespace lt
