// Model presets and random initialisation.
#include "model/presets.h"

#include <random>

#include "core/error.h"

namespace lt {

nlohmann::json preset_config(const std::string& name) {
  auto llama = [](int64_t d, int64_t f, int64_t l, int64_t h, int64_t kv, int64_t v, int64_t maxpos,
                  double theta) {
    return nlohmann::json{{"architectures", {"LlamaForCausalLM"}},
                          {"model_type", "llama"},
                          {"hidden_size", d},
                          {"intermediate_size", f},
                          {"num_hidden_layers", l},
                          {"num_attention_heads", h},
                          {"num_key_value_heads", kv},
                          {"vocab_size", v},
                          {"max_position_embeddings", maxpos},
                          {"rms_norm_eps", 1e-5},
                          {"rope_theta", theta},
                          {"tie_word_embeddings", false},
                          {"hidden_act", "silu"},
                          {"initializer_range", 0.02},
                          {"attention_bias", false},
                          {"mlp_bias", false},
                          {"bos_token_id", 1},
                          {"eos_token_id", 2},
                          {"torch_dtype", "float32"}};
  };
  if (name == "tiny") return llama(64, 176, 4, 4, 2, 512, 1024, 10000.0);
  if (name == "small") return llama(256, 688, 4, 8, 4, 32000, 4096, 10000.0);
  if (name == "llama2-7b") return llama(4096, 11008, 32, 32, 32, 32000, 4096, 10000.0);
  if (name == "llama3-8b") {
    auto j = llama(4096, 14336, 32, 32, 8, 128256, 8192, 500000.0);
    j["bos_token_id"] = 128000;
    j["eos_token_id"] = 128001;
    return j;
  }
  if (name == "mistral-7b") {
    auto j = llama(4096, 14336, 32, 32, 8, 32000, 32768, 1000000.0);
    j["architectures"] = {"MistralForCausalLM"};
    j["model_type"] = "mistral";
    j["sliding_window"] = nullptr;
    return j;
  }
  if (name == "qwen2-7b") {
    auto j = llama(3584, 18944, 28, 28, 4, 152064, 32768, 1000000.0);
    j["architectures"] = {"Qwen2ForCausalLM"};
    j["model_type"] = "qwen2";
    j["rms_norm_eps"] = 1e-6;
    j["use_sliding_window"] = false;
    return j;
  }
  fail(
      "--preset: '{}' is not a preset; allowed: tiny, small, llama2-7b, llama3-8b, mistral-7b, "
      "qwen2-7b",
      name);
}

void init_random_weights(const ParamTable& table, float* params, double std, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.0f, static_cast<float>(std));
  for (const auto& p : table.params()) {
    float* x = params + p.offset;
    const bool norm = p.name.find("norm") != std::string::npos;
    const bool bias = p.name.size() > 5 && p.name.compare(p.name.size() - 5, 5, ".bias") == 0;
    for (int64_t i = 0; i < p.numel; ++i) x[i] = norm ? 1.0f : bias ? 0.0f : nd(rng);
  }
}

}  // namespace lt
