// The memory planner: predictions against measured peak memory of real training steps (within
// 10%), longest-sequence search, automatic settings, sizes, LongLoRA position interpolation.
#include <gtest/gtest.h>

#include <fstream>
#include <random>

#include "backend/backend.h"
#include "core/error.h"
#include "plan/planner.h"
#include "train/batching.h"
#include "train/optimizer.h"

namespace lt {
namespace {

ModelConfig mid_config() {
  nlohmann::json j = {{"architectures", {"LlamaForCausalLM"}}, {"hidden_size", 128},
                      {"intermediate_size", 352},               {"num_hidden_layers", 2},
                      {"num_attention_heads", 4},               {"num_key_value_heads", 2},
                      {"vocab_size", 8000},                     {"max_position_embeddings", 8192},
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

}  // namespace
}  // namespace lt
