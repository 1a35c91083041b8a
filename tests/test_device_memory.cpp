// The device-memory discipline of everything above the backend, on a machine without a GPU: the
// guarded CPU backend (`--device cpu-guarded`: device memory unreadable outside backend calls,
// not host-addressable) must give the CPU backend's results exactly, for every training path
// and for the trainer's loading, checkpoints, resume and saving. Host code that touched device
// memory directly would crash these tests with SIGSEGV.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <random>
#include <regex>

#include "backend/backend.h"
#include "cli_runner.h"
#include "dist/sequence.h"
#include "model/llama.h"
#include "model/presets.h"
#include "plan/planner.h"
#include "train/batching.h"
#include "train/optimizer.h"
#include "train/trainer.h"

namespace lt {
namespace {

namespace fs = std::filesystem;

ModelConfig config() {
  nlohmann::json j = {{"architectures", {"LlamaForCausalLM"}},
                      {"hidden_size", 32},
                      {"intermediate_size", 40},
                      {"num_hidden_layers", 3},
                      {"num_attention_heads", 4},
                      {"num_key_value_heads", 2},
                      {"head_dim", 8},
                      {"vocab_size", 37},
                      {"max_position_embeddings", 128},
                      {"rms_norm_eps", 1e-5}};
  return parse_model_config(j, "device memory test");
}

std::vector<Example> rows(uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<Example> out(6);
  for (auto& e : out) {
    const int64_t len = 6 + int64_t(rng() % 20);
    for (int64_t t = 0; t < len; ++t) e.input_ids.push_back(int32_t(rng() % 37));
    e.labels = e.input_ids;
    e.labels[0] = kIgnoreIndex;
  }
  return out;
}

struct Outcome {
  std::vector<double> loss, grad_norm;
  std::vector<std::vector<float>> trainable;  // final values, host
  std::vector<float> logits;
};

// Two optimizer steps of three micro-batches, then forward-only logits, on `device`.
Outcome train(const std::string& device, RunSettings rs, bool fpdt) {
  const ModelConfig c = config();
  auto be = make_backend(device);
  const auto r = rows(3);
  std::vector<MicroBatch> mbs;
  for (size_t i = 0; i < r.size(); i += 2) {
    std::vector<const Example*> p = {&r[i], &r[i + 1]};
    mbs.push_back(make_micro_batch(p));
    if (fpdt) mbs.back() = sequence_shard(mbs.back(), 1, 0, rs.seq_chunk);
    rs.max_tokens = std::max(rs.max_tokens, mbs.back().num_tokens());
  }
  // The CUDA backend's workspace as the trainer plans and binds it: the guarded backend then
  // checks every op's CUDA scratch request against it.
  const BackendWorkspace ws = be->workspace_needs(workspace_shape(c, rs));
  std::unique_ptr<void, std::function<void(void*)>> workspace(
      ws.op_bytes ? be->alloc(ws.op_bytes) : nullptr, [&](void* p) { be->free(p); });
  be->bind_workspace(workspace.get(), ws.op_bytes, nullptr, 0, nullptr, 0);
  LlamaModel m(c, *be, rs);
  const ParamTable full(c);
  std::vector<float> w(full.total_numel());
  init_random_weights(full, w.data(), 0.3, 11);
  for (const auto& p : m.table().params())
    be->copy_to_device(m.params() + p.offset, w.data() + full.find(p.name)->offset, p.numel * 4);
  for (size_t i = 0; i < m.packed_weights().size(); ++i)
    m.pack_base_weight(i, w.data() + full.find(m.packed_weights()[i].name)->offset);
  if (rs.lora.enabled) {  // B non-zero so that every adapter tensor has a gradient at once
    std::vector<float> lora(m.lora_table().total_numel());
    std::mt19937 rng(2);
    std::normal_distribution<float> nd(0.0f, 0.1f);
    for (auto& x : lora) x = nd(rng);
    be->copy_to_device(m.lora_params(), lora.data(), lora.size() * 4);
  }
  OptimizerSettings opt;
  opt.learning_rate = 1e-2;
  opt.max_grad_norm = 0.5;
  AdamW adam(m.trainable(), *be, opt);
  ScheduleSettings sched{ScheduleType::kConstant, 0, 2};
  Outcome out;
  for (int64_t s = 0; s < 2; ++s) {
    const StepResult res = train_step(m, adam, opt, sched, mbs, s);
    out.loss.push_back(res.loss);
    out.grad_norm.push_back(res.grad_norm);
  }
  for (const auto& t : m.trainable()) out.trainable.push_back(be->download(t.param, t.numel));
  if (!fpdt) {
    RunSettings er = rs;
    er.train = false;
    out.logits.resize(size_t(mbs[0].num_tokens()) * c.vocab_size);
    auto host = be->download(m.params(), m.table().total_numel());
    LlamaModel e(c, *be, er);
    be->copy_to_device(e.params(), host.data(), host.size() * 4);
    for (size_t i = 0; i < e.packed_weights().size(); ++i)
      e.pack_base_weight(i, w.data() + full.find(e.packed_weights()[i].name)->offset);
    if (rs.lora.enabled)
      be->copy_device(e.lora_params(), m.lora_params(), m.lora_table().total_numel() * 4);
    std::vector<float> dev_logits;
    float* d = static_cast<float*>(be->alloc(out.logits.size() * 4));
    e.forward_logits(mbs[0], d);
    be->copy_to_host(out.logits.data(), d, out.logits.size() * 4);
    be->free(d);
  }
  return out;
}

struct Case {
  const char* name;
  RunSettings rs;
  bool fpdt;
};

// The same losses, gradient norms and final trainable tensors, bit for bit.
void expect_identical(const Outcome& got, const Outcome& want, const char* what) {
  SCOPED_TRACE(what);
  EXPECT_EQ(got.loss, want.loss);
  EXPECT_EQ(got.grad_norm, want.grad_norm);
  ASSERT_EQ(got.trainable.size(), want.trainable.size());
  for (size_t i = 0; i < want.trainable.size(); ++i)
    ASSERT_EQ(got.trainable[i], want.trainable[i]) << "trainable tensor " << i;
}

RunSettings offloaded(RunSettings s) {
  s.checkpointing = s.offload_checkpoints = true;
  s.offload_dir = "/tmp";
  return s;
}

TEST(DeviceMemory, EveryTrainingPathMatchesTheCpuBackendExactly) {
  std::vector<Case> cases;
  cases.push_back({"plain", RunSettings{}, false});
  {
    RunSettings s;
    s.mlp_chunks = s.lm_head_chunks = 3;
    cases.push_back({"mini-sequence + checkpointing + offload", offloaded(s), false});
  }
  {
    RunSettings s;
    LoraOptions o;
    o.use_peft_lora = true;
    o.r = 4;
    o.target_modules = "all-linear";
    o.dropout = 0.1;
    o.trainable_params = "embed,norm";
    s.lora = resolve_lora(o, 5);
    cases.push_back({"LoRA with dropout, embed and norms", s, false});
    RunSettings ms = s;  // dropout buffers sized for the MLP chunk, not every token
    ms.mlp_chunks = ms.lm_head_chunks = 3;
    cases.push_back({"LoRA with dropout + mini-sequence", ms, false});
    o.load_in_4bit = true;
    o.dropout = 0;
    o.trainable_params = "";
    s.lora = resolve_lora(o, 5);
    s.checkpointing = true;
    cases.push_back({"QLoRA + checkpointing", s, false});
    cases.push_back({"QLoRA + checkpointing + offload", offloaded(s), false});
    o.load_in_4bit = false;
    s.lora = resolve_lora(o, 5);
    s.lora.base_bf16 = true;
    cases.push_back({"LoRA on a bf16 base + checkpointing", s, false});
    s.lora.embed_bf16 = true;  // --bf16 True: the frozen embedding and LM head too
    s.lm_head_chunks = 2;
    cases.push_back({"LoRA on a bf16 base, embedding and head", s, false});
    o.load_in_4bit = true;
    s.lora = resolve_lora(o, 5);
    s.lora.embed_bf16 = true;
    cases.push_back({"QLoRA with a bf16 embedding and head", offloaded(s), false});
  }
  {
    RunSettings s;
    s.seq_chunk = 8;
    s.checkpointing = true;
    cases.push_back({"FPDT chunks on one rank", s, true});
    cases.push_back({"FPDT chunks + offload", offloaded(s), true});
  }
  {
    RunSettings s;
    s.bf16_residual = true;
    s.mlp_chunks = s.lm_head_chunks = 2;
    cases.push_back({"bf16 residual stream", s, false});
    s.checkpointing = true;
    cases.push_back({"bf16 residual + checkpoints in bf16", s, false});
    cases.push_back({"bf16 residual + bf16 checkpoints offloaded", offloaded(s), false});
    s.keep_attention = true;
    cases.push_back({"selective recomputation, bf16 checkpoints offloaded", offloaded(s), false});
    RunSettings f;
    f.bf16_residual = true;
    f.seq_chunk = 8;
    cases.push_back({"FPDT + bf16 checkpoints offloaded", offloaded(f), true});
  }
  for (const Case& k : cases) {
    SCOPED_TRACE(k.name);
    const Outcome cpu = train("cpu", k.rs, k.fpdt);
    const Outcome guarded = train("cpu-guarded", k.rs, k.fpdt);
    expect_identical(guarded, cpu, "cpu-guarded vs cpu");
    EXPECT_EQ(guarded.logits, cpu.logits);
    EXPECT_GT(std::abs(cpu.loss[1] - cpu.loss[0]), 1e-5) << "training moved";
    if (k.rs.bf16_residual && k.rs.checkpointing && !k.fpdt) {
      // bf16 checkpoints are the bf16-rounded stream itself: recomputing from them gives what
      // keeping every activation gives, bit for bit.
      RunSettings all = k.rs;
      all.checkpointing = all.offload_checkpoints = false;
      expect_identical(guarded, train("cpu-guarded", all, k.fpdt), "every activation kept");
    }
    if (!k.rs.offload_checkpoints) continue;
    // Offload only moves the checkpoints: the same numbers as keeping them, on the device
    // backend too (where the copies are asynchronous and deferred to the last moment).
    RunSettings kept = k.rs;
    kept.offload_checkpoints = false;
    expect_identical(guarded, train("cpu-guarded", kept, k.fpdt), "checkpoints kept");
  }
}

// The guarded backend holds op calls to the CUDA workspace contract: a call whose CUDA kernel
// would need more scratch than the bound workspace stops the run, naming the op.
TEST(DeviceMemoryDeathTest, GuardedBackendHoldsOpsToThePlannedCudaWorkspace) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        auto be = make_backend("cpu-guarded");
        const int64_t N = 4096;  // 4096 rows: 16 KiB of CUDA scratch, 1 KiB planned
        void* ws = be->alloc(1024);
        be->bind_workspace(ws, 1024, nullptr, 0, nullptr, 0);
        float* x = static_cast<float*>(be->alloc(size_t(N) * 4));
        int32_t* t = static_cast<int32_t*>(be->alloc(size_t(N) * 4));
        be->memset_zero(t, size_t(N) * 4);
        float* scratch = static_cast<float*>(be->alloc(size_t(N) * 4));
        be->lm_head_cross_entropy(nullptr, nullptr, x, x, t, N, 1, 1, N, 1.0f, scratch);
      },
      "lm_head_cross_entropy needs 32768 bytes of CUDA scratch; the planned workspace has 1024");
}

TEST(DeviceMemory, GuardedMemoryReallyIsGuarded) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  auto be = make_backend("cpu-guarded");
  EXPECT_FALSE(be->host_addressable());
  float* p = static_cast<float*>(be->alloc(64));
  const float one = 1.0f;
  be->copy_to_device(p, &one, 4);
  float back = 0;
  be->copy_to_host(&back, p, 4);
  EXPECT_EQ(back, 1.0f);
  EXPECT_DEATH(
      {
        volatile float x = p[0];
        (void)x;
      },
      "")
      << "a host read of device memory";
  be->free(p);
}

// The trainer's whole job on the guarded backend: loading, steps, a checkpoint, resume, the
// saved model and the adapter, all as on the CPU backend.
TEST(DeviceMemory, TrainerJobMatchesTheCpuBackend) {
  const fs::path dir = fs::temp_directory_path() / fmt::format("lt_devmem_{}", getpid());
  fs::remove_all(dir);
  fs::create_directories(dir);
  {
    std::ofstream f(dir / "data.jsonl");
    for (int i = 0; i < 24; ++i) {
      f << "{\"input_ids\": [";
      for (int t = 0; t < 5 + i % 9; ++t) f << (t ? "," : "") << (i * 13 + t * 7) % 97;
      f << "]}\n";
    }
  }
  const std::string model = std::string(LT_SOURCE_DIR) + "/tests/fixtures/models/llama_gqa";
  auto steps = [](const std::string& out) {
    std::vector<std::string> s;
    std::regex re(R"(step (\d+)/\d+ +epoch \S+ +loss (\S+) .*grad_norm (\S+))");
    std::smatch m;
    std::istringstream in(out);
    for (std::string line; std::getline(in, line);)
      if (std::regex_search(line, m, re))
        s.push_back(m[1].str() + " " + m[2].str() + " " + m[3].str());
    return s;
  };
  enum Kind { kFull, kLora, kLoraBf16 };
  for (Kind kind : {kFull, kLora, kLoraBf16}) {
    const bool lora = kind != kFull;
    const std::string tag = kind == kFull ? "" : kind == kLora ? "_lora" : "_lora_bf16";
    SCOPED_TRACE(kind == kFull ? "full fine-tune" : kind == kLora ? "LoRA" : "LoRA, bf16 base");
    std::vector<std::string> base = {"train",
                                     "--model_name_or_path",
                                     model,
                                     "--data_path",
                                     (dir / "data.jsonl").string(),
                                     "--max_steps",
                                     "4",
                                     "--logging_steps",
                                     "1",
                                     "--save_steps",
                                     "2",
                                     "--per_device_train_batch_size",
                                     "2",
                                     "--report_to",
                                     "none",
                                     "--disable_tqdm",
                                     "True",
                                     "--overwrite_output_dir",
                                     "True",
                                     "--learning_rate",
                                     "1e-3",
                                     "--gradient_checkpointing",
                                     "True"};
    if (lora) base.insert(base.end(), {"--use_peft_lora", "True", "--lora_dropout", "0"});
    if (kind == kLoraBf16) base.insert(base.end(), {"--bf16", "True"});
    std::map<std::string, std::vector<std::string>> got;
    for (const std::string device : {"cpu", "cpu-guarded"}) {
      auto args = base;
      const fs::path out = dir / (device + tag);
      args.insert(args.end(), {"--device", device, "--output_dir", out.string()});
      const auto r = testing::run_cli(args);
      ASSERT_EQ(r.rc, 0) << r.err;
      got[device] = steps(r.out);
      if (device == "cpu-guarded") {  // every device allocation is a planned arena
        std::smatch m;
        const std::regex re(
            R"(device memory on cpu-guarded: planned ([0-9.]+) (\w+), measured peak ([0-9.]+) (\w+))");
        ASSERT_TRUE(std::regex_search(r.out, m, re)) << r.out;
        auto bytes = [](const std::string& v, const std::string& unit) {
          const double scale = unit == "GiB"   ? 1 << 30
                               : unit == "MiB" ? 1 << 20
                               : unit == "KiB" ? 1 << 10
                                               : 1;
          return std::stod(v) * scale;
        };
        const double planned = bytes(m[1], m[2]), measured = bytes(m[3], m[4]);
        EXPECT_GE(measured, planned * 0.999) << m[0];
        EXPECT_LE(measured, planned * 1.01 + 65536) << m[0] << " (page rounding only)";
      }
      if (kind == kLoraBf16) {  // the plan holds the projections at 2 bytes each
        EXPECT_NE(r.out.find("base projections in bf16"), std::string::npos) << r.out;
        EXPECT_NE(r.out.find("weights_packed"), std::string::npos) << r.out;
      }
      // Resume from checkpoint-2: steps 3 and 4 again.
      fs::remove_all(out / "checkpoint-4");
      args.insert(args.end(), {"--resume_from_checkpoint", "latest"});
      const auto again = testing::run_cli(args);
      ASSERT_EQ(again.rc, 0) << again.err;
      for (const auto& s : steps(again.out)) got[device + " resumed"].push_back(s);
      EXPECT_TRUE(fs::exists(out / (lora ? "adapter_model.safetensors" : "model.safetensors")));
    }
    ASSERT_EQ(got["cpu"].size(), 4u);
    EXPECT_EQ(got["cpu-guarded"], got["cpu"]);
    EXPECT_EQ(got["cpu-guarded resumed"], got["cpu resumed"]);
    EXPECT_EQ(got["cpu resumed"],
              std::vector<std::string>(got["cpu"].begin() + 2, got["cpu"].end()));
  }
  fs::remove_all(dir);
}

}  // namespace
}  // namespace lt
