// Full fine-tune vs LoRA (f32 or bf16 base) vs QLoRA on one small Llama shape: planned bytes per
// base parameter (weights, gradients, optimizer state) and the time of one training step (forward,
// backward, AdamW). Usage: bench_lora [tokens=256] [steps=3]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>

#include "backend/backend.h"
#include "model/llama.h"
#include "ops/nf4.h"
#include "train/trainer.h"

using namespace lt;

int main(int argc, char** argv) {
  const int64_t tokens = argc > 1 ? std::atoll(argv[1]) : 256;
  const int steps = argc > 2 ? std::atoi(argv[2]) : 3;
  ModelConfig c;
  c.architecture = "LlamaForCausalLM";
  c.model_type = "llama";
  c.hidden_size = 512;
  c.intermediate_size = 1408;
  c.num_hidden_layers = 4;
  c.num_attention_heads = 8;
  c.num_key_value_heads = 4;
  c.head_dim = 64;
  c.vocab_size = 2048;
  c.max_position_embeddings = 4096;
  c.rms_norm_eps = 1e-5;
  const int64_t P = ParamTable(c).total_numel();

  MicroBatch mb;
  std::mt19937 rng(1);
  for (int64_t t = 0; t < tokens; ++t) {
    mb.ids.push_back(int32_t(rng() % c.vocab_size));
    mb.pos.push_back(int32_t(t));
    mb.docs.push_back(0);
    mb.targets.push_back(t + 1 < tokens ? int32_t(rng() % c.vocab_size) : kIgnoreIndex);
  }
  mb.row_start = {0, tokens};

  std::printf(
      "shape: hidden %lld, FFN %lld, %lld layers, vocab %lld: %.2fM parameters, %lld tokens\n",
      (long long)c.hidden_size, (long long)c.intermediate_size, (long long)c.num_hidden_layers,
      (long long)c.vocab_size, P / 1e6, (long long)tokens);
  std::printf("bytes per base parameter (planned) and median step time\n");
  std::printf("%-6s %11s %11s %11s %11s %14s %9s\n", "mode", "weights", "grads", "optimizer",
              "total", "adapter params", "step ms");
  const char* names[] = {"full", "lora", "qlora", "lora16"};  // lora16: bf16 base projections
  for (int mode = 0; mode < 4; ++mode) {
    RunSettings rs;
    rs.max_tokens = tokens;
    if (mode > 0) {
      rs.lora.enabled = true;
      rs.lora.r = 16;
      rs.lora.alpha = 32;
      rs.lora.dropout = 0.05;
      rs.lora.targets.fill(true);
      rs.lora.quantize_4bit = mode == 2;
      rs.lora.base_bf16 = mode == 3;
    }
    MemoryPlan plan;
    LlamaModel::plan(c, rs, &plan);
    AdamW::plan(LlamaModel::trainable_numel(c, rs), &plan);
    auto be = make_cpu_backend();
    LlamaModel m(c, *be, rs);
    // Random weights (norms 1); NF4 / bf16 weights packed from the same distribution.
    std::normal_distribution<float> nd(0.0f, 0.02f);
    std::vector<float> host;
    for (const auto& p : m.table().params()) {
      float* dst = m.params() + p.offset;
      const bool norm = p.shape.size() == 1;
      for (int64_t i = 0; i < p.numel; ++i) dst[i] = norm ? 1.0f : nd(rng);
    }
    for (size_t i = 0; i < m.packed_weights().size(); ++i) {
      host.resize(m.packed_weights()[i].numel);
      for (auto& x : host) x = nd(rng);
      m.pack_base_weight(i, host.data());
    }
    if (mode > 0) init_lora_weights(m.lora_table(), 3, m.lora_params());
    OptimizerSettings opt;
    opt.learning_rate = 1e-3;
    AdamW adam(m.trainable(), *be, opt);
    ScheduleSettings sched{ScheduleType::kConstant, 0, steps + 1};
    std::vector<double> ms;
    double loss = 0;
    for (int s = 0; s <= steps; ++s) {  // step 0 warms up
      const auto t0 = std::chrono::steady_clock::now();
      const double l = train_step(m, adam, opt, sched, {mb}, s).loss;
      if (s == 0) loss = l;
      const double dt =
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      if (s > 0) ms.push_back(dt);
    }
    // Validate: a random model's first loss is about ln V (near-uniform predictions).
    if (!std::isfinite(loss) || std::fabs(loss - std::log(double(c.vocab_size))) > 1.0) {
      std::fprintf(stderr, "bench_lora: implausible loss %f in mode %d\n", loss, mode);
      return 1;
    }
    std::sort(ms.begin(), ms.end());
    const double w = double(plan.category_bytes(MemCategory::kWeights));
    const double g = double(plan.category_bytes(MemCategory::kGradients));
    const double o = double(plan.category_bytes(MemCategory::kOptimizer));
    std::printf("%-6s %11.3f %11.3f %11.3f %11.3f %14lld %9.1f\n", names[mode], w / P, g / P, o / P,
                (w + g + o) / P, (long long)m.lora_table().total_numel(), ms[ms.size() / 2]);
  }
  std::printf(
      "(QLoRA weights include the f32 embeddings, LM head and norms; the projections "
      "alone are %.3f B/param)\n",
      double(nf4_bytes(c.hidden_size * c.intermediate_size)) /
          double(c.hidden_size * c.intermediate_size));
  return 0;
}
