// Loading and saving whole models in the Hugging Face folder format.
#pragma once
#include <filesystem>

#include "backend/backend.h"
#include "core/dtype.h"
#include "io/safetensors.h"
#include "model/config.h"
#include "model/params.h"

namespace lt {

// Fills params (table.total_numel() floats) from the checkpoint, converting to f32.
// UserError names the folder and the tensor that is missing or shaped wrong for the config.
void load_weights(const CheckpointReader& reader, const ParamTable& table, float* params);
// The same into a backend's device memory, one tensor at a time through host memory.
void load_weights(const CheckpointReader& reader, const ParamTable& table, float* params,
                  Backend& be);

// Writes dir/config.json and the model safetensors (sharded when large) in dtype, plus the
// tokenizer and generation files found in source_dir (copied as they are). Every file is
// written atomically. Shards of at most max_shard_bytes (a tensor larger than that gets its own).
void save_model(const std::filesystem::path& dir, const ModelConfig& config,
                const ParamTable& table, const float* params, DType dtype,
                const std::filesystem::path& source_dir,
                size_t max_shard_bytes = kDefaultMaxShardBytes);

}  // namespace lt
