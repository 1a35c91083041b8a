// Memory planner (see planner.h).
#include "plan/planner.h"

#include <fmt/format.h>

#include <cctype>
#include <cmath>

#include "backend/arena.h"
#include "core/error.h"
#include "dist/parallel.h"
#include "dist/zero.h"
#include "train/optimizer.h"

namespace lt {

namespace {

constexpr MemCategory kAllCategories[] = {
    MemCategory::kWeights,     MemCategory::kGradients,   MemCategory::kOptimizer,
    MemCategory::kCheckpoints, MemCategory::kActivations, MemCategory::kAttention,
    MemCategory::kMlpChunk,    MemCategory::kLmHeadChunk, MemCategory::kScratch};

// Device bytes of a plan: host arenas ("*_host") and offloaded checkpoints ("offload": host
// memory or a file; the layers run on two staging buffers planned with the activations) are off
// the device.
void account(PlanResult* out, const PlanRequest& r) {
  out->device_bytes = out->offloaded_bytes = 0;
  out->by_category.clear();
  for (MemCategory c : kAllCategories) {
    size_t bytes = 0;  // device bytes of this category
    for (const auto& b : out->plan.buffers()) {
      if (b.category != c) continue;
      // ZeRO-Offload, FPDT's store, pipeline staging, checkpoint offload
      if (b.arena.ends_with("_host") || b.arena == "offload") {
        out->offloaded_bytes += b.bytes;
        continue;
      }
      bytes += b.bytes;
    }
    out->by_category.emplace_back(std::string(mem_category_name(c)), bytes);
    out->device_bytes += bytes;
  }
  // What every process holds besides the planned buffers, measured on the engine: code and
  // libraries, OpenMP thread stacks and OpenBLAS's packing workspace (CPU, about 30-55 MiB
  // here); the CUDA context, NCCL and cuBLAS workspaces on a GPU.
  out->runtime_bytes = r.device == PlanDevice::kCpu ? size_t(64) << 20 : size_t(1) << 30;
  out->by_category.emplace_back("runtime", out->runtime_bytes);
  out->device_bytes += out->runtime_bytes;
}

// The CUDA backend's workspace, sized for the run's largest ops (every stage, every layout).
void add_workspace(const PlanRequest& r, const RunSettings& s, MemoryPlan* plan) {
  if (r.device == PlanDevice::kCuda)
    plan_workspace(cuda_workspace_needs(workspace_shape(r.config, s), r.bf16_gemms), plan);
}

ParallelSettings parallel_settings(const PlanRequest& r) {
  ParallelSettings ps;
  ps.zero.stage = r.zero_stage;
  ps.zero.offload_optimizer = r.offload_optimizer || r.offload_params;
  ps.zero.offload_params = r.offload_params;
  ps.fpdt_chunk = r.fpdt_chunk;
  ps.micro_per_step = r.micro_per_step;
  ps.max_tokens = r.seq_len * r.batch;
  return ps;
}

}  // namespace

WorkspaceShape workspace_shape(const ModelConfig& c, const RunSettings& s) {
  WorkspaceShape w;
  const int64_t N = std::max<int64_t>(s.max_tokens, 1);
  w.tokens = N;
  w.mlp_rows = (N + s.mlp_chunks - 1) / s.mlp_chunks;
  w.lm_rows = (N + s.lm_head_chunks - 1) / s.lm_head_chunks;
  w.hidden = c.hidden_size;
  w.intermediate = c.intermediate_size;
  w.vocab = c.vocab_size;
  w.heads = c.num_attention_heads;
  w.q_dim = c.num_attention_heads * c.head_dim;
  w.kv_dim = c.num_key_value_heads * c.head_dim;
  w.lora_rank = s.lora.enabled ? s.lora.r : 0;
  return w;
}

PlanResult plan_memory(const PlanRequest& r) {
  RunSettings s = r.settings;
  s.max_tokens = r.seq_len * r.batch;
  if (!r.parallel() || !s.train) {
    PlanResult out;
    if (r.mini_sequence_auto) mini_sequence_auto(r.config, s.max_tokens, &s);
    LlamaModel::plan(r.config, s, &out.plan);
    if (s.train) AdamW::plan(LlamaModel::trainable_numel(r.config, s), &out.plan);
    if (!s.flash_attention)  // plain attention materialises one (T,T) score matrix at a time
      out.plan.add("attention.scores", size_t(r.seq_len) * r.seq_len * 4 * 2,
                   MemCategory::kAttention, "transient");
    add_workspace(r, s, &out.plan);
    account(&out, r);
    out.settings = s;
    return out;
  }
  // Every pipeline stage (replica 0, sequence rank 0: all ranks of a stage plan alike, rank 0
  // of a ZeRO group holds the largest shard); the largest peak is the layout's.
  const ParallelSettings ps = parallel_settings(r);
  PlanResult best;
  for (int stage = 0; stage < r.pipeline_parallel; ++stage) {
    if (r.only_stage >= 0 && stage != r.only_stage) continue;
    const ParallelLayout probe =
        ParallelLayout::make(r.world_size, 0, r.sequence_parallel, r.pipeline_parallel);
    const ParallelLayout lay = ParallelLayout::make(r.world_size, probe.rank_of(stage, 0, 0),
                                                    r.sequence_parallel, r.pipeline_parallel);
    RunSettings st = s;
    if (r.mini_sequence_auto)
      mini_sequence_auto(r.config, ParallelEngine::local_max_tokens(lay, ps), &st);
    ParallelEngine::adjust_run_settings(r.config, lay, ps, &st);
    PlanResult p;
    p.stage = stage;
    LlamaModel::plan(r.config, st, &p.plan);
    ParallelEngine::plan(r.config, st, lay, ps, &p.plan);
    if (!st.flash_attention)
      p.plan.add("attention.scores", size_t(r.seq_len) * r.seq_len * 4 * 2, MemCategory::kAttention,
                 "transient");
    add_workspace(r, st, &p.plan);
    account(&p, r);
    p.settings = st;
    if (best.plan.buffers().empty() || p.device_bytes > best.device_bytes) best = std::move(p);
  }
  return best;
}

GpuSpec gpu_spec(const std::string& name) {
  const double GB = 1e9;
  // Dense bf16 peaks and NVLink per direction from NVIDIA's data sheets; PCIe and network are
  // what a copy engine and a 200 / 400 Gb/s NIC per GPU deliver in practice.
  if (name == "a100-40gb") return {name, size_t(40) << 30, 312e12, 300 * GB, 25 * GB, 25 * GB, 8};
  if (name == "a100-80gb") return {name, size_t(80) << 30, 312e12, 300 * GB, 25 * GB, 25 * GB, 8};
  if (name == "h100-80gb") return {name, size_t(80) << 30, 989e12, 450 * GB, 50 * GB, 50 * GB, 8};
  if (name == "h200") return {name, size_t(140) << 30, 989e12, 450 * GB, 50 * GB, 50 * GB, 8};
  fail("--gpu: '{}' is not known; use a100-40gb, a100-80gb, h100-80gb or h200", name);
}

double training_flops(const ModelConfig& c, double tokens, double row_tokens) {
  const double D = double(c.hidden_size), F = double(c.intermediate_size);
  const double QD = double(c.num_attention_heads * c.head_dim);
  const double KVD = double(c.num_key_value_heads * c.head_dim);
  const double per_layer = D * QD * 2 + D * KVD * 2 + 3 * D * F;  // q, o, k, v, gate, up, down
  const double matmul = double(c.num_hidden_layers) * per_layer + double(c.vocab_size) * D;
  return 6.0 * matmul * tokens + 6.0 * tokens * row_tokens * double(c.num_hidden_layers) * QD;
}

std::string StepEstimate::describe() const {
  return fmt::format(
      "estimated step {:.2f} s ({:.0f} tokens/s, MFU {:.1f}%): compute {:.2f} s, all-to-all "
      "{:.2f} s, pipeline point-to-point {:.2f} s, exposed gradient sync {:.2f} s, exposed host "
      "copies {:.2f} s",
      step_s, tokens_per_s, 100 * mfu, compute_s, alltoall_s, p2p_s, grad_sync_s, host_copy_s);
}

StepEstimate estimate_step(const PlanRequest& r, const GpuSpec& g, double assumed_mfu) {
  const ModelConfig& c = r.config;
  const int W = r.world_size, SP = r.sequence_parallel, PP = r.pipeline_parallel;
  const int DP = W / (SP * PP);
  const double M = double(std::max<int64_t>(1, r.micro_per_step));
  const double tokens_mb = double(r.seq_len * r.batch);  // one replica's micro-batch
  const double model = training_flops(c, tokens_mb * M * DP, double(r.seq_len));
  // Recomputation: checkpointing runs each layer's forward again (a third of the training
  // FLOPs; selective recomputation leaves out the attention's); mini-sequence MLP chunks
  // recompute gate/up (2 of the 6 x D x F per token, about a tenth more of the MLP).
  const double attention =
      model - training_flops(c, tokens_mb * M * DP, 0.0);  // the attention's share
  const bool selective = r.settings.keep_attention && SP == 1 && r.fpdt_chunk == 0;
  double executed =
      model + (r.settings.checkpointing ? (model - (selective ? attention : 0.0)) / 3.0 : 0.0);
  StepEstimate e;
  e.flops_per_device = executed / W;
  const double bubble = 1.0 + double(PP - 1) / M;  // 1F1B
  e.compute_s = e.flops_per_device / (g.peak_flops * assumed_mfu) * bubble;
  const double L = double(c.num_hidden_layers) / PP, D = double(c.hidden_size);
  const double QD = double(c.num_attention_heads * c.head_dim);
  const double KVD = double(c.num_key_value_heads * c.head_dim);
  const double n = tokens_mb / SP;  // this rank's tokens of a micro-batch
  const double bf16 = 2;
  auto link = [&](int group) {
    return group <= g.gpus_per_node ? g.intra_node_bw : g.inter_node_bw;
  };
  if (SP > 1) {  // per layer: q, k, v, out forward; dout, dq, dk, dv backward (tests/dist)
    double bytes = M * L * bf16 * n * 2 * (2 * QD + 2 * KVD);
    if (r.settings.checkpointing) bytes *= 1.5;  // the forward's four again
    e.alltoall_bytes = bytes;
    e.alltoall_s = bytes * (SP - 1) / SP / link(SP);
  }
  if (PP > 1) {  // each stage sends an activation (or a gradient) per micro-batch
    e.p2p_bytes = M * bf16 * n * D;
    e.p2p_s = 2 * e.p2p_bytes / link(W);  // one each way across a boundary
  }
  {
    const double P = double(ParamTable(c).total_numel()) / PP;
    const double trainable =
        r.settings.lora.enabled ? double(LlamaModel::trainable_numel(c, r.settings)) / PP : P;
    const int G = DP * SP;  // the ZeRO group of a stage
    if (G > 1) {
      double bytes = 2 * trainable * bf16 * (G - 1) / G;           // reduce-scatter + all-gather
      if (r.zero_stage == 3) bytes += 2 * P * bf16 * (G - 1) / G;  // gathers in the backward
      e.grad_sync_bytes = bytes;
      e.grad_sync_s = std::max(0.0, bytes / link(G) - 0.5 * e.compute_s);
    }
  }
  {
    double host = 0;
    if (r.settings.offload_checkpoints) host += M * 2 * L * n * D * bf16;  // out and back in
    if (r.fpdt_chunk > 0) {  // the store written once, K/V read back per later chunk, the
      const double u = std::max(1.0, std::ceil(tokens_mb / double(r.fpdt_chunk)));  // query
      const double store = n * (3 * QD + 2 * KVD);                                  // side
      host += M * L * bf16 *
              (store + n * 2 * KVD * (u - 1) / 2 +                      // forward
               n * 2 * KVD + n * (4 * QD) * (u + 1) / 2 + n * 2 * QD);  // backward
      if (r.settings.checkpointing) host += M * L * bf16 * (store + n * 2 * KVD * (u - 1) / 2);
    }
    if (r.offload_optimizer || r.offload_params) {  // gradients out, updated weights back
      const double P = double(ParamTable(c).total_numel()) / PP / (DP * SP);
      host += 2 * P * bf16;
    }
    e.host_bytes = host;
    e.host_copy_s = std::max(0.0, host / g.host_bw - e.compute_s);
  }
  e.step_s = e.compute_s + e.alltoall_s + e.p2p_s + e.grad_sync_s + e.host_copy_s;
  e.tokens_per_s = tokens_mb * M * DP / e.step_s;
  e.mfu = model / (W * g.peak_flops * e.step_s);
  return e;
}

std::string PlanResult::describe() const {
  std::string s = "predicted peak memory by category:\n";
  for (const auto& [name, bytes] : by_category)
    if (bytes) s += fmt::format("  {:<16} {:>12}\n", name, format_bytes(bytes));
  s += fmt::format("  {:<16} {:>12}", "total", format_bytes(device_bytes));
  if (offloaded_bytes)
    s += fmt::format("\n  (+ {} offloaded to the host)", format_bytes(offloaded_bytes));
  return s;
}

bool plan_fits(const PlanResult& p, const PlanRequest& r, size_t device_budget) {
  const bool host_ok =
      r.device != PlanDevice::kCuda || r.host_budget == 0 || p.offloaded_bytes <= r.host_budget;
  return p.device_bytes <= device_budget && host_ok;
}

int64_t longest_sequence(PlanRequest r, size_t budget, int64_t granularity, int64_t limit) {
  auto fits = [&](int64_t t) {
    r.seq_len = t;
    return plan_fits(plan_memory(r), r, budget);
  };
  if (!fits(granularity)) return 0;
  int64_t lo = granularity, hi = 2 * granularity;  // lo fits
  while (hi <= limit && fits(hi)) lo = hi, hi *= 2;
  if (hi > limit) return lo;
  while (hi - lo > granularity) {  // lo fits, hi does not
    const int64_t mid = (lo + hi) / 2 / granularity * granularity;
    if (mid <= lo) break;
    (fits(mid) ? lo : hi) = mid;
  }
  return lo;
}

std::optional<int64_t> parse_mini_sequence(const std::string& value) {
  if (value == "auto") return std::nullopt;
  char* end = nullptr;
  const long long m = std::strtoll(value.c_str(), &end, 10);
  if (value.empty() || !end || *end || m < 1)
    fail("--mini_sequence: '{}' is not allowed; use a positive integer or auto", value);
  return m;
}

bool parse_recompute_granularity(const std::string& value) {
  if (value == "full") return false;
  if (value == "selective") return true;
  fail("--recompute_granularity: '{}' is not allowed; use full or selective", value);
}

void mini_sequence_auto(const ModelConfig& c, int64_t tokens, RunSettings* s) {
  // MST's rules: MLP chunks of ~hidden_size tokens; ceil(V/D) LM-head chunks, so that one chunk
  // of logits is as large as the hidden states. Chunks never go below kMinChunkRows rows: below
  // that the GEMMs stop being compute-bound and the saving is no longer worth it. LM-head chunks
  // never go above kMaxLmChunkRows rows: past 131K tokens MST's chunk (tokens / 32 rows of a
  // 128K vocabulary) grows with the sequence (5 GiB of f32 logits at 350K tokens) while a
  // 4096-row product (4 TFLOP for Llama-3-8B) is long compute-bound.
  constexpr int64_t kMinChunkRows = 256, kMaxLmChunkRows = 4096;
  const int64_t t = std::max<int64_t>(1, tokens);
  auto chunks_for_rows = [&](int64_t rows) {
    rows = std::max(rows, std::min(t, kMinChunkRows));
    return std::max<int64_t>(1, (t + rows - 1) / rows);
  };
  s->mlp_chunks = chunks_for_rows(c.hidden_size);
  const int64_t lm_chunks =
      std::max<int64_t>(1, (c.vocab_size + c.hidden_size - 1) / c.hidden_size);
  s->lm_head_chunks = chunks_for_rows(std::min((t + lm_chunks - 1) / lm_chunks, kMaxLmChunkRows));
}

AutoChoice choose_settings(const PlanRequest& base, size_t budget, bool auto_ms, bool auto_ck) {
  struct Candidate {
    bool mini, ckpt, offload, fine, selective;
    const char* what;
  };
  // Fastest first: chunking costs a recompute of gate/up per chunk (~+10% step time),
  // checkpointing one extra forward (~+33%; selective recomputation keeps the attention outputs
  // and recomputes the rest), offload only copies (hidden by prefetch). Very long sequences may
  // need chunks finer than MST's rule (whose LM-head chunk of logits is as large as the hidden
  // states): 1024-row chunks, still large enough for compute-bound GEMMs.
  const Candidate cands[] = {
      {false, false, false, false, false, "no memory-saving technique needed"},
      {true, false, false, false, false,
       "mini-sequence MLP/LM head (cheapest saving: logits and MLP intermediates)"},
      {true, true, false, false, true,
       "mini-sequence + checkpointing with the attention outputs kept (selective "
       "recomputation: the extra forward without attention)"},
      {true, true, false, false, false,
       "mini-sequence + per-layer checkpointing (one extra forward)"},
      {true, true, true, false, false, "mini-sequence + checkpointing + checkpoint offload"},
      {true, true, true, true, false,
       "1024-row mini-sequence chunks + checkpointing + checkpoint offload"},
  };
  const bool sequence_path = base.sequence_parallel > 1 || base.fpdt_chunk > 0;
  AutoChoice best;
  for (const auto& c : cands) {
    PlanRequest r = base;
    if (auto_ms) {
      r.mini_sequence_auto = c.mini;
      if (!c.mini) r.settings.mlp_chunks = r.settings.lm_head_chunks = 1;
    } else if (c.mini && r.settings.mlp_chunks == 1 && r.settings.lm_head_chunks == 1) {
      continue;  // the user fixed the chunks
    } else if (c.fine) {
      continue;
    }
    if (c.fine) {
      const int64_t t =
          std::max<int64_t>(1, r.seq_len * r.batch / std::max(1, r.sequence_parallel));
      r.mini_sequence_auto = false;
      r.settings.mlp_chunks = r.settings.lm_head_chunks = std::max<int64_t>(1, (t + 1023) / 1024);
    }
    if (c.selective && (!auto_ck || sequence_path || base.settings.keep_attention))
      continue;  // chosen only with checkpointing itself (and once: a user's choice stands)
    if (c.selective) r.settings.keep_attention = true;
    if (auto_ck)
      r.settings.checkpointing = c.ckpt;
    else if (c.ckpt != r.settings.checkpointing)
      continue;
    r.settings.offload_checkpoints = c.offload;
    if (c.offload && !r.settings.checkpointing) continue;
    const PlanResult p = plan_memory(r);
    best.settings = r.settings;
    if (r.mini_sequence_auto)
      mini_sequence_auto(r.config,
                         (r.seq_len * r.batch + r.sequence_parallel - 1) / r.sequence_parallel,
                         &best.settings);
    if (plan_fits(p, r, budget)) {
      best.fits = true;
      best.why = fmt::format("{}: predicted {} fits the budget of {}", c.what,
                             format_bytes(p.device_bytes), format_bytes(budget));
      return best;
    }
    best.why = p.device_bytes <= budget
                   ? fmt::format(
                         "even with {}, the {} offloaded to pinned host memory exceed the "
                         "host budget of {}",
                         c.what, format_bytes(p.offloaded_bytes), format_bytes(r.host_budget))
                   : fmt::format("even with {}, the prediction {} exceeds the budget of {}", c.what,
                                 format_bytes(p.device_bytes), format_bytes(budget));
  }
  return best;
}

size_t parse_bytes(const std::string& s, const std::string& flag) {
  size_t i = 0;
  while (i < s.size() && (std::isdigit(static_cast<unsigned char>(s[i])) || s[i] == '.')) ++i;
  double v = 0;
  try {
    v = std::stod(s.substr(0, i));
  } catch (...) {
    fail("{}: '{}' is not a size; use e.g. 80GiB, 512MiB or a number of bytes", flag, s);
  }
  std::string unit = s.substr(i);
  for (auto& ch : unit) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  double mult = 1;
  if (unit.empty() || unit == "b")
    mult = 1;
  else if (unit == "k" || unit == "kb" || unit == "kib")
    mult = 1024.0;
  else if (unit == "m" || unit == "mb" || unit == "mib")
    mult = 1024.0 * 1024;
  else if (unit == "g" || unit == "gb" || unit == "gib")
    mult = 1024.0 * 1024 * 1024;
  else if (unit == "t" || unit == "tb" || unit == "tib")
    mult = 1024.0 * 1024 * 1024 * 1024;
  else
    fail("{}: unit '{}' is not known; use B, KiB, MiB, GiB or TiB", flag, unit);
  if (v <= 0) fail("{}: '{}' must be positive", flag, s);
  return static_cast<size_t>(v * mult);
}

bool apply_position_interpolation(ModelConfig* c, int64_t model_max_length) {
  if (model_max_length <= c->max_position_embeddings) return false;
  if (c->rope_scaling.type != RopeType::kDefault) return false;
  c->rope_scaling = RopeScaling{};
  c->rope_scaling.type = RopeType::kLinear;
  c->rope_scaling.factor = std::ceil(static_cast<double>(model_max_length) /
                                     static_cast<double>(c->max_position_embeddings));
  return true;
}

}  // namespace lt
