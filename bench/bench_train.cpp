// Training-step benchmark (not a test): tokens/s, peak memory and MFU of training steps for a
// model at several sequence lengths, with the memory-saving settings chosen on the command line.
// Prints one JSON line per sequence length (bench/run_train_bench.sh compares them with PyTorch on
// the same model, tokens and threads; scripts/gpu-check.sh runs it on a GPU next to
// bench/hf_peft_bench.py).
//
// usage: bench_train MODEL SEQ[,SEQ...] [steps=3] [settings...]
//   MODEL: a Hugging Face folder, or preset:NAME (random weights of a named shape, no files)
//   settings: naive (plain attention), mini=M|auto, ckpt, offload, selective (with ckpt/offload:
//             attention outputs kept, the recompute skips attention), device=cpu|cuda|cpu-guarded,
//             lora=R (LoRA r=R, alpha 2R, all linear layers), bf16 (bf16 GEMMs on CUDA; with
//             LoRA the frozen projections in bf16), peak_tflops=X (MFU reference; default: the
//             measured sgemm peak on the CPU, 989 on CUDA), fit=BYTES (also run the longest
//             sequence the planner says fits in BYTES of device memory, one timed step; SEQ
//             'fit' runs that length alone), host=BYTES (with fit on CUDA: the pinned host
//             memory offloaded buffers may take), profile (one more step with op timing
//             (Backend::set_op_profiling): a table of where its time went, after the JSON line)
#include <fmt/format.h>
#include <omp.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <sstream>
#include <string>

#include "backend/arena.h"
#include "backend/backend.h"
#include "bench/bench_common.h"
#include "core/error.h"
#include "io/safetensors.h"
#include "model/adapter_io.h"
#include "model/lora.h"
#include "model/model_io.h"
#include "model/presets.h"
#include "plan/planner.h"
#include "train/batching.h"
#include "train/trainer.h"

namespace lt {
namespace {

// A whole command-line number: "12x", "" and out-of-range values are errors naming the setting.
template <typename T>
T number(const std::string& text, const char* what) {
  T v{};
  const char* end = text.data() + text.size();
  const auto [p, ec] = std::from_chars(text.data(), end, v);
  if (text.empty() || ec != std::errc() || p != end)
    fail("{} '{}' is not a number; see the usage line", what, text);
  return v;
}

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

// Random weights of the model's shape: each tensor a repeated block of U(-0.035, 0.035) values
// (about N(0, 0.02)'s spread; norms 1), cheap enough for 8B shapes; packed projections too.
void random_weights(LlamaModel& m) {
  std::vector<float> block(1 << 20);
  uint64_t x = 88172645463325252ull;
  for (float& v : block) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    v = 0.035f * (float(x >> 40) / float(1 << 24) * 2.0f - 1.0f);
  }
  std::vector<float> host;
  auto fill = [&](int64_t n, bool norm) {
    host.resize(size_t(n));
    for (int64_t off = 0; off < n; off += int64_t(block.size())) {
      const int64_t k = std::min<int64_t>(int64_t(block.size()), n - off);
      if (norm)
        std::fill_n(host.begin() + off, k, 1.0f);
      else
        std::copy_n(block.begin(), k, host.begin() + off);
    }
  };
  Backend& be = m.backend();
  for (const auto& p : m.table().params()) {
    fill(p.numel, p.shape.size() == 1);
    be.copy_to_device(m.params() + p.offset, host.data(), host.size() * 4);
  }
  for (size_t i = 0; i < m.packed_weights().size(); ++i) {
    fill(m.packed_weights()[i].numel, false);
    m.pack_base_weight(i, host.data());
  }
}

int run(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(
        stderr,
        "usage: bench_train MODEL_DIR|preset:NAME SEQ[,SEQ...]|fit [steps] [naive] "
        "[mini=M|auto] [ckpt] [offload] [selective] [device=D] [lora=R] [bf16] [peak_tflops=X] "
        "[fit=BYTES] [host=BYTES] [profile]\n");
    return 2;
  }
  const std::string model = argv[1];
  std::vector<int64_t> seqs;
  const bool fit_only = std::string(argv[2]) == "fit";
  std::stringstream ss(fit_only ? "" : argv[2]);
  for (std::string tok; std::getline(ss, tok, ',');) seqs.push_back(number<int64_t>(tok, "SEQ"));
  const int steps = argc > 3 ? number<int>(argv[3], "steps") : 3;
  RunSettings base;
  std::string mini = "1", label, device = "cpu";
  int64_t lora_r = 0;
  bool bf16 = false, profile = false;
  double peak_tflops = 0;
  size_t fit = 0, host_budget = 0;
  for (int i = 4; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "naive")
      base.flash_attention = false;
    else if (a == "ckpt")
      base.checkpointing = true;
    else if (a == "offload")
      base.checkpointing = base.offload_checkpoints = true;
    else if (a == "selective")
      base.keep_attention = true;
    else if (a.rfind("mini=", 0) == 0)
      mini = a.substr(5);
    else if (a.rfind("device=", 0) == 0)
      device = a.substr(7);
    else if (a.rfind("lora=", 0) == 0)
      lora_r = number<int64_t>(a.substr(5), "lora=");
    else if (a == "bf16")
      bf16 = true;
    else if (a == "profile")
      profile = true;
    else if (a.rfind("peak_tflops=", 0) == 0)
      peak_tflops = number<double>(a.substr(12), "peak_tflops=");
    else if (a.rfind("fit=", 0) == 0)
      fit = parse_bytes(a.substr(4), "fit=");
    else if (a.rfind("host=", 0) == 0)
      host_budget = parse_bytes(a.substr(5), "host=");
    else
      fail("unknown setting '{}'", a);
    if (a.rfind("peak_tflops=", 0) != 0 && a.rfind("fit=", 0) != 0 && a.rfind("host=", 0) != 0 &&
        a != "profile")
      label += (label.empty() ? "" : "+") + a;
  }
  if (label.empty()) label = "default";
  if (fit_only && fit == 0) fail("SEQ 'fit' needs fit=BYTES");
  base.offload_dir = "/tmp";
  base.bf16_residual = bf16;  // as train --bf16 True: the residual stream and checkpoints in bf16
  if (lora_r > 0) {
    LoraOptions o;
    o.use_peft_lora = true;
    o.r = lora_r;
    o.alpha = 2.0 * double(lora_r);
    o.dropout = 0;
    o.target_modules = "all-linear";
    base.lora = resolve_lora(o, 1);
    base.lora.base_bf16 = base.lora.embed_bf16 = bf16;  // as train --bf16 True
  }
  const bool preset = model.rfind("preset:", 0) == 0;
  ModelConfig config = preset ? parse_model_config(preset_config(model.substr(7)), model)
                              : load_model_config(std::filesystem::path(model) / "config.json");
  const int threads = omp_get_max_threads();
  const bool cuda = make_backend(device, bf16)->name() == "cuda";
  const double peak_gflops = peak_tflops > 0 ? peak_tflops * 1e3
                             : cuda          ? 989e3
                                             : bench::sgemm_peak_gflops();
  auto settings_for = [&](int64_t T) {
    RunSettings rs = base;
    rs.max_tokens = T;
    if (const auto m = parse_mini_sequence(mini))
      rs.mlp_chunks = rs.lm_head_chunks = *m;
    else
      mini_sequence_auto(config, T, &rs);
    return rs;
  };
  // The plan of the engine this runs: the CUDA one counts its workspace and runtime.
  auto plan_request = [&](int64_t T, const RunSettings& rs) {
    PlanRequest pr{config, T, 1, rs};
    pr.device = cuda ? PlanDevice::kCuda : PlanDevice::kCpu;
    pr.bf16_gemms = bf16;
    pr.host_budget = host_budget;
    return pr;
  };
  const size_t given = seqs.size();
  if (fit > 0) {  // the planner's longest sequence for this budget, then run it
    PlanRequest pr = plan_request(seqs.empty() ? 4096 : seqs.back(), settings_for(4096));
    pr.mini_sequence_auto = mini == "auto";
    const int64_t longest = longest_sequence(pr, fit, 1024);
    fmt::print(stderr, "bench_train: the planner's longest sequence within {}: {}\n",
               format_bytes(fit), longest);
    if (longest > 0) seqs.push_back(longest);
  }
  // The planner's longest sequence (after the given lengths, when it fits at all) runs one
  // step, timed: the longest steps take minutes.
  for (size_t i = 0; i < seqs.size(); ++i) {
    const int64_t T = seqs[i];
    const int steps_here = i >= given ? 0 : steps;
    const RunSettings rs = settings_for(T);
    const Example e = bench_row(T, config.vocab_size);
    std::vector<const Example*> rows = {&e};
    const std::vector<MicroBatch> micro = {make_micro_batch(rows)};
    const size_t predicted = plan_memory(plan_request(T, rs)).device_bytes;
    double first_loss = 0, secs = 0, profile_ms = 0;
    std::vector<OpTime> ops;
    // A fresh backend per length: its device-memory peak is this run's.
    auto be = make_backend(device, bf16);
    const bool host = be->host_addressable();
    {
      // The backend's workspace, planned and bound as train binds it.
      const Arena workspace =
          bind_workspace_arena(*be, be->workspace_needs(workspace_shape(config, rs)));
      LlamaModel m(config, *be, rs);
      if (preset) {
        random_weights(m);
      } else if (rs.lora.enabled) {
        load_base_weights(CheckpointReader(model), m);
      } else {
        std::vector<float> host(m.table().total_numel());
        load_weights(CheckpointReader(model), m.table(), host.data());
        be->copy_to_device(m.params(), host.data(), host.size() * 4);
      }
      if (rs.lora.enabled) {
        std::vector<float> init(m.lora_table().total_numel());
        init_lora_weights(m.lora_table(), 1, init.data());
        be->copy_to_device(m.lora_params(), init.data(), init.size() * 4);
      }
      // The checkpoint's mapped pages are gone with the reader: from here on the peak is the
      // whole process's while it trains (libraries, thread pools and the engine's arenas).
      bench::reset_peak_rss();
      OptimizerSettings opt;
      opt.learning_rate = 1e-4;
      AdamW adam(m.trainable(), *be, opt);
      ScheduleSettings sched{ScheduleType::kConstant, 0, steps + 1};
      // Warm-up step (also the validation value: the loss at the initial weights); with
      // steps = 0 it is the only step and the one timed.
      const auto t_first = std::chrono::steady_clock::now();
      first_loss = train_step(m, adam, opt, sched, micro, 0).loss;
      be->synchronize();
      if (steps_here == 0)
        secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_first).count();
      const auto t0 = std::chrono::steady_clock::now();
      for (int s = 1; s <= steps_here; ++s) train_step(m, adam, opt, sched, micro, s);
      be->synchronize();
      if (steps_here > 0)
        secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() /
               steps_here;
      if (profile) {  // one more step, every op timed where it runs
        be->set_op_profiling(true);
        const auto tp = std::chrono::steady_clock::now();
        train_step(m, adam, opt, sched, micro, steps_here + 1);
        ops = be->take_op_profile();  // waits for the step's work
        profile_ms =
            std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - tp)
                .count();
        be->set_op_profiling(false);
      }
    }
    const size_t measured = host ? measured_peak_rss() : be->device_memory_use().peak;
    // PaLM's model FLOPs (plan/planner.h), the same count bench_gpu and `longtune plan` use.
    const double flops = training_flops(config, double(T), double(T));
    const double gflops = flops / secs / 1e9;
    fmt::print(
        "{{\"impl\": \"longtune\", \"device\": \"{}\", \"settings\": \"{}\", \"seq\": {}, "
        "\"threads\": {}, \"loss\": {:.6f}, \"timed_steps\": {}, \"step_s\": {:.4f}, "
        "\"tokens_per_s\": {:.1f}, "
        "\"peak_bytes\": {}, \"predicted_bytes\": {}, \"gflops\": {:.1f}, "
        "\"peak_gflops\": {:.1f}, \"mfu\": {:.3f}}}\n",
        be->name(), label, T, threads, first_loss, std::max(steps_here, 1), secs, T / secs,
        measured, predicted, gflops, peak_gflops, gflops / peak_gflops);
    if (profile)
      fmt::print("op profile: {} {} seq {}, one step of {:.1f} ms\n{}", be->name(), label, T,
                 profile_ms, format_op_profile(ops, profile_ms));
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
