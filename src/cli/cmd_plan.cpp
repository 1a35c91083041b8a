// `longtune plan`: predicted peak memory by category for a model, sequence, batch and settings;
// the longest sequence within --memory_budget; the settings auto flags would pick.
#include <algorithm>
#include <optional>

#include "cli/commands.h"
#include "cli/flags.h"
#include "cli/lora_flags.h"
#include "core/error.h"
#include "dist/parallel.h"
#include "model/presets.h"
#include "plan/planner.h"

namespace lt {

namespace {
std::string settings_text(const RunSettings& s) {
  return fmt::format(
      "mini-sequence MLP {} / LM head {} chunks, checkpointing {}, offload {}, "
      "flash attention {}",
      s.mlp_chunks, s.lm_head_chunks,
      !s.checkpointing   ? "off"
      : s.keep_attention ? "on (--recompute_granularity selective)"
                         : "on",
      s.offload_checkpoints ? "on" : "off", s.flash_attention ? "on" : "off");
}

std::string layout_text(const PlanRequest& r) {
  std::string t =
      fmt::format("sp {} pp {} ZeRO-{}", r.sequence_parallel, r.pipeline_parallel, r.zero_stage);
  if (r.offload_params)
    t += " +param offload";
  else if (r.offload_optimizer)
    t += " +optimizer offload";
  if (r.fpdt_chunk) t += fmt::format(" FPDT {}", r.fpdt_chunk);
  return t;
}

// Every layout of the world's ranks (sequence x pipeline x ZeRO x offload x FPDT chunk) with
// the memory-saving settings auto picks for it; those that fit, fastest first.
void print_fitting_layouts(const PlanRequest& base, size_t budget, const GpuSpec& gpu, double mfu) {
  struct Row {
    PlanRequest r;
    size_t bytes;
    StepEstimate e;
  };
  std::vector<Row> rows;
  const ModelConfig& c = base.config;
  const int64_t tokens = base.seq_len * base.batch;
  for (int sp = 1; sp <= base.world_size; ++sp) {
    if (base.world_size % sp || c.num_attention_heads % sp || c.num_key_value_heads % sp) continue;
    for (int pp = 1; pp * sp <= base.world_size; ++pp) {
      if (base.world_size % (sp * pp) || pp > c.num_hidden_layers) continue;
      for (int zero = 0; zero <= (pp > 1 ? 1 : 3); ++zero)
        for (int off = 0; off <= (zero == 3 ? 2 : 1); ++off)
          for (int64_t chunk : {int64_t(0), int64_t(65536), int64_t(16384), int64_t(4096)}) {
            if (chunk && (chunk >= tokens || chunk % sp)) continue;
            PlanRequest r = base;
            r.sequence_parallel = sp, r.pipeline_parallel = pp, r.zero_stage = zero;
            r.offload_optimizer = off >= 1, r.offload_params = off == 2;
            r.fpdt_chunk = chunk;
            try {
              const AutoChoice a = choose_settings(r, budget, true, true);
              if (!a.fits) continue;
              r.settings = a.settings;
              r.mini_sequence_auto = false;
              rows.push_back({r, plan_memory(r).device_bytes, estimate_step(r, gpu, mfu)});
            } catch (const UserError&) {  // a layout this model cannot run
            }
          }
    }
  }
  std::sort(rows.begin(), rows.end(),
            [](const Row& a, const Row& b) { return a.e.step_s < b.e.step_s; });
  fmt::print(
      "layouts of {} x {} that fit {} per device ({} found; fastest first, at an "
      "assumed {:.0f}% of peak for the compute):\n",
      base.world_size, gpu.name, format_bytes(budget), rows.size(), 100 * mfu);
  if (rows.empty()) fmt::print("  none: more devices, a shorter sequence or LoRA/QLoRA\n");
  for (size_t i = 0; i < rows.size() && i < 10; ++i) {
    const Row& w = rows[i];
    fmt::print("  {:<40} {:>11}  step {:>8.2f} s  {:>9.0f} tokens/s  MFU {:4.1f}%  ({})\n",
               layout_text(w.r), format_bytes(w.bytes), w.e.step_s, w.e.tokens_per_s, 100 * w.e.mfu,
               settings_text(w.r.settings));
  }
}
}  // namespace

int cmd_plan(int argc, char** argv) {
  CLI::App app{"Predict peak memory and the longest sequence that fits", "longtune plan"};
  std::string model, preset, mini = "1", ckpt = "False", budget, device = "cpu";
  int64_t seq = 0, batch = 1;
  bool offload = false, flash = true, bf16 = false;
  app.add_option("--model_name_or_path", model, "Hugging Face model folder (config.json)");
  app.add_option("--preset", preset,
                 "a named shape instead: tiny, small, llama2-7b, llama3-8b, ...");
  app.add_option("--model_max_length", seq, "sequence length (tokens per row)")->required();
  app.add_option("--per_device_train_batch_size", batch, "rows per micro-batch");
  app.add_option("--mini_sequence", mini, "MLP / LM-head chunks: M or auto");
  app.add_option("--gradient_checkpointing", ckpt, "True, False or auto");
  add_bool_flag(app, "--offload_activations", &offload, "offload layer checkpoints");
  std::string granularity = "full";
  app.add_option("--recompute_granularity", granularity,
                 "full or selective (keep attention outputs), as train");
  add_bool_flag(app, "--use_flash_attn", &flash, "tiled attention (default True)");
  add_bool_flag(app, "--bf16", &bf16, "bf16 training: bf16 checkpoints and LoRA base, as train");
  app.add_option("--device", device,
                 "cpu or cuda (the CUDA engine: its workspace and runtime; with --bf16 True "
                 "its bf16 GEMM staging)");
  app.add_option("--memory_budget", budget, "device memory, e.g. 80GiB");
  std::string host_budget;
  app.add_option("--host_memory_budget", host_budget,
                 "--device cuda: host memory the offloaded buffers may pin, e.g. 1TiB (default: "
                 "not checked)");
  LoraOptions lora;
  add_lora_flags(app, &lora);
  int world_size = 1, zero_stage = 0, sp = 1, pp = 1;
  int64_t fpdt = 0, accumulation = 1;
  bool offload_optimizer = false, offload_params = false;
  std::string gpu;
  double mfu = 0.5;
  app.add_option("--world_size", world_size,
                 "ranks (GPUs) = data-parallel replicas x sequence x pipeline")
      ->check(CLI::PositiveNumber);
  app.add_option("--zero_stage", zero_stage, "0, 1, 2 or 3")->check(CLI::Range(0, 3));
  add_bool_flag(app, "--offload_optimizer", &offload_optimizer, "ZeRO-Offload of the optimizer");
  add_bool_flag(app, "--offload_param", &offload_params,
                "ZeRO-3: parameter shard (and optimizer) in host memory");
  app.add_option("--sequence_parallel_size", sp, "DeepSpeed-Ulysses degree")
      ->check(CLI::PositiveNumber);
  app.add_option("--pipeline_parallel_size", pp, "pipeline stages")->check(CLI::PositiveNumber);
  app.add_option("--fpdt_chunk_size", fpdt, "FPDT chunk tokens (0 = off)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--gradient_accumulation_steps", accumulation,
                 "micro-batches per step (the pipeline's)")
      ->check(CLI::PositiveNumber);
  app.add_option("--gpu", gpu,
                 "a100-40gb, a100-80gb, h100-80gb or h200: plan for CUDA on it (its memory is "
                 "the budget unless --memory_budget says otherwise), estimate the step time and "
                 "list the layouts of --world_size GPUs that fit");
  app.add_option("--assumed_mfu", mfu, "fraction of the GPU's peak the compute reaches (0.5)")
      ->check(CLI::Range(0.01, 1.0));
  if (!parse_flags(app, argc, argv)) return 0;
  if (model.empty() == preset.empty())
    fail("give exactly one of --model_name_or_path and --preset");
  if (seq < 1) fail("--model_max_length must be >= 1 (got {})", seq);
  if (batch < 1) fail("--per_device_train_batch_size must be >= 1 (got {})", batch);
  if (device != "cpu" && device != "cuda")
    fail("--device: '{}' is not allowed; use cpu or cuda", device);
  std::optional<GpuSpec> spec;
  if (!gpu.empty()) {
    spec = gpu_spec(gpu);
    device = "cuda";
    if (budget.empty()) budget = std::to_string(spec->memory_bytes);
  }

  PlanRequest r;
  r.config = model.empty() ? parse_model_config(preset_config(preset), "--preset " + preset)
                           : load_model_config(std::filesystem::path(model) / "config.json");
  r.seq_len = seq;
  r.batch = batch;
  r.device = device == "cuda" ? PlanDevice::kCuda : PlanDevice::kCpu;
  r.bf16_gemms = bf16;
  r.settings.flash_attention = flash;
  r.settings.lora = resolve_lora(lora, 42);
  // As train: --bf16 True keeps LoRA's frozen projections in bf16, rounds the residual stream
  // and keeps the checkpoints in bf16.
  r.settings.lora.base_bf16 = bf16 && r.settings.lora.enabled && !r.settings.lora.quantize_4bit;
  r.settings.lora.embed_bf16 = bf16 && r.settings.lora.enabled;
  r.settings.bf16_residual = bf16;
  r.world_size = world_size;
  r.zero_stage = zero_stage;
  r.offload_optimizer = offload_optimizer;
  r.offload_params = offload_params;
  r.sequence_parallel = sp;
  r.pipeline_parallel = pp;
  r.fpdt_chunk = fpdt;
  r.micro_per_step = accumulation;
  r.settings.offload_checkpoints = offload;
  r.settings.keep_attention = parse_recompute_granularity(granularity);
  const std::optional<int64_t> chunks = parse_mini_sequence(mini);
  const bool auto_ms = !chunks, auto_ck = ckpt == "auto";
  if (chunks)
    r.settings.mlp_chunks = r.settings.lm_head_chunks = *chunks;
  else
    r.mini_sequence_auto = true;
  if (!auto_ck) {
    if (ckpt == "True" || ckpt == "true")
      r.settings.checkpointing = true;
    else if (ckpt == "False" || ckpt == "false")
      r.settings.checkpointing = false;
    else
      fail("--gradient_checkpointing: '{}' is not allowed; use True, False or auto", ckpt);
  }
  if (apply_position_interpolation(&r.config, seq))
    fmt::print("note: {} > max_position_embeddings {}: linear position interpolation, factor {}\n",
               seq, r.config.max_position_embeddings, r.config.rope_scaling.factor);

  std::optional<size_t> budget_bytes;
  if (!budget.empty()) budget_bytes = parse_bytes(budget, "--memory_budget");
  if (!host_budget.empty()) {
    if (r.device != PlanDevice::kCuda)
      fail(
          "--host_memory_budget is for --device cuda plans (on the CPU, offloaded checkpoints "
          "go to a file)");
    r.host_budget = parse_bytes(host_budget, "--host_memory_budget");
  }
  if (budget_bytes && (auto_ms || auto_ck)) {
    const AutoChoice c = choose_settings(r, *budget_bytes, auto_ms, auto_ck);
    r.settings = c.settings;
    r.mini_sequence_auto = false;
    fmt::print("auto: {}\n", c.why);
  } else if (auto_ck) {
    r.settings.checkpointing = true;
  }
  const PlanResult p = plan_memory(r);
  fmt::print("plan: {} ({} layers, hidden {}, vocab {}) at {} tokens x batch {} on {}\n",
             r.config.architecture, r.config.num_hidden_layers, r.config.hidden_size,
             r.config.vocab_size, seq, batch,
             device == "cpu" ? (bf16 ? "cpu (--bf16 True)" : "cpu")
             : bf16          ? "cuda (bf16 GEMMs)"
                             : "cuda (f32 GEMMs)");
  if (r.parallel()) {
    const ParallelLayout lay = ParallelLayout::make(world_size, 0, sp, pp);
    fmt::print("per device of {}, {}{}\n", lay.describe(), layout_text(r),
               pp > 1 ? fmt::format(" (the largest stage: stage {})", p.stage) : "");
  }
  fmt::print("settings: {}\n{}\n", settings_text(p.settings), p.describe());
  {
    const double n = static_cast<double>(ParamTable(r.config).total_numel());
    size_t fixed = 0;
    for (const auto& [name, bytes] : p.by_category)
      if (name == "weights" || name == "gradients" || name == "optimizer state") fixed += bytes;
    fmt::print("{}: {:.3f} bytes per base parameter (weights + gradients + optimizer state)\n",
               r.settings.lora.enabled ? (r.settings.lora.quantize_4bit ? "QLoRA" : "LoRA")
                                       : "full fine-tune",
               static_cast<double>(fixed) / n);
  }
  if (spec)
    fmt::print("{} x {}: {}\n", world_size, spec->name, estimate_step(r, *spec, mfu).describe());
  if (budget_bytes) {
    fmt::print("budget {}: {}\n", format_bytes(*budget_bytes),
               p.device_bytes <= *budget_bytes ? "fits" : "does NOT fit");
    if (r.host_budget)
      fmt::print("host budget {}: {} pinned, {}\n", format_bytes(r.host_budget),
                 format_bytes(p.offloaded_bytes),
                 p.offloaded_bytes <= r.host_budget ? "fits" : "does NOT fit");
    if (spec && world_size > 1) print_fitting_layouts(r, *budget_bytes, *spec, mfu);
    fmt::print("longest sequence within the budget (batch {}):\n", batch);
    auto print_longest = [&](const char* name, const PlanRequest& q) {
      try {
        fmt::print("  {:<20} {}\n", name, longest_sequence(q, *budget_bytes));
      } catch (const UserError& e) {  // e.g. FPDT without flash attention
        fmt::print("  {:<20} n/a ({})\n", name, e.what());
      }
    };
    struct Row {
      const char* name;
      bool flash, mini, ckpt, off;
    };
    for (const Row& row : {Row{"vanilla", false, false, false, false},
                           Row{"+ flash attention", true, false, false, false},
                           Row{"+ mini-sequence", true, true, false, false},
                           Row{"+ checkpointing", true, true, true, false},
                           Row{"+ offload", true, true, true, true}}) {
      PlanRequest q = r;
      q.settings.flash_attention = row.flash;
      q.settings.mlp_chunks = q.settings.lm_head_chunks = 1;
      q.mini_sequence_auto = row.mini;
      q.settings.checkpointing = row.ckpt;
      q.settings.offload_checkpoints = row.off;
      print_longest(row.name, q);
    }
    // FPDT on the layout as given (one device too): whole layers chunk by chunk, q/k/v and the
    // attention's gradients in pinned host memory; the user's chunk, else 16384 tokens a rank.
    {
      PlanRequest q = r;
      q.settings.flash_attention = true;
      q.mini_sequence_auto = true;
      q.settings.checkpointing = q.settings.offload_checkpoints = true;
      q.fpdt_chunk = r.fpdt_chunk > 0 ? r.fpdt_chunk : int64_t(16384) * sp;
      print_longest(fmt::format("+ FPDT chunk {}", q.fpdt_chunk).c_str(), q);
    }
    print_longest("these settings", r);
  }
  return 0;
}

}  // namespace lt
