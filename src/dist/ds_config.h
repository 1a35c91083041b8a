// DeepSpeed config files (--deepspeed ds_config.json) and --fsdp turned into the run's ZeRO
// settings, with Hugging Face Trainer's rules: "auto" is filled from the flags, any other value
// must agree with them, and every key that has no effect here is named.
#pragma once
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "dist/zero.h"
#include "train/trainer.h"

namespace lt {

// Applies the config `j` (read from `source`, named in errors) to o: ZeRO fields of o->dist,
// and the training fields it sets (scheduler). dp_world: data-parallel ranks (train_batch_size
// = micro x accumulation x dp_world); hidden_size fills the "auto" bucket sizes as HF does.
// Returns one note per key that is accepted but has no effect. UserError on a value that
// disagrees with the flags, an unknown stage or an unsupported feature (fp16, nvme offload).
std::vector<std::string> apply_deepspeed_config(const nlohmann::json& j, const std::string& source,
                                                int dp_world, int64_t hidden_size, TrainOptions* o);
// Reads the file first (UserError naming it when it cannot be read or parsed).
std::vector<std::string> apply_deepspeed_config_file(const std::filesystem::path& path,
                                                     int dp_world, int64_t hidden_size,
                                                     TrainOptions* o);
// --fsdp full_shard | shard_grad_op [offload], --fsdp_offload_params: ZeRO 3 / 2 in o->dist.
void apply_fsdp(TrainOptions* o);
// The engine's settings from the resolved options.
ZeroSettings zero_settings(const DistOptions& d);

}  // namespace lt
