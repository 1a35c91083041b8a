// Llama-family decoder: buffers, forward and backward (see llama.h for the contract).
#include "model/llama.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>

#include "backend/arena.h"
#include "core/check.h"
#include "core/dtype.h"
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
  // Plain path: q (N,H,HD) and k, v (N,KVH,HD) after RoPE, lse (H,N). Sequence path: the
  // sequence store in head layout, the whole padded sequence of S = N*P tokens for H/P heads:
  // q (S,H/P,HD), k and v (S,KVH/P,HD), o_heads (S,H/P,HD), lse (chunks,H/P,chunk); in pinned
  // host memory with FPDT.
  float* q;
  float* k;
  float* v;
  float* o_heads;   // sequence path only
  float* attn_out;  // (N,H*HD) attention output before o_proj (this rank's tokens)
  float* lse;
  float* x_mid;     // (N,D) residual after attention
  float* ffn_in;    // (N,D) post_attention_layernorm output
  float* ffn_rstd;  // (N)
  float* gate;      // (N,F) only when the MLP is not chunked, else null
  float* up;        // (N,F) only when the MLP is not chunked, else null
};

// One micro-batch in flight: its tokens and the stage's layer inputs.
struct LlamaModel::Slot {
  int32_t *ids, *pos, *docs, *targets;  // (N)
  int32_t* seq_docs;                    // (N*P) sequence path: doc ids of the whole sequence
  float *rope_cos, *rope_sin;           // (N, HD/2)
  // The residual stream at the layer inputs: (stage layers + 1) f32 buffers. Staged (checkpoint
  // offload or bf16 checkpoints): `store` keeps each layer input (stage layers of them, f32 or
  // bf16, in host memory with offload) and the layers run on f32 staging buffers. f32
  // checkpoints: two, one being computed while the other's checkpoint goes out (forward) or
  // comes in (backward). bf16 checkpoints: one, each layer writing its output over its input
  // (its checkpoint is rounded out of it first); bf16 checkpoints offloaded from a device travel
  // through one device bf16 buffer.
  std::vector<float*> res;
  std::vector<void*> store;
  float* stage[2] = {nullptr, nullptr};  // stage[1] null: one staging buffer
  uint16_t* bstage = nullptr;
  std::vector<std::unique_ptr<LayerActs>> acts;  // (stage layers) when nothing is recomputed
  // Selective recomputation: each layer's attention output (N, QD) and lse (H, N) from the
  // forward (stage layers of each), which the shared activations point at for that layer.
  std::vector<float*> kept_out, kept_lse;
  int64_t n = 0;          // tokens here
  int64_t chunks = 1;     // sequence path: attention chunks of the whole sequence
  int64_t row0 = 0;       // LoRA dropout: first token's index in the whole sequence
  uint64_t key = 0;       // LoRA dropout: the micro-batch's ordinal
  bool training = false;  // the forward was a training pass (a backward may follow)
};

// Working buffers shared by all layers and slots.
struct LlamaModel::Work {
  float* inv_freq;                // (HD/2)
  float *final_in, *final_rstd;   // (N,D), (N)
  float *gate_c, *up_c, *h_c;     // (C,F) MLP chunk (gate_c/up_c null when not chunked)
  float *dh_c, *dgate_c, *dup_c;  // (C,F) MLP chunk gradients
  float* lm_scratch;              // (C_lm, V) logits of one LM-head chunk
  float* head_expand;             // bf16 LM head: (head_expand_rows, D) widened rows
  int64_t head_expand_rows = 0;
  float *dres, *dnorm, *dattn, *dq, *dk, *dv;  // (N,D) (N,D) (N,H*HD) (N,H*HD) (N,KVH*HD) x2
  // dattn and dq (null) live in the layer's ffn_in and x_mid, dead once its MLP backward is done
  // (layer_backward; the plain and Ulysses paths, not FPDT's chunks), when H*HD <= D.
  bool attn_grads_in_acts = false;
  float* base_weight;         // packed base: one expanded (OUT,IN) weight
  float *lora_t, *lora_u;     // (N,R) LoRA intermediates
  float *lora_xd, *lora_dxd;  // dropped-out input and its gradient:
  size_t lora_xd_numel = 0;   // rows x IN of the widest projection
  int64_t mlp_chunk = 0, lm_chunk = 0;
};

// Sequence path working buffers (device unless noted). c = this rank's tokens of one chunk (all
// of them with Ulysses), Ce = c x P the chunk's tokens, W = H/P x HD, KW = KVH/P x HD.
struct LlamaModel::SeqWork {
  int64_t c = 0;        // most local tokens per chunk
  bool fpdt = false;    // FPDT: whole layers chunk by chunk, the store in pinned host memory
  float* pack;          // (c, H*HD) all-to-all send buffer
  float *ql, *kl, *vl;  // FPDT: (c, H*HD), (c, KVH*HD) x2: one chunk's projections
  // FPDT, one chunk of the layer's per-token tensors: (c,D) (c) (c,H*HD) (c,D) (c,D) (c).
  float *attn_in, *attn_rstd, *attn_out, *x_mid, *ffn_in, *ffn_rstd;
  float *q_c, *k_c, *v_c, *o_c, *lse_c;  // the current chunk in head layout; lse (H/P, Ce)
  float *k_s[2], *v_s[2];                // K/V of earlier chunks, double-buffered
  float *o_b, *lse_b;                    // one block's partial result (merged into o_c, lse_c)
  // FPDT backward: query-chunk sets (double-buffered), one block's gradients, dk / dv of the
  // key chunk in hand, this rank's tokens' gradients of one chunk.
  float *q_s[2], *o_s[2], *lse_s[2], *do_s[2], *dq_s[2];
  float *dq_b, *dk_b, *dv_b, *dk_acc, *dv_acc;
  float *dattn, *dnorm, *dq_l, *dk_l, *dv_l;  // (c,H*HD) (c,D) (c,H*HD) (c,KVH*HD) x2
  float *do_store, *dq_store;                 // host: dL/d(out) and dq of every chunk (S, W)
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

// The layer range [begin, end) of a stage.
std::pair<int64_t, int64_t> stage_range(const ModelConfig& c, const RunSettings& s) {
  const int64_t e = s.layer_end < 0 ? c.num_hidden_layers : s.layer_end;
  LT_CHECK(s.layer_begin >= 0 && s.layer_begin < e && e <= c.num_hidden_layers,
           "stage layers [{}, {}) of {}", s.layer_begin, e, c.num_hidden_layers);
  return {s.layer_begin, e};
}

ParamTable make_table(const ModelConfig& c, const RunSettings& s) {
  const bool packed =
      s.lora.enabled && (s.lora.quantize_4bit || s.lora.base_bf16 || s.lora.embed_bf16);
  if (!packed && s.layer_begin == 0 && s.layer_end < 0) return ParamTable(c);
  return ParamTable(c, [&](const std::string& n) {
    return LlamaModel::in_stage(c, s, n) && !LlamaModel::is_packed(s.lora, n);
  });
}

LoraTable make_lora_table(const ModelConfig& c, const RunSettings& s) {
  const auto [l0, l1] = stage_range(c, s);
  return LoraTable(c, s.lora, l0, l1);
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

namespace {
bool is_projection(const std::string& name) {
  for (int p = 0; p < kNumProj; ++p)
    if (name.size() > 7 && name.ends_with(std::string(proj_name(Proj(p))) + ".weight")) return true;
  return false;
}
}  // namespace

bool LlamaModel::is_packed(const LoraSpec& s, const std::string& name) {
  if (!s.enabled) return false;
  if (s.embed_bf16 &&
      (name == "lm_head.weight" || (name == "model.embed_tokens.weight" && !base_trains(s, name))))
    return true;  // a tied LM head is the embedding: packed when it is frozen
  return (s.quantize_4bit || s.base_bf16) && is_projection(name);
}

PackedFormat LlamaModel::packed_format(const LoraSpec& s, const std::string& name) {
  return s.quantize_4bit && is_projection(name) ? PackedFormat::kNf4 : PackedFormat::kBf16;
}

bool LlamaModel::in_stage(const ModelConfig& c, const RunSettings& s, const std::string& name) {
  const auto [l0, l1] = stage_range(c, s);
  const bool first = l0 == 0, last = l1 == c.num_hidden_layers;
  if (name == "model.embed_tokens.weight") return first || (last && c.tie_word_embeddings);
  if (name == "model.norm.weight" || name == "lm_head.weight") return last;
  if (name.rfind("model.layers.", 0) == 0) {
    const int64_t l = std::strtoll(name.c_str() + 13, nullptr, 10);
    return l >= l0 && l < l1;
  }
  return true;
}

bool LlamaModel::base_trains(const LoraSpec& s, const std::string& name) {
  if (!s.enabled) return true;
  if (s.train_embed && name == "model.embed_tokens.weight") return true;
  return s.train_norm && (name.ends_with("layernorm.weight") || name == "model.norm.weight");
}

ParamTable LlamaModel::param_table(const ModelConfig& config, const RunSettings& settings) {
  return make_table(config, settings);
}

std::vector<TrainableTensor> LlamaModel::trainable_layout(const ModelConfig& config,
                                                          const RunSettings& settings) {
  std::vector<TrainableTensor> out;
  if (!settings.train || settings.external_params) return out;
  const ParamTable table = make_table(config, settings);
  if (!settings.lora.enabled) {
    for (const auto& p : table.params())
      out.push_back({p.name, nullptr, nullptr, p.numel, p.decay});
    return out;
  }
  const LoraTable lora = make_lora_table(config, settings);
  for (const auto& t : lora.tensors()) out.push_back({t.name, nullptr, nullptr, t.numel, true});
  for (const auto& p : table.params())
    if (base_trains(settings.lora, p.name))
      out.push_back({p.name, nullptr, nullptr, p.numel, p.decay});
  return out;
}

int64_t LlamaModel::trainable_numel(const ModelConfig& config, const RunSettings& settings) {
  RunSettings s = settings;
  s.external_params = false;
  int64_t total = 0;  // each tensor 64-byte aligned, as AdamW lays out its moments
  for (const auto& t : trainable_layout(config, s))
    total += int64_t(align_up(size_t(t.numel) * 4) / 4);
  return total;
}

void LlamaModel::declare_buffers(const ModelConfig& c, const RunSettings& s, BufferBinder& b,
                                 Bound* out) {
  const auto [l0, l1] = stage_range(c, s);
  const size_t NL = size_t(l1 - l0);
  const size_t N = s.max_tokens, D = c.hidden_size, F = c.intermediate_size, V = c.vocab_size;
  const size_t H = c.num_attention_heads, HD = c.head_dim, QD = H * HD;
  const size_t KVD = c.num_key_value_heads * HD;
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
    const LoraTable lt = make_lora_table(c, s);
    out->lora_params = b.take("lora.params", lt.total_numel(), MemCategory::kWeights, "lora");
    if (s.train)
      out->lora_grads = b.take("lora.grads", lt.total_numel(), MemCategory::kGradients, "lora");
    // QLoRA: the seven projection weights of every layer in NF4 (about 0.53 bytes per value);
    // LoRA with --bf16 True: in bf16 (2 bytes per value); with --bf16 True the frozen
    // embedding and LM head in bf16 too.
    out->packed.clear();
    const ParamTable full(c);
    for (const auto& p : full.params()) {
      if (!is_packed(s.lora, p.name) || !in_stage(c, s, p.name)) continue;
      PackedWeight w;
      w.name = p.name;
      w.numel = p.numel;
      w.format = packed_format(s.lora, p.name);
      if (w.format == PackedFormat::kBf16) {
        w.packed = static_cast<uint8_t*>(b.take_bytes("bf16." + p.name, size_t(p.numel) * 2,
                                                      MemCategory::kWeights, "weights_packed"));
      } else {
        const Nf4Layout lay = nf4_layout(p.numel);
        auto* buf = static_cast<uint8_t*>(
            b.take_bytes("nf4." + p.name, lay.bytes, MemCategory::kWeights, "weights_packed"));
        if (buf) {
          w.packed = buf;
          w.absmax_q = buf + lay.absmax_q;
          w.absmax_scale = reinterpret_cast<float*>(buf + lay.absmax_scale);
        }
      }
      out->packed.push_back(std::move(w));
    }
  }

  // The sequence path keeps q/k/v/out in head layout over the whole sequence (N * P tokens for
  // H / P heads: the same element counts as this rank's N tokens for H heads); FPDT keeps them
  // in pinned host memory.
  const bool seq = s.sequence_path();
  const size_t SPD = size_t(s.sp_degree);
  const std::string store_arena = "activations";
  const bool fpdt = s.seq_chunk > 0;
  const bool keep = keeps_attention(s);
  auto declare_acts = [&](const std::string& p) {
    auto a = std::make_unique<LayerActs>();
    const std::string arena = "activations";
    if (fpdt) {  // FPDT: per-token tensors live per chunk in SeqWork; the store on the host
      const std::string h = "sequence_host";
      std::memset(static_cast<void*>(a.get()), 0, sizeof(LayerActs));
      a->q = b.take(p + "q", N * QD, MemCategory::kAttention, h);
      a->k = b.take(p + "k", N * KVD, MemCategory::kAttention, h);
      a->v = b.take(p + "v", N * KVD, MemCategory::kAttention, h);
      a->o_heads = b.take(p + "o_heads", N * QD, MemCategory::kAttention, h);
      a->lse = b.take(p + "lse", H * N, MemCategory::kAttention, h);
      a->attn_out = b.take(p + "attn_out", N * QD, MemCategory::kAttention, h);
      return a;
    }
    a->attn_in = b.take(p + "attn_in", N * D, MemCategory::kActivations, arena);
    a->attn_rstd = b.take(p + "attn_rstd", N, MemCategory::kActivations, arena);
    const std::string qa = seq ? store_arena : arena;
    a->q = b.take(p + "q", N * QD, MemCategory::kAttention, qa);
    a->k = b.take(p + "k", N * KVD, MemCategory::kAttention, qa);
    a->v = b.take(p + "v", N * KVD, MemCategory::kAttention, qa);
    a->o_heads = seq ? b.take(p + "o_heads", N * QD, MemCategory::kAttention, qa) : nullptr;
    // Selective recomputation: the shared activations borrow each layer's kept ones instead.
    a->attn_out = keep ? nullptr : b.take(p + "attn_out", N * QD, MemCategory::kAttention, arena);
    a->lse = keep ? nullptr : b.take(p + "lse", H * N, MemCategory::kAttention, qa);
    a->x_mid = b.take(p + "x_mid", N * D, MemCategory::kActivations, arena);
    a->ffn_in = b.take(p + "ffn_in", N * D, MemCategory::kActivations, arena);
    a->ffn_rstd = b.take(p + "ffn_rstd", N, MemCategory::kActivations, arena);
    a->gate = save_mlp ? b.take(p + "gate", N * F, MemCategory::kActivations, arena) : nullptr;
    a->up = save_mlp ? b.take(p + "up", N * F, MemCategory::kActivations, arena) : nullptr;
    return a;
  };

  // Slots: the tokens of each micro-batch in flight and the residual stream at every layer
  // input (with training: the checkpoints when layers are recomputed); without training two
  // buffers alternate.
  const size_t slots = s.train ? size_t(s.micro_slots) : 1;
  LT_CHECK(slots >= 1, "micro_slots {}", s.micro_slots);
  const bool offload = s.train && s.offload_checkpoints;
  const bool bf16_store = bf16_checkpoints(s);
  const bool staged = offload || bf16_store;
  const size_t num_res = s.train ? (staged ? 0 : NL + 1) : 2;
  const MemCategory res_cat =
      s.checkpointing ? MemCategory::kCheckpoints : MemCategory::kActivations;
  // Offloaded checkpoints are whole pages so that releasing one never touches its neighbour.
  const size_t store_bytes = N * D * (bf16_store ? 2 : 4);
  const size_t store_rounded =
      offload ? (store_bytes + kPageSize - 1) / kPageSize * kPageSize : store_bytes;
  const bool per_layer_acts = s.train && !s.checkpointing;
  out->slots.clear();
  for (size_t i = 0; i < slots; ++i) {
    auto sl = std::make_unique<Slot>();
    const std::string p = slots > 1 ? fmt::format("slot{}.", i) : "";
    auto ints = [&](const std::string& name, size_t n) {
      return reinterpret_cast<int32_t*>(b.take(p + name, n, MemCategory::kScratch, "scratch"));
    };
    sl->ids = ints("ids", N);
    sl->pos = ints("pos", N);
    sl->docs = ints("docs", N);
    sl->targets = ints("targets", N);
    sl->seq_docs = seq ? ints("seq_docs", N * SPD) : nullptr;
    sl->rope_cos = b.take(p + "rope_cos", N * HD / 2, MemCategory::kScratch, "scratch");
    sl->rope_sin = b.take(p + "rope_sin", N * HD / 2, MemCategory::kScratch, "scratch");
    for (size_t j = 0; j < num_res; ++j)
      sl->res.push_back(
          b.take(fmt::format("{}res.{}", p, size_t(l0) + j), N * D, res_cat, "activations"));
    for (size_t j = 0; staged && j < NL; ++j)
      sl->store.push_back(
          b.take_bytes(fmt::format("{}{}res.{}", p, bf16_store ? "bf16." : "", size_t(l0) + j),
                       store_rounded, res_cat, offload ? "offload" : "activations"));
    for (size_t j = 0; staged && j < (bf16_store && !fpdt ? 1u : 2u); ++j)
      sl->stage[j] = b.take(fmt::format("{}res_stage.{}", p, j), N * D, res_cat, "activations");
    if (offload && bf16_store)
      sl->bstage = static_cast<uint16_t*>(
          b.take_bytes(p + "bf16.res_stage", N * D * 2, res_cat, "activations"));
    if (per_layer_acts)
      for (size_t j = 0; j < NL; ++j)
        sl->acts.push_back(declare_acts(fmt::format("{}layer{}.", p, size_t(l0) + j)));
    for (size_t j = 0; keep && j < NL; ++j) {
      sl->kept_out.push_back(b.take(fmt::format("{}layer{}.attn_out", p, size_t(l0) + j), N * QD,
                                    MemCategory::kCheckpoints, "activations"));
      sl->kept_lse.push_back(b.take(fmt::format("{}layer{}.lse", p, size_t(l0) + j), H * N,
                                    MemCategory::kCheckpoints, "activations"));
    }
    out->slots.push_back(std::move(sl));
  }
  out->shared_acts = per_layer_acts ? nullptr : declare_acts("layer0.");

  auto w = std::make_unique<Work>();
  w->inv_freq = b.take("inv_freq", HD / 2, MemCategory::kScratch, "scratch");
  // The final norm and the LM head run on the last pipeline stage only. Its output lives in the
  // shared layer activations' attn_in where there are such (dead after the last layer's forward;
  // a backward's recompute rewrites them only after the loss has read final_in, and the loss
  // runs right after its micro-batch's forward: stage_loss_backward).
  const bool last = l1 == c.num_hidden_layers;
  const bool final_in_acts = !per_layer_acts && !fpdt;
  w->final_in = !last ? nullptr
                : final_in_acts
                    ? out->shared_acts->attn_in
                    : b.take("final_in", N * D, MemCategory::kActivations, "activations");
  w->final_rstd =
      last ? b.take("final_rstd", N, MemCategory::kActivations, "activations") : nullptr;
  // FPDT runs the MLP inside each sequence chunk: mini-sequence chunks no longer than that.
  const int64_t fpdt_rows = fpdt ? std::min<int64_t>(s.seq_chunk / s.sp_degree, int64_t(N)) : 0;
  const bool chunked_mlp = !save_mlp || fpdt;
  w->mlp_chunk = fpdt ? std::min(ceil_div(N, s.mlp_chunks), fpdt_rows) : ceil_div(N, s.mlp_chunks);
  w->lm_chunk =
      fpdt ? std::min(ceil_div(N, s.lm_head_chunks), fpdt_rows) : ceil_div(N, s.lm_head_chunks);
  const size_t C = w->mlp_chunk;
  w->gate_c =
      chunked_mlp ? b.take("mlp.gate_c", C * F, MemCategory::kMlpChunk, "scratch") : nullptr;
  w->up_c = chunked_mlp ? b.take("mlp.up_c", C * F, MemCategory::kMlpChunk, "scratch") : nullptr;
  w->h_c = b.take("mlp.h_c", C * F, MemCategory::kMlpChunk, "scratch");
  w->lm_scratch =
      last ? b.take("lm_head.logits", w->lm_chunk * V, MemCategory::kLmHeadChunk, "scratch")
           : nullptr;
  // A bf16 LM head is widened (where a backend widens) kHeadExpandRows vocabulary rows at a time.
  const bool head16 = last && is_packed(s.lora, c.tie_word_embeddings ? "model.embed_tokens.weight"
                                                                      : "lm_head.weight");
  w->head_expand_rows = head16 ? std::min<int64_t>(V, kHeadExpandRows) : 0;
  w->head_expand = head16 ? b.take("lm_head.expand", size_t(w->head_expand_rows) * D,
                                   MemCategory::kLmHeadChunk, "scratch")
                          : nullptr;
  w->dh_c = w->dgate_c = w->dup_c = w->dres = w->dnorm = nullptr;
  w->dattn = w->dq = w->dk = w->dv = nullptr;
  if (s.train) {
    w->dh_c = b.take("mlp.dh_c", C * F, MemCategory::kMlpChunk, "scratch");
    w->dgate_c = b.take("mlp.dgate_c", C * F, MemCategory::kMlpChunk, "scratch");
    w->dup_c = b.take("mlp.dup_c", C * F, MemCategory::kMlpChunk, "scratch");
    w->dres = b.take("grad.res", N * D, MemCategory::kScratch, "scratch");
    if (!fpdt) {  // FPDT keeps these per chunk (SeqWork)
      w->dnorm = b.take("grad.norm", N * D, MemCategory::kScratch, "scratch");
      w->attn_grads_in_acts = QD <= D;
      if (!w->attn_grads_in_acts) {
        w->dattn = b.take("grad.attn_out", N * QD, MemCategory::kAttention, "scratch");
        w->dq = b.take("grad.q", N * QD, MemCategory::kAttention, "scratch");
      }
      w->dk = b.take("grad.k", N * KVD, MemCategory::kAttention, "scratch");
      w->dv = b.take("grad.v", N * KVD, MemCategory::kAttention, "scratch");
    }
  }
  w->base_weight = w->lora_t = w->lora_u = w->lora_xd = w->lora_dxd = nullptr;
  if (s.lora.enabled && (s.lora.quantize_4bit || s.lora.base_bf16))
    w->base_weight = b.take("packed.expanded", std::max({QD * D, KVD * D, F * D}),
                            MemCategory::kScratch, "scratch");
  if (s.lora.enabled) {
    const size_t R = s.lora.r;
    w->lora_t = b.take("lora.t", N * R, MemCategory::kScratch, "scratch");
    w->lora_u = b.take("lora.u", N * R, MemCategory::kScratch, "scratch");
    if (s.lora.dropout > 0 && s.train) {
      // One row block of the widest projection input (the MLP's down projection: F).
      LT_CHECK(s.lora_dropout_rows >= 1, "lora_dropout_rows={}", s.lora_dropout_rows);
      const size_t rows = std::min(N, size_t(s.lora_dropout_rows));
      const size_t XD = rows * std::max({D, QD, F});
      w->lora_xd_numel = XD;
      w->lora_xd = b.take("lora.dropout_x", XD, MemCategory::kScratch, "scratch");
      w->lora_dxd = b.take("lora.dropout_dx", XD, MemCategory::kScratch, "scratch");
    }
  }
  out->work = std::move(w);

  out->seq = nullptr;
  if (!seq) return;
  auto q = std::make_unique<SeqWork>();
  std::memset(static_cast<void*>(q.get()), 0, sizeof(SeqWork));
  q->fpdt = fpdt;
  q->c = fpdt ? fpdt_rows : int64_t(N);
  const size_t cr = size_t(q->c), cq = cr * QD, ckv = cr * KVD, cl = cr * H;
  auto take = [&](const std::string& name, size_t n) {
    return b.take("seq." + name, n, MemCategory::kAttention, "scratch");
  };
  q->pack = take("alltoall", cq);
  if (!fpdt) {  // Ulysses: its exchanges run in place on the plain path's buffers
    out->seq = std::move(q);
    return;
  }
  q->ql = take("q_local", cq);
  q->kl = take("k_local", ckv);
  q->vl = take("v_local", ckv);
  // FPDT: everything of a layer one chunk at a time; two chunks of earlier K/V (and, in
  // backward, of the query-side tensors) so that the next one is read while this one runs.
  auto act = [&](const std::string& name, size_t n) {
    return b.take("seq." + name, n, MemCategory::kActivations, "scratch");
  };
  q->attn_in = act("attn_in", cr * D);
  q->attn_rstd = act("attn_rstd", cr);
  q->attn_out = act("attn_out", cq);
  q->x_mid = act("x_mid", cr * D);
  q->ffn_in = act("ffn_in", cr * D);
  q->ffn_rstd = act("ffn_rstd", cr);
  q->q_c = take("q_chunk", cq);
  q->k_c = take("k_chunk", ckv);
  q->v_c = take("v_chunk", ckv);
  q->o_c = take("out_chunk", cq);
  q->lse_c = take("lse_chunk", cl);
  for (int i = 0; i < 2; ++i) {
    const std::string n = std::to_string(i);
    q->k_s[i] = take("k_prefetch" + n, ckv);
    q->v_s[i] = take("v_prefetch" + n, ckv);
  }
  q->o_b = take("out_block", cq);
  q->lse_b = take("lse_block", cl);
  if (s.train) {
    for (int i = 0; i < 2; ++i) {
      const std::string n = std::to_string(i);
      q->q_s[i] = take("q_prefetch" + n, cq);
      q->o_s[i] = take("out_prefetch" + n, cq);
      q->lse_s[i] = take("lse_prefetch" + n, cl);
      q->do_s[i] = take("dout_prefetch" + n, cq);
      q->dq_s[i] = take("dq_prefetch" + n, cq);
    }
    q->dq_b = take("dq_block", cq);
    q->dk_b = take("dk_block", ckv);
    q->dv_b = take("dv_block", ckv);
    q->dk_acc = take("dk_chunk", ckv);
    q->dv_acc = take("dv_chunk", ckv);
    q->dattn = take("grad.attn_out", cq);
    q->dnorm = act("grad.norm", cr * D);
    q->dq_l = take("grad.q", cq);
    q->dk_l = take("grad.k", ckv);
    q->dv_l = take("grad.v", ckv);
    q->do_store = b.take("seq.dout_heads", N * QD, MemCategory::kAttention, "sequence_host");
    q->dq_store = b.take("seq.dq_heads", N * QD, MemCategory::kAttention, "sequence_host");
  }
  out->seq = std::move(q);
}

LlamaModel::LlamaModel(const ModelConfig& config, Backend& backend, const RunSettings& settings)
    : config_(config),
      be_(backend),
      settings_(settings),
      table_(make_table(config, settings)),
      lora_table_(make_lora_table(config, settings)) {
  LT_CHECK(settings_.max_tokens > 0 && settings_.mlp_chunks >= 1 && settings_.lm_head_chunks >= 1);
  LT_CHECK(!settings_.offload_checkpoints || settings_.checkpointing,
           "checkpoint offload needs checkpointing");
  if (settings_.keep_attention && settings_.train && settings_.checkpointing &&
      settings_.sequence_path())
    fail(
        "--recompute_granularity selective does not run with sequence parallelism or FPDT (their "
        "attention runs between all-to-alls); use full");
  std::tie(layer_begin_, layer_end_) = stage_range(config_, settings_);
  LT_CHECK(settings_.micro_slots >= 1 && settings_.sp_degree >= 1 && settings_.seq_chunk >= 0);
  if (settings_.sequence_path()) {
    const int64_t P = settings_.sp_degree;
    LT_CHECK(config_.num_attention_heads % P == 0 && config_.num_key_value_heads % P == 0,
             "sequence parallel degree {} must divide {} heads and {} kv heads", P,
             config_.num_attention_heads, config_.num_key_value_heads);
    LT_CHECK(settings_.seq_chunk % P == 0, "FPDT chunk {} is not a multiple of {}",
             settings_.seq_chunk, P);
    LT_CHECK(settings_.seq_chunk == 0 || settings_.flash_attention,
             "FPDT chunks need flash attention");
  }
  if (!settings_.flash_attention && !be_.host_addressable())
    fail(
        "--use_flash_attn False runs the plain attention, the CPU specification; --device {} "
        "needs flash attention",
        be_.name());
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
    arenas_.emplace(name, make_backend_arena(be_, name, bytes, settings_.offload_dir));
  }
  if (auto it = arenas_.find("offload"); it != arenas_.end()) offload_arena_ = &it->second;
  ArenaBinder binder(&arenas_);
  Bound bound;
  declare_buffers(config_, settings_, binder, &bound);
  params_ = bound.params;
  grads_ = bound.grads;
  slots_ = std::move(bound.slots);
  shared_acts_ = std::move(bound.shared_acts);
  work_ = std::move(bound.work);
  seq_ = std::move(bound.seq);
  base_grads_ = std::move(bound.base_grads);
  lora_params_ = bound.lora_params;
  lora_grads_ = bound.lora_grads;
  packed_ = std::move(bound.packed);
  if (params_) w_ = table_.bind(params_);
  for (const PackedWeight& p : packed_) {  // bf16 embedding / LM head
    const auto* v = reinterpret_cast<const uint16_t*>(p.packed);
    if (p.name == "model.embed_tokens.weight") embed16_ = v;
    if (p.name == "lm_head.weight") head16_ = v;
  }
  if (config_.tie_word_embeddings && embed16_ && last_stage()) head16_ = embed16_;
  if (grads_) g_ = table_.bind(grads_);
  if (settings_.external_params) {  // views filled unit by unit by the provider
    w_.layers.assign(config_.num_hidden_layers, LayerWeights{});
    g_.layers.assign(config_.num_hidden_layers, LayerWeights{});
  } else {
    LT_CHECK((!first_stage() || w_.embed || embed16_) &&
             (!last_stage() || (w_.final_norm && (w_.lm_head || head16_))));
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
  trainable_ = trainable_layout(config_, settings_);
  for (auto& t : trainable_) {
    if (settings_.lora.enabled) {
      const int64_t i = lora_table_.index(t.name);
      if (i >= 0) {
        t.param = lora_params_ + lora_table_.tensors()[i].offset;
        t.grad = lora_grads_ + lora_table_.tensors()[i].offset;
        continue;
      }
      t.grad = base_grads_.at(t.name);
    }
    const ParamInfo* p = table_.find(t.name);
    LT_CHECK(p, "trainable tensor {} not in the table", t.name);
    t.param = params_ + p->offset;
    if (!settings_.lora.enabled) t.grad = grads_ + p->offset;
  }
}

void LlamaModel::build_slots() {
  lin_.assign(config_.num_hidden_layers, {});
  // External parameters: a layer's slots are built when its views are acquired.
  if (!settings_.external_params)
    for (int64_t l = layer_begin_; l < layer_end_; ++l) build_layer_slots(l);
}

void LlamaModel::build_layer_slots(int64_t l) {
  const LayerWeights& w = w_.layers[l];
  const LayerWeights* g = g_.layers.empty() ? nullptr : &g_.layers[l];
  for (int p = 0; p < kNumProj; ++p) {
    LinearSlot& s = lin_[l][p];
    s = LinearSlot{};
    s.proj = Proj(p);
    std::tie(s.in, s.out) = proj_shape(config_, s.proj);
    auto pick = [&](const LayerWeights& x) -> std::pair<float*, float*> {
      switch (s.proj) {
        case Proj::kQ:
          return {x.attn_q, x.attn_q_bias};
        case Proj::kK:
          return {x.attn_k, x.attn_k_bias};
        case Proj::kV:
          return {x.attn_v, x.attn_v_bias};
        case Proj::kO:
          return {x.attn_o, x.attn_o_bias};
        case Proj::kGate:
          return {x.ffn_gate, x.ffn_gate_bias};
        case Proj::kUp:
          return {x.ffn_up, x.ffn_up_bias};
        case Proj::kDown:
          return {x.ffn_down, x.ffn_down_bias};
      }
      return {nullptr, nullptr};
    };
    std::tie(s.weight, s.bias) = pick(w);
    if (g) std::tie(s.grad_weight, s.grad_bias) = pick(*g);
    if (!s.weight) {
      const std::string name = fmt::format("model.layers.{}.{}.weight", l, proj_module(s.proj));
      for (size_t i = 0; i < packed_.size(); ++i)
        if (packed_[i].name == name) s.packed = static_cast<int64_t>(i);
      LT_CHECK(s.packed >= 0, "no weight for {}", name);
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

void LlamaModel::pack_base_weight(size_t i, const float* w) {
  LT_CHECK(i < packed_.size());
  PackedWeight& q = packed_[i];
  if (q.format == PackedFormat::kBf16) {
    std::vector<uint16_t> host(q.numel);
#pragma omp parallel for simd schedule(static) if (q.numel > (1 << 16))
    for (int64_t j = 0; j < q.numel; ++j) host[j] = f32_to_bf16(w[j]);
    be_.copy_to_device(q.packed, host.data(), host.size() * 2);
    return;
  }
  const Nf4Layout lay = nf4_layout(q.numel);
  std::vector<uint8_t> host(lay.bytes);
  nf4_quantize(host.data(), host.data() + lay.absmax_q,
               reinterpret_cast<float*>(host.data() + lay.absmax_scale), &q.absmax_offset, w,
               q.numel);
  be_.copy_to_device(q.packed, host.data(), lay.bytes);
}

const float* LlamaModel::base_weight(const LinearSlot& s) {
  if (s.weight) return s.weight;
  const PackedWeight& q = packed_[s.packed];
  if (q.format == PackedFormat::kBf16)
    be_.bf16_to_f32(work_->base_weight, reinterpret_cast<const uint16_t*>(q.packed), q.numel);
  else
    be_.nf4_dequantize(work_->base_weight, q.packed, q.absmax_q, q.absmax_scale, q.absmax_offset,
                       q.numel);
  return work_->base_weight;
}

LoraCall LlamaModel::lora_call(int64_t l, Proj p, int64_t row0) const {
  LoraCall c;
  c.R = settings_.lora.r;
  c.scale = settings_.lora.scale();
  c.dropout = dropout_on_ ? static_cast<float>(settings_.lora.dropout) : 0.0f;
  // One mask key per (seed, micro-batch, layer, projection); rows and columns index inside it.
  c.seed = settings_.lora.seed * 0x9E3779B97F4A7C15ull ^
           (slot().key << 20 | uint64_t(l) << 4 | uint64_t(p));
  c.row0 = row0 + slot().row0;
  return c;
}

int64_t LlamaModel::lora_rows(const LinearSlot& s, int64_t n) const {
  if (!dropout_on_ || settings_.lora.dropout <= 0 || !work_->lora_xd)
    return std::max<int64_t>(n, 1);
  const int64_t rows = int64_t(work_->lora_xd_numel / size_t(s.in));
  LT_CHECK(rows >= 1, "LoRA dropout buffer of {} values for inputs {} wide", work_->lora_xd_numel,
           s.in);
  return rows;
}

const uint16_t* LlamaModel::bf16_weight(const LinearSlot& s) const {
  if (s.weight || packed_[s.packed].format != PackedFormat::kBf16) return nullptr;
  return reinterpret_cast<const uint16_t*>(packed_[s.packed].packed);
}

void LlamaModel::project(float* out, const float* inp, const LinearSlot& s, int64_t n, int64_t l,
                         int64_t row0) {
  // With an adapter two GEMMs read inp: the base's and the adapter's A.
  const HeldGemmInput held(be_, s.lora_a ? inp : nullptr, s.lora_a ? n : 0, s.in);
  if (const uint16_t* w16 = bf16_weight(s))
    be_.linear_forward_bf16w(out, inp, w16, s.bias, n, s.in, s.out, work_->base_weight, s.out);
  else
    be_.linear_forward(out, inp, base_weight(s), s.bias, n, s.in, s.out);
  if (s.lora_a) {
    const int64_t step = lora_rows(s, n);
    for (int64_t r = 0; r < n; r += step)  // masks keyed by token: any row blocks drop alike
      be_.lora_forward(out + r * s.out, work_->lora_t, work_->lora_xd, inp + r * s.in, s.lora_a,
                       s.lora_b, std::min(step, n - r), s.in, s.out,
                       lora_call(l, s.proj, row0 + r));
  }
}

void LlamaModel::project_backward(float* dinp, const LinearSlot& s, const float* dout,
                                  const float* inp, int64_t n, int64_t l, int64_t row0,
                                  Accumulate acc) {
  // dout feeds dinp's GEMM and the weight's or the adapter's (three GEMMs with an adapter);
  // inp the weight's GEMM or the adapter's two.
  const HeldGemmInput held_dout(be_, dout, n, s.out);
  const HeldGemmInput held_inp(be_, s.lora_a ? inp : nullptr, s.lora_a ? n : 0, s.in);
  if (const uint16_t* w16 = bf16_weight(s))  // frozen: no weight gradient
    be_.linear_backward_bf16w(dinp, s.grad_bias, dout, w16, n, s.in, s.out, acc, work_->base_weight,
                              s.out);
  else
    be_.linear_backward(dinp, s.grad_weight, s.grad_bias, dout, inp, base_weight(s), n, s.in, s.out,
                        acc);
  if (s.lora_a) {
    Work& k = *work_;
    const int64_t step = lora_rows(s, n);
    for (int64_t r = 0; r < n; r += step)  // adapter gradients accumulate over the blocks
      be_.lora_backward(dinp ? dinp + r * s.in : nullptr, s.grad_a, s.grad_b, k.lora_t, k.lora_u,
                        k.lora_xd, k.lora_dxd, dout + r * s.out, inp + r * s.in, s.lora_a, s.lora_b,
                        std::min(step, n - r), s.in, s.out, lora_call(l, s.proj, row0 + r));
  }
}

void LlamaModel::project_qkv(float* q, float* k, float* v, const float* inp, const Slots& sl,
                             int64_t n, int64_t l, int64_t row0) {
  const HeldGemmInput held(be_, inp, n, config_.hidden_size);
  project(q, inp, sl[int(Proj::kQ)], n, l, row0);
  project(k, inp, sl[int(Proj::kK)], n, l, row0);
  project(v, inp, sl[int(Proj::kV)], n, l, row0);
}

void LlamaModel::project_qkv_backward(float* dinp, const float* dq, const float* dk,
                                      const float* dv, const float* inp, const Slots& sl, int64_t n,
                                      int64_t l, int64_t row0) {
  const HeldGemmInput held(be_, inp, n, config_.hidden_size);
  project_backward(dinp, sl[int(Proj::kQ)], dq, inp, n, l, row0, Accumulate::kNo);
  project_backward(dinp, sl[int(Proj::kK)], dk, inp, n, l, row0, Accumulate::kYes);
  project_backward(dinp, sl[int(Proj::kV)], dv, inp, n, l, row0, Accumulate::kYes);
}

void LlamaModel::project_gate_up(float* gate, float* up, const float* inp, const Slots& sl,
                                 int64_t n, int64_t l, int64_t row0) {
  const HeldGemmInput held(be_, inp, n, config_.hidden_size);
  project(gate, inp, sl[int(Proj::kGate)], n, l, row0);
  project(up, inp, sl[int(Proj::kUp)], n, l, row0);
}

void LlamaModel::project_gate_up_backward(float* dinp, const float* dgate, const float* dup,
                                          const float* inp, const Slots& sl, int64_t n, int64_t l,
                                          int64_t row0) {
  const HeldGemmInput held(be_, inp, n, config_.hidden_size);
  project_backward(dinp, sl[int(Proj::kGate)], dgate, inp, n, l, row0, Accumulate::kNo);
  project_backward(dinp, sl[int(Proj::kUp)], dup, inp, n, l, row0, Accumulate::kYes);
}

LlamaModel::~LlamaModel() = default;

void LlamaModel::plan(const ModelConfig& config, const RunSettings& settings, MemoryPlan* plan) {
  PlanBinder planner(plan);
  Bound sizes;
  declare_buffers(config, settings, planner, &sizes);
}

float* LlamaModel::res_of(const Slot& sl, int64_t l) const {
  const int64_t i = l - layer_begin_;
  if (sl.stage[0]) return sl.stage[sl.stage[1] ? i % 2 : 0];
  return sl.res[settings_.train ? i : i % 2];
}

float* LlamaModel::res(int64_t l) { return res_of(slot(), l); }

LlamaModel::LayerActs& LlamaModel::acts_for(int64_t l) {
  if (!shared_acts_) return *slot().acts[l - layer_begin_];
  if (!slot().kept_out.empty()) {  // selective recomputation: this layer's kept attention
    shared_acts_->attn_out = slot().kept_out[l - layer_begin_];
    shared_acts_->lse = slot().kept_lse[l - layer_begin_];
  }
  return *shared_acts_;
}

void LlamaModel::dump(const std::string& name, const float* data, size_t n) const {
  if (!dump_) return;
  if (be_.host_addressable()) return dump_(dump_user_, name, data, n);
  const std::vector<float> host = be_.download(data, n);  // the hook reads host memory
  dump_(dump_user_, name, host.data(), n);
}

void LlamaModel::acquire(int64_t unit, LayerWeightsProvider::Pass pass) {
  LT_CHECK(provider_ || !settings_.external_params, "external parameters without a provider");
  if (!provider_) return;
  const bool backward = pass == LayerWeightsProvider::Pass::kBackward;
  provider_->acquire(unit, pass, &w_, backward ? &g_ : nullptr);
  if (unit != LayerWeightsProvider::kOuter) build_layer_slots(unit);  // projections read lin_
}

void LlamaModel::release(int64_t unit, LayerWeightsProvider::Pass pass) {
  if (provider_) provider_->release(unit, pass);
}

// Staged checkpoints: layer l's input is kept while layer l runs (forward) and comes back while
// layer l + 1 runs its backward. Offload: an asynchronous copy each way; a file-backed store
// (CPU) is written and read piece by piece, each piece's pages released at once, so that no more
// than one piece is resident besides the staging buffers, and the next checkpoint is read
// ahead. bf16 checkpoints: rounded into the store and widened back, exactly (the residual stream
// is bf16-rounded already); offloaded from a device, through one device bf16 buffer (a layer
// start waits for the copies before it is reused), on CPU straight into and out of the file.
void LlamaModel::checkpoint_out(int64_t l) {
  Slot& sl = slot();
  if (!sl.stage[0] || !sl.training) return;  // forward-only passes keep nothing
  const size_t n = size_t(n_) * config_.hidden_size;
  void* store = sl.store[l - layer_begin_];
  if (!bf16_checkpoints(settings_))
    return offload_copy(store, res(l), n * 4, /*out=*/true, nullptr);
  auto* store16 = static_cast<uint16_t*>(store);
  if (!settings_.offload_checkpoints) return be_.f32_to_bf16(store16, res(l), int64_t(n));
  Arena& arena = *offload_arena_;
  if (!arena.is_file_backed()) {
    be_.f32_to_bf16(sl.bstage, res(l), int64_t(n));
    return offload_copy(store, sl.bstage, n * 2, /*out=*/true, nullptr);
  }
  for (size_t at = 0, piece = kOffloadPiece / 2; at < n; at += piece) {
    const size_t k = std::min(piece, n - at);
    be_.f32_to_bf16(store16 + at, res(l) + at, int64_t(k));
    arena.release(store16 + at, k * 2);
  }
}

void LlamaModel::checkpoint_in(int64_t l) {
  Slot& sl = slot();
  if (!sl.stage[0] || !settings_.offload_checkpoints) return;
  const int64_t i = l - layer_begin_;
  const size_t n = size_t(n_) * config_.hidden_size;
  void* next = i > 0 ? sl.store[i - 1] : nullptr;
  if (!bf16_checkpoints(settings_))
    return offload_copy(sl.store[i], res(l), n * 4, /*out=*/false, next);
  if (!offload_arena_->is_file_backed())
    offload_copy(sl.store[i], sl.bstage, n * 2, /*out=*/false, next);
}

void LlamaModel::checkpoint_ready(int64_t l) {
  Slot& sl = slot();
  if (!sl.stage[0] || !bf16_checkpoints(settings_)) return;
  const int64_t i = l - layer_begin_;
  const int64_t n = n_ * config_.hidden_size;
  auto* store16 = static_cast<uint16_t*>(sl.store[i]);
  if (!settings_.offload_checkpoints) return be_.bf16_to_f32(res(l), store16, n);
  Arena& arena = *offload_arena_;
  if (!arena.is_file_backed()) return be_.bf16_to_f32(res(l), sl.bstage, n);
  for (int64_t at = 0, piece = int64_t(kOffloadPiece / 2); at < n; at += piece) {
    const int64_t k = std::min(piece, n - at);
    be_.bf16_to_f32(res(l) + at, store16 + at, k);
    arena.release(store16 + at, size_t(k) * 2);
  }
  if (i > 0) arena.prefetch(sl.store[i - 1], size_t(n) * 2);
}

void LlamaModel::offload_copy(void* store, void* dev, size_t bytes, bool out, void* next) {
  Arena& arena = *offload_arena_;
  char* s = static_cast<char*>(store);
  char* d = static_cast<char*>(dev);
  const size_t piece = arena.is_file_backed() ? kOffloadPiece : bytes;
  for (size_t at = 0; at < bytes; at += piece) {
    const size_t n = std::min(piece, bytes - at);
    if (out)
      be_.copy_to_host_async(s + at, d + at, n);
    else
      be_.copy_to_device_async(d + at, s + at, n);
    if (!arena.is_file_backed()) continue;
    be_.synchronize_copies();
    arena.release(s + at, n);
  }
  if (next && arena.is_file_backed()) arena.prefetch(next, bytes);
}

bool LlamaModel::bf16_checkpoints(const RunSettings& s) {
  return s.train && s.checkpointing && s.bf16_residual;
}

bool LlamaModel::keeps_attention(const RunSettings& s) {
  return s.train && s.checkpointing && s.keep_attention && !s.sequence_path();
}

void LlamaModel::prepare(const MicroBatch& mb, int64_t slot_index, bool training) {
  LT_CHECK(slot_index >= 0 && slot_index < int64_t(slots_.size()), "slot {} of {}", slot_index,
           slots_.size());
  cur_ = slot_index;
  Slot& sl = slot();
  n_ = sl.n = mb.num_tokens();
  LT_CHECK(n_ > 0 && n_ <= settings_.max_tokens, "micro-batch of {} tokens, planned for {}", n_,
           settings_.max_tokens);
  LT_CHECK(mb.pos.size() == size_t(n_) && mb.docs.size() == size_t(n_) &&
           mb.targets.size() == size_t(n_) && mb.row_start.size() >= 2);
  be_.copy_to_device(sl.ids, mb.ids.data(), n_ * 4);
  be_.copy_to_device(sl.pos, mb.pos.data(), n_ * 4);
  be_.copy_to_device(sl.docs, mb.docs.data(), n_ * 4);
  be_.copy_to_device(sl.targets, mb.targets.data(), n_ * 4);
  sl.chunks = 1;
  sl.row0 = mb.seq_row0;
  if (settings_.sequence_path()) {
    const int64_t P = settings_.sp_degree;
    LT_CHECK(mb.seq_docs.size() == size_t(n_ * P) && mb.seq_chunks >= 1 &&
                 n_ % mb.seq_chunks == 0 && n_ / mb.seq_chunks <= seq_->c,
             "sequence-parallel micro-batch: {} tokens here, {} in the sequence, {} chunks (at "
             "most {} tokens each here)",
             n_, mb.seq_docs.size(), mb.seq_chunks, seq_->c);
    LT_CHECK(!sp_ || sp_->degree() == P, "sequence exchange of degree {} for degree {}",
             sp_ ? sp_->degree() : 0, P);
    LT_CHECK(P == 1 || sp_, "sequence parallel degree {} without a SequenceExchange", P);
    sl.chunks = mb.seq_chunks;
    be_.copy_to_device(sl.seq_docs, mb.seq_docs.data(), mb.seq_docs.size() * 4);
  }
  if (training) sl.key = ++micro_batches_done_;
  // RoPE tables row by row: "dynamic" scaling depends on each row's longest position.
  const int64_t HD = config_.head_dim, half = HD / 2;
  LT_CHECK(mb.rope_len.empty() || mb.rope_len.size() + 1 == mb.row_start.size());
  for (size_t r = 0; r + 1 < mb.row_start.size(); ++r) {
    const int64_t a = mb.row_start[r], n = mb.row_start[r + 1] - a;
    if (n == 0) continue;
    const int64_t len =
        mb.rope_len.empty()
            ? int64_t(*std::max_element(mb.pos.begin() + a, mb.pos.begin() + a + n)) + 1
            : int64_t(mb.rope_len[r]);
    const RopeParams rp = compute_rope_params(config_, len);
    be_.copy_to_device(work_->inv_freq, rp.inv_freq.data(), half * 4);
    be_.rope_tables(sl.rope_cos + a * half, sl.rope_sin + a * half, sl.pos + a, work_->inv_freq,
                    rp.attention_scaling, n, HD);
  }
}

void LlamaModel::layer_forward(int64_t l, LayerActs& a, Pass pass) {
  if (seq_ && seq_->fpdt) return fpdt_forward(l, a, pass);
  const ModelConfig& c = config_;
  const LayerWeights& w = w_.layers[l];
  const auto& sl = lin_[l];
  auto slot = [&](Proj p) -> const LinearSlot& { return sl[static_cast<int>(p)]; };
  Work& k = *work_;
  const Slot& ms = this->slot();
  const int64_t N = n_, D = c.hidden_size, F = c.intermediate_size, H = c.num_attention_heads;
  const int64_t KVH = c.num_key_value_heads, HD = c.head_dim, QD = H * HD;
  const float* x = res(l);
  float* x_out = res(l + 1);

  be_.rmsnorm_forward(a.attn_in, a.attn_rstd, x, w.attn_norm, N, D, c.rms_norm_eps);
  if (settings_.sequence_path()) {
    seq_attention_forward(l, a);
  } else {
    project_qkv(a.q, a.k, a.v, a.attn_in, sl, N, l, 0);
    be_.rope_forward(a.q, a.q, ms.rope_cos, ms.rope_sin, N, H, HD);
    be_.rope_forward(a.k, a.k, ms.rope_cos, ms.rope_sin, N, KVH, HD);
    // Selective recomputation: the recompute finds attn_out and lse kept (acts_for).
    if (pass != Pass::kRecompute || !keeps_attention(settings_)) {
      AttentionShape s{1, N, H, KVH, HD, c.layer_window(l), ms.docs, 1.0f / std::sqrt(float(HD))};
      if (settings_.flash_attention)
        be_.attention_forward(a.attn_out, a.lse, a.q, a.k, a.v, s);
      else
        attention_forward_naive(a.attn_out, a.lse, a.q, a.k, a.v, s);
    }
  }
  project(a.x_mid, a.attn_out, slot(Proj::kO), N, l, 0);
  be_.add_inplace(a.x_mid, x, N * D);
  be_.rmsnorm_forward(a.ffn_in, a.ffn_rstd, a.x_mid, w.ffn_norm, N, D, c.rms_norm_eps);
  if (pass == Pass::kForward) {
    dump(fmt::format("layer{}.attn_out", l), a.attn_out, N * QD);
    dump(fmt::format("layer{}.x_mid", l), a.x_mid, N * D);
  }

  if (a.gate) {  // whole-sequence MLP; gate and up are kept for backward
    project_gate_up(a.gate, a.up, a.ffn_in, sl, N, l, 0);
    if (pass == Pass::kRecompute) return;
    be_.swiglu_forward(k.h_c, a.gate, a.up, N * F);
    project(x_out, k.h_c, slot(Proj::kDown), N, l, 0);
  } else {  // mini-sequence MLP: chunk by chunk, nothing of size N*F is kept
    if (pass == Pass::kRecompute) return;
    for (int64_t r0 = 0; r0 < N; r0 += k.mlp_chunk) {
      const int64_t n = std::min(k.mlp_chunk, N - r0);
      project_gate_up(k.gate_c, k.up_c, a.ffn_in + r0 * D, sl, n, l, r0);
      be_.swiglu_forward(k.h_c, k.gate_c, k.up_c, n * F);
      project(x_out + r0 * D, k.h_c, slot(Proj::kDown), n, l, r0);
    }
  }
  be_.add_inplace(x_out, a.x_mid, N * D);
  if (settings_.bf16_residual) be_.round_to_bf16(x_out, N * D);  // the layer boundary
  dump(fmt::format("layer{}.out", l), x_out, N * D);
}

void LlamaModel::layer_backward(int64_t l, LayerActs& a, float* dres) {
  if (seq_ && seq_->fpdt) return fpdt_backward(l, a, dres);
  const ModelConfig& c = config_;
  const LayerWeights& w = w_.layers[l];
  const LayerWeights& g = g_.layers[l];
  const auto& sl = lin_[l];
  auto slot = [&](Proj p) -> const LinearSlot& { return sl[static_cast<int>(p)]; };
  Work& k = *work_;
  const Slot& ms = this->slot();
  const int64_t N = n_, D = c.hidden_size, F = c.intermediate_size, H = c.num_attention_heads;
  const int64_t KVH = c.num_key_value_heads, HD = c.head_dim;

  // MLP: dres is dL/d(x_out); its MLP share flows back to ffn_in (k.dnorm).
  for (int64_t r0 = 0; r0 < N; r0 += k.mlp_chunk) {
    const int64_t n = std::min(k.mlp_chunk, N - r0);
    const float* ffn_in = a.ffn_in + r0 * D;
    const float* gate = a.gate ? a.gate + r0 * F : k.gate_c;
    const float* up = a.up ? a.up + r0 * F : k.up_c;
    if (!a.gate) {  // recompute this chunk's gate and up
      project_gate_up(k.gate_c, k.up_c, ffn_in, sl, n, l, r0);
    }
    be_.swiglu_forward(k.h_c, gate, up, n * F);
    project_backward(k.dh_c, slot(Proj::kDown), dres + r0 * D, k.h_c, n, l, r0, Accumulate::kNo);
    be_.swiglu_backward(k.dgate_c, k.dup_c, k.dh_c, gate, up, n * F);
    project_gate_up_backward(k.dnorm + r0 * D, k.dgate_c, k.dup_c, ffn_in, sl, n, l, r0);
  }
  // dres += d(ffn_in)/d(x_mid): dres becomes dL/d(x_mid).
  be_.rmsnorm_backward(dres, g.ffn_norm, k.dnorm, a.x_mid, w.ffn_norm, a.ffn_rstd, N, D,
                       Accumulate::kYes);

  // Attention. From here on ffn_in and x_mid are dead: they may hold dL/d(attn_out) and dq.
  float* dattn = k.attn_grads_in_acts ? a.ffn_in : k.dattn;
  float* dq = k.attn_grads_in_acts ? a.x_mid : k.dq;
  project_backward(dattn, slot(Proj::kO), dres, a.attn_out, N, l, 0, Accumulate::kNo);
  if (settings_.sequence_path()) {
    seq_attention_backward(l, a, dattn, dq);
  } else {
    AttentionShape s{1, N, H, KVH, HD, c.layer_window(l), ms.docs, 1.0f / std::sqrt(float(HD))};
    if (settings_.flash_attention)
      be_.attention_backward(dq, k.dk, k.dv, dattn, a.attn_out, a.lse, a.q, a.k, a.v, s);
    else
      attention_backward_naive(dq, k.dk, k.dv, dattn, a.attn_out, a.lse, a.q, a.k, a.v, s);
    be_.rope_backward(dq, dq, ms.rope_cos, ms.rope_sin, N, H, HD);
    be_.rope_backward(k.dk, k.dk, ms.rope_cos, ms.rope_sin, N, KVH, HD);
    project_qkv_backward(k.dnorm, dq, k.dk, k.dv, a.attn_in, sl, N, l, 0);
  }
  // dres += d(attn_in)/d(x): dres becomes dL/d(x), the gradient at this layer's input.
  be_.rmsnorm_backward(dres, g.attn_norm, k.dnorm, res(l), w.attn_norm, a.attn_rstd, N, D,
                       Accumulate::kYes);
}

// ---- Sequence path: DeepSpeed-Ulysses and FPDT ---------------------------------------------
//
// This rank holds chunks x c tokens of a sequence of S = chunks x Ce tokens, Ce = c x P: its
// c tokens of chunk i are the sequence's [i Ce + r c, i Ce + (r + 1) c) (src/dist/sequence.h
// lays the tokens out so). After the all-to-all, chunk i of the store is the contiguous range
// [i Ce, (i + 1) Ce) for this rank's H/P heads; attention runs on those with the masks of the
// whole sequence.

void LlamaModel::to_heads(float* dst, const float* src, int64_t c, int64_t width) {
  const int64_t P = settings_.sp_degree, hw = width / P;
  if (P == 1) {
    if (dst != src) be_.copy_device(dst, src, size_t(c * width) * 4);
    return;
  }
  float* pack = seq_->pack;
  for (int64_t j = 0; j < P; ++j)  // block j: every token's heads of rank j
    be_.copy_2d(pack + j * c * hw, hw * 4, src + j * hw, width * 4, hw * 4, c);
  sp_->alltoall(dst, pack, size_t(c * hw));
}

void LlamaModel::from_heads(float* dst, const float* src, int64_t c, int64_t width) {
  const int64_t P = settings_.sp_degree, hw = width / P;
  if (P == 1) {
    if (dst != src) be_.copy_device(dst, src, size_t(c * width) * 4);
    return;
  }
  float* pack = seq_->pack;
  // Block j of src (rank j's c tokens) goes back to rank j; block j received holds this rank's
  // tokens for rank j's heads.
  sp_->alltoall(pack, src, size_t(c * hw));
  for (int64_t j = 0; j < P; ++j)
    be_.copy_2d(dst + j * hw, width * 4, pack + j * c * hw, hw * 4, hw * 4, c);
}

const float* LlamaModel::fetch_chunk(const float* store, int64_t i, int64_t n, float* stage) {
  be_.copy_to_device_async(stage, store + i * n, size_t(n) * 4);
  return stage;
}

void LlamaModel::put_chunk(float* store, int64_t i, int64_t n, const float* dev) {
  be_.copy_to_host_async(store + i * n, dev, size_t(n) * 4);
}

// DeepSpeed-Ulysses: q/k/v of all this rank's tokens, all-to-all to the whole sequence for H/P
// heads (kept on the device), attention, all-to-all of the output back. The exchanges run in
// place (to_heads / from_heads read their source whole before writing), so Ulysses needs no
// buffers beyond the plain path's but the head-layout output and the all-to-all's send buffer.
void LlamaModel::seq_attention_forward(int64_t l, LayerActs& a) {
  const ModelConfig& cf = config_;
  const Slot& ms = slot();
  const auto& sl = lin_[l];
  const int64_t P = settings_.sp_degree, H = cf.num_attention_heads, KVH = cf.num_key_value_heads;
  const int64_t HD = cf.head_dim, QD = H * HD, KVD = KVH * HD, N = n_;
  AttentionShape whole{
      1, N * P, H / P, KVH / P, HD, cf.layer_window(l), ms.seq_docs, 1.0f / std::sqrt(float(HD))};
  project_qkv(a.q, a.k, a.v, a.attn_in, sl, N, l, 0);
  be_.rope_forward(a.q, a.q, ms.rope_cos, ms.rope_sin, N, H, HD);
  be_.rope_forward(a.k, a.k, ms.rope_cos, ms.rope_sin, N, KVH, HD);
  to_heads(a.q, a.q, N, QD);
  to_heads(a.k, a.k, N, KVD);
  to_heads(a.v, a.v, N, KVD);
  if (settings_.flash_attention)
    be_.attention_forward(a.o_heads, a.lse, a.q, a.k, a.v, whole);
  else
    attention_forward_naive(a.o_heads, a.lse, a.q, a.k, a.v, whole);
  from_heads(a.attn_out, a.o_heads, N, QD);
}

void LlamaModel::seq_attention_backward(int64_t l, LayerActs& a, float* dattn, float* dq) {
  const ModelConfig& cf = config_;
  Work& k = *work_;
  const Slot& ms = slot();
  const auto& sl = lin_[l];
  const int64_t P = settings_.sp_degree, H = cf.num_attention_heads, KVH = cf.num_key_value_heads;
  const int64_t HD = cf.head_dim, QD = H * HD, KVD = KVH * HD, N = n_;
  AttentionShape whole{
      1, N * P, H / P, KVH / P, HD, cf.layer_window(l), ms.seq_docs, 1.0f / std::sqrt(float(HD))};
  to_heads(dattn, dattn, N, QD);  // dL/d(out) in head layout
  if (settings_.flash_attention)
    be_.attention_backward(dq, k.dk, k.dv, dattn, a.o_heads, a.lse, a.q, a.k, a.v, whole);
  else
    attention_backward_naive(dq, k.dk, k.dv, dattn, a.o_heads, a.lse, a.q, a.k, a.v, whole);
  from_heads(dq, dq, N, QD);
  from_heads(k.dk, k.dk, N, KVD);
  from_heads(k.dv, k.dv, N, KVD);
  be_.rope_backward(dq, dq, ms.rope_cos, ms.rope_sin, N, H, HD);
  be_.rope_backward(k.dk, k.dk, ms.rope_cos, ms.rope_sin, N, KVH, HD);
  project_qkv_backward(k.dnorm, dq, k.dk, k.dv, a.attn_in, sl, N, l, 0);
}

// ---- FPDT: whole layers chunk by chunk -----------------------------------------------------
//
// This rank holds u chunks x c tokens of a sequence of S = u x Ce tokens, Ce = c x P: its c
// tokens of chunk i are the sequence's [i Ce + r c, i Ce + (r + 1) c) (src/dist/sequence.h lays
// the tokens out so), and after the all-to-all chunk i is the contiguous range [i Ce, (i+1) Ce)
// for this rank's H/P heads. Per chunk i the forward runs the norm, q/k/v, RoPE, the
// all-to-all, attention of chunk i against chunks 0..i (online softmax; earlier K/V come back
// from pinned host memory two at a time, the next read while this one runs), the all-to-all
// back, o_proj and the MLP; only the residual stream is whole. q, k, v, out, lse and this rank's
// attention output go to the host store. The backward first runs each chunk's MLP and o_proj
// backward (recomputing their inputs from the store) into dL/d(out), then the attention backward
// with key chunks outside and the query chunks that see them inside (dq accumulates in the host
// store), and finishes each key chunk's q/k/v and norm backward as soon as its gradients are
// complete. The device holds a few chunks of everything and the (N, D) residual gradient.

void LlamaModel::fpdt_forward(int64_t l, LayerActs& a, Pass pass) {
  const ModelConfig& cf = config_;
  SeqWork& q = *seq_;
  Work& k = *work_;
  const Slot& ms = slot();
  const LayerWeights& w = w_.layers[l];
  const auto& sl = lin_[l];
  const int64_t P = settings_.sp_degree, H = cf.num_attention_heads, KVH = cf.num_key_value_heads;
  const int64_t HD = cf.head_dim, QD = H * HD, KVD = KVH * HD, D = cf.hidden_size, half = HD / 2;
  const int64_t F = cf.intermediate_size;
  const int64_t u = ms.chunks, c = n_ / u, Ce = c * P, W = QD / P, KW = KVD / P, HP = H / P;
  AttentionShape whole{
      1, u * Ce, HP, KVH / P, HD, cf.layer_window(l), ms.seq_docs, 1.0f / std::sqrt(float(HD))};
  for (int64_t i = 0; i < u; ++i) {
    // Local row of the chunk's first token, and its row in the whole sequence relative to this
    // rank's first (LoRA dropout masks follow the token, whatever the layout).
    const int64_t r0 = i * c, g0 = i * Ce;
    const float* x = res(l) + r0 * D;
    be_.wait_copies();  // the previous chunk's stores have left the chunk buffers
    be_.rmsnorm_forward(q.attn_in, q.attn_rstd, x, w.attn_norm, c, D, cf.rms_norm_eps);
    project_qkv(q.ql, q.kl, q.vl, q.attn_in, sl, c, l, g0);
    be_.rope_forward(q.ql, q.ql, ms.rope_cos + r0 * half, ms.rope_sin + r0 * half, c, H, HD);
    be_.rope_forward(q.kl, q.kl, ms.rope_cos + r0 * half, ms.rope_sin + r0 * half, c, KVH, HD);
    to_heads(q.q_c, q.ql, c, QD);
    to_heads(q.k_c, q.kl, c, KVD);
    to_heads(q.v_c, q.vl, c, KVD);
    put_chunk(a.q, i, Ce * W, q.q_c);
    put_chunk(a.k, i, Ce * KW, q.k_c);
    put_chunk(a.v, i, Ce * KW, q.v_c);
    if (i > 0) fetch_chunk(a.k, 0, Ce * KW, q.k_s[0]), fetch_chunk(a.v, 0, Ce * KW, q.v_s[0]);
    for (int64_t j = 0; j <= i; ++j) {
      const float *kj = q.k_c, *vj = q.v_c;
      if (j < i) {
        be_.wait_copies();
        kj = q.k_s[j % 2], vj = q.v_s[j % 2];
        if (j + 1 < i) {
          fetch_chunk(a.k, j + 1, Ce * KW, q.k_s[(j + 1) % 2]);
          fetch_chunk(a.v, j + 1, Ce * KW, q.v_s[(j + 1) % 2]);
        }
      }
      AttentionShape s = whole;
      s.q_begin = i * Ce, s.Tq = Ce, s.k_begin = j * Ce, s.Tk = Ce;
      if (j == 0) {
        be_.attention_forward(q.o_c, q.lse_c, q.q_c, kj, vj, s);
      } else {
        be_.attention_forward(q.o_b, q.lse_b, q.q_c, kj, vj, s);
        be_.attention_merge(q.o_c, q.lse_c, q.o_b, q.lse_b, Ce, HP, HD);
      }
    }
    put_chunk(a.o_heads, i, Ce * W, q.o_c);
    put_chunk(a.lse, i, HP * Ce, q.lse_c);
    from_heads(q.attn_out, q.o_c, c, QD);
    put_chunk(a.attn_out, i, c * QD, q.attn_out);
    if (pass == Pass::kRecompute) continue;  // the backward redoes o_proj and the MLP per chunk
    project(q.x_mid, q.attn_out, sl[int(Proj::kO)], c, l, g0);
    be_.add_inplace(q.x_mid, x, c * D);
    be_.rmsnorm_forward(q.ffn_in, q.ffn_rstd, q.x_mid, w.ffn_norm, c, D, cf.rms_norm_eps);
    float* out = res(l + 1) + r0 * D;
    for (int64_t m0 = 0; m0 < c; m0 += k.mlp_chunk) {
      const int64_t n = std::min(k.mlp_chunk, c - m0);
      project_gate_up(k.gate_c, k.up_c, q.ffn_in + m0 * D, sl, n, l, g0 + m0);
      be_.swiglu_forward(k.h_c, k.gate_c, k.up_c, n * F);
      project(out + m0 * D, k.h_c, sl[int(Proj::kDown)], n, l, g0 + m0);
    }
    be_.add_inplace(out, q.x_mid, c * D);
    if (settings_.bf16_residual) be_.round_to_bf16(out, c * D);  // the layer boundary
  }
  be_.wait_copies();
}

void LlamaModel::fpdt_backward(int64_t l, LayerActs& a, float* dres) {
  const ModelConfig& cf = config_;
  SeqWork& q = *seq_;
  Work& k = *work_;
  const Slot& ms = slot();
  const LayerWeights& w = w_.layers[l];
  const LayerWeights& g = g_.layers[l];
  const auto& sl = lin_[l];
  const int64_t P = settings_.sp_degree, H = cf.num_attention_heads, KVH = cf.num_key_value_heads;
  const int64_t HD = cf.head_dim, QD = H * HD, KVD = KVH * HD, D = cf.hidden_size, half = HD / 2;
  const int64_t F = cf.intermediate_size;
  const int64_t u = ms.chunks, c = n_ / u, Ce = c * P, W = QD / P, KW = KVD / P, HP = H / P;
  AttentionShape whole{
      1, u * Ce, HP, KVH / P, HD, cf.layer_window(l), ms.seq_docs, 1.0f / std::sqrt(float(HD))};
  // 1. Per chunk: o_proj, norm and MLP recomputed from the stored attention output; their
  // backward turns dres (dL/d output) into dL/d x_mid and gives dL/d(attention output).
  for (int64_t i = 0; i < u; ++i) {
    const int64_t r0 = i * c, g0 = i * Ce;  // local row, dropout row (as in fpdt_forward)
    const float* x = res(l) + r0 * D;
    float* dr = dres + r0 * D;
    be_.wait_copies();
    fetch_chunk(a.attn_out, i, c * QD, q.attn_out);
    be_.wait_copies();
    project(q.x_mid, q.attn_out, sl[int(Proj::kO)], c, l, g0);
    be_.add_inplace(q.x_mid, x, c * D);
    be_.rmsnorm_forward(q.ffn_in, q.ffn_rstd, q.x_mid, w.ffn_norm, c, D, cf.rms_norm_eps);
    for (int64_t m0 = 0; m0 < c; m0 += k.mlp_chunk) {
      const int64_t n = std::min(k.mlp_chunk, c - m0);
      const float* ffn_in = q.ffn_in + m0 * D;
      const int64_t row = g0 + m0;
      project_gate_up(k.gate_c, k.up_c, ffn_in, sl, n, l, row);
      be_.swiglu_forward(k.h_c, k.gate_c, k.up_c, n * F);
      project_backward(k.dh_c, sl[int(Proj::kDown)], dr + m0 * D, k.h_c, n, l, row,
                       Accumulate::kNo);
      be_.swiglu_backward(k.dgate_c, k.dup_c, k.dh_c, k.gate_c, k.up_c, n * F);
      project_gate_up_backward(q.dnorm + m0 * D, k.dgate_c, k.dup_c, ffn_in, sl, n, l, row);
    }
    be_.rmsnorm_backward(dr, g.ffn_norm, q.dnorm, q.x_mid, w.ffn_norm, q.ffn_rstd, c, D,
                         Accumulate::kYes);
    project_backward(q.dattn, sl[int(Proj::kO)], dr, q.attn_out, c, l, g0, Accumulate::kNo);
    to_heads(q.do_s[0], q.dattn, c, QD);
    put_chunk(q.do_store, i, Ce * W, q.do_s[0]);
  }
  // 2. Attention backward, key chunk j outside, query chunks i >= j inside (their tensors read
  // ahead into the other buffer set). dq_i is complete once j = i, dk_j and dv_j after their
  // inner loop: then chunk j's RoPE, q/k/v and norm backward finish dL/dx of its tokens.
  for (int64_t j = 0; j < u; ++j) {
    be_.wait_copies();
    const float* kj = fetch_chunk(a.k, j, Ce * KW, q.k_s[0]);
    const float* vj = fetch_chunk(a.v, j, Ce * KW, q.v_s[0]);
    auto fetch_set = [&](int64_t i, int set) {
      fetch_chunk(a.q, i, Ce * W, q.q_s[set]);
      fetch_chunk(a.o_heads, i, Ce * W, q.o_s[set]);
      fetch_chunk(a.lse, i, HP * Ce, q.lse_s[set]);
      fetch_chunk(q.do_store, i, Ce * W, q.do_s[set]);
      if (j > 0) fetch_chunk(q.dq_store, i, Ce * W, q.dq_s[set]);
    };
    fetch_set(j, 0);
    be_.memset_zero(q.dk_acc, size_t(Ce * KW) * 4);
    be_.memset_zero(q.dv_acc, size_t(Ce * KW) * 4);
    for (int64_t i = j; i < u; ++i) {
      const int set = int((i - j) % 2);
      be_.wait_copies();
      if (i + 1 < u) fetch_set(i + 1, 1 - set);
      AttentionShape s = whole;
      s.q_begin = i * Ce, s.Tq = Ce, s.k_begin = j * Ce, s.Tk = Ce;
      be_.attention_backward(q.dq_b, q.dk_b, q.dv_b, q.do_s[set], q.o_s[set], q.lse_s[set],
                             q.q_s[set], kj, vj, s);
      be_.add_inplace(q.dk_acc, q.dk_b, Ce * KW);
      be_.add_inplace(q.dv_acc, q.dv_b, Ce * KW);
      // dq_i: the first key chunk writes it, later ones add to it.
      if (j > 0) be_.add_inplace(q.dq_s[set], q.dq_b, Ce * W);
      const float* dq_i = j > 0 ? q.dq_s[set] : q.dq_b;
      if (i == j) {  // complete: this key chunk's own query chunk
        from_heads(q.dq_l, dq_i, c, QD);
      } else {
        put_chunk(q.dq_store, i, Ce * W, dq_i);
        be_.wait_copies();  // dq_b / dq_s are written again by the next block
      }
    }
    from_heads(q.dk_l, q.dk_acc, c, KVD);
    from_heads(q.dv_l, q.dv_acc, c, KVD);
    const int64_t r0 = j * c, g0 = j * Ce;
    const float* x = res(l) + r0 * D;
    be_.rope_backward(q.dq_l, q.dq_l, ms.rope_cos + r0 * half, ms.rope_sin + r0 * half, c, H, HD);
    be_.rope_backward(q.dk_l, q.dk_l, ms.rope_cos + r0 * half, ms.rope_sin + r0 * half, c, KVH, HD);
    be_.rmsnorm_forward(q.attn_in, q.attn_rstd, x, w.attn_norm, c, D, cf.rms_norm_eps);
    project_qkv_backward(q.dnorm, q.dq_l, q.dk_l, q.dv_l, q.attn_in, sl, c, l, g0);
    be_.rmsnorm_backward(dres + r0 * D, g.attn_norm, q.dnorm, x, w.attn_norm, q.attn_rstd, c, D,
                         Accumulate::kYes);
  }
  be_.wait_copies();
}

// ---- Passes --------------------------------------------------------------------------------

void LlamaModel::forward_layers(const float* input) {
  const int64_t N = n_, D = config_.hidden_size;
  const Slot& sl = slot();
  const bool staged = sl.stage[0] != nullptr;
  if (staged) be_.wait_copies();  // an earlier pass's copies have left the staging buffers
  if (first_stage()) {
    if (embed16_)
      be_.embedding_forward_bf16(res(layer_begin_), sl.ids, embed16_, N, D);
    else
      be_.embedding_forward(res(layer_begin_), sl.ids, w_.embed, N, D);
    if (settings_.bf16_residual) be_.round_to_bf16(res(layer_begin_), N * D);
    dump("embed", res(layer_begin_), N * D);
  } else {
    LT_CHECK(input, "stage from layer {} needs the previous stage's output", layer_begin_);
    be_.copy_device(res(layer_begin_), input, size_t(N * D) * 4);  // rounded already
  }
  for (int64_t l = layer_begin_; l < layer_end_; ++l) {
    // Staged: res(l - 1) has left the buffer that layer l writes, res(l) is kept as it runs
    // (with one staging buffer: rounded into its store, then overwritten by the layer's output).
    if (staged) be_.wait_copies();
    checkpoint_out(l);
    acquire(l, LayerWeightsProvider::Pass::kForward);
    layer_forward(l, acts_for(l), Pass::kForward);
    release(l, LayerWeightsProvider::Pass::kForward);
  }
  if (last_stage()) {
    Work& k = *work_;
    be_.rmsnorm_forward(k.final_in, k.final_rstd, res(layer_end_), w_.final_norm, N, D,
                        config_.rms_norm_eps);
    dump("final_norm", k.final_in, N * D);
  }
}

void LlamaModel::backward_layers() {
  Work& k = *work_;
  using PP = LayerWeightsProvider::Pass;
  const bool staged = slot().stage[0] != nullptr;
  // One staging buffer holds the stage's output after the forward: the last layer's input
  // comes back like the others'. With two it is still in its staging buffer.
  const bool one_stage = staged && !slot().stage[1];
  if (one_stage) checkpoint_in(layer_end_ - 1);
  for (int64_t l = layer_end_ - 1; l >= layer_begin_; --l) {
    LayerActs& a = acts_for(l);
    // Staged: res(l) has arrived; res(l - 1) comes in, over res(l + 1), as layer l runs.
    if (staged) be_.wait_copies();
    if (l < layer_end_ - 1 || one_stage) checkpoint_ready(l);
    if (l > layer_begin_) checkpoint_in(l - 1);
    acquire(l, PP::kBackward);
    if (settings_.checkpointing) layer_forward(l, a, Pass::kRecompute);
    layer_backward(l, a, k.dres);
    release(l, PP::kBackward);
  }
  if (first_stage() && g_.embed)
    be_.embedding_backward(g_.embed, k.dres, slot().ids, n_, config_.hidden_size);
}

void LlamaModel::stage_forward(const MicroBatch& mb, int64_t slot_index, const float* input,
                               bool training) {
  LT_CHECK(!training || settings_.train, "a training pass on a model planned without training");
  prepare(mb, slot_index, training);
  slot().training = training;
  dropout_on_ = training;  // PEFT applies lora_dropout in train mode only
  forward_layers(input);
  dropout_on_ = false;
  last_forward_ = slot_index;
}

const float* LlamaModel::stage_output(int64_t slot_index) {
  LT_CHECK(!last_stage() && slot_index >= 0 && slot_index < int64_t(slots_.size()));
  return res_of(*slots_[slot_index], layer_end_);
}

double LlamaModel::stage_loss_backward(int64_t slot_index, float grad_scale) {
  LT_CHECK(last_stage() && slot_index == last_forward_ && slots_[slot_index]->training,
           "the loss of slot {} (last forward: slot {})", slot_index, last_forward_);
  cur_ = slot_index;
  n_ = slot().n;
  Work& k = *work_;
  const int64_t N = n_, D = config_.hidden_size;
  dropout_on_ = true;
  // Fused LM head + loss: dL/d(final_in) into dnorm, LM-head gradient accumulated; FPDT runs
  // it per sequence chunk (its dnorm holds one chunk).
  double loss = 0;
  const bool fpdt = seq_ && seq_->fpdt;
  const int64_t rows = fpdt ? seq_->c : N;
  float* dnorm = fpdt ? seq_->dnorm : k.dnorm;
  for (int64_t r0 = 0; r0 < N; r0 += rows) {
    const int64_t n = std::min(rows, N - r0);
    loss += head_loss(dnorm, k.final_in + r0 * D, slot().targets + r0, n, std::min(k.lm_chunk, n),
                      grad_scale);
    be_.rmsnorm_backward(k.dres + r0 * D, g_.final_norm, dnorm, res(layer_end_) + r0 * D,
                         w_.final_norm, k.final_rstd + r0, n, D, Accumulate::kNo);
  }
  backward_layers();
  dropout_on_ = false;
  return loss;
}

double LlamaModel::stage_loss(int64_t slot_index) {
  LT_CHECK(last_stage() && slot_index == last_forward_);
  cur_ = slot_index;
  n_ = slot().n;
  Work& k = *work_;
  return head_loss(nullptr, k.final_in, slot().targets, n_, k.lm_chunk, 0.0f);
}

double LlamaModel::head_loss(float* dnorm, const float* h, const int32_t* targets, int64_t n,
                             int64_t chunk, float grad_scale) {
  Work& k = *work_;
  const int64_t D = config_.hidden_size, V = config_.vocab_size;
  if (head16_)  // frozen bf16 head: no weight gradient
    return be_.lm_head_cross_entropy_bf16w(dnorm, h, head16_, targets, n, D, V, chunk, grad_scale,
                                           k.lm_scratch, k.head_expand, k.head_expand_rows);
  return be_.lm_head_cross_entropy(dnorm, dnorm ? g_.lm_head : nullptr, h, w_.lm_head, targets, n,
                                   D, V, chunk, grad_scale, k.lm_scratch);
}

void LlamaModel::stage_backward(int64_t slot_index, const float* dout) {
  LT_CHECK(!last_stage() && slots_[slot_index]->training);
  cur_ = slot_index;
  n_ = slot().n;
  be_.copy_device(work_->dres, dout, size_t(n_ * config_.hidden_size) * 4);
  dropout_on_ = true;
  backward_layers();
  dropout_on_ = false;
}

const float* LlamaModel::stage_input_grad() {
  LT_CHECK(!first_stage());
  return work_->dres;
}

double LlamaModel::forward_backward(const MicroBatch& mb, float grad_scale) {
  LT_CHECK(settings_.train, "forward_backward on a model planned without training buffers");
  LT_CHECK(first_stage() && last_stage(), "forward_backward on a pipeline stage");
  acquire(LayerWeightsProvider::kOuter, LayerWeightsProvider::Pass::kBackward);
  stage_forward(mb, 0, nullptr, true);
  const double loss = stage_loss_backward(0, grad_scale);
  release(LayerWeightsProvider::kOuter, LayerWeightsProvider::Pass::kBackward);
  return loss;
}

double LlamaModel::forward_loss(const MicroBatch& mb) {
  LT_CHECK(first_stage() && last_stage(), "forward_loss on a pipeline stage");
  acquire(LayerWeightsProvider::kOuter, LayerWeightsProvider::Pass::kForward);
  stage_forward(mb, 0, nullptr, false);
  const double loss = stage_loss(0);
  release(LayerWeightsProvider::kOuter, LayerWeightsProvider::Pass::kForward);
  return loss;
}

void LlamaModel::forward_logits(const MicroBatch& mb, float* logits) {
  LT_CHECK(first_stage() && last_stage(), "forward_logits on a pipeline stage");
  acquire(LayerWeightsProvider::kOuter, LayerWeightsProvider::Pass::kForward);
  stage_forward(mb, 0, nullptr, false);
  if (head16_)
    be_.linear_forward_bf16w(logits, work_->final_in, head16_, nullptr, n_, config_.hidden_size,
                             config_.vocab_size, work_->head_expand, work_->head_expand_rows);
  else
    be_.linear_forward(logits, work_->final_in, w_.lm_head, nullptr, n_, config_.hidden_size,
                       config_.vocab_size);
  release(LayerWeightsProvider::kOuter, LayerWeightsProvider::Pass::kForward);
}

}  // namespace lt
