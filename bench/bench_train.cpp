// Training-step benchmark (not a test): tokens/s, peak memory and MFU of full fine-tuning steps
// for a model folder at several sequence lengths, with the memory-saving settings chosen on the
// command line. Prints one JSON line per sequence length (bench/run_train_bench.sh compares them
// with PyTorch on the same model, tokens and threads).
//
// usage: bench_train MODEL_DIR SEQ[,SEQ...] [steps=3] [settings...]
//   settings: naive (plain attention), mini=M|auto, ckpt, offload
#include <fmt/format.h>
#include <omp.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <sstream>
#include <string>

#include "backend/backend.h"
#include "bench/bench_common.h"
#include "core/error.h"
#include "io/safetensors.h"
#include "model/model_io.h"
#include "plan/planner.h"
#include "train/batching.h"
#include "train/trainer.h"

namespace lt {
namespace {

// The benchmark's tokens: a fixed formula that bench/torch_train.py reproduces.
Example bench_row(int64_t T, int64_t V) {
  Example e;
  uint64_t x = 12345;
  for (int64_t t = 0; t < T; ++t) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    e.input_ids.push_back(static_cast<int32_t>((x >> 33) % static_cast<uint64_t>(V)));
  }
  return e;
}

int run(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr,
                 "usage: bench_train MODEL_DIR SEQ[,SEQ...] [steps] [naive] [mini=M|auto] [ckpt] "
                 "[offload]\n");
    return 2;
  }
  const std::filesystem::path dir = argv[1];
  std::vector<int64_t> seqs;
  std::stringstream ss(argv[2]);
  for (std::string tok; std::getline(ss, tok, ',');) seqs.push_back(std::stoll(tok));
  const int steps = argc > 3 ? std::atoi(argv[3]) : 3;
  RunSettings base;
  std::string mini = "1", label;
  for (int i = 4; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "naive")
      base.flash_attention = false;
    else if (a == "ckpt")
      base.checkpointing = true;
    else if (a == "offload")
      base.checkpointing = base.offload_checkpoints = true;
    else if (a.rfind("mini=", 0) == 0)
      mini = a.substr(5);
    else
      fail("unknown setting '{}'", a);
    label += (label.empty() ? "" : "+") + a;
  }
  if (label.empty()) label = "default";
  base.offload_dir = "/tmp";
  ModelConfig config = load_model_config(dir / "config.json");
  const int threads = omp_get_max_threads();
  const double peak = bench::sgemm_peak_gflops();
  auto be = make_cpu_backend();
  for (int64_t T : seqs) {
    RunSettings rs = base;
    rs.max_tokens = T;
    if (const auto m = parse_mini_sequence(mini))
      rs.mlp_chunks = rs.lm_head_chunks = *m;
    else
      mini_sequence_auto(config, T, &rs);
    const Example e = bench_row(T, config.vocab_size);
    std::vector<const Example*> rows = {&e};
    const std::vector<MicroBatch> micro = {make_micro_batch(rows)};
    PlanRequest pr{config, T, 1, rs};
    const size_t predicted = plan_memory(pr).device_bytes;
    double first_loss = 0, secs = 0;
    {
      LlamaModel model(config, *be, rs);
      load_weights(CheckpointReader(dir), model.table(), model.params());
      // The checkpoint's mapped pages are gone with the reader: from here on the peak is the
      // whole process's while it trains (libraries, thread pools and the engine's arenas).
      bench::reset_peak_rss();
      OptimizerSettings opt;
      opt.learning_rate = 1e-4;
      AdamW adam(model.table(), *be, opt);
      ScheduleSettings sched{ScheduleType::kConstant, 0, steps + 1};
      // Warm-up step (also the validation value: the loss at the initial weights); with
      // steps = 0 it is the only step and the one timed.
      const auto t_first = std::chrono::steady_clock::now();
      first_loss = train_step(model, adam, opt, sched, micro, 0).loss;
      if (steps == 0)
        secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_first).count();
      const auto t0 = std::chrono::steady_clock::now();
      for (int s = 1; s <= steps; ++s) train_step(model, adam, opt, sched, micro, s);
      if (steps > 0)
        secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / steps;
    }
    const size_t measured = measured_peak_rss();
    // PaLM's model FLOPs (plan/planner.h), the same count bench_gpu and `longtune plan` use.
    const double flops = training_flops(config, double(T), double(T));
    const double gflops = flops / secs / 1e9;
    fmt::print(
        "{{\"impl\": \"longtune\", \"settings\": \"{}\", \"seq\": {}, \"threads\": {}, "
        "\"loss\": {:.6f}, \"step_s\": {:.4f}, \"tokens_per_s\": {:.1f}, \"peak_bytes\": {}, "
        "\"predicted_bytes\": {}, \"gflops\": {:.1f}, \"sgemm_peak_gflops\": {:.1f}, "
        "\"mfu\": {:.3f}}}\n",
        label, T, threads, first_loss, secs, T / secs, measured, predicted, gflops, peak,
        gflops / peak);
    std::fflush(stdout);
    if (!std::isfinite(first_loss)) fail("loss is not finite at seq {}", T);
  }
  return 0;
}

}  // namespace
}  // namespace lt

int main(int argc, char** argv) {
  try {
    return lt::run(argc, argv);
  } catch (const lt::UserError& e) {
    std::fprintf(stderr, "bench_train: %s\n", e.what());
    return 1;
  }
}
