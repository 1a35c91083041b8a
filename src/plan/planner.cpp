// Memory planner (see planner.h).
#include "plan/planner.h"

#include <cctype>
#include <cmath>

#include <fmt/format.h>

#include "core/error.h"
#include "dist/zero.h"
#include "train/optimizer.h"

namespace lt {

namespace {

// Bytes per f32-planned byte on the device for each category.
double device_factor(MemCategory c, PlanDevice d) {
  if (d == PlanDevice::kCpuF32) return 1.0;
  switch (c) {
    case MemCategory::kWeights: return 1.5;    // bf16 weights + f32 master copy
    case MemCategory::kGradients: return 0.5;  // bf16 gradients
    case MemCategory::kOptimizer: return 1.0;  // f32 moments
    case MemCategory::kLmHeadChunk: return 1.0;  // logits stay f32
    default: return 0.5;                       // bf16 activations and scratch
  }
}

constexpr MemCategory kAllCategories[] = {
    MemCategory::kWeights,     MemCategory::kGradients, MemCategory::kOptimizer,
    MemCategory::kCheckpoints, MemCategory::kActivations, MemCategory::kAttention,
    MemCategory::kMlpChunk,    MemCategory::kLmHeadChunk, MemCategory::kScratch};

}  // namespace

PlanResult plan_memory(const PlanRequest& r) {
  PlanResult out;
  RunSettings s = r.settings;
  s.max_tokens = r.seq_len * r.batch;
  if (r.mini_sequence_auto) mini_sequence_auto(r.config, s.max_tokens, &s);
  const bool sharded = s.train && (r.world_size > 1 || r.zero_stage > 0);
  ZeroSettings zero;
  zero.stage = r.zero_stage;
  zero.offload_optimizer = r.offload_optimizer;
  if (sharded && s.lora.enabled)
    fail("--use_peft_lora with --world_size > 1 or --zero_stage > 0 is not supported yet (the "
         "ZeRO engine shards the full parameter block, not the LoRA trainable set)");
  if (sharded) ZeroEngine::adjust_run_settings(zero, &s);
  LlamaModel::plan(r.config, s, &out.plan);
  if (sharded)  // rank 0 holds the largest shard
    ZeroEngine::plan(r.config, zero, r.world_size, 0, &out.plan);
  else if (s.train)
    AdamW::plan(LlamaModel::trainable_numel(r.config, s), &out.plan);
  if (!s.flash_attention) {  // plain attention materialises one (T,T) score matrix at a time
    out.plan.add("attention.scores", size_t(r.seq_len) * r.seq_len * 4 * 2, MemCategory::kAttention,
                 "transient");
  }
  const bool frozen_base = s.lora.enabled;
  for (MemCategory c : kAllCategories) {
    size_t bytes = 0;  // device bytes of this category, before offload of checkpoints
    for (const auto& b : out.plan.buffers()) {
      if (b.category != c) continue;
      if (b.arena.ends_with("_host")) {  // ZeRO-Offload: host arenas are not on the device
        out.offloaded_bytes += b.bytes;
        continue;
      }
      double f = device_factor(c, r.device);
      if (r.device == PlanDevice::kCudaBf16 && c == MemCategory::kWeights) {
        if (b.name.rfind("nf4.", 0) == 0) f = 1.0;                  // already 4-bit codes
        else if (frozen_base && b.name == "params") f = 0.5;        // frozen bf16, no master
      }
      bytes += static_cast<size_t>(static_cast<double>(b.bytes) * f);
    }
    if (c == MemCategory::kCheckpoints && r.settings.offload_checkpoints) {
      // Two layers' checkpoints stay resident: the one in use and the one being prefetched.
      const size_t per_layer = bytes / std::max<int64_t>(1, r.config.num_hidden_layers + 1);
      const size_t resident = std::min(bytes, 2 * per_layer);
      out.offloaded_bytes += bytes - resident;
      bytes = resident;
    }
    out.by_category.emplace_back(std::string(mem_category_name(c)), bytes);
    out.device_bytes += bytes;
  }
  // What every process holds besides the planned buffers, measured on the engine: code and
  // libraries, OpenMP thread stacks and OpenBLAS's packing workspace (CPU, about 30-55 MiB
  // here); the CUDA context and cuBLAS workspaces on a GPU.
  out.runtime_bytes = r.device == PlanDevice::kCpuF32 ? size_t(64) << 20 : size_t(1) << 30;
  out.by_category.emplace_back("runtime", out.runtime_bytes);
  out.device_bytes += out.runtime_bytes;
  return out;
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

int64_t longest_sequence(PlanRequest r, size_t budget, int64_t granularity, int64_t limit) {
  auto fits = [&](int64_t t) {
    r.seq_len = t;
    return plan_memory(r).device_bytes <= budget;
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

void mini_sequence_auto(const ModelConfig& c, int64_t tokens, RunSettings* s) {
  // MST's rules: MLP chunks of ~hidden_size tokens; ceil(V/D) LM-head chunks, so that one chunk
  // of logits is as large as the hidden states. Chunks never go below kMinChunkRows rows: below
  // that the GEMMs stop being compute-bound and the saving is no longer worth it.
  constexpr int64_t kMinChunkRows = 256;
  const int64_t t = std::max<int64_t>(1, tokens);
  auto chunks_for_rows = [&](int64_t rows) {
    rows = std::max(rows, std::min(t, kMinChunkRows));
    return std::max<int64_t>(1, (t + rows - 1) / rows);
  };
  s->mlp_chunks = chunks_for_rows(c.hidden_size);
  const int64_t lm_chunks = std::max<int64_t>(1, (c.vocab_size + c.hidden_size - 1) / c.hidden_size);
  s->lm_head_chunks = chunks_for_rows((t + lm_chunks - 1) / lm_chunks);
}

AutoChoice choose_settings(const PlanRequest& base, size_t budget, bool auto_ms, bool auto_ck) {
  struct Candidate {
    bool mini, ckpt, offload;
    const char* what;
  };
  // Fastest first: chunking costs a recompute of gate/up per chunk (~+10% step time),
  // checkpointing one extra forward (~+33%), offload only copies (hidden by prefetch).
  const Candidate cands[] = {
      {false, false, false, "no memory-saving technique needed"},
      {true, false, false, "mini-sequence MLP/LM head (cheapest saving: logits and MLP intermediates)"},
      {true, true, false, "mini-sequence + per-layer checkpointing (one extra forward)"},
      {true, true, true, "mini-sequence + checkpointing + checkpoint offload"},
  };
  AutoChoice best;
  for (const auto& c : cands) {
    PlanRequest r = base;
    if (auto_ms) {
      r.mini_sequence_auto = c.mini;
      if (!c.mini) r.settings.mlp_chunks = r.settings.lm_head_chunks = 1;
    } else if (c.mini && r.settings.mlp_chunks == 1 && r.settings.lm_head_chunks == 1) {
      continue;  // the user fixed the chunks
    }
    if (auto_ck) r.settings.checkpointing = c.ckpt;
    else if (c.ckpt != r.settings.checkpointing) continue;
    r.settings.offload_checkpoints = c.offload;
    if (c.offload && !r.settings.checkpointing) continue;
    const PlanResult p = plan_memory(r);
    best.settings = r.settings;
    if (r.mini_sequence_auto) mini_sequence_auto(r.config, r.seq_len * r.batch, &best.settings);
    if (p.device_bytes <= budget) {
      best.fits = true;
      best.why = fmt::format("{}: predicted {} fits the budget of {}", c.what,
                             format_bytes(p.device_bytes), format_bytes(budget));
      return best;
    }
    best.why = fmt::format("even with {}, the prediction {} exceeds the budget of {}", c.what,
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
  if (unit.empty() || unit == "b") mult = 1;
  else if (unit == "k" || unit == "kb" || unit == "kib") mult = 1024.0;
  else if (unit == "m" || unit == "mb" || unit == "mib") mult = 1024.0 * 1024;
  else if (unit == "g" || unit == "gb" || unit == "gib") mult = 1024.0 * 1024 * 1024;
  else if (unit == "t" || unit == "tb" || unit == "tib") mult = 1024.0 * 1024 * 1024 * 1024;
  else fail("{}: unit '{}' is not known; use B, KiB, MiB, GiB or TiB", flag, unit);
  if (v <= 0) fail("{}: '{}' must be positive", flag, s);
  return static_cast<size_t>(v * mult);
}

bool apply_position_interpolation(ModelConfig* c, int64_t model_max_length) {
  if (model_max_length <= c->max_position_embeddings) return false;
  if (c->rope_scaling.type != RopeType::kDefault) return false;
  c->rope_scaling = RopeScaling{};
  c->rope_scaling.type = RopeType::kLinear;
  c->rope_scaling.factor =
      std::ceil(static_cast<double>(model_max_length) / static_cast<double>(c->max_position_embeddings));
  return true;
}

}  // namespace lt
