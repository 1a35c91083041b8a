// Llama-family decoder: buffers, forward and backward (see llama.h for the contract).
#include "model/llama.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>

#include "core/check.h"
#include "core/error.h"
#include "ops/nf4.h"

namespace lt {

int64_t MicroBatch::num_targets() const {
  int64_t n = 0;
  for (int32_t t : targets) n += t != kIgnoreIndex;
  return n;
}

// Saved activations of one decoder layer (one set per layer, or one shared set when layers are
// recomputed from their checkpointed input).
struct LlamaModel::LayerActs {
  float* attn_in;    // (N,D) input_layernorm output
  float* attn_rstd;  // (N)
  float* q;          // (N,H,HD) after RoPE
  float* k;          // (N,KVH,HD) after RoPE
  float* v;          // (N,KVH,HD)
  float* attn_out;   // (N,H*HD) attention output before o_proj
  float* lse;        // (H,N) log-sum-exp per query row
  float* x_mid;      // (N,D) residual after attention
  float* ffn_in;     // (N,D) post_attention_layernorm output
  float* ffn_rstd;   // (N)
  float* gate;       // (N,F) only when the MLP is not chunked, else null
  float* up;         // (N,F) only when the MLP is not chunked, else null
};

// Working buffers shared by all layers.
struct LlamaModel::Work {
  int32_t *ids, *pos, *docs, *targets;  // (N)
  float *rope_cos, *rope_sin;           // (N, HD/2)
  float* inv_freq;                      // (HD/2)
  float *final_in, *final_rstd;         // (N,D), (N)
  float *gate_c, *up_c, *h_c;           // (C,F) MLP chunk (gate_c/up_c null when not chunked)
  float *dh_c, *dgate_c, *dup_c;        // (C,F) MLP chunk gradients
  float* lm_scratch;                    // (C_lm, V) logits of one LM-head chunk
  float *dres, *dnorm, *dattn, *dq, *dk, *dv;  // (N,D) (N,D) (N,H*HD) (N,H*HD) (N,KVH*HD) x2
  float* nf4_weight;                    // QLoRA: one dequantized (OUT,IN) weight at a time
  float *lora_t, *lora_u;               // (N,R) LoRA intermediates
  float *lora_xd, *lora_dxd;            // (N, max IN) dropped-out input and its gradient
  int64_t mlp_chunk = 0, lm_chunk = 0;
};

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

class PlanBinder final : public BufferBinder {
 public:
  explicit PlanBinder(MemoryPlan* plan) : plan_(plan) {}
  float* take(const std::string& name, size_t count, MemCategory c,
              const std::string& arena) override {
    plan_->add(name, count * sizeof(float), c, arena);
    return nullptr;
  }
  void* take_bytes(const std::string& name, size_t bytes, MemCategory c,
                   const std::string& arena) override {
    plan_->add(name, bytes, c, arena);
    return nullptr;
  }

 private:
  MemoryPlan* plan_;
};

class ArenaBinder final : public BufferBinder {
 public:
  explicit ArenaBinder(std::map<std::string, Arena>* arenas) : arenas_(arenas) {}
  float* take(const std::string& name, size_t count, MemCategory,
              const std::string& arena) override {
    auto it = arenas_->find(arena);
    LT_CHECK(it != arenas_->end(), "arena '{}' was not planned (buffer '{}')", arena, name);
    return it->second.take<float>(name, count);
  }
  void* take_bytes(const std::string& name, size_t bytes, MemCategory,
                   const std::string& arena) override {
    auto it = arenas_->find(arena);
    LT_CHECK(it != arenas_->end(), "arena '{}' was not planned (buffer '{}')", arena, name);
    return it->second.take_bytes(name, bytes);
  }

 private:
  std::map<std::string, Arena>* arenas_;
};

ParamTable make_table(const ModelConfig& c, const RunSettings& s) {
  if (!s.lora.quantize_4bit) return ParamTable(c);
  return ParamTable(c, [&](const std::string& n) { return !LlamaModel::is_quantized(s.lora, n); });
}

// Byte layout of one NF4 weight's buffer: packed codes, absmax codes, then (4-aligned) scales.
struct Nf4Layout {
  size_t absmax_q, absmax_scale, bytes;
};
Nf4Layout nf4_layout(int64_t n) {
  const Nf4Sizes z = nf4_sizes(n);
  Nf4Layout o;
  o.absmax_q = size_t(z.packed_bytes);
  o.absmax_scale = (o.absmax_q + size_t(z.blocks) + 3) / 4 * 4;
  o.bytes = o.absmax_scale + 4 * size_t(z.scale_blocks);
  return o;
}

}  // namespace

bool LlamaModel::is_quantized(const LoraSpec& s, const std::string& name) {
  if (!s.enabled || !s.quantize_4bit) return false;
  for (int p = 0; p < kNumProj; ++p)
    if (name.size() > 7 && name.ends_with(std::string(proj_name(Proj(p))) + ".weight"))
      return true;
  return false;
}

bool LlamaModel::base_trains(const LoraSpec& s, const std::string& name) {
  if (!s.enabled) return true;
  if (s.train_embed && name == "model.embed_tokens.weight") return true;
  return s.train_norm && (name.ends_with("layernorm.weight") || name == "model.norm.weight");
}

int64_t LlamaModel::trainable_numel(const ModelConfig& config, const RunSettings& settings) {
  if (!settings.train) return 0;
  int64_t n = 0;
  const ParamTable table = make_table(config, settings);
  const LoraTable lora(config, settings.lora);
  for (const auto& p : table.params())
    if (base_trains(settings.lora, p.name)) n += int64_t(align_up(size_t(p.numel) * 4) / 4);
  for (const auto& t : lora.tensors()) n += int64_t(align_up(size_t(t.numel) * 4) / 4);
  return n;
}

void LlamaModel::declare_buffers(const ModelConfig& c, const RunSettings& s, BufferBinder& b,
                                 Bound* out) {
  const size_t N = s.max_tokens, D = c.hidden_size, F = c.intermediate_size, V = c.vocab_size;
  const size_t H = c.num_attention_heads, HD = c.head_dim, QD = H * HD;
  const size_t KVD = c.num_key_value_heads * HD, L = c.num_hidden_layers;
  const bool save_mlp = s.mlp_chunks == 1;
  const ParamTable table = make_table(c, s);
  const size_t P = table.total_numel();

  LT_CHECK(!(s.external_params && s.lora.enabled), "external parameters with LoRA");
  if (!s.external_params) {  // ZeRO-2/3: a LayerWeightsProvider holds them (src/dist/zero.h)
    out->params = b.take("params", P, MemCategory::kWeights, "weights");
    if (s.train && !s.lora.enabled)
      out->grads = b.take("grads", P, MemCategory::kGradients, "grads");
  }
  if (s.lora.enabled) {
    // Frozen base tensors get no gradient; only those that also train (embed, norms) do.
    out->base_grads.clear();
    for (const auto& p : table.params())
      if (s.train && base_trains(s.lora, p.name))
        out->base_grads[p.name] =
            b.take("grad." + p.name, p.numel, MemCategory::kGradients, "grads");
    const LoraTable lt(c, s.lora);
    out->lora_params = b.take("lora.params", lt.total_numel(), MemCategory::kWeights, "lora");
    if (s.train)
      out->lora_grads = b.take("lora.grads", lt.total_numel(), MemCategory::kGradients, "lora");
    // QLoRA: the seven projection weights of every layer in NF4 (about 0.53 bytes per value).
    out->nf4.clear();
    const ParamTable full(c);
    for (const auto& p : full.params()) {
      if (!is_quantized(s.lora, p.name)) continue;
      const Nf4Layout lay = nf4_layout(p.numel);
      auto* buf = static_cast<uint8_t*>(
          b.take_bytes("nf4." + p.name, lay.bytes, MemCategory::kWeights, "weights_nf4"));
      Nf4Weight w;
      w.name = p.name;
      w.numel = p.numel;
      if (buf) {
        w.packed = buf;
        w.absmax_q = buf + lay.absmax_q;
        w.absmax_scale = reinterpret_cast<float*>(buf + lay.absmax_scale);
      }
      out->nf4.push_back(std::move(w));
    }
  }

  // Residual stream: with training every layer input is kept (these are the checkpoints when
  // layers are recomputed); without training two buffers alternate.
  const size_t num_res = s.train ? L + 1 : 2;
  const MemCategory res_cat = s.checkpointing ? MemCategory::kCheckpoints : MemCategory::kActivations;
  const bool offload = s.train && s.offload_checkpoints;
  // Offloaded checkpoints are whole pages so that releasing one never touches its neighbour.
  const size_t res_count = offload ? (N * D * 4 + kPageSize - 1) / kPageSize * kPageSize / 4 : N * D;
  out->res.clear();
  for (size_t l = 0; l < num_res; ++l)
    out->res.push_back(b.take(fmt::format("res.{}", l), res_count, res_cat,
                              offload ? "offload" : "activations"));

  const size_t num_sets = (s.train && !s.checkpointing) ? L : 1;
  out->acts.clear();
  for (size_t i = 0; i < num_sets; ++i) {
    auto a = std::make_unique<LayerActs>();
    const std::string p = fmt::format("layer{}.", i);
    const std::string arena = "activations";
    a->attn_in = b.take(p + "attn_in", N * D, MemCategory::kActivations, arena);
    a->attn_rstd = b.take(p + "attn_rstd", N, MemCategory::kActivations, arena);
    a->q = b.take(p + "q", N * QD, MemCategory::kAttention, arena);
    a->k = b.take(p + "k", N * KVD, MemCategory::kAttention, arena);
    a->v = b.take(p + "v", N * KVD, MemCategory::kAttention, arena);
    a->attn_out = b.take(p + "attn_out", N * QD, MemCategory::kAttention, arena);
    a->lse = b.take(p + "lse", H * N, MemCategory::kAttention, arena);
    a->x_mid = b.take(p + "x_mid", N * D, MemCategory::kActivations, arena);
    a->ffn_in = b.take(p + "ffn_in", N * D, MemCategory::kActivations, arena);
    a->ffn_rstd = b.take(p + "ffn_rstd", N, MemCategory::kActivations, arena);
    a->gate = save_mlp ? b.take(p + "gate", N * F, MemCategory::kActivations, arena) : nullptr;
    a->up = save_mlp ? b.take(p + "up", N * F, MemCategory::kActivations, arena) : nullptr;
    out->acts.push_back(std::move(a));
  }

  auto w = std::make_unique<Work>();
  auto ints = [&](const char* name) {
    return reinterpret_cast<int32_t*>(b.take(name, N, MemCategory::kScratch, "scratch"));
  };
  w->ids = ints("ids");
  w->pos = ints("pos");
  w->docs = ints("docs");
  w->targets = ints("targets");
  w->rope_cos = b.take("rope_cos", N * HD / 2, MemCategory::kScratch, "scratch");
  w->rope_sin = b.take("rope_sin", N * HD / 2, MemCategory::kScratch, "scratch");
  w->inv_freq = b.take("inv_freq", HD / 2, MemCategory::kScratch, "scratch");
  w->final_in = b.take("final_in", N * D, MemCategory::kActivations, "activations");
  w->final_rstd = b.take("final_rstd", N, MemCategory::kActivations, "activations");
  w->mlp_chunk = ceil_div(N, s.mlp_chunks);
  w->lm_chunk = ceil_div(N, s.lm_head_chunks);
  const size_t C = w->mlp_chunk;
  w->gate_c = save_mlp ? nullptr : b.take("mlp.gate_c", C * F, MemCategory::kMlpChunk, "scratch");
  w->up_c = save_mlp ? nullptr : b.take("mlp.up_c", C * F, MemCategory::kMlpChunk, "scratch");
  w->h_c = b.take("mlp.h_c", C * F, MemCategory::kMlpChunk, "scratch");
  w->lm_scratch = b.take("lm_head.logits", w->lm_chunk * V, MemCategory::kLmHeadChunk, "scratch");
  if (s.train) {
    w->dh_c = b.take("mlp.dh_c", C * F, MemCategory::kMlpChunk, "scratch");
    w->dgate_c = b.take("mlp.dgate_c", C * F, MemCategory::kMlpChunk, "scratch");
    w->dup_c = b.take("mlp.dup_c", C * F, MemCategory::kMlpChunk, "scratch");
    w->dres = b.take("grad.res", N * D, MemCategory::kScratch, "scratch");
    w->dnorm = b.take("grad.norm", N * D, MemCategory::kScratch, "scratch");
    w->dattn = b.take("grad.attn_out", N * QD, MemCategory::kAttention, "scratch");
    w->dq = b.take("grad.q", N * QD, MemCategory::kAttention, "scratch");
    w->dk = b.take("grad.k", N * KVD, MemCategory::kAttention, "scratch");
    w->dv = b.take("grad.v", N * KVD, MemCategory::kAttention, "scratch");
  }
  w->nf4_weight = w->lora_t = w->lora_u = w->lora_xd = w->lora_dxd = nullptr;
  if (s.lora.quantize_4bit)
    w->nf4_weight = b.take("nf4.dequantized", std::max({QD * D, KVD * D, F * D}),
                           MemCategory::kScratch, "scratch");
  if (s.lora.enabled) {
    const size_t R = s.lora.r, IN = std::max({D, QD, F});
    w->lora_t = b.take("lora.t", N * R, MemCategory::kScratch, "scratch");
    w->lora_u = b.take("lora.u", N * R, MemCategory::kScratch, "scratch");
    if (s.lora.dropout > 0 && s.train) {
      w->lora_xd = b.take("lora.dropout_x", N * IN, MemCategory::kScratch, "scratch");
      w->lora_dxd = b.take("lora.dropout_dx", N * IN, MemCategory::kScratch, "scratch");
    }
  }
  out->work = std::move(w);
}

LlamaModel::LlamaModel(const ModelConfig& config, Backend& backend, const RunSettings& settings)
    : config_(config), be_(backend), settings_(settings), table_(make_table(config, settings)),
      lora_table_(config, settings.lora) {
  LT_CHECK(settings_.max_tokens > 0 && settings_.mlp_chunks >= 1 && settings_.lm_head_chunks >= 1);
  LT_CHECK(!settings_.offload_checkpoints || settings_.checkpointing,
           "checkpoint offload needs checkpointing");
  if (settings_.lora.enabled) {
    LT_CHECK(settings_.lora.r > 0, "LoRA rank {}", settings_.lora.r);
    if (!be_.supports(OpKind::kLora) ||
        (settings_.lora.quantize_4bit && !be_.supports(OpKind::kNf4Dequantize)))
      fail("--device {}: this backend does not support LoRA / 4-bit weights yet", be_.name());
  }
  MemoryPlan plan;
  PlanBinder planner(&plan);
  Bound sizes;
  declare_buffers(config_, settings_, planner, &sizes);
  for (const auto& name : plan.arena_names()) {
    const size_t bytes = plan.arena_bytes(name);
    arenas_.emplace(name, name == "offload" ? Arena::file_backed(name, bytes, settings_.offload_dir)
                                            : Arena(name, bytes));
  }
  ArenaBinder binder(&arenas_);
  Bound bound;
  declare_buffers(config_, settings_, binder, &bound);
  params_ = bound.params;
  grads_ = bound.grads;
  acts_ = std::move(bound.acts);
  res_ = std::move(bound.res);
  work_ = std::move(bound.work);
  base_grads_ = std::move(bound.base_grads);
  lora_params_ = bound.lora_params;
  lora_grads_ = bound.lora_grads;
  nf4_ = std::move(bound.nf4);
  if (params_) w_ = table_.bind(params_);
  if (grads_) g_ = table_.bind(grads_);
  if (settings_.external_params) {  // views filled unit by unit by the provider
    w_.layers.assign(config_.num_hidden_layers, LayerWeights{});
    g_.layers.assign(config_.num_hidden_layers, LayerWeights{});
  } else {
    LT_CHECK(w_.embed && w_.final_norm && w_.lm_head);
  }
  if (settings_.lora.enabled)
    g_ = table_.bind([&](const std::string& n) -> float* {
      auto it = base_grads_.find(n);
      return it == base_grads_.end() ? nullptr : it->second;
    });
  if (lora_params_) be_.memset_zero(lora_params_, lora_table_.total_numel() * 4);
  build_slots();
  // The trainable set, in the order the optimizer walks it (with external parameters the
  // provider owns them and runs the update).
  if (settings_.train && !settings_.lora.enabled && !settings_.external_params) {
    for (const auto& p : table_.params())
      trainable_.push_back({p.name, params_ + p.offset, grads_ + p.offset, p.numel, p.decay});
  } else if (settings_.train && settings_.lora.enabled) {
    for (const auto& t : lora_table_.tensors())
      trainable_.push_back(
          {t.name, lora_params_ + t.offset, lora_grads_ + t.offset, t.numel, true});
    for (const auto& p : table_.params())
      if (auto it = base_grads_.find(p.name); it != base_grads_.end())
        trainable_.push_back({p.name, params_ + p.offset, it->second, p.numel, p.decay});
  }
}

void LlamaModel::build_slots() {
  slots_.assign(config_.num_hidden_layers, {});
  // External parameters: a layer's slots are built when its views are acquired.
  if (!settings_.external_params)
    for (int64_t l = 0; l < config_.num_hidden_layers; ++l) build_layer_slots(l);
}

void LlamaModel::build_layer_slots(int64_t l) {
  const LayerWeights& w = w_.layers[l];
  const LayerWeights* g = g_.layers.empty() ? nullptr : &g_.layers[l];
  for (int p = 0; p < kNumProj; ++p) {
    LinearSlot& s = slots_[l][p];
    s = LinearSlot{};
    s.proj = Proj(p);
    std::tie(s.in, s.out) = proj_shape(config_, s.proj);
    auto pick = [&](const LayerWeights& x) -> std::pair<float*, float*> {
      switch (s.proj) {
        case Proj::kQ: return {x.attn_q, x.attn_q_bias};
        case Proj::kK: return {x.attn_k, x.attn_k_bias};
        case Proj::kV: return {x.attn_v, x.attn_v_bias};
        case Proj::kO: return {x.attn_o, x.attn_o_bias};
        case Proj::kGate: return {x.ffn_gate, x.ffn_gate_bias};
        case Proj::kUp: return {x.ffn_up, x.ffn_up_bias};
        case Proj::kDown: return {x.ffn_down, x.ffn_down_bias};
      }
      return {nullptr, nullptr};
    };
    std::tie(s.weight, s.bias) = pick(w);
    if (g) std::tie(s.grad_weight, s.grad_bias) = pick(*g);
    if (!s.weight) {
      const std::string name = fmt::format("model.layers.{}.{}.weight", l, proj_module(s.proj));
      for (size_t i = 0; i < nf4_.size(); ++i)
        if (nf4_[i].name == name) s.nf4 = static_cast<int64_t>(i);
      LT_CHECK(s.nf4 >= 0, "no weight for {}", name);
    }
    const int64_t ia = lora_table_.find(l, s.proj, false), ib = lora_table_.find(l, s.proj, true);
    if (ia >= 0) {
      s.lora_a = lora_params_ + lora_table_.tensors()[ia].offset;
      s.lora_b = lora_params_ + lora_table_.tensors()[ib].offset;
      if (lora_grads_) {
        s.grad_a = lora_grads_ + lora_table_.tensors()[ia].offset;
        s.grad_b = lora_grads_ + lora_table_.tensors()[ib].offset;
      }
    }
  }
}

void LlamaModel::zero_grads() {
  for (const auto& t : trainable_) be_.memset_zero(t.grad, size_t(t.numel) * 4);
}

void LlamaModel::quantize_base_weight(size_t i, const float* w) {
  LT_CHECK(i < nf4_.size());
  Nf4Weight& q = nf4_[i];
  const Nf4Layout lay = nf4_layout(q.numel);
  std::vector<uint8_t> host(lay.bytes);
  nf4_quantize(host.data(), host.data() + lay.absmax_q,
               reinterpret_cast<float*>(host.data() + lay.absmax_scale), &q.absmax_offset, w,
               q.numel);
  be_.copy_to_device(q.packed, host.data(), lay.bytes);
}

const float* LlamaModel::base_weight(const LinearSlot& s) {
  if (s.weight) return s.weight;
  const Nf4Weight& q = nf4_[s.nf4];
  be_.nf4_dequantize(work_->nf4_weight, q.packed, q.absmax_q, q.absmax_scale, q.absmax_offset,
                     q.numel);
  return work_->nf4_weight;
}

LoraCall LlamaModel::lora_call(int64_t l, Proj p, int64_t row0) const {
  LoraCall c;
  c.R = settings_.lora.r;
  c.scale = settings_.lora.scale();
  c.dropout = dropout_on_ ? static_cast<float>(settings_.lora.dropout) : 0.0f;
  // One mask key per (seed, micro-batch, layer, projection); rows and columns index inside it.
  c.seed = settings_.lora.seed * 0x9E3779B97F4A7C15ull ^
           (micro_batches_done_ << 20 | uint64_t(l) << 4 | uint64_t(p));
  c.row0 = row0;
  return c;
}

void LlamaModel::project(float* out, const float* inp, const LinearSlot& s, int64_t n, int64_t l,
                         int64_t row0) {
  be_.linear_forward(out, inp, base_weight(s), s.bias, n, s.in, s.out);
  if (s.lora_a)
    be_.lora_forward(out, work_->lora_t, work_->lora_xd, inp, s.lora_a, s.lora_b, n, s.in, s.out,
                     lora_call(l, s.proj, row0));
}

void LlamaModel::project_backward(float* dinp, const LinearSlot& s, const float* dout,
                                  const float* inp, int64_t n, int64_t l, int64_t row0,
                                  Accumulate acc) {
  be_.linear_backward(dinp, s.grad_weight, s.grad_bias, dout, inp, base_weight(s), n, s.in, s.out,
                      acc);
  if (s.lora_a) {
    Work& k = *work_;
    be_.lora_backward(dinp, s.grad_a, s.grad_b, k.lora_t, k.lora_u, k.lora_xd, k.lora_dxd, dout,
                      inp, s.lora_a, s.lora_b, n, s.in, s.out, lora_call(l, s.proj, row0));
  }
}

LlamaModel::~LlamaModel() = default;

void LlamaModel::plan(const ModelConfig& config, const RunSettings& settings, MemoryPlan* plan) {
  PlanBinder planner(plan);
  Bound sizes;
  declare_buffers(config, settings, planner, &sizes);
}

LlamaModel::LayerActs& LlamaModel::acts_for(int64_t l) {
  return *acts_[acts_.size() == 1 ? 0 : l];
}

void LlamaModel::dump(const std::string& name, const float* data, size_t n) const {
  if (dump_) dump_(dump_user_, name, data, n);
}

void LlamaModel::acquire(int64_t unit, LayerWeightsProvider::Pass pass) {
  LT_CHECK(provider_ || !settings_.external_params, "external parameters without a provider");
  if (!provider_) return;
  const bool backward = pass == LayerWeightsProvider::Pass::kBackward;
  provider_->acquire(unit, pass, &w_, backward ? &g_ : nullptr);
  if (unit != LayerWeightsProvider::kOuter) build_layer_slots(unit);  // projections read slots_
}

void LlamaModel::release(int64_t unit, LayerWeightsProvider::Pass pass) {
  if (provider_) provider_->release(unit, pass);
}

void LlamaModel::offload_release(int64_t l) {
  auto it = arenas_.find("offload");
  if (it == arenas_.end() || !settings_.train) return;
  it->second.release(res(l), size_t(n_) * config_.hidden_size * 4);
}

void LlamaModel::offload_prefetch(int64_t l) {
  auto it = arenas_.find("offload");
  if (it == arenas_.end() || !settings_.train) return;
  it->second.prefetch(res(l), size_t(n_) * config_.hidden_size * 4);
}

void LlamaModel::prepare(const MicroBatch& mb) {
  n_ = mb.num_tokens();
  LT_CHECK(n_ > 0 && n_ <= settings_.max_tokens, "micro-batch of {} tokens, planned for {}", n_,
           settings_.max_tokens);
  LT_CHECK(mb.pos.size() == size_t(n_) && mb.docs.size() == size_t(n_) &&
           mb.targets.size() == size_t(n_) && mb.row_start.size() >= 2);
  Work& w = *work_;
  be_.copy_to_device(w.ids, mb.ids.data(), n_ * 4);
  be_.copy_to_device(w.pos, mb.pos.data(), n_ * 4);
  be_.copy_to_device(w.docs, mb.docs.data(), n_ * 4);
  be_.copy_to_device(w.targets, mb.targets.data(), n_ * 4);
  // RoPE tables row by row: "dynamic" scaling depends on each row's longest position.
  const int64_t HD = config_.head_dim, half = HD / 2;
  for (size_t r = 0; r + 1 < mb.row_start.size(); ++r) {
    const int64_t a = mb.row_start[r], n = mb.row_start[r + 1] - a;
    if (n == 0) continue;
    const int32_t max_pos = *std::max_element(mb.pos.begin() + a, mb.pos.begin() + a + n);
    const RopeParams rp = compute_rope_params(config_, max_pos + 1);
    be_.copy_to_device(w.inv_freq, rp.inv_freq.data(), half * 4);
    be_.rope_tables(w.rope_cos + a * half, w.rope_sin + a * half, w.pos + a, w.inv_freq,
                    rp.attention_scaling, n, HD);
  }
}

void LlamaModel::layer_forward(int64_t l, LayerActs& a, Pass pass) {
  const ModelConfig& c = config_;
  const LayerWeights& w = w_.layers[l];
  const auto& sl = slots_[l];
  auto slot = [&](Proj p) -> const LinearSlot& { return sl[static_cast<int>(p)]; };
  Work& k = *work_;
  const int64_t N = n_, D = c.hidden_size, F = c.intermediate_size, H = c.num_attention_heads;
  const int64_t KVH = c.num_key_value_heads, HD = c.head_dim, QD = H * HD;
  const float* x = res(l);
  float* x_out = res(l + 1);

  be_.rmsnorm_forward(a.attn_in, a.attn_rstd, x, w.attn_norm, N, D, c.rms_norm_eps);
  project(a.q, a.attn_in, slot(Proj::kQ), N, l, 0);
  project(a.k, a.attn_in, slot(Proj::kK), N, l, 0);
  project(a.v, a.attn_in, slot(Proj::kV), N, l, 0);
  be_.rope_forward(a.q, a.q, k.rope_cos, k.rope_sin, N, H, HD);
  be_.rope_forward(a.k, a.k, k.rope_cos, k.rope_sin, N, KVH, HD);
  AttentionShape s{1, N, H, KVH, HD, c.layer_window(l), k.docs, 1.0f / std::sqrt(float(HD))};
  if (settings_.flash_attention)
    be_.attention_forward(a.attn_out, a.lse, a.q, a.k, a.v, s);
  else
    attention_forward_naive(a.attn_out, a.lse, a.q, a.k, a.v, s);
  project(a.x_mid, a.attn_out, slot(Proj::kO), N, l, 0);
  be_.add_inplace(a.x_mid, x, N * D);
  be_.rmsnorm_forward(a.ffn_in, a.ffn_rstd, a.x_mid, w.ffn_norm, N, D, c.rms_norm_eps);
  if (pass == Pass::kForward) {
    dump(fmt::format("layer{}.attn_out", l), a.attn_out, N * QD);
    dump(fmt::format("layer{}.x_mid", l), a.x_mid, N * D);
  }

  if (a.gate) {  // whole-sequence MLP; gate and up are kept for backward
    project(a.gate, a.ffn_in, slot(Proj::kGate), N, l, 0);
    project(a.up, a.ffn_in, slot(Proj::kUp), N, l, 0);
    if (pass == Pass::kRecompute) return;
    be_.swiglu_forward(k.h_c, a.gate, a.up, N * F);
    project(x_out, k.h_c, slot(Proj::kDown), N, l, 0);
  } else {  // mini-sequence MLP: chunk by chunk, nothing of size N*F is kept
    if (pass == Pass::kRecompute) return;
    for (int64_t r0 = 0; r0 < N; r0 += k.mlp_chunk) {
      const int64_t n = std::min(k.mlp_chunk, N - r0);
      project(k.gate_c, a.ffn_in + r0 * D, slot(Proj::kGate), n, l, r0);
      project(k.up_c, a.ffn_in + r0 * D, slot(Proj::kUp), n, l, r0);
      be_.swiglu_forward(k.h_c, k.gate_c, k.up_c, n * F);
      project(x_out + r0 * D, k.h_c, slot(Proj::kDown), n, l, r0);
    }
  }
  be_.add_inplace(x_out, a.x_mid, N * D);
  dump(fmt::format("layer{}.out", l), x_out, N * D);
}

void LlamaModel::layer_backward(int64_t l, LayerActs& a, float* dres) {
  const ModelConfig& c = config_;
  const LayerWeights& w = w_.layers[l];
  const LayerWeights& g = g_.layers[l];
  const auto& sl = slots_[l];
  auto slot = [&](Proj p) -> const LinearSlot& { return sl[static_cast<int>(p)]; };
  Work& k = *work_;
  const int64_t N = n_, D = c.hidden_size, F = c.intermediate_size, H = c.num_attention_heads;
  const int64_t KVH = c.num_key_value_heads, HD = c.head_dim;

  // MLP: dres is dL/d(x_out); its MLP share flows back to ffn_in (k.dnorm).
  for (int64_t r0 = 0; r0 < N; r0 += k.mlp_chunk) {
    const int64_t n = std::min(k.mlp_chunk, N - r0);
    const float* ffn_in = a.ffn_in + r0 * D;
    const float* gate = a.gate ? a.gate + r0 * F : k.gate_c;
    const float* up = a.up ? a.up + r0 * F : k.up_c;
    if (!a.gate) {  // recompute this chunk's gate and up
      project(k.gate_c, ffn_in, slot(Proj::kGate), n, l, r0);
      project(k.up_c, ffn_in, slot(Proj::kUp), n, l, r0);
    }
    be_.swiglu_forward(k.h_c, gate, up, n * F);
    project_backward(k.dh_c, slot(Proj::kDown), dres + r0 * D, k.h_c, n, l, r0, Accumulate::kNo);
    be_.swiglu_backward(k.dgate_c, k.dup_c, k.dh_c, gate, up, n * F);
    project_backward(k.dnorm + r0 * D, slot(Proj::kGate), k.dgate_c, ffn_in, n, l, r0,
                     Accumulate::kNo);
    project_backward(k.dnorm + r0 * D, slot(Proj::kUp), k.dup_c, ffn_in, n, l, r0,
                     Accumulate::kYes);
  }
  // dres += d(ffn_in)/d(x_mid): dres becomes dL/d(x_mid).
  be_.rmsnorm_backward(dres, g.ffn_norm, k.dnorm, a.x_mid, w.ffn_norm, a.ffn_rstd, N, D,
                       Accumulate::kYes);

  // Attention.
  project_backward(k.dattn, slot(Proj::kO), dres, a.attn_out, N, l, 0, Accumulate::kNo);
  AttentionShape s{1, N, H, KVH, HD, c.layer_window(l), k.docs, 1.0f / std::sqrt(float(HD))};
  if (settings_.flash_attention)
    be_.attention_backward(k.dq, k.dk, k.dv, k.dattn, a.attn_out, a.lse, a.q, a.k, a.v, s);
  else
    attention_backward_naive(k.dq, k.dk, k.dv, k.dattn, a.attn_out, a.lse, a.q, a.k, a.v, s);
  be_.rope_backward(k.dq, k.dq, k.rope_cos, k.rope_sin, N, H, HD);
  be_.rope_backward(k.dk, k.dk, k.rope_cos, k.rope_sin, N, KVH, HD);
  project_backward(k.dnorm, slot(Proj::kQ), k.dq, a.attn_in, N, l, 0, Accumulate::kNo);
  project_backward(k.dnorm, slot(Proj::kK), k.dk, a.attn_in, N, l, 0, Accumulate::kYes);
  project_backward(k.dnorm, slot(Proj::kV), k.dv, a.attn_in, N, l, 0, Accumulate::kYes);
  // dres += d(attn_in)/d(x): dres becomes dL/d(x), the gradient at this layer's input.
  be_.rmsnorm_backward(dres, g.attn_norm, k.dnorm, res(l), w.attn_norm, a.attn_rstd, N, D,
                       Accumulate::kYes);
}

void LlamaModel::forward_layers() {
  const int64_t N = n_, D = config_.hidden_size;
  Work& k = *work_;
  be_.embedding_forward(res(0), k.ids, w_.embed, N, D);
  dump("embed", res(0), N * D);
  for (int64_t l = 0; l < config_.num_hidden_layers; ++l) {
    acquire(l, LayerWeightsProvider::Pass::kForward);
    layer_forward(l, acts_for(l), Pass::kForward);
    release(l, LayerWeightsProvider::Pass::kForward);
    offload_release(l);  // res(l) is not needed again until layer l's backward
  }
  be_.rmsnorm_forward(k.final_in, k.final_rstd, res(config_.num_hidden_layers), w_.final_norm, N,
                      D, config_.rms_norm_eps);
  dump("final_norm", k.final_in, N * D);
}

double LlamaModel::forward_backward(const MicroBatch& mb, float grad_scale) {
  LT_CHECK(settings_.train, "forward_backward on a model planned without training buffers");
  using PP = LayerWeightsProvider::Pass;
  acquire(LayerWeightsProvider::kOuter, PP::kBackward);
  prepare(mb);
  ++micro_batches_done_;
  dropout_on_ = true;  // PEFT applies lora_dropout in train mode only
  forward_layers();
  const int64_t N = n_, D = config_.hidden_size, V = config_.vocab_size;
  const int64_t L = config_.num_hidden_layers;
  Work& k = *work_;
  // Fused LM head + loss: dL/d(final_in) into dnorm, LM-head gradient accumulated.
  const double loss = be_.lm_head_cross_entropy(k.dnorm, g_.lm_head, k.final_in, w_.lm_head,
                                                k.targets, N, D, V, k.lm_chunk, grad_scale,
                                                k.lm_scratch);
  be_.rmsnorm_backward(k.dres, g_.final_norm, k.dnorm, res(L), w_.final_norm, k.final_rstd, N, D,
                       Accumulate::kNo);
  for (int64_t l = L - 1; l >= 0; --l) {
    LayerActs& a = acts_for(l);
    if (l > 0) offload_prefetch(l - 1);  // the next layer's checkpoint, read ahead
    acquire(l, PP::kBackward);
    if (settings_.checkpointing) layer_forward(l, a, Pass::kRecompute);
    layer_backward(l, a, k.dres);
    release(l, PP::kBackward);
    offload_release(l + 1);
  }
  if (g_.embed) be_.embedding_backward(g_.embed, k.dres, k.ids, N, D);
  dropout_on_ = false;
  release(LayerWeightsProvider::kOuter, PP::kBackward);
  return loss;
}

double LlamaModel::forward_loss(const MicroBatch& mb) {
  acquire(LayerWeightsProvider::kOuter, LayerWeightsProvider::Pass::kForward);
  prepare(mb);
  forward_layers();
  Work& k = *work_;
  const double loss = be_.lm_head_cross_entropy(nullptr, nullptr, k.final_in, w_.lm_head,
                                                k.targets, n_, config_.hidden_size,
                                                config_.vocab_size, k.lm_chunk, 0.0f, k.lm_scratch);
  release(LayerWeightsProvider::kOuter, LayerWeightsProvider::Pass::kForward);
  return loss;
}

void LlamaModel::forward_logits(const MicroBatch& mb, float* logits) {
  acquire(LayerWeightsProvider::kOuter, LayerWeightsProvider::Pass::kForward);
  prepare(mb);
  forward_layers();
  be_.linear_forward(logits, work_->final_in, w_.lm_head, nullptr, n_, config_.hidden_size,
                     config_.vocab_size);
  release(LayerWeightsProvider::kOuter, LayerWeightsProvider::Pass::kForward);
}

}  // namespace lt
