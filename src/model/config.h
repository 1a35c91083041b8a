// Model configuration read from a Hugging Face config.json (LlamaForCausalLM,
// MistralForCausalLM, Qwen2ForCausalLM) and the rotary-embedding parameters it implies.
#pragma once
#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace lt {

enum class Arch { kLlama, kMistral, kQwen2 };

enum class RopeType { kDefault, kLinear, kDynamic, kLlama3, kYarn };

// rope_scaling (or rope_parameters in newer transformers) as transformers interprets it.
struct RopeScaling {
  RopeType type = RopeType::kDefault;
  double factor = 1.0;
  // llama3
  double low_freq_factor = 1.0, high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 0;  // 0 = use max_position_embeddings
  // yarn
  double beta_fast = 32.0, beta_slow = 1.0;
  double attention_factor = -1.0;  // < 0: not given (derived from factor / mscale)
  double mscale = 0, mscale_all_dim = 0;
  bool truncate = true;
  bool operator==(const RopeScaling&) const = default;
};

struct ModelConfig {
  Arch arch = Arch::kLlama;
  std::string architecture;  // as written in "architectures"[0]
  std::string model_type;    // "llama", "mistral", "qwen2"
  int64_t hidden_size = 0, intermediate_size = 0, num_hidden_layers = 0;
  int64_t num_attention_heads = 0, num_key_value_heads = 0, head_dim = 0;
  int64_t vocab_size = 0, max_position_embeddings = 0;
  double rms_norm_eps = 1e-6, rope_theta = 10000.0;
  RopeScaling rope_scaling;  // type kDefault when absent
  bool tie_word_embeddings = false;
  int64_t sliding_window = 0;     // 0 = none (Qwen2 only when use_sliding_window)
  int64_t max_window_layers = 0;  // Qwen2: layers >= this use the sliding window
  // Qwen2 "layer_types" when the file gives it ("full_attention" / "sliding_attention" per
  // layer); empty = derived from max_window_layers as transformers does.
  std::vector<std::string> layer_types;
  bool attention_bias = false;  // bias on q,k,v,o (Llama/Mistral attention_bias)
  bool qkv_bias = false;        // bias on q,k,v only (Qwen2)
  bool mlp_bias = false;        // bias on gate,up,down (Llama mlp_bias)
  DType torch_dtype = DType::kF32;
  nlohmann::json raw;  // the whole file, kept so that saving preserves unknown keys

  // Sliding window in effect for decoder layer `layer` (0 = full causal attention).
  int64_t layer_window(int64_t layer) const;
};

// Reads and validates config.json; UserError names the file and the field on any problem
// (missing or mistyped field, unsupported architecture, heads not dividing, ...).
ModelConfig load_model_config(const std::filesystem::path& config_json);
ModelConfig parse_model_config(const nlohmann::json& j, const std::string& source_name);
// config.json text for saving: raw with the fields that longtune may change written back
// (rope_scaling, torch_dtype, vocab_size, ...).
nlohmann::json model_config_to_json(const ModelConfig& c);

// Rotary parameters for a sequence: inv_freq (HD/2) and the cos/sin multiplier, computed as
// transformers' ROPE_INIT_FUNCTIONS do for each type. seq_len matters for "dynamic" only
// (transformers recomputes inv_freq when the longest position + 1 exceeds the original max).
struct RopeParams {
  std::vector<float> inv_freq;
  float attention_scaling = 1.0f;
};
RopeParams compute_rope_params(const ModelConfig& c, int64_t seq_len);

}  // namespace lt
