// `longtune plan`: predicted peak memory by category for a model, sequence, batch and settings;
// the longest sequence within --memory_budget; the settings auto flags would pick.
#include <optional>

#include "cli/commands.h"
#include "cli/flags.h"
#include "cli/lora_flags.h"
#include "core/error.h"
#include "model/presets.h"
#include "plan/planner.h"

namespace lt {

namespace {
std::string settings_text(const RunSettings& s) {
  return fmt::format("mini-sequence MLP {} / LM head {} chunks, checkpointing {}, offload {}, "
                     "flash attention {}",
                     s.mlp_chunks, s.lm_head_chunks, s.checkpointing ? "on" : "off",
                     s.offload_checkpoints ? "on" : "off", s.flash_attention ? "on" : "off");
}
}  // namespace

int cmd_plan(int argc, char** argv) {
  CLI::App app{"Predict peak memory and the longest sequence that fits", "longtune plan"};
  std::string model, preset, mini = "1", ckpt = "False", budget, device = "cpu";
  int64_t seq = 0, batch = 1;
  bool offload = false, flash = true, bf16 = false;
  app.add_option("--model_name_or_path", model, "Hugging Face model folder (config.json)");
  app.add_option("--preset", preset, "a named shape instead: tiny, small, llama2-7b, llama3-8b, ...");
  app.add_option("--model_max_length", seq, "sequence length (tokens per row)")->required();
  app.add_option("--per_device_train_batch_size", batch, "rows per micro-batch");
  app.add_option("--mini_sequence", mini, "MLP / LM-head chunks: M or auto");
  app.add_option("--gradient_checkpointing", ckpt, "True, False or auto");
  add_bool_flag(app, "--offload_activations", &offload, "offload layer checkpoints");
  add_bool_flag(app, "--use_flash_attn", &flash, "tiled attention (default True)");
  add_bool_flag(app, "--bf16", &bf16, "bf16 training (CUDA plan)");
  app.add_option("--device", device, "cpu or cuda (cuda plans bf16 with f32 master weights)");
  app.add_option("--memory_budget", budget, "device memory, e.g. 80GiB");
  LoraOptions lora;
  add_lora_flags(app, &lora);
  int world_size = 1, zero_stage = 0;
  bool offload_optimizer = false;
  app.add_option("--world_size", world_size, "data-parallel ranks sharing the ZeRO state")
      ->check(CLI::PositiveNumber);
  app.add_option("--zero_stage", zero_stage, "0, 1, 2 or 3")->check(CLI::Range(0, 3));
  add_bool_flag(app, "--offload_optimizer", &offload_optimizer, "ZeRO-Offload of the optimizer");
  if (!parse_flags(app, argc, argv)) return 0;
  if (model.empty() == preset.empty()) fail("give exactly one of --model_name_or_path and --preset");
  if (seq < 1) fail("--model_max_length must be >= 1 (got {})", seq);
  if (batch < 1) fail("--per_device_train_batch_size must be >= 1 (got {})", batch);
  if (device != "cpu" && device != "cuda") fail("--device: '{}' is not allowed; use cpu or cuda", device);

  PlanRequest r;
  r.config = model.empty() ? parse_model_config(preset_config(preset), "--preset " + preset)
                           : load_model_config(std::filesystem::path(model) / "config.json");
  r.seq_len = seq;
  r.batch = batch;
  r.device = device == "cuda" ? PlanDevice::kCudaBf16 : PlanDevice::kCpuF32;
  r.settings.flash_attention = flash;
  r.settings.lora = resolve_lora(lora, 42);
  r.world_size = world_size;
  r.zero_stage = zero_stage;
  r.offload_optimizer = offload_optimizer;
  r.settings.offload_checkpoints = offload;
  const std::optional<int64_t> chunks = parse_mini_sequence(mini);
  const bool auto_ms = !chunks, auto_ck = ckpt == "auto";
  if (chunks)
    r.settings.mlp_chunks = r.settings.lm_head_chunks = *chunks;
  else
    r.mini_sequence_auto = true;
  if (!auto_ck) {
    if (ckpt == "True" || ckpt == "true") r.settings.checkpointing = true;
    else if (ckpt == "False" || ckpt == "false") r.settings.checkpointing = false;
    else fail("--gradient_checkpointing: '{}' is not allowed; use True, False or auto", ckpt);
  }
  if (apply_position_interpolation(&r.config, seq))
    fmt::print("note: {} > max_position_embeddings {}: linear position interpolation, factor {}\n",
               seq, r.config.max_position_embeddings, r.config.rope_scaling.factor);

  std::optional<size_t> budget_bytes;
  if (!budget.empty()) budget_bytes = parse_bytes(budget, "--memory_budget");
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
             r.config.vocab_size, seq, batch, device == "cuda" ? "cuda (bf16)" : "cpu (f32)");
  if (world_size > 1 || zero_stage > 0)
    fmt::print("per device of {} data-parallel ranks, ZeRO stage {}{}\n", world_size, zero_stage,
               offload_optimizer ? " with optimizer offload" : "");
  fmt::print("settings: {}\n{}\n", settings_text(r.settings), p.describe());
  {
    const double n = static_cast<double>(ParamTable(r.config).total_numel());
    size_t fixed = 0;
    for (const auto& [name, bytes] : p.by_category)
      if (name == "weights" || name == "gradients" || name == "optimizer state") fixed += bytes;
    fmt::print("{}: {:.3f} bytes per base parameter (weights + gradients + optimizer state)\n",
               r.settings.lora.enabled
                   ? (r.settings.lora.quantize_4bit ? "QLoRA" : "LoRA")
                   : "full fine-tune",
               static_cast<double>(fixed) / n);
  }
  if (budget_bytes) {
    fmt::print("budget {}: {}\n", format_bytes(*budget_bytes),
               p.device_bytes <= *budget_bytes ? "fits" : "does NOT fit");
    fmt::print("longest sequence within the budget (batch {}):\n", batch);
    struct Row {
      const char* name;
      bool flash, mini, ckpt, off;
    };
    for (const Row& row :
         {Row{"vanilla", false, false, false, false}, Row{"+ flash attention", true, false, false, false},
          Row{"+ mini-sequence", true, true, false, false},
          Row{"+ checkpointing", true, true, true, false}, Row{"+ offload", true, true, true, true}}) {
      PlanRequest q = r;
      q.settings.flash_attention = row.flash;
      q.settings.mlp_chunks = q.settings.lm_head_chunks = 1;
      q.mini_sequence_auto = row.mini;
      q.settings.checkpointing = row.ckpt;
      q.settings.offload_checkpoints = row.off;
      fmt::print("  {:<18} {}\n", row.name, longest_sequence(q, *budget_bytes));
    }
  }
  return 0;
}

}  // namespace lt
