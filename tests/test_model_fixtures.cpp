// End-to-end golden tests: tiny random Llama/Mistral/Qwen2 models made by transformers
// (tools/make_model_fixtures.py, computed in float64) against longtune's f32 engine: logits,
// per-micro-batch loss, every parameter gradient of step 0, learning rates, gradient norms and
// the weights after several AdamW steps with warmup, clipping and gradient accumulation.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "backend/backend.h"
#include "fixture_util.h"
#include "io/safetensors.h"
#include "model/llama.h"
#include "model/model_io.h"
#include "train/batching.h"
#include "train/trainer.h"

namespace lt {
namespace {

using test::expect_close;
using test::tensor_f32;

namespace fs = std::filesystem;

const fs::path kFixtures = fs::path(LT_SOURCE_DIR) / "tests/fixtures/models";



Example example_from_json(const nlohmann::json& row) {
  Example e;
  e.input_ids = row.at("input_ids").get<std::vector<int32_t>>();
  e.labels = row.at("labels").get<std::vector<int32_t>>();
  if (row.contains("position_ids")) {  // packed documents: a new document where positions restart
    const auto pos = row.at("position_ids").get<std::vector<int32_t>>();
    int32_t doc = -1;
    for (int32_t p : pos) e.doc_ids.push_back(p == 0 ? ++doc : doc);
  }
  return e;
}

class ModelFixture : public ::testing::TestWithParam<std::string> {};

TEST_P(ModelFixture, MatchesTransformers) {
  const fs::path dir = kFixtures / GetParam();
  ASSERT_TRUE(fs::exists(dir / "config.json")) << dir;
  const ModelConfig config = load_model_config(dir / "config.json");
  const auto hp = nlohmann::json::parse(std::ifstream(dir / "case.json"));
  const auto batch = nlohmann::json::parse(std::ifstream(dir / "batch.json"));
  auto expected = SafetensorsFile::open(dir / "expected.safetensors");

  const int64_t G = batch.at("micro_batches_per_step"), S = batch.at("steps");
  std::vector<std::vector<Example>> micro_rows;
  for (const auto& mb : batch.at("micro_batches")) {
    micro_rows.emplace_back();
    for (const auto& row : mb) micro_rows.back().push_back(example_from_json(row));
  }
  ASSERT_EQ(static_cast<int64_t>(micro_rows.size()), G * S);
  std::vector<MicroBatch> micro;
  int64_t max_tokens = 0;
  for (const auto& rows : micro_rows) {
    std::vector<const Example*> ptrs;
    for (const auto& r : rows) ptrs.push_back(&r);
    micro.push_back(make_micro_batch(ptrs));
    max_tokens = std::max(max_tokens, micro.back().num_tokens());
  }

  auto backend = make_cpu_backend();
  RunSettings rs;
  rs.max_tokens = max_tokens;
  LlamaModel model(config, *backend, rs);
  load_weights(CheckpointReader(dir), model.table(), model.params());
  const int64_t V = config.vocab_size;

  // Logits of row 0 of micro-batch 0.
  {
    std::vector<const Example*> first = {&micro_rows[0][0]};
    const MicroBatch mb = make_micro_batch(first);
    std::vector<float> logits(mb.num_tokens() * V);
    model.forward_logits(mb, logits.data());
    const auto want = tensor_f32(*expected, "logits");
    ASSERT_EQ(want.size(), logits.size());
    expect_close("logits", logits.data(), want.data(), want.size(), 1e-4, 1e-4);
  }

  OptimizerSettings opt;
  opt.learning_rate = hp.at("learning_rate");
  opt.weight_decay = hp.at("weight_decay");
  opt.beta1 = hp.at("adam_beta1");
  opt.beta2 = hp.at("adam_beta2");
  opt.eps = hp.at("adam_epsilon");
  opt.max_grad_norm = hp.at("max_grad_norm");
  ScheduleSettings sched{parse_schedule(hp.at("lr_scheduler_type")), hp.at("warmup_steps"), S};
  AdamW optimizer(model.table(), *backend, opt);

  const auto want_loss = tensor_f32(*expected, "loss_sum");  // (S*G, rows)
  const auto want_items = tensor_f32(*expected, "num_items");
  const auto want_lr = tensor_f32(*expected, "lr");
  const auto want_norm = tensor_f32(*expected, "grad_norm");
  const size_t rows_per_mb = want_loss.size() / (G * S);
  for (int64_t s = 0; s < S; ++s) {
    std::vector<MicroBatch> step_mb(micro.begin() + s * G, micro.begin() + (s + 1) * G);
    StepResult r = accumulate_step_gradients(model, step_mb);
    EXPECT_EQ(r.num_items, static_cast<int64_t>(want_items[s])) << "step " << s;
    double want_sum = 0;
    for (int64_t m = 0; m < G; ++m)
      for (size_t row = 0; row < rows_per_mb; ++row) want_sum += want_loss[(s * G + m) * rows_per_mb + row];
    EXPECT_NEAR(r.loss * r.num_items, want_sum, 1e-4 * std::fabs(want_sum) + 1e-4) << "step " << s;
    if (s == 0) {
      for (const auto& p : model.table().params()) {
        const auto want = tensor_f32(*expected, "grad." + p.name);
        ASSERT_EQ(want.size(), static_cast<size_t>(p.numel)) << p.name;
        expect_close("grad " + p.name, model.grads() + p.offset, want.data(), want.size(), 2e-6, 2e-4);
      }
    }
    apply_step_update(model, optimizer, opt, sched, s, &r);
    EXPECT_NEAR(r.learning_rate, want_lr[s], 1e-9 + 1e-6 * want_lr[s]) << "step " << s;
    EXPECT_NEAR(r.grad_norm, want_norm[s], 1e-4 * want_norm[s]) << "step " << s;
  }
  for (const auto& p : model.table().params()) {
    const auto want = tensor_f32(*expected, "final." + p.name);
    ASSERT_EQ(want.size(), static_cast<size_t>(p.numel)) << p.name;
    expect_close("final " + p.name, model.params() + p.offset, want.data(), want.size(), 2e-5, 1e-4);
  }
}

std::vector<std::string> fixture_cases() {
  std::vector<std::string> cases;
  if (fs::exists(kFixtures))
    for (const auto& e : fs::directory_iterator(kFixtures))
      if (fs::exists(e.path() / "expected.safetensors")) cases.push_back(e.path().filename());
  std::sort(cases.begin(), cases.end());
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Transformers, ModelFixture, ::testing::ValuesIn(fixture_cases()),
                         [](const auto& info) { return info.param; });

// --bf16 True's residual stream against transformers with straight-through bf16 rounding at
// every layer boundary (tools/make_bf16_residual_fixture.py): the loss and every gradient of the
// summed token loss over all rows, much closer to that reference than to the unrounded model.
TEST(ModelFixtures, Bf16ResidualStreamMatchesTransformers) {
  const fs::path dir = kFixtures / "llama_gqa";
  const ModelConfig config = load_model_config(dir / "config.json");
  const auto batch = nlohmann::json::parse(std::ifstream(dir / "batch.json"));
  auto golden = SafetensorsFile::open(dir / "bf16_residual.safetensors");
  std::vector<std::vector<Example>> rows;
  for (const auto& mb : batch.at("micro_batches")) {
    rows.emplace_back();
    for (const auto& row : mb) rows.back().push_back(example_from_json(row));
  }
  std::vector<MicroBatch> micro;
  RunSettings rs;
  rs.bf16_residual = true;
  for (const auto& r : rows) {
    std::vector<const Example*> ptrs;
    for (const auto& e : r) ptrs.push_back(&e);
    micro.push_back(make_micro_batch(ptrs));
    rs.max_tokens = std::max(rs.max_tokens, micro.back().num_tokens());
  }
  for (bool ckpt : {false, true}) {
    SCOPED_TRACE(ckpt ? "with bf16 checkpoints" : "every activation kept");
    rs.checkpointing = ckpt;
    auto backend = make_cpu_backend();
    LlamaModel model(config, *backend, rs);
    load_weights(CheckpointReader(dir), model.table(), model.params());
    model.zero_grads();
    double loss = 0;
    for (const auto& mb : micro) loss += model.forward_backward(mb, 1.0f);
    const double want = tensor_f32(*golden, "bf16.loss")[0];
    const double f32 = tensor_f32(*golden, "f32.loss")[0];
    EXPECT_NEAR(loss, want, 1e-6 * std::fabs(want)) << "loss: transformers " << want
                                                          << ", unrounded " << f32;
    double off_bf16 = 0, off_f32 = 0, scale = 0;
    std::string worst;
    for (const auto& p : model.table().params()) {
      const auto g = tensor_f32(*golden, "bf16.grad." + p.name);
      const auto u = tensor_f32(*golden, "f32.grad." + p.name);
      ASSERT_EQ(g.size(), size_t(p.numel)) << p.name;
      for (int64_t i = 0; i < p.numel; ++i) {
        const double got = model.grads()[p.offset + i];
        scale = std::max(scale, std::fabs(double(g[i])));
        if (std::fabs(got - g[i]) > off_bf16) off_bf16 = std::fabs(got - g[i]), worst = p.name;
        off_f32 = std::max(off_f32, std::fabs(got - u[i]));
      }
    }
    EXPECT_LT(off_bf16, 1e-5 * scale) << "worst gradient: " << worst << " (max |g| " << scale << ")";
    EXPECT_LT(off_bf16, 1e-3 * off_f32) << "not much closer to the rounded reference";
    std::printf("bf16 residual vs transformers: loss %.6f vs %.6f (unrounded %.6f); worst "
                "gradient difference %.3g (vs the unrounded model %.3g, max |g| %.3g)\n",
                loss, want, f32, off_bf16, off_f32, scale);
  }
}

// The fixture set must be there: an empty list would make the suite above pass vacuously.
TEST(ModelFixtures, AllCasesPresent) {
  const auto cases = fixture_cases();
  for (const char* c : {"llama_gqa", "llama_tied_mha", "llama_head_dim", "mistral_swa",
                        "qwen2_bias", "rope_linear", "rope_dynamic", "rope_llama3", "rope_yarn",
                        "llama_packed"})
    EXPECT_NE(std::find(cases.begin(), cases.end(), c), cases.end()) << "missing fixture " << c;
}

}  // namespace
}  // namespace lt
