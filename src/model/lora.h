// LoRA / QLoRA settings and the adapter's tensor table: which projections carry low-rank
// adapters (PEFT's target_modules), their rank and scaling, which base tensors also train
// (LongLoRA's "embed,norm" = PEFT's modules_to_save), and whether the frozen base is NF4.
#pragma once
#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "model/config.h"

namespace lt {

// The seven projections of a decoder layer, in layer order.
enum class Proj { kQ, kK, kV, kO, kGate, kUp, kDown };
inline constexpr int kNumProj = 7;
// "q_proj", ..., "down_proj" (the PEFT target-module names).
const char* proj_name(Proj p);
// "self_attn.q_proj", ..., "mlp.down_proj" (the module path inside a layer).
std::string proj_module(Proj p);

// The flags as the user gives them (longtune train; LongLoRA / PEFT names).
struct LoraOptions {
  bool use_peft_lora = false;  // --use_peft_lora / --low_rank_training
  int64_t r = 8;               // --lora_r
  double alpha = 16;           // --lora_alpha
  double dropout = 0.05;       // --lora_dropout (LongLoRA / QLoRA recipes; PEFT's default is 0)
  std::string target_modules = "q_proj,v_proj";  // --lora_target_modules, or all-linear
  bool use_rslora = false;           // --use_rslora: scale alpha/sqrt(r) instead of alpha/r
  std::string trainable_params;      // --trainable_params "embed,norm" (LongLoRA)
  bool load_in_4bit = false;         // --load_in_4bit / --use_4bit_quantization (implies LoRA)
  std::string adapter_name_or_path;  // --adapter_name_or_path: continue this PEFT adapter
};

// The resolved, validated setting the model is built with.
struct LoraSpec {
  bool enabled = false;
  int64_t r = 0;
  double alpha = 0;
  double dropout = 0;
  bool rslora = false;
  std::array<bool, kNumProj> targets{};
  bool train_embed = false, train_norm = false;
  bool quantize_4bit = false;
  bool base_bf16 = false;   // frozen base projections stored in bf16 (--bf16 True, not 4-bit)
  bool embed_bf16 = false;  // the frozen embedding and LM head in bf16 (--bf16 True, LoRA/QLoRA)
  uint64_t seed = 42;       // adapter initialisation and dropout masks
  // PEFT: scaling = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora (Kalajdzievski 2023).
  float scale() const;
  bool targets_proj(Proj p) const { return enabled && targets[static_cast<int>(p)]; }
};

// Validates the flags (UserError naming the flag) and resolves them.
LoraSpec resolve_lora(const LoraOptions& o, uint64_t seed);
// Parses a target list ("q_proj,v_proj", "all-linear"); UserError naming `what` otherwise.
std::array<bool, kNumProj> parse_lora_targets(const std::vector<std::string>& names,
                                              const std::string& what);

// One adapter tensor in the LoRA block (A and B of every targeted projection).
struct LoraTensorInfo {
  std::string name;  // PEFT's saved name, ...q_proj.lora_A.weight
  int64_t layer = 0;
  Proj proj = Proj::kQ;
  bool is_b = false;  // lora_B (OUT,R); else lora_A (R,IN)
  std::vector<int64_t> shape;
  int64_t offset = 0, numel = 0;
};

class LoraTable {
 public:
  LoraTable() = default;
  LoraTable(const ModelConfig& c, const LoraSpec& s) : LoraTable(c, s, 0, c.num_hidden_layers) {}
  // Only the adapters of layers [layer_begin, layer_end) (a pipeline stage).
  LoraTable(const ModelConfig& c, const LoraSpec& s, int64_t layer_begin, int64_t layer_end);
  const std::vector<LoraTensorInfo>& tensors() const { return tensors_; }
  int64_t total_numel() const { return total_; }
  // Index of (layer, proj, is_b) in tensors(), or -1.
  int64_t find(int64_t layer, Proj p, bool is_b) const;
  // Index of the tensor with this (PEFT) name in tensors(), or -1.
  int64_t index(const std::string& name) const;

 private:
  std::vector<LoraTensorInfo> tensors_;
  int64_t total_ = 0;
};

// (IN, OUT) of a projection.
std::pair<int64_t, int64_t> proj_shape(const ModelConfig& c, Proj p);
// PEFT's names: "base_model.model." + the Hugging Face name.
std::string peft_name(const std::string& hf_name);
// PEFT's default initialisation: A ~ U(-1/sqrt(IN), 1/sqrt(IN)) (kaiming_uniform_ with
// a = sqrt(5), nn.Linear's default), B = 0. Seeded, host block of table.total_numel().
void init_lora_weights(const LoraTable& table, uint64_t seed, float* block);

}  // namespace lt
