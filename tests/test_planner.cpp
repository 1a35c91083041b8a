// The memory planner: predictions against measured peak memory of real training steps (within
// 10%), longest-sequence search, automatic settings, sizes, LongLoRA position interpolation.
#include <gtest/gtest.h>

#include <algorithm>
#include <fstream>
#include <random>

#include "backend/backend.h"
#include "core/error.h"
#include "model/lora.h"
#include "model/presets.h"
#include "plan/planner.h"
#include "train/batching.h"
#include "train/optimizer.h"

namespace lt {
namespace {

ModelConfig mid_config() {
  nlohmann::json j = {{"architectures", {"LlamaForCausalLM"}},
                      {"hidden_size", 128},
                      {"intermediate_size", 352},
                      {"num_hidden_layers", 2},
                      {"num_attention_heads", 4},
                      {"num_key_value_heads", 2},
                      {"vocab_size", 8000},
                      {"max_position_embeddings", 8192},
                      {"rms_norm_eps", 1e-5}};
  return parse_model_config(j, "mid_config");
}

// Resets the kernel's peak-RSS counter (VmHWM) to the current RSS.
bool reset_peak() {
  std::ofstream f("/proc/self/clear_refs");
  f << "5";
  f.close();
  return static_cast<bool>(f);
}

struct Measured {
  size_t predicted, measured;
};

Measured measure_step(RunSettings rs, int64_t T) {
  const ModelConfig c = mid_config();
  PlanRequest req{c, T, 1, rs};
  const PlanResult plan = plan_memory(req);
  // The fixed runtime overhead is already resident here (warmed up before the cases).
  const size_t predicted = plan.device_bytes - plan.runtime_bytes;
  Example e;
  std::mt19937 rng(1);
  for (int64_t t = 0; t < T; ++t) e.input_ids.push_back(static_cast<int32_t>(rng() % c.vocab_size));
  std::vector<const Example*> rows = {&e};
  const MicroBatch mb = make_micro_batch(rows);
  auto be = make_cpu_backend();
  const size_t before = current_rss();
  EXPECT_TRUE(reset_peak()) << "cannot reset the peak RSS through /proc/self/clear_refs";
  {
    rs.max_tokens = T;
    LlamaModel m(c, *be, rs);
    std::fill(m.params(), m.params() + m.table().total_numel(), 0.01f);
    std::fill(m.grads(), m.grads() + m.table().total_numel(), 0.0f);
    AdamW opt(m.table(), *be, OptimizerSettings{});
    std::fill(opt.moments(), opt.moments() + opt.moments_count(), 0.0f);
    m.forward_backward(mb, 1.0f / T);
  }
  return {predicted, measured_peak_rss() - before};
}

TEST(Planner, PredictionWithinTenPercentOfMeasuredPeak) {
  // The plan covers the engine's buffers. The process's one-time overhead (thread pools and
  // their stacks, OpenBLAS's packing workspace: about 13 MiB here, touched by the first step)
  // is warmed up by a short step first, so the comparison measures what the plan predicts.
  measure_step(RunSettings{}, 256);
  struct Case {
    const char* name;
    int64_t T, mlp, lm;
    bool ckpt, offload;
  };
  for (const Case& k : {Case{"vanilla", 2048, 1, 1, false, false},
                        Case{"mini-sequence", 4096, 32, 63, false, false},
                        Case{"mini-sequence + checkpointing", 8192, 64, 63, true, false},
                        Case{"+ offload", 8192, 64, 63, true, true}}) {
    RunSettings rs;
    rs.mlp_chunks = k.mlp;
    rs.lm_head_chunks = k.lm;
    rs.checkpointing = k.ckpt;
    rs.offload_checkpoints = k.offload;
    rs.offload_dir = "/tmp";
    const Measured m = measure_step(rs, k.T);
    const double ratio = static_cast<double>(m.measured) / static_cast<double>(m.predicted);
    EXPECT_NEAR(ratio, 1.0, 0.10) << k.name << ": predicted " << format_bytes(m.predicted)
                                  << ", measured " << format_bytes(m.measured);
    std::printf("%-32s T=%-6lld predicted %-12s measured %-12s ratio %.3f\n", k.name,
                static_cast<long long>(k.T), format_bytes(m.predicted).c_str(),
                format_bytes(m.measured).c_str(), ratio);
  }
}

TEST(Planner, LongestSequenceGrowsWithEachTechnique) {
  PlanRequest r;
  r.config = mid_config();
  r.batch = 1;
  const size_t budget = size_t(256) << 20;
  r.settings.flash_attention = false;
  const int64_t vanilla = longest_sequence(r, budget);
  r.settings.flash_attention = true;
  const int64_t flash = longest_sequence(r, budget);
  r.mini_sequence_auto = true;
  const int64_t mini = longest_sequence(r, budget);
  r.settings.checkpointing = true;
  const int64_t ckpt = longest_sequence(r, budget);
  r.settings.offload_checkpoints = true;
  const int64_t off = longest_sequence(r, budget);
  EXPECT_GT(vanilla, 0);
  EXPECT_GT(flash, vanilla);
  EXPECT_GT(mini, flash);
  EXPECT_GT(ckpt, mini);
  EXPECT_GE(off, ckpt);
  // The answer is the longest: it fits, one granule more does not.
  r.seq_len = off;
  EXPECT_LE(plan_memory(r).device_bytes, budget);
  r.seq_len = off + 256;
  EXPECT_GT(plan_memory(r).device_bytes, budget);
}

TEST(Planner, AutoPicksTheFastestSettingsThatFit) {
  PlanRequest r;
  r.config = mid_config();
  r.seq_len = 4096;
  const AutoChoice roomy = choose_settings(r, size_t(8) << 30, true, true);
  EXPECT_TRUE(roomy.fits);
  EXPECT_EQ(roomy.settings.mlp_chunks, 1);
  EXPECT_FALSE(roomy.settings.checkpointing);
  const size_t vanilla = plan_memory(r).device_bytes;
  const AutoChoice tight = choose_settings(r, vanilla * 6 / 10, true, true);
  EXPECT_TRUE(tight.fits) << tight.why;
  EXPECT_GT(tight.settings.lm_head_chunks, 1);
  const AutoChoice impossible = choose_settings(r, 1 << 20, true, true);
  EXPECT_FALSE(impossible.fits);
  EXPECT_NE(impossible.why.find("exceeds"), std::string::npos) << impossible.why;
}

// Llama-3-8B on 4 GPUs with --bf16 True: sequence parallel 4, ZeRO-3 with the optimizer
// offloaded, checkpoints offloaded (in bf16), mini-sequence 512 (FPDT's setting; the sequence
// and chunk per test).
PlanRequest eight_billion_on_four() {
  PlanRequest r;
  r.config = parse_model_config(preset_config("llama3-8b"), "llama3-8b");
  r.device = PlanDevice::kCuda;
  r.bf16_gemms = r.settings.bf16_residual = true;
  r.world_size = 4;
  r.sequence_parallel = 4;
  r.zero_stage = 3;
  r.offload_optimizer = true;
  r.settings.checkpointing = r.settings.offload_checkpoints = true;
  r.settings.mlp_chunks = r.settings.lm_head_chunks = 512;
  return r;
}

// FPDT chunks whole layers: past the residual stream (kept, offloaded but two) and its
// gradient, device memory no longer grows with the sequence; Ulysses keeps every layer's
// per-token tensors for the whole sequence.
TEST(Planner, FpdtDeviceMemoryGrowsOnlyWithTheResidualStream) {
  PlanRequest r = eight_billion_on_four();
  auto per_token = [&](int64_t chunk) {
    r.fpdt_chunk = chunk;
    r.seq_len = 1 << 20;
    const double a = double(plan_memory(r).device_bytes);
    r.seq_len = 1 << 21;
    const double b = double(plan_memory(r).device_bytes);
    return (b - a) / double(1 << 20);  // device bytes per token of the sequence
  };
  const double ulysses = per_token(0), fpdt = per_token(65536);
  const double D = double(r.config.hidden_size);
  std::printf(
      "device bytes per sequence token on each of 4 ranks: Ulysses %.0f, FPDT %.0f "
      "(hidden %g)\n",
      ulysses, fpdt, D);
  // Ulysses keeps about 13.7 f32 hidden vectors per local token (3.4 per sequence token on each
  // of the 4 ranks; dL/d(out) and dq live in the layer's dead activations), FPDT a third of it.
  EXPECT_LT(fpdt, 0.4 * ulysses);
  // What remains per local token, as the engine allocates it: the two f32 staging buffers and
  // the bf16 one the checkpoints leave through, the residual gradient and the final norm's
  // input (f32), RoPE tables and token ids: under 5 f32 hidden vectors.
  EXPECT_LT(fpdt * 4, 5 * D * 4);
}

// FPDT's headline (Yao et al. 2024) is an 8B model at 2M tokens on 4 x A100-40GB, with bf16
// activations and gradients throughout. This engine keeps the residual stream's working
// buffers, the activations inside a layer and the gradients in f32, and the plan says what it
// allocates: with FPDT chunks (sequence parallel 4, ZeRO-3, offloaded optimizer and
// checkpoints) 2M tokens fit 4 x A100-80GB but not 40 GB; plain Ulysses fits neither.
TEST(Planner, EightBillionAtTwoMillionTokensOnFourA100) {
  PlanRequest r = eight_billion_on_four();
  apply_position_interpolation(&r.config, 2097152);
  r.seq_len = 2097152;
  const GpuSpec a100 = gpu_spec("a100-80gb");
  r.fpdt_chunk = 65536;
  const PlanResult fpdt = plan_memory(r);
  r.fpdt_chunk = 0;
  const PlanResult ulysses = plan_memory(r);
  std::printf("8B at 2M tokens per A100-80GB: FPDT %s, Ulysses %s\n",
              format_bytes(fpdt.device_bytes).c_str(), format_bytes(ulysses.device_bytes).c_str());
  EXPECT_LE(fpdt.device_bytes, a100.memory_bytes);
  EXPECT_GT(fpdt.device_bytes, gpu_spec("a100-40gb").memory_bytes);
  EXPECT_GT(ulysses.device_bytes, 1.5 * a100.memory_bytes);
  r.fpdt_chunk = 65536;
  const StepEstimate e = estimate_step(r, a100, 0.5);
  std::printf("%s\n", e.describe().c_str());
  EXPECT_GT(e.step_s, 0);
  EXPECT_GT(e.mfu, 0.2);
  EXPECT_LE(e.mfu, 0.5);
  // Attention dominates at 2M tokens: FLOPs are about 6 x 2M x 2M x L x H x HD.
  const double attention = 6.0 * 2097152.0 * 2097152.0 * 32 * 4096;
  EXPECT_NEAR(training_flops(r.config, 2097152, 2097152) / attention, 1.0, 0.05);
}

TEST(Planner, SequenceParallelStretchesTheLongestSequence) {
  PlanRequest r;
  r.config = mid_config();
  r.settings.checkpointing = true;
  r.mini_sequence_auto = true;
  const size_t budget = size_t(256) << 20;
  const int64_t one = longest_sequence(r, budget);
  r.world_size = r.sequence_parallel = 2;  // the model has 2 kv heads
  const int64_t two = longest_sequence(r, budget);
  std::printf("longest sequence in 256 MiB per rank: 1 rank %lld, Ulysses over 2 %lld\n",
              (long long)one, (long long)two);
  EXPECT_GT(two, 1.7 * one);
}

// mid_config at one row of seq tokens with checkpointing.
PlanRequest checkpointed_mid(int64_t seq) {
  PlanRequest r;
  r.config = mid_config();
  r.seq_len = seq;
  r.batch = 1;
  r.settings.checkpointing = true;
  return r;
}

// bf16 checkpoints (--bf16 True with checkpointing): the layer inputs in 2 bytes each plus one
// f32 staging buffer (each layer writes its output over its input), against (layers + 1) f32
// inputs; the CUDA plan counts the same bytes.
TEST(Planner, Bf16CheckpointsHalveTheCheckpoints) {
  PlanRequest r = checkpointed_mid(4096);
  auto checkpoint_bytes = [](const PlanResult& p) {
    size_t n = 0;
    for (const auto& b : p.plan.buffers())
      n += b.category == MemCategory::kCheckpoints ? b.bytes : 0;
    return n;
  };
  const size_t N = 4096, D = r.config.hidden_size, L = r.config.num_hidden_layers;
  EXPECT_EQ(checkpoint_bytes(plan_memory(r)), (L + 1) * N * D * 4);
  r.settings.bf16_residual = true;
  const PlanResult bf16 = plan_memory(r);
  EXPECT_EQ(checkpoint_bytes(bf16), L * N * D * 2 + N * D * 4);
  r.device = PlanDevice::kCuda;
  const PlanResult gpu = plan_memory(r);
  size_t dev = 0;
  for (const auto& [name, bytes] : gpu.by_category)
    if (name == mem_category_name(MemCategory::kCheckpoints)) dev = bytes;
  EXPECT_EQ(dev, L * N * D * 2 + N * D * 4) << "as allocated: bf16 stores, f32 staging";
}

// Selective recomputation keeps every layer's attention output and lse as checkpoints, and the
// shared activations no longer hold their own; the step estimate leaves the attention out of
// the recompute.
TEST(Planner, SelectiveRecomputationKeepsAttentionPerLayer) {
  PlanRequest r = checkpointed_mid(4096);
  const PlanResult full = plan_memory(r);
  r.settings.keep_attention = true;
  const PlanResult selective = plan_memory(r);
  const size_t N = 4096, L = r.config.num_hidden_layers, H = r.config.num_attention_heads;
  const size_t QD = H * r.config.head_dim;
  EXPECT_EQ(selective.device_bytes - full.device_bytes, (L - 1) * N * (QD + H) * 4);
  const GpuSpec g = gpu_spec("h100-80gb");
  const double t_sel = estimate_step(r, g, 0.4).compute_s;
  r.settings.keep_attention = false;
  const double t_full = estimate_step(r, g, 0.4).compute_s;
  const double attention = training_flops(r.config, N, N) - training_flops(r.config, N, 0);
  EXPECT_NEAR(t_full - t_sel, attention / 3 / (g.peak_flops * 0.4), 1e-9 * t_full);
  // Automatic settings take it between mini-sequence alone and full recomputation: where it
  // fits and mini-sequence alone does not, and never when it does not fit.
  PlanRequest a;
  a.config = mid_config();
  a.seq_len = 4096;
  a.mini_sequence_auto = true;
  const size_t mini = plan_memory(a).device_bytes;
  a.settings.checkpointing = a.settings.keep_attention = true;
  const size_t kept = plan_memory(a).device_bytes;
  a.settings.keep_attention = false;
  const size_t recompute = plan_memory(a).device_bytes;
  ASSERT_LT(recompute, kept);
  ASSERT_LT(kept, mini);
  a = PlanRequest{};
  a.config = mid_config();
  a.seq_len = 4096;
  const AutoChoice fits = choose_settings(a, kept, true, true);
  EXPECT_TRUE(fits.fits && fits.settings.checkpointing && fits.settings.keep_attention) << fits.why;
  const AutoChoice tight = choose_settings(a, kept - 1, true, true);
  EXPECT_TRUE(tight.fits && tight.settings.checkpointing && !tight.settings.keep_attention)
      << tight.why;
}

// Offloaded checkpoints are pinned host memory on a GPU: a host budget caps the longest
// sequence offload reaches and turns offload down when it does not fit; the CPU's store is a
// file, so CPU plans ignore it.
TEST(Planner, HostBudgetCapsPinnedOffload) {
  PlanRequest r;
  r.config = mid_config();
  r.config.num_hidden_layers = 16;  // enough layers for offload to save device memory
  r.device = PlanDevice::kCuda;
  r.bf16_gemms = true;
  r.settings.checkpointing = r.settings.offload_checkpoints = true;
  r.seq_len = 4096;
  const PlanResult p = plan_memory(r);
  const size_t N = 4096, D = r.config.hidden_size, L = r.config.num_hidden_layers;
  ASSERT_GE(p.offloaded_bytes, L * N * D * 4) << "the checkpoints are offloaded";
  EXPECT_TRUE(plan_fits(p, r, p.device_bytes));
  r.host_budget = p.offloaded_bytes - 1;
  EXPECT_FALSE(plan_fits(p, r, p.device_bytes));
  const size_t device_budget = p.device_bytes * 4;
  r.host_budget = 0;
  const int64_t unbounded = longest_sequence(r, device_budget, 256);
  r.host_budget = p.offloaded_bytes;
  const int64_t capped = longest_sequence(r, device_budget, 256);
  EXPECT_LT(capped, unbounded);
  EXPECT_GE(capped, 4096);
  r.seq_len = capped;
  EXPECT_LE(plan_memory(r).offloaded_bytes, r.host_budget);
  r.seq_len = capped + 256;
  EXPECT_GT(plan_memory(r).offloaded_bytes, r.host_budget);
  // Automatic settings: with no room on the host, offload is never chosen.
  r.seq_len = 16384;
  r.host_budget = 1;
  const AutoChoice c = choose_settings(r, p.device_bytes, true, true);
  EXPECT_FALSE(c.fits && c.settings.offload_checkpoints) << c.why;
  // Checkpointing asked for: on the device it does not fit, offloaded it does not fit the host.
  // (The device budget holds both offloading candidates: MST's chunks and 1024-row chunks.)
  PlanRequest q = r;
  q.mini_sequence_auto = true;
  size_t offload_device = plan_memory(q).device_bytes;
  PlanRequest fine = r;
  fine.settings.mlp_chunks = fine.settings.lm_head_chunks = 16;  // 1024-row chunks
  offload_device = std::max(offload_device, plan_memory(fine).device_bytes);
  q.settings.offload_checkpoints = false;
  ASSERT_GT(plan_memory(q).device_bytes, offload_device);
  const AutoChoice none = choose_settings(r, offload_device, true, false);
  EXPECT_FALSE(none.fits);
  EXPECT_NE(none.why.find("host budget"), std::string::npos) << none.why;
  r.device = PlanDevice::kCpu;
  EXPECT_TRUE(plan_fits(plan_memory(r), r, size_t(1) << 40)) << "a CPU store is a file";
}

// FPDT on one GPU: whole layers chunk by chunk with q/k/v and the attention gradients in pinned
// host memory, so past the residual stream nothing grows with the sequence on the device. For
// Llama-3-8B LoRA on 76 GiB it goes well past checkpoint offload alone (the engine's own plan),
// and with a host budget the pinned store caps it.
TEST(Planner, FpdtOnOneGpuGoesPastOffload) {
  PlanRequest r;
  r.config = parse_model_config(preset_config("llama3-8b"), "llama3-8b");
  r.device = PlanDevice::kCuda;
  r.bf16_gemms = r.settings.bf16_residual = true;
  LoraOptions o;
  o.use_peft_lora = true;
  o.r = 16;
  o.dropout = 0;
  o.target_modules = "all-linear";
  r.settings.lora = resolve_lora(o, 1);
  r.settings.lora.base_bf16 = r.settings.lora.embed_bf16 = true;
  r.settings.checkpointing = r.settings.offload_checkpoints = true;
  r.mini_sequence_auto = true;
  const size_t budget = size_t(76) << 30;
  const int64_t offload = longest_sequence(r, budget, 4096);
  r.fpdt_chunk = 16384;
  const int64_t fpdt = longest_sequence(r, budget, 4096);
  EXPECT_GT(offload, 200000);
  EXPECT_GT(fpdt, 1.8 * double(offload)) << "offload " << offload << ", FPDT " << fpdt;
  r.host_budget = size_t(115) << 30;
  const int64_t capped = longest_sequence(r, budget, 4096);
  EXPECT_LT(capped, fpdt);
  r.seq_len = capped;
  EXPECT_LE(plan_memory(r).offloaded_bytes, r.host_budget);
  r.seq_len = capped + 4096;
  EXPECT_GT(plan_memory(r).offloaded_bytes, r.host_budget) << "the host budget is what caps it";
}

TEST(Planner, ParseBytes) {
  EXPECT_EQ(parse_bytes("80GiB", "--memory_budget"), size_t(80) << 30);
  EXPECT_EQ(parse_bytes("512MiB", "--memory_budget"), size_t(512) << 20);
  EXPECT_EQ(parse_bytes("1.5G", "--memory_budget"), size_t(3) << 29);
  EXPECT_EQ(parse_bytes("1000", "--memory_budget"), 1000u);
  EXPECT_THROW(parse_bytes("lots", "--memory_budget"), UserError);
  EXPECT_THROW(parse_bytes("5 parsecs", "--memory_budget"), UserError);
}

TEST(Planner, LongLoraPositionInterpolation) {
  ModelConfig c = mid_config();
  c.max_position_embeddings = 4096;
  EXPECT_FALSE(apply_position_interpolation(&c, 4096));
  EXPECT_TRUE(apply_position_interpolation(&c, 10000));  // ceil(10000/4096) = 3
  EXPECT_EQ(c.rope_scaling.type, RopeType::kLinear);
  EXPECT_EQ(c.rope_scaling.factor, 3.0);
  const auto j = model_config_to_json(c);
  const std::string text = j.dump();
  EXPECT_NE(text.find("linear"), std::string::npos) << text;
  // An existing rope scaling is left alone, as LongLoRA's fine-tune.py does.
  EXPECT_FALSE(apply_position_interpolation(&c, 100000));
  EXPECT_EQ(c.rope_scaling.factor, 3.0);
  // The saved config reads back with the same scaling.
  const ModelConfig back = parse_model_config(j, "saved");
  EXPECT_EQ(back.rope_scaling.type, RopeType::kLinear);
  EXPECT_EQ(back.rope_scaling.factor, 3.0);
}

// The CUDA plan adds the backend's workspace, as the trainer binds it: op scratch for the run's
// largest op and, with bf16 GEMMs, the staging of their rounded inputs (the largest product's,
// at most kCudaGemmScratchCap: larger ones run in blocks). The CPU plan has none, and CUDA's
// fixed runtime is larger.
TEST(Planner, CudaPlanCountsTheBackendWorkspace) {
  PlanRequest r;
  r.config = mid_config();
  r.seq_len = 2048;
  r.batch = 1;
  r.settings.checkpointing = true;
  auto buffer = [](const PlanResult& p, const std::string& name) {
    for (const auto& b : p.plan.buffers())
      if (b.name == name) return b.bytes;
    return size_t(0);
  };
  const PlanResult cpu = plan_memory(r);
  EXPECT_EQ(buffer(cpu, "workspace.op") + buffer(cpu, "workspace.gemm"), 0u);
  r.device = PlanDevice::kCuda;
  const PlanResult f32 = plan_memory(r);
  const size_t N = 2048, D = r.config.hidden_size, H = r.config.num_attention_heads;
  EXPECT_EQ(buffer(f32, "workspace.op"),
            std::max({N * H * 4, N * 8, (N / 256) * D * 8, size_t(1) << 20}));
  EXPECT_EQ(buffer(f32, "workspace.gemm"), 0u) << "f32 GEMMs stage nothing";
  EXPECT_EQ(f32.device_bytes - cpu.device_bytes,
            buffer(f32, "workspace.op") + (size_t(1) << 30) - (size_t(64) << 20));
  r.bf16_gemms = true;
  const PlanResult bf16 = plan_memory(r);
  // The LM head's gradient product is the largest here: logits (all rows, V) and the weight.
  const size_t V = r.config.vocab_size;
  const size_t head = (N * V * 2 + 255) / 256 * 256 + V * D * 2;
  EXPECT_EQ(buffer(bf16, "workspace.gemm"), head);
  EXPECT_LE(buffer(bf16, "workspace.gemm"), kCudaGemmScratchCap);
  r.config = parse_model_config(preset_config("llama3-8b"), "llama3-8b");
  r.seq_len = 32768;
  r.settings.mlp_chunks = r.settings.lm_head_chunks = 16;
  EXPECT_EQ(buffer(plan_memory(r), "workspace.gemm"), kCudaGemmScratchCap)
      << "8B products are blocked to the cap";
}

// MST's LM-head rule (ceil(V/D) chunks, a chunk of logits as large as the hidden states) until a
// chunk would pass 4096 rows: then 4096-row chunks, so the logits stop growing with the sequence.
TEST(Planner, LmHeadChunksStopGrowingAt4096Rows) {
  const ModelConfig c = mid_config();
  const int64_t mst = (c.vocab_size + c.hidden_size - 1) / c.hidden_size;
  for (const int64_t t : {mst * 1024, mst * 4096, mst * 4096 + 1, int64_t(1) << 20}) {
    RunSettings s;
    mini_sequence_auto(c, t, &s);
    const int64_t rows = (t + s.lm_head_chunks - 1) / s.lm_head_chunks;
    EXPECT_LE(rows, 4096) << t << " tokens";
    const int64_t want = t <= mst * 4096 ? mst : (t + 4095) / 4096;
    EXPECT_EQ(s.lm_head_chunks, want) << t << " tokens";
  }
}

// The plan reports the settings it planned: MST's automatic chunks, not the request's 1.
TEST(Planner, ReportsTheMiniSequenceChunksItPlanned) {
  PlanRequest r;
  r.config = mid_config();
  r.seq_len = 8192;
  r.mini_sequence_auto = true;
  const PlanResult p = plan_memory(r);
  EXPECT_EQ(r.settings.mlp_chunks, 1);
  RunSettings want = r.settings;
  want.max_tokens = 8192;
  mini_sequence_auto(r.config, 8192, &want);
  EXPECT_GT(want.mlp_chunks, 1);
  EXPECT_EQ(p.settings.mlp_chunks, want.mlp_chunks);
  EXPECT_EQ(p.settings.lm_head_chunks, want.lm_head_chunks);
  r.world_size = r.sequence_parallel = 2;  // each rank's share of the sequence
  mini_sequence_auto(r.config, 4096, &want);
  EXPECT_EQ(plan_memory(r).settings.mlp_chunks, want.mlp_chunks);
}

}  // namespace
}  // namespace lt
