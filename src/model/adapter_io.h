// PEFT adapter folders (adapter_config.json + adapter_model.safetensors, tensor names as PEFT
// saves them: base_model.model.<HF module>.lora_A.weight, modules_to_save as
// base_model.model.<HF name>), base-model loading for LoRA / QLoRA, and merging an adapter into
// a base model.
#pragma once
#include <filesystem>
#include <string>

#include "io/safetensors.h"
#include "model/llama.h"

namespace lt {

// Reads dir/adapter_config.json into a spec: r, lora_alpha, use_rslora, target_modules and
// modules_to_save come from the file; dropout, seed, quantize_4bit and base_bf16 are kept from
// `spec`. UserError naming the file and field for anything longtune cannot reproduce exactly (DoRA,
// bias training, rank/alpha patterns, layer subsets, regex targets, other PEFT types).
LoraSpec read_adapter_config(const std::filesystem::path& dir, const ModelConfig& config,
                             LoraSpec spec);
// Fills the model's LoRA block and the base tensors that train from dir/adapter_model.safetensors.
// Every tensor must be there with the model's shape and nothing else may be (an adapter made for
// another base fails here, naming the file and the tensor); the model is left untouched then.
void load_adapter(const std::filesystem::path& dir, LlamaModel& model);
// The same checks, into host tensors keyed as LlamaModel::trainable() names them (adapter
// tensors by their PEFT names, base tensors that train by their Hugging Face names): every
// trainable tensor of the whole model under `spec`.
NamedTensors read_adapter_tensors(const std::filesystem::path& dir, const ModelConfig& config,
                                  const LoraSpec& spec);
// Writes dir/adapter_config.json and dir/adapter_model.safetensors (f32) atomically.
void save_adapter(const std::filesystem::path& dir, LlamaModel& model,
                  const std::string& base_model_name_or_path);
// The same from host tensors keyed as read_adapter_tensors gives them (a distributed run
// gathers them from its pipeline stages).
void save_adapter_tensors(const std::filesystem::path& dir, const ModelConfig& config,
                          const LoraSpec& spec, const NamedTensors& tensors,
                          const std::string& base_model_name_or_path);
// Loads the base model's tensors into the model: f32 table tensors as they are, QLoRA's
// projection weights quantized to NF4 one at a time.
void load_base_weights(const CheckpointReader& reader, LlamaModel& model);
// PEFT's merge_and_unload: W += scale * B @ A for every adapted projection, and the
// modules_to_save tensors replace the base ones. params is a host block of `table` (every HF
// tensor, f32); config must be the adapter's base.
void merge_adapter(const std::filesystem::path& adapter_dir, const ModelConfig& config,
                   const ParamTable& table, float* params);

}  // namespace lt
