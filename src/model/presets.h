// Named model shapes (for `longtune init`, `longtune plan` and the benchmarks) and Hugging Face
// style random initialisation.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

#include "model/params.h"

namespace lt {

// config.json contents of a named preset: tiny, small, llama2-7b, mistral-7b, llama3-8b,
// qwen2-7b. UserError lists the names for an unknown one.
nlohmann::json preset_config(const std::string& name);

// transformers' _init_weights: linear and embedding weights ~ N(0, std), biases 0, norms 1.
void init_random_weights(const ParamTable& table, float* params, double std, uint64_t seed);

}  // namespace lt
