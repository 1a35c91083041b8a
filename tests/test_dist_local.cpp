// Distributed pieces in one process: the ZeRO engine on a world of one equals the plain trainer
// bit for bit at every stage, and DeepSpeed config / --fsdp resolution.
#include <gtest/gtest.h>

#include <random>

#include "backend/backend.h"
#include "core/error.h"
#include "dist/comm.h"
#include "dist/ds_config.h"
#include "dist/zero.h"
#include "model/presets.h"
#include "plan/planner.h"
#include "train/batching.h"

namespace lt {
namespace {

ModelConfig tiny(bool tied) {
  nlohmann::json j = {{"architectures", {"LlamaForCausalLM"}},
                      {"model_type", "llama"},
                      {"hidden_size", 32},
                      {"intermediate_size", 48},
                      {"num_hidden_layers", 3},
                      {"num_attention_heads", 4},
                      {"num_key_value_heads", 2},
                      {"head_dim", 8},
                      {"vocab_size", 61},
                      {"max_position_embeddings", 64},
                      {"rms_norm_eps", 1e-5},
                      {"tie_word_embeddings", tied}};
  return parse_model_config(j, "tiny");
}

std::vector<MicroBatch> batches(int64_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<MicroBatch> out;
  for (int m = 0; m < 2; ++m) {
    std::vector<Example> rows(3);
    std::vector<const Example*> ptrs;
    for (auto& e : rows) {
      for (int t = 0; t < 5 + int(rng() % 9); ++t) e.input_ids.push_back(int32_t(rng() % vocab));
      ptrs.push_back(&e);
    }
    out.push_back(make_micro_batch(ptrs));
  }
  return out;
}

// ZeRO on one rank runs the plain trainer's arithmetic: bit for bit at stages 0 and 1; stages 2
// and 3 sum each micro-batch's layer gradients apart before adding them to the shard (the plain
// trainer accumulates inside the GEMM), so they agree to float rounding.
TEST(ZeroLocal, EveryStageEqualsTrainStepBitwise) {
  for (bool tied : {false, true}) {
    const ModelConfig c = tiny(tied);
    OptimizerSettings opt;
    opt.learning_rate = 1e-2;
    opt.weight_decay = 0.1;
    opt.max_grad_norm = 0.5;
    const ScheduleSettings sched{ScheduleType::kLinear, 1, 3};
    auto be = make_cpu_backend();
    RunSettings rs;
    rs.max_tokens = 64;
    rs.mlp_chunks = 3;
    rs.checkpointing = true;
    LlamaModel ref(c, *be, rs);
    init_random_weights(ref.table(), ref.params(), 0.2, 3);
    std::vector<float> init(ref.params(), ref.params() + ref.table().total_numel());
    AdamW adam(ref.table(), *be, opt);
    std::vector<double> ref_loss;
    for (int s = 0; s < 3; ++s)
      ref_loss.push_back(train_step(ref, adam, opt, sched, batches(c.vocab_size, s), s).loss);

    for (int stage = 0; stage <= 3; ++stage) {
      SCOPED_TRACE(testing::Message() << "stage " << stage << " tied " << tied);
      auto comm = make_local_communicator();
      ZeroSettings z;
      z.stage = stage;
      z.offload_optimizer = stage == 3;
      RunSettings zrs = rs;
      ZeroEngine::adjust_run_settings(z, &zrs);
      LlamaModel model(c, *be, zrs);
      ZeroEngine engine(model, *be, *comm, z, opt);
      engine.load_full(init.data());
      const double tol = stage <= 1 ? 0.0 : 1e-6;
      for (int s = 0; s < 3; ++s) {
        const double loss = engine.train_step(batches(c.vocab_size, s), sched, s).loss;
        EXPECT_NEAR(loss, ref_loss[s], tol * ref_loss[s]) << "step " << s;
      }
      std::vector<float> out(init.size());
      engine.gather_full(out.data());
      for (size_t i = 0; i < out.size(); ++i)
        ASSERT_NEAR(out[i], ref.params()[i], stage <= 1 ? 0.0 : 2e-5) << "weight " << i;
      EXPECT_EQ(model.params() == nullptr, stage >= 2);
    }
  }
}

TEST(ZeroLocal, ShardLayoutCoversTheBlock) {
  const ShardLayout l(1001, 4);
  EXPECT_EQ(l.shard, 256);
  EXPECT_EQ(l.end(3), 1001);
  const auto c = l.counts(250, 600);
  EXPECT_EQ(c, (std::vector<int64_t>{6, 256, 88, 0}));
  EXPECT_EQ(make_local_communicator()->size(), 1);
  unsetenv("OMPI_COMM_WORLD_SIZE");
  if (!launched_by_mpi()) {
    EXPECT_EQ(init_world({})->size(), 1);
  }
}

TrainOptions options() {
  TrainOptions o;
  o.per_device_train_batch_size = 4;
  o.gradient_accumulation_steps = 2;
  o.optimizer.learning_rate = 3e-4;
  o.optimizer.weight_decay = 0.01;
  o.max_steps = 100;
  return o;
}

TEST(DeepSpeedConfig, AutoValuesAndIgnoredKeys) {
  TrainOptions o = options();
  const auto j = nlohmann::json::parse(R"({
    "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 2,
    "train_batch_size": 16, "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": [0.9, 0.999],
                  "eps": "auto", "weight_decay": 0.01}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": "auto",
                  "warmup_num_steps": 7, "warmup_type": "linear"}},
    "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": true},
                          "offload_param": {"device": "cpu"}, "overlap_comm": true,
                          "contiguous_gradients": true, "reduce_bucket_size": "auto",
                          "stage3_prefetch_bucket_size": 0,
                          "stage3_param_persistence_threshold": "auto",
                          "stage3_max_live_parameters": 1e9,
                          "stage3_gather_16bit_weights_on_model_save": true},
    "steps_per_print": 10
  })");
  const auto notes = apply_deepspeed_config(j, "ds.json", 2, 32, &o);
  EXPECT_EQ(o.dist.zero_stage, 3);
  EXPECT_TRUE(o.dist.offload_optimizer);
  EXPECT_TRUE(o.dist.offload_params);
  EXPECT_EQ(o.dist.reduce_bucket_size, 32 * 32);  // HF's auto: hidden^2
  EXPECT_EQ(zero_settings(o.dist).prefetch, false);
  EXPECT_EQ(o.lr_scheduler_type, "constant_with_warmup");
  EXPECT_EQ(o.warmup_steps, 7);
  std::string all;
  for (const auto& n : notes) all += n + "\n";
  for (const char* key : {"steps_per_print", "overlap_comm", "contiguous_gradients",
                          "stage3_param_persistence_threshold", "stage3_max_live_parameters"})
    EXPECT_NE(all.find(key), std::string::npos) << key << " not named in:\n" << all;
}

void expect_error(const char* json, int world, const std::string& needle) {
  TrainOptions o = options();
  try {
    apply_deepspeed_config(nlohmann::json::parse(json), "ds.json", world, 32, &o);
    ADD_FAILURE() << "no error for " << json;
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(DeepSpeedConfig, Errors) {
  expect_error(R"({"train_batch_size": 16})", 4, "train_batch_size");  // 4 x 2 x 4 = 32
  expect_error(R"({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}})", 1, "--learning_rate");
  expect_error(R"({"fp16": {"enabled": true}})", 1, "fp16");
  expect_error(R"({"scheduler": {"type": "WarmupLR", "params": {}}})", 1, "warmup_type");
  expect_error(R"({"zero_optimization": {"stage": 4}})", 1, "stage");
  expect_error(R"({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}})", 1,
               "offload_param");
  expect_error(R"({"zero_optimization": {"offload_optimizer": {"device": "nvme"}}})", 1, "nvme");
  expect_error(R"({"optimizer": {"type": "SGD"}})", 1, "SGD");
}

TEST(Fsdp, SelectsZeroStage) {
  TrainOptions o = options();
  o.dist.fsdp = "full_shard auto_wrap";
  o.dist.fsdp_offload_params = true;
  apply_fsdp(&o);
  EXPECT_EQ(o.dist.zero_stage, 3);
  EXPECT_TRUE(o.dist.offload_params && o.dist.offload_optimizer);
  o = options();
  o.dist.fsdp = "shard_grad_op";
  apply_fsdp(&o);
  EXPECT_EQ(o.dist.zero_stage, 2);
  o.dist.fsdp = "hybrid_shard";
  EXPECT_THROW(apply_fsdp(&o), UserError);
}

// `longtune plan --world_size N --zero_stage S`: the sharded categories shrink per device; with
// optimizer offload the optimizer state moves off the device.
TEST(PlanWorld, ShardedCategoriesShrink) {
  PlanRequest r;
  r.config = parse_model_config(preset_config("small"), "small");
  r.seq_len = 256;
  auto cat = [](const PlanResult& p, const std::string& name) {
    for (const auto& [n, b] : p.by_category)
      if (n == name) return b;
    return size_t{0};
  };
  const PlanResult one = plan_memory(r);
  r.world_size = 4;
  r.zero_stage = 1;
  const PlanResult z1 = plan_memory(r);
  EXPECT_EQ(cat(z1, "weights"), cat(one, "weights"));
  EXPECT_LT(cat(z1, "optimizer state"), cat(one, "optimizer state") / 4 + 4096);
  r.zero_stage = 3;
  const PlanResult z3 = plan_memory(r);
  // Weights alone need not shrink on a small model: the embedding and LM head are gathered whole
  // for a pass and two layers are gathered at a time; the three sharded categories together do.
  auto state = [&](const PlanResult& p) {
    return cat(p, "weights") + cat(p, "gradients") + cat(p, "optimizer state");
  };
  std::printf("small preset, 4 ranks ZeRO-3: %zu bytes of weights+gradients+optimizer vs %zu\n",
              state(z3), state(one));
  EXPECT_LT(state(z3), state(one) * 0.8);  // 0.77 today: the gathered outer unit dominates
  r.offload_optimizer = true;
  const PlanResult off = plan_memory(r);
  EXPECT_EQ(cat(off, "optimizer state"), 0u);
  EXPECT_GT(off.offloaded_bytes, cat(z3, "optimizer state"));
}

}  // namespace
}  // namespace lt
