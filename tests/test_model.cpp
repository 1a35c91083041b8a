// Whole-model properties: finite-difference gradients, and exactness of the memory-saving
// paths (mini-sequence with N not divisible by M, all-ignored chunks, checkpointing, naive vs
// flash attention, gradient accumulation) against the plain path.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <random>
#include <tuple>

#include "backend/backend.h"
#include "core/dtype.h"
#include "core/error.h"
#include "model/llama.h"
#include "train/batching.h"
#include "train/trainer.h"

namespace lt {
namespace {

ModelConfig tiny_config(bool tied, int64_t window = 0, const char* arch = "LlamaForCausalLM") {
  nlohmann::json j = {{"architectures", {arch}},
                      {"model_type", std::string(arch) == "Qwen2ForCausalLM" ? "qwen2" : "llama"},
                      {"hidden_size", 16},
                      {"intermediate_size", 24},
                      {"num_hidden_layers", 2},
                      {"num_attention_heads", 4},
                      {"num_key_value_heads", 2},
                      {"vocab_size", 29},
                      {"max_position_embeddings", 128},
                      {"rms_norm_eps", 1e-5},
                      {"rope_theta", 10000.0},
                      {"tie_word_embeddings", tied}};
  if (window) {
    j["architectures"] = {"MistralForCausalLM"};
    j["model_type"] = "mistral";
    j["sliding_window"] = window;
  }
  return parse_model_config(j, "tiny_config");
}

void randomize(LlamaModel& m, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 0.3f);
  for (const auto& p : m.table().params()) {
    float* x = m.params() + p.offset;
    const bool norm = p.name.find("norm") != std::string::npos;
    for (int64_t i = 0; i < p.numel; ++i) x[i] = norm ? 1.0f + 0.2f * nd(rng) : nd(rng);
  }
}

Example random_row(std::mt19937& rng, int64_t len, int64_t V, int ignore_every = 0) {
  Example e;
  std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(V - 1));
  for (int64_t t = 0; t < len; ++t) {
    e.input_ids.push_back(tok(rng));
    e.labels.push_back(ignore_every && t % ignore_every == 0 ? kIgnoreIndex : e.input_ids.back());
  }
  return e;
}

struct Grads {
  double loss;
  std::vector<float> g;
};

// One step's loss and gradients on the CPU backend; with `ops`, the step's op profile (calls).
Grads run(const ModelConfig& c, RunSettings rs,
          const std::vector<std::vector<const Example*>>& micro,
          std::map<std::string, int64_t>* ops = nullptr) {
  auto be = make_cpu_backend();
  be->set_op_profiling(ops != nullptr);
  std::vector<MicroBatch> mbs;
  for (const auto& rows : micro) {
    mbs.push_back(make_micro_batch(rows));
    rs.max_tokens = std::max(rs.max_tokens, mbs.back().num_tokens());
  }
  LlamaModel m(c, *be, rs);
  randomize(m, 7);
  StepResult r = accumulate_step_gradients(m, mbs);
  if (ops)
    for (const OpTime& t : be->take_op_profile()) (*ops)[t.name] = t.calls;
  return {r.loss, std::vector<float>(m.grads(), m.grads() + m.table().total_numel())};
}

void expect_same(const Grads& a, const Grads& b, double rtol, const char* what) {
  EXPECT_NEAR(a.loss, b.loss, 1e-6 * std::fabs(a.loss)) << what;
  ASSERT_EQ(a.g.size(), b.g.size());
  double worst = 0;
  size_t wi = 0;
  double scale = 0;
  for (float x : a.g) scale = std::max(scale, double(std::fabs(x)));
  for (size_t i = 0; i < a.g.size(); ++i) {
    const double d = std::fabs(double(a.g[i]) - double(b.g[i]));
    if (d > worst) worst = d, wi = i;
  }
  EXPECT_LE(worst, rtol * scale) << what << ": worst gradient element " << wi << ": " << a.g[wi]
                                 << " vs " << b.g[wi] << " (max |g| " << scale << ")";
}

TEST(ModelPaths, MiniSequenceCheckpointingAndAttentionAreExact) {
  const ModelConfig c = tiny_config(false);
  std::mt19937 rng(1);
  // 70 tokens in one micro-batch: M = 8 leaves a short tail chunk (MST bug 3); the first
  // 20 labels are ignored so early LM-head chunks have no label at all (MST bug 1).
  Example a = random_row(rng, 45, c.vocab_size), b = random_row(rng, 25, c.vocab_size);
  for (int t = 0; t < 20; ++t) a.labels[t] = kIgnoreIndex;
  const std::vector<std::vector<const Example*>> micro = {{&a, &b}};
  RunSettings base;
  const Grads ref = run(c, base, micro);
  for (int64_t M : {2, 3, 8, 70}) {
    RunSettings s;
    s.mlp_chunks = s.lm_head_chunks = M;
    expect_same(ref, run(c, s, micro), 2e-6, ("mini_sequence " + std::to_string(M)).c_str());
  }
  RunSettings ck;
  ck.checkpointing = true;
  expect_same(ref, run(c, ck, micro), 2e-6, "checkpointing");
  ck.mlp_chunks = ck.lm_head_chunks = 8;
  expect_same(ref, run(c, ck, micro), 2e-6, "checkpointing + mini_sequence 8");
  ck.offload_checkpoints = true;
  expect_same(ref, run(c, ck, micro), 2e-6, "checkpointing + offload + mini_sequence 8");
  RunSettings naive;
  naive.flash_attention = false;
  expect_same(ref, run(c, naive, micro), 2e-5, "naive attention");
}

// Selective recomputation (--recompute_granularity selective) keeps each layer's attention output
// and lse from the forward: the backward's recompute runs every op of full recomputation but the
// attention forward, and the gradients are the same bits (the forward is deterministic), with
// mini-sequence chunks, offloaded checkpoints and the bf16 residual stream too.
TEST(ModelPaths, SelectiveRecomputationSkipsOnlyTheAttentionForward) {
  const ModelConfig c = tiny_config(false, 24);  // a sliding window too
  std::mt19937 rng(3);
  const Example a = random_row(rng, 45, c.vocab_size), b = random_row(rng, 25, c.vocab_size);
  const std::vector<std::vector<const Example*>> micro = {{&a, &b}, {&b}};
  for (const auto& [name, mini, offload, bf16] :
       {std::tuple{"checkpointing", 1, false, false},
        std::tuple{"+ mini_sequence 8", 8, false, false}, std::tuple{"+ offload", 8, true, false},
        std::tuple{"+ bf16 residual", 8, true, true}}) {
    RunSettings full;
    full.checkpointing = true;
    full.mlp_chunks = full.lm_head_chunks = mini;
    full.offload_checkpoints = offload;
    full.bf16_residual = bf16;
    RunSettings selective = full;
    selective.keep_attention = true;
    std::map<std::string, int64_t> full_ops, selective_ops;
    const Grads want = run(c, full, micro, &full_ops),
                got = run(c, selective, micro, &selective_ops);
    EXPECT_EQ(got.loss, want.loss) << name;
    EXPECT_EQ(got.g, want.g) << name;
    // 2 layers x 2 micro-batches: 8 attention forwards with full recomputation, 4 selective.
    EXPECT_EQ(full_ops["attention_forward"], 8) << name;
    EXPECT_EQ(selective_ops["attention_forward"], 4) << name;
    selective_ops["attention_forward"] = full_ops["attention_forward"];
    EXPECT_EQ(selective_ops, full_ops) << name << ": only the attention forward differs";
  }
  RunSettings plain, kept;
  kept.keep_attention = true;  // without checkpointing nothing is recomputed: no effect
  EXPECT_EQ(run(c, kept, micro).g, run(c, plain, micro).g);
}

// --bf16 True carries the residual stream in bf16: the embedding output and every layer's
// output are bf16 values, what happens inside a layer is not rounded, and the loss and the
// gradients move by the rounding only (bf16 keeps 8 significant bits: about 2^-8 relative).
TEST(ModelPaths, Bf16ResidualStreamIsRoundedAtLayerBoundariesOnly) {
  const ModelConfig c = tiny_config(false);
  std::mt19937 rng(5);
  Example a = random_row(rng, 37, c.vocab_size), b = random_row(rng, 22, c.vocab_size);
  const std::vector<std::vector<const Example*>> micro = {{&a, &b}};
  const MicroBatch mb = make_micro_batch(micro[0]);
  auto be = make_cpu_backend();
  std::map<std::string, std::vector<float>> seen;
  auto hook = [](void* user, const std::string& name, const float* data, size_t n) {
    (*static_cast<std::map<std::string, std::vector<float>>*>(user))[name].assign(data, data + n);
  };
  auto bf16_values = [](const std::vector<float>& v) {
    size_t exact = 0;
    for (float x : v) exact += bf16_to_f32(f32_to_bf16(x)) == x;
    return exact;
  };
  double loss[2];
  for (bool bf16 : {false, true}) {
    RunSettings rs;
    rs.bf16_residual = bf16;
    rs.max_tokens = mb.num_tokens();
    LlamaModel m(c, *be, rs);
    randomize(m, 7);
    m.set_dump_hook(hook, &seen);
    loss[bf16] = m.forward_loss(mb);
    for (const char* name : {"embed", "layer0.out", "layer1.out"}) {
      const auto& v = seen.at(name);
      if (bf16)
        EXPECT_EQ(bf16_values(v), v.size()) << name << ": not every value is a bf16 value";
      else
        EXPECT_LT(bf16_values(v), v.size() / 10) << name << ": f32 values expected";
    }
    const auto& inner = seen.at("layer1.x_mid");  // inside a layer: never rounded
    EXPECT_LT(bf16_values(inner), inner.size() / 10)
        << "layer1.x_mid rounded (bf16 " << bf16 << ")";
  }
  EXPECT_NE(loss[1], loss[0]);
  EXPECT_NEAR(loss[1], loss[0], 1e-2 * std::fabs(loss[0]));
  RunSettings rs;
  const Grads f32 = run(c, rs, micro);
  rs.bf16_residual = true;
  const Grads bf16 = run(c, rs, micro);
  // The training pass rounds as the forward-only pass does (losses: means vs sums).
  EXPECT_NEAR(bf16.loss / f32.loss, loss[1] / loss[0], 1e-6) << "training pass vs forward only";
  double scale = 0, worst = 0;
  for (size_t i = 0; i < f32.g.size(); ++i) {
    scale = std::max(scale, double(std::fabs(f32.g[i])));
    worst = std::max(worst, double(std::fabs(f32.g[i] - bf16.g[i])));
  }
  EXPECT_GT(worst, 0.0);
  EXPECT_LT(worst, 3e-2 * scale) << "gradients of the bf16 stream vs f32 (max |g| " << scale << ")";
  std::printf("bf16 residual: loss %.6f vs %.6f in f32; worst gradient difference %.3g of %.3g\n",
              loss[1], loss[0], worst, scale);
}

TEST(ModelPaths, GradientAccumulationIsTheTrueGradient) {
  // Two micro-batches of one row each must give exactly the gradient of one micro-batch with
  // both rows: the LM-head gradient is neither doubled nor unevenly weighted (MST bugs 1, 2).
  const ModelConfig c = tiny_config(true);
  std::mt19937 rng(2);
  Example a = random_row(rng, 13, c.vocab_size, 3), b = random_row(rng, 21, c.vocab_size, 4);
  RunSettings s;
  s.mlp_chunks = s.lm_head_chunks = 4;
  expect_same(run(c, s, {{&a, &b}}), run(c, s, {{&a}, {&b}}), 2e-6, "accumulation");
}

TEST(ModelPaths, FiniteDifferenceGradients) {
  for (int64_t window : {0, 3}) {
    const ModelConfig c = tiny_config(window == 0, window);
    std::mt19937 rng(3);
    Example a = random_row(rng, 9, c.vocab_size, 4), b = random_row(rng, 6, c.vocab_size);
    std::vector<const Example*> rows = {&a, &b};
    const MicroBatch mb = make_micro_batch(rows);
    auto be = make_cpu_backend();
    RunSettings rs;
    rs.max_tokens = mb.num_tokens();
    rs.mlp_chunks = rs.lm_head_chunks = 4;
    LlamaModel m(c, *be, rs);
    randomize(m, 11);
    std::fill(m.grads(), m.grads() + m.table().total_numel(), 0.0f);
    const double n = static_cast<double>(mb.num_targets());
    m.forward_backward(mb, static_cast<float>(1.0 / n));
    std::vector<float> g(m.grads(), m.grads() + m.table().total_numel());
    // Central differences of the mean loss on a sample of every parameter tensor.
    std::mt19937 pick(5);
    int checked = 0;
    for (const auto& p : m.table().params()) {
      for (int k = 0; k < 3; ++k) {
        const int64_t i = p.offset + std::uniform_int_distribution<int64_t>(0, p.numel - 1)(pick);
        float* x = m.params() + i;
        const float x0 = *x, h = 1e-2f * std::max(1.0f, std::fabs(x0));
        *x = x0 + h;
        const double lp = m.forward_loss(mb) / n;
        *x = x0 - h;
        const double lm = m.forward_loss(mb) / n;
        *x = x0;
        const double fd = (lp - lm) / (2.0 * h);
        EXPECT_NEAR(g[i], fd, 2e-4 + 2e-2 * std::fabs(fd))
            << p.name << " element " << i - p.offset << " (window " << window << ")";
        ++checked;
      }
    }
    EXPECT_GT(checked, 30);
  }
}

}  // namespace
}  // namespace lt
