// Parameter name table for Llama-family models (Llama, Mistral, Qwen2).
#include "model/params.h"

#include <fmt/format.h>

#include "core/check.h"
#include "core/memory.h"

namespace lt {

ParamTable::ParamTable(const ModelConfig& c)
    : ParamTable(c, [](const std::string&) { return true; }) {}

ParamTable::ParamTable(const ModelConfig& c, const std::function<bool(const std::string&)>& keep)
    : config_(c), keep_(keep) {
  const int64_t D = c.hidden_size, F = c.intermediate_size, V = c.vocab_size;
  const int64_t QD = c.num_attention_heads * c.head_dim, KVD = c.num_key_value_heads * c.head_dim;
  const bool qkv_bias = c.attention_bias || c.qkv_bias;
  add("model.embed_tokens.weight", {V, D}, true);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = fmt::format("model.layers.{}.", l);
    add(p + "input_layernorm.weight", {D}, false);
    add(p + "self_attn.q_proj.weight", {QD, D}, true);
    if (qkv_bias) add(p + "self_attn.q_proj.bias", {QD}, false);
    add(p + "self_attn.k_proj.weight", {KVD, D}, true);
    if (qkv_bias) add(p + "self_attn.k_proj.bias", {KVD}, false);
    add(p + "self_attn.v_proj.weight", {KVD, D}, true);
    if (qkv_bias) add(p + "self_attn.v_proj.bias", {KVD}, false);
    add(p + "self_attn.o_proj.weight", {D, QD}, true);
    if (c.attention_bias) add(p + "self_attn.o_proj.bias", {D}, false);
    add(p + "post_attention_layernorm.weight", {D}, false);
    add(p + "mlp.gate_proj.weight", {F, D}, true);
    if (c.mlp_bias) add(p + "mlp.gate_proj.bias", {F}, false);
    add(p + "mlp.up_proj.weight", {F, D}, true);
    if (c.mlp_bias) add(p + "mlp.up_proj.bias", {F}, false);
    add(p + "mlp.down_proj.weight", {D, F}, true);
    if (c.mlp_bias) add(p + "mlp.down_proj.bias", {D}, false);
  }
  add("model.norm.weight", {D}, false);
  if (!c.tie_word_embeddings) add("lm_head.weight", {V, D}, true);
}

void ParamTable::add(const std::string& name, std::vector<int64_t> shape, bool decay) {
  if (!keep_(name)) return;
  int64_t n = 1;
  for (auto s : shape) n *= s;
  params_.push_back({name, std::move(shape), total_, n, decay});
  // Keep every tensor 64-byte aligned inside the block.
  total_ += static_cast<int64_t>(align_up(static_cast<size_t>(n) * 4) / 4);
}

const ParamInfo* ParamTable::find(const std::string& name) const {
  for (auto& p : params_)
    if (p.name == name) return &p;
  return nullptr;
}

ModelWeights ParamTable::bind(float* block) const { return bind_at(block, 0); }

ModelWeights ParamTable::bind_at(float* base, int64_t base_offset) const {
  // Integer arithmetic: views outside the caller's range are formed but never dereferenced.
  return bind([&](const std::string& name) -> float* {
    const ParamInfo* p = find(name);
    if (!p) return nullptr;
    return reinterpret_cast<float*>(reinterpret_cast<intptr_t>(base) +
                                    (p->offset - base_offset) * intptr_t(sizeof(float)));
  });
}

ModelWeights ParamTable::bind(const std::function<float*(const std::string&)>& at) const {
  ModelWeights w;
  w.embed = at("model.embed_tokens.weight");
  for (int64_t l = 0; l < config_.num_hidden_layers; ++l) {
    const std::string p = fmt::format("model.layers.{}.", l);
    LayerWeights lw;
    lw.attn_norm = at(p + "input_layernorm.weight");
    lw.attn_q = at(p + "self_attn.q_proj.weight");
    lw.attn_q_bias = at(p + "self_attn.q_proj.bias");
    lw.attn_k = at(p + "self_attn.k_proj.weight");
    lw.attn_k_bias = at(p + "self_attn.k_proj.bias");
    lw.attn_v = at(p + "self_attn.v_proj.weight");
    lw.attn_v_bias = at(p + "self_attn.v_proj.bias");
    lw.attn_o = at(p + "self_attn.o_proj.weight");
    lw.attn_o_bias = at(p + "self_attn.o_proj.bias");
    lw.ffn_norm = at(p + "post_attention_layernorm.weight");
    lw.ffn_gate = at(p + "mlp.gate_proj.weight");
    lw.ffn_gate_bias = at(p + "mlp.gate_proj.bias");
    lw.ffn_up = at(p + "mlp.up_proj.weight");
    lw.ffn_up_bias = at(p + "mlp.up_proj.bias");
    lw.ffn_down = at(p + "mlp.down_proj.weight");
    lw.ffn_down_bias = at(p + "mlp.down_proj.bias");
    w.layers.push_back(lw);
  }
  w.final_norm = at("model.norm.weight");
  w.lm_head = config_.tie_word_embeddings ? w.embed : at("lm_head.weight");
  return w;
}

}  // namespace lt
