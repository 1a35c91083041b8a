// `longtune train --device cuda` end to end on the CUDA emulator (label emu; ctest sets
// LONGTUNE_CUDA_MODULE to liblongtune_cuda_emu.so, the real cuda_backend.cpp and kernels on
// tests/cuda_emu): the pretrained stories260K trains a few steps on the emulated GPU and on the
// CPU, and the losses agree step by step, as scripts/gpu-check.sh's train step checks on a GPU.
// The emulated device runs its copy stream lazily (emu_runtime.h), so a checkpoint copied
// before the layer that wrote it, or read back before its prefetch was waited for, changes the
// offload run's losses: they must equal the checkpointing run's bit for bit (the emulator runs
// blocks in one order unless LONGTUNE_CUDA_EMU_SCHEDULE says otherwise, so even the attention
// backward's dq atomics add in one order).
#include <dlfcn.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <regex>
#include <string>
#include <tuple>
#include <vector>

#include "cli_runner.h"

namespace lt {
namespace {

namespace fs = std::filesystem;
const fs::path kData = fs::path(LT_SOURCE_DIR) / "../shared/data";

struct TrainRun {
  std::vector<double> losses;
  std::string log;
};

class TrainEmu : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = fs::temp_directory_path() / ("lt_test_train_emu_" + std::to_string(getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    const fs::path m = kData / "models/stories260K";
    const auto r =
        testing::run_cli({"convert", "llama2c", "--checkpoint", m / "stories260K.bin",
                          "--tokenizer", m / "tok512.bin", "--output_dir", dir_ / "model"});
    ASSERT_EQ(r.rc, 0) << r.err;
  }
  static void TearDownTestSuite() { fs::remove_all(dir_); }

  void SetUp() override {
    const char* module = std::getenv("LONGTUNE_CUDA_MODULE");
    ASSERT_TRUE(module && *module) << "run through ctest: LONGTUNE_CUDA_MODULE names the emulator";
  }

  // `steps` steps of one row of up to 128 tokens, as gpu-check's runs at a smaller size, into
  // NAME-DEVICE.
  static std::vector<std::string> train_args(const std::string& name, const std::string& device,
                                             const std::vector<std::string>& extra, int steps) {
    std::vector<std::string> args = {"train",
                                     "--model_name_or_path",
                                     dir_ / "model",
                                     "--data_path",
                                     kData / "instructions/llamafactory_alpaca_en_demo.json",
                                     "--output_dir",
                                     dir_ / (name + "-" + device),
                                     "--max_steps",
                                     std::to_string(steps),
                                     "--logging_steps",
                                     "1",
                                     "--learning_rate",
                                     "1e-3",
                                     "--per_device_train_batch_size",
                                     "1",
                                     "--model_max_length",
                                     "128",
                                     "--seed",
                                     "1",
                                     "--device",
                                     device,
                                     "--report_to",
                                     "none",
                                     "--save_strategy",
                                     "no"};
    args.insert(args.end(), extra.begin(), extra.end());
    return args;
  }

  static TrainRun train(const std::string& name, const std::string& device,
                        const std::vector<std::string>& extra, int steps = 3) {
    const auto r = testing::run_cli(train_args(name, device, extra, steps));
    TrainRun run;
    run.log = r.out + r.err;
    EXPECT_EQ(r.rc, 0) << name << " on " << device << ":\n" << run.log;
    static const std::regex loss(R"(step \d+/\d+ .*?loss ([0-9.eE+-]+|nan|inf))");
    for (std::sregex_iterator it(run.log.begin(), run.log.end(), loss), end; it != end; ++it)
      run.losses.push_back(std::stod((*it)[1]));
    EXPECT_EQ(run.losses.size(), size_t(steps)) << name << " on " << device << ":\n" << run.log;
    return run;
  }

  // The CUDA run's losses within 2e-2 relative of the CPU's (bf16 attention operands), and its
  // device memory: every allocation planned, the measured peak within the plan.
  static void compare(const std::string& name, const TrainRun& cpu, const TrainRun& cuda) {
    ASSERT_EQ(cpu.losses.size(), cuda.losses.size()) << name;
    for (size_t i = 0; i < cpu.losses.size(); ++i) {
      const double rel = std::fabs(cuda.losses[i] - cpu.losses[i]) / std::fabs(cpu.losses[i]);
      EXPECT_LE(rel, 2e-2) << name << " step " << i + 1 << ": cpu " << cpu.losses[i] << ", cuda "
                           << cuda.losses[i];
    }
    EXPECT_EQ(cuda.log.find("outside the plan"), std::string::npos) << name << ":\n" << cuda.log;
    static const std::regex mem(
        R"(device memory on cuda: planned ([0-9.]+) (B|KiB|MiB|GiB), measured peak ([0-9.]+) (B|KiB|MiB|GiB))");
    std::smatch m;
    ASSERT_TRUE(std::regex_search(cuda.log, m, mem)) << name << ":\n" << cuda.log;
    const auto bytes = [](const std::string& v, const std::string& unit) {
      const double scale = unit == "GiB"   ? 1 << 30
                           : unit == "MiB" ? 1 << 20
                           : unit == "KiB" ? 1 << 10
                                           : 1;
      return std::stod(v) * scale;
    };
    EXPECT_LE(bytes(m[3], m[4]), bytes(m[1], m[2]) * 1.001) << name << ": " << m[0];
  }

  static fs::path dir_;
};
fs::path TrainEmu::dir_;

const std::vector<std::string> kLoraBf16 = {
    "--use_peft_lora", "True", "--lora_target_modules", "all-linear", "--lora_dropout", "0",
    "--bf16",          "True"};

std::vector<std::string> with(std::vector<std::string> a, const std::vector<std::string>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

TEST_F(TrainEmu, FullFineTuneMatchesTheCpu) {
  compare("full", train("full", "cpu", {}), train("full", "cuda", {}));
}

TEST_F(TrainEmu, LoraOnABf16BaseMatchesTheCpu) {
  compare("lora-bf16", train("lora-bf16", "cpu", kLoraBf16), train("lora-bf16", "cuda", kLoraBf16));
}

// Evaluation during training (forward only, eval micro-batches of several rows): the eval loss on
// the emulated GPU within the same tolerance of the CPU's.
TEST_F(TrainEmu, EvaluationMatchesTheCpu) {
  const fs::path eval = dir_ / "eval.jsonl";
  {
    std::ofstream f(eval);
    for (int i = 0; i < 6; ++i) {
      f << "{\"input_ids\": [1";
      for (int t = 0; t < 20 + 7 * i; ++t) f << ", " << (37 * i + 11 * t) % 500 + 3;
      f << "]}\n";
    }
  }
  const std::vector<std::string> extra = {"--eval_data_path",
                                          eval,
                                          "--eval_strategy",
                                          "steps",
                                          "--eval_steps",
                                          "2",
                                          "--per_device_eval_batch_size",
                                          "4",
                                          "--use_peft_lora",
                                          "True"};
  const TrainRun cpu = train("eval", "cpu", extra, 2), cuda = train("eval", "cuda", extra, 2);
  static const std::regex loss(R"(eval at step 2: loss ([0-9.]+))");
  std::smatch a, b;
  ASSERT_TRUE(std::regex_search(cpu.log, a, loss)) << cpu.log;
  ASSERT_TRUE(std::regex_search(cuda.log, b, loss)) << cuda.log;
  const double want = std::stod(a[1]), got = std::stod(b[1]);
  EXPECT_LE(std::fabs(got - want), 2e-2 * want) << "eval loss: cpu " << want << ", cuda " << got;
}

// Offloaded checkpoints go to pinned host memory on the copy stream and come back ahead of
// their layer: the losses of checkpointing exactly, and the CPU's within the tolerance.
TEST_F(TrainEmu, OffloadEqualsCheckpointingAndMatchesTheCpu) {
  const auto ckpt = with(kLoraBf16, {"--gradient_checkpointing", "True"});
  const auto offload = with(ckpt, {"--offload_activations", "True"});
  const TrainRun a = train("ckpt", "cuda", ckpt), b = train("offload", "cuda", offload);
  EXPECT_EQ(a.losses, b.losses) << "offload changed the losses:\n" << b.log;
  compare("offload", train("offload", "cpu", offload), b);
}

// The host waits for the GPU (each drains its queue: launch latency shows) a fixed number of times
// a step, whatever the depth of the model or the number of trainable tensors: the micro-batch's
// inputs, the loss, the LM head's targets and one gradient norm for every tensor (it was one per
// tensor: 448 a step for Llama-3-8B LoRA). Counted by the emulated runtime over 2 and 4 steps.
TEST_F(TrainEmu, HostWaitsPerStepDoNotGrowWithTheModel) {
  const char* path = std::getenv("LONGTUNE_CUDA_MODULE");
  if (!dlopen(path, RTLD_NOW | RTLD_NOLOAD)) (void)train("waits-load", "cuda", {}, 1);  // loads it
  void* module = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
  ASSERT_NE(module, nullptr) << dlerror();
  auto waits = reinterpret_cast<uint64_t (*)()>(dlsym(module, "longtune_cuda_emu_host_waits"));
  ASSERT_NE(waits, nullptr) << dlerror();
  const auto lora = with(kLoraBf16, {"--gradient_checkpointing", "True"});
  uint64_t counts[2];
  for (int i = 0; i < 2; ++i) {
    const uint64_t before = waits();
    (void)train("waits" + std::to_string(i), "cuda", lora, i == 0 ? 2 : 4);
    counts[i] = waits() - before;
  }
  const double per_step = double(counts[1] - counts[0]) / 2;
  std::printf("host waits: %llu over 2 steps, %llu over 4: %.1f a step\n",
              (unsigned long long)counts[0], (unsigned long long)counts[1], per_step);
  // 5 layers, 20 LoRA tensors: one wait per layer or per tensor would pass 16.
  EXPECT_LE(per_step, 16.0);
}

// A plan larger than the GPU's free memory is refused before anything is allocated, with the
// flags that shrink it; the output folder is not created. (The emulated device shrunk to 5 MiB;
// the run plans 6.7 MiB.)
TEST_F(TrainEmu, APlanLargerThanTheGpuIsRefusedBeforeAllocating) {
  ASSERT_EQ(setenv("LONGTUNE_CUDA_EMU_MEMORY", "5242880", 1), 0);
  const auto r = testing::run_cli(train_args("too-big", "cuda", {}, 1));
  unsetenv("LONGTUNE_CUDA_EMU_MEMORY");
  EXPECT_NE(r.rc, 0);
  EXPECT_NE(r.err.find("of cuda memory, "), std::string::npos) << r.err;
  EXPECT_NE(r.err.find(" of 5.00 MiB is free"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("--gradient_checkpointing True"), std::string::npos) << r.err;
  EXPECT_EQ(r.out.find("step 1/1"), std::string::npos) << r.out;
  EXPECT_FALSE(fs::exists(dir_ / "too-big-cuda"));
}

// QLoRA: the frozen projections in NF4, dequantized on the device per use; the MLP and LM head in
// two mini-sequence chunks.
TEST_F(TrainEmu, QloraWithMiniSequencesMatchesTheCpu) {
  const auto qlora = with(kLoraBf16, {"--load_in_4bit", "True", "--mini_sequence", "2"});
  compare("qlora", train("qlora", "cpu", qlora), train("qlora", "cuda", qlora));
}

// FPDT on one GPU: attention over 32-token chunks whose q/k/v live in pinned host memory, chunk
// pairs merged on the device (attention blocks and merge), copies on the copy stream.
TEST_F(TrainEmu, FpdtChunksMatchTheCpu) {
  const auto fpdt = with(kLoraBf16, {"--fpdt_chunk_size", "32"});
  compare("fpdt", train("fpdt", "cpu", fpdt), train("fpdt", "cuda", fpdt));
}

// --full_determinism: a full fine-tune of 320-token packed rows (5 key tiles a row: dQ rows
// summed over up to 5 tiles; the embedding's ids repeat) gives the same model bytes whether the
// emulated GPU runs its blocks in order or reversed (as a GPU's blocks finish in another order
// run to run). Without the flag the two orders give different bits (the test can tell); with it
// the losses still match the CPU's.
TEST_F(TrainEmu, FullDeterminismGivesTheSameBitsWhateverTheBlockOrder) {
  const std::vector<std::string> rows = {"--model_max_length", "320", "--packing", "True"};
  const auto model_bytes = [](const std::string& name) {
    std::ifstream f(dir_ / (name + "-cuda") / "model.safetensors", std::ios::binary);
    EXPECT_TRUE(f.good()) << name;
    return std::string(std::istreambuf_iterator<char>(f), {});
  };
  std::map<std::string, TrainRun> runs;
  for (const std::string mode : {"default", "deterministic"})
    for (const std::string order : {"in-order", "reversed"}) {
      ASSERT_EQ(setenv("LONGTUNE_CUDA_EMU_SCHEDULE", order.c_str(), 1), 0);
      const auto extra = mode == "default" ? rows : with(rows, {"--full_determinism", "True"});
      runs[mode + "-" + order] = train(mode + "-" + order, "cuda", extra, 2);
      unsetenv("LONGTUNE_CUDA_EMU_SCHEDULE");
    }
  EXPECT_NE(model_bytes("default-in-order"), model_bytes("default-reversed"))
      << "the block order left the default kernels' bits alone: the test cannot tell";
  EXPECT_EQ(model_bytes("deterministic-in-order"), model_bytes("deterministic-reversed"));
  EXPECT_EQ(runs["deterministic-in-order"].losses, runs["deterministic-reversed"].losses);
  EXPECT_NE(runs["deterministic-in-order"].log.find("deterministic kernels"), std::string::npos);
  compare("deterministic",
          train("deterministic", "cpu", with(rows, {"--full_determinism", "True"}), 2),
          runs["deterministic-in-order"]);
}

// Selective recomputation keeps each layer's attention output and lse on the device: the GPU's
// recompute skips the attention forward and gives full recomputation's bits (the forward
// kernel is deterministic), within the plan, and the CPU's losses.
TEST_F(TrainEmu, SelectiveRecomputationEqualsFullRecomputation) {
  const auto full = with(kLoraBf16, {"--gradient_checkpointing", "True"});
  const auto selective = with(full, {"--recompute_granularity", "selective"});
  const TrainRun a = train("recompute-full", "cuda", full),
                 b = train("recompute-selective", "cuda", selective);
  EXPECT_EQ(a.losses, b.losses);
  std::ifstream fa(dir_ / "recompute-full-cuda" / "adapter_model.safetensors", std::ios::binary),
      fb(dir_ / "recompute-selective-cuda" / "adapter_model.safetensors", std::ios::binary);
  EXPECT_EQ(std::string(std::istreambuf_iterator<char>(fa), {}),
            std::string(std::istreambuf_iterator<char>(fb), {}));
  compare("selective", train("recompute-selective", "cpu", selective), b);
}

// Held GEMM inputs (Backend::hold_gemm_input: q/k/v and gate/up multiply one bf16 rounding of
// their input, a projection's base and adapter GEMMs one of their output gradient) round the
// same values the per-GEMM staging rounds: the trained weights are the same bytes with holding
// turned off (LONGTUNE_CUDA_HOLD_GEMM_INPUTS=0). LoRA on a bf16 base with checkpointing and a
// chunked MLP, and a full fine-tune (dout held for dinp and the weight gradient), bf16 GEMMs.
TEST_F(TrainEmu, HeldGemmInputsChangeNoBit) {
  const auto bytes = [](const std::string& name, const std::string& file) {
    std::ifstream f(dir_ / (name + "-cuda") / file, std::ios::binary);
    EXPECT_TRUE(f.good()) << name << "/" << file;
    return std::string(std::istreambuf_iterator<char>(f), {});
  };
  const auto lora = with(kLoraBf16, {"--gradient_checkpointing", "True", "--mini_sequence", "3"});
  const std::vector<std::string> full = {"--bf16", "True"};
  for (const auto& [name, extra, file] :
       {std::tuple{"held-lora", lora, "adapter_model.safetensors"},
        std::tuple{"held-full", full, "model.safetensors"}}) {
    ASSERT_EQ(setenv("LONGTUNE_CUDA_HOLD_GEMM_INPUTS", "0", 1), 0);
    const TrainRun off = train(std::string(name) + "-off", "cuda", extra, 2);
    unsetenv("LONGTUNE_CUDA_HOLD_GEMM_INPUTS");
    const TrainRun on = train(name, "cuda", extra, 2);
    EXPECT_EQ(off.losses, on.losses) << name;
    EXPECT_EQ(bytes(std::string(name) + "-off", file), bytes(name, file)) << name;
  }
}

// ZeRO in one process (the engine's collectives on a world of one are device copies): ZeRO-3
// with offload (parameter shard and optimizer on the host, layer weights gathered to the device
// per use) and ZeRO-2. The guarded CPU backend, whose device memory the host cannot touch,
// gives the CPU's losses exactly (both crashed before: the local world's collectives were host
// memmoves of device buffers).
TEST_F(TrainEmu, ZeroInOneProcessMatchesTheCpu) {
  for (const std::string fsdp : {"full_shard offload", "shard_grad_op"}) {
    const std::string name = fsdp == "shard_grad_op" ? "zero2" : "zero3-offload";
    const std::vector<std::string> zero = {"--fsdp", fsdp};
    const TrainRun cpu = train(name, "cpu", zero);
    EXPECT_EQ(train(name, "cpu-guarded", zero).losses, cpu.losses) << name;
    compare(name, cpu, train(name, "cuda", zero));
  }
}

}  // namespace
}  // namespace lt
