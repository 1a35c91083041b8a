// The parameter name table: Hugging Face tensor names <-> offsets in one contiguous f32 block,
// and typed per-layer views (LayerWeights) bound to any block of that layout (weights or grads).
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "model/config.h"

namespace lt {

// Named host tensors (f32): Hugging Face names, or PEFT names for LoRA adapter tensors.
using NamedTensors = std::map<std::string, std::vector<float>>;

struct ParamInfo {
  std::string name;            // Hugging Face name, e.g. model.layers.0.self_attn.q_proj.weight
  std::vector<int64_t> shape;  // as stored in the checkpoint
  int64_t offset = 0;          // in floats from the start of the block
  int64_t numel = 0;
  bool decay = true;  // AdamW weight decay applies (HF: not biases, not norms)
};

// One tensor the optimizer updates: its parameter and gradient (same numel). Full fine-tunes list
// every ParamTable entry; LoRA lists the adapter tensors and any base tensors that also train.
struct TrainableTensor {
  std::string name;
  float* param = nullptr;
  float* grad = nullptr;
  int64_t numel = 0;
  bool decay = true;
};

// Views of one decoder layer's tensors in a block. Absent biases are null.
struct LayerWeights {
  float* attn_norm;                 // (D)
  float *attn_q, *attn_q_bias;      // (H*HD, D), (H*HD)
  float *attn_k, *attn_k_bias;      // (KVH*HD, D), (KVH*HD)
  float *attn_v, *attn_v_bias;      // (KVH*HD, D), (KVH*HD)
  float *attn_o, *attn_o_bias;      // (D, H*HD), (D)
  float* ffn_norm;                  // (D)
  float *ffn_gate, *ffn_gate_bias;  // (F, D), (F)
  float *ffn_up, *ffn_up_bias;      // (F, D), (F)
  float *ffn_down, *ffn_down_bias;  // (D, F), (D)
};

struct ModelWeights {
  float* embed;  // (V, D)
  std::vector<LayerWeights> layers;
  float* final_norm;  // (D)
  float* lm_head;     // (V, D); == embed when tied
};

class ParamTable {
 public:
  explicit ParamTable(const ModelConfig& c);
  // Only the tensors for which keep(name) is true (QLoRA: the NF4 weights live elsewhere).
  ParamTable(const ModelConfig& c, const std::function<bool(const std::string&)>& keep);
  const std::vector<ParamInfo>& params() const { return params_; }
  int64_t total_numel() const { return total_; }
  const ParamInfo* find(const std::string& name) const;
  // Views into block (total_numel floats).
  ModelWeights bind(float* block) const;
  // Views from a lookup: at(name) gives each tensor's pointer or null (tensors not in the
  // table are looked up too, so a view can cover weights kept elsewhere).
  ModelWeights bind(const std::function<float*(const std::string&)>& at) const;
  // Views where the block's float offset `base_offset` lies at `base` (a buffer holding only a
  // range of the block, e.g. one gathered layer): only the tensors inside that range are valid.
  ModelWeights bind_at(float* base, int64_t base_offset) const;

 private:
  void add(const std::string& name, std::vector<int64_t> shape, bool decay);
  ModelConfig config_;
  std::function<bool(const std::string&)> keep_;
  std::vector<ParamInfo> params_;
  int64_t total_ = 0;
};

}  // namespace lt
