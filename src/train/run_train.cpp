// `longtune train` as a whole job: validation, data, plan, steps, logs and the saved model.
#include <chrono>
#include <cmath>

#include <fmt/format.h>

#include "core/check.h"
#include "core/error.h"
#include "data/dataset.h"
#include "data/tokenizer.h"
#include "dist/comm.h"
#include "dist/ds_config.h"
#include "dist/zero.h"
#include "io/safetensors.h"
#include "model/model_io.h"
#include "plan/planner.h"
#include "train/batching.h"
#include "train/trainer.h"

namespace lt {

namespace {

bool dir_has_entries(const std::filesystem::path& p) {
  return std::filesystem::is_directory(p) && !std::filesystem::is_empty(p);
}

DType parse_save_dtype(const std::string& s, DType loaded) {
  if (s.empty()) return loaded;
  if (s == "f32" || s == "float32") return DType::kF32;
  if (s == "bf16" || s == "bfloat16") return DType::kBF16;
  if (s == "f16" || s == "float16") return DType::kF16;
  fail("--save_dtype: '{}' is not allowed; use f32, bf16 or f16", s);
}

void settings_from_options(const TrainOptions& o, const ModelConfig& c, int64_t max_tokens,
                           RunSettings* s) {
  s->max_tokens = max_tokens;
  s->checkpointing = o.gradient_checkpointing || o.offload_activations;
  s->offload_checkpoints = o.offload_activations;
  s->offload_dir = o.output_dir.parent_path().empty() ? "." : o.output_dir.parent_path().string();
  s->flash_attention = o.use_flash_attn;
  if (o.mini_sequence == "auto") {
    mini_sequence_auto(c, max_tokens, s);
  } else {
    char* end = nullptr;
    const long long m = std::strtoll(o.mini_sequence.c_str(), &end, 10);
    if (!end || *end || m < 1)
      fail("--mini_sequence: '{}' is not allowed; use a positive integer or auto", o.mini_sequence);
    s->mlp_chunks = s->lm_head_chunks = m;
  }
  s->mlp_chunks = std::min(s->mlp_chunks, max_tokens);
  s->lm_head_chunks = std::min(s->lm_head_chunks, max_tokens);
}

}  // namespace

void run_train(const TrainOptions& options) {
  using Clock = std::chrono::steady_clock;
  const auto t_start = Clock::now();
  TrainOptions o = options;  // a DeepSpeed config may fill some fields
  // ---- dist: the world of ranks; rank 0 prints unless --log_all_ranks ----
  auto world = init_world(WorldOptions{o.dist.dist_timeout});
  const int world_size = world->size(), rank = world->rank();
  if (rank != 0 && !o.dist.log_all_ranks) std::freopen("/dev/null", "w", stdout);
  if (o.dist.sequence_parallel_size != 1 || o.dist.pipeline_parallel_size != 1 ||
      o.dist.fpdt_chunk_size != 0)
    fail("--sequence_parallel_size, --pipeline_parallel_size and --fpdt_chunk_size are not "
         "implemented yet (use 1, 1 and 0)");
  apply_fsdp(&o);
  // ---- end dist ----
  // 1. Validate everything before anything is written.
  if (o.model_name_or_path.empty()) fail("--model_name_or_path is required");
  if (o.data_path.empty()) fail("--data_path is required");
  if (o.output_dir.empty()) fail("--output_dir is required");
  if (o.per_device_train_batch_size < 1)
    fail("--per_device_train_batch_size must be >= 1 (got {})", o.per_device_train_batch_size);
  if (o.gradient_accumulation_steps < 1)
    fail("--gradient_accumulation_steps must be >= 1 (got {})", o.gradient_accumulation_steps);
  if (!(o.optimizer.learning_rate >= 0)) fail("--learning_rate must be >= 0");
  if (o.warmup_ratio < 0 || o.warmup_ratio > 1) fail("--warmup_ratio must be in [0, 1]");
  if (o.logging_steps < 1) fail("--logging_steps must be >= 1 (got {})", o.logging_steps);
  if (dir_has_entries(o.output_dir) && !o.overwrite_output_dir)
    fail("--output_dir '{}' exists and is not empty; pass --overwrite_output_dir True to reuse it",
         o.output_dir.string());
  const std::filesystem::path model_dir = o.model_name_or_path;
  if (!std::filesystem::is_directory(model_dir))
    fail("--model_name_or_path '{}' is not a folder", model_dir.string());
  ModelConfig config = load_model_config(model_dir / "config.json");
  if (o.model_max_length > 0 && apply_position_interpolation(&config, o.model_max_length))
    fmt::print("context extension: model_max_length {} > max_position_embeddings {}: linear "
               "position interpolation with factor {} (saved in config.json)\n",
               o.model_max_length, config.max_position_embeddings, config.rope_scaling.factor);
  // ---- dist: DeepSpeed config (HF "auto" rules); the ZeRO settings of this run ----
  if (!o.dist.deepspeed.empty())
    for (const auto& note : apply_deepspeed_config_file(o.dist.deepspeed, world_size,
                                                        config.hidden_size, &o))
      fmt::print("{}\n", note);
  const bool distributed = world_size > 1 || o.dist.zero_stage > 0;
  const ZeroSettings zero = zero_settings(o.dist);
  if (distributed)
    fmt::print("distributed: {} ranks ({}), ZeRO stage {}{}{}\n", world_size, world->backend(),
               zero.stage, zero.offload_optimizer ? ", optimizer offload" : "",
               zero.offload_params ? ", parameter offload" : "");
  // ---- end dist ----
  const ScheduleType sched_type = parse_schedule(o.lr_scheduler_type);
  CheckpointReader reader(model_dir);
  const DType save_dtype = parse_save_dtype(o.save_dtype, reader.stored_dtype());

  std::unique_ptr<Tokenizer> tokenizer;
  const std::filesystem::path tok_path = o.tokenizer.empty() ? model_dir : o.tokenizer;
  if (!o.tokenizer.empty() || std::filesystem::exists(model_dir / "tokenizer.json"))
    tokenizer = Tokenizer::load(tok_path);
  DatasetOptions dopt;
  dopt.format = parse_dataset_format(o.dataset_format);
  dopt.model_max_length = o.model_max_length > 0 ? o.model_max_length : config.max_position_embeddings;
  dopt.train_on_inputs = o.train_on_inputs;
  dopt.packing = o.packing;
  dopt.chat_template = o.chat_template;
  const Dataset data = load_dataset(o.data_path, tokenizer.get(), dopt, config.vocab_size);
  fmt::print("data: {} rows from {} ({} truncated to {} tokens, {} skipped)\n",
             data.rows.size(), o.data_path.string(), data.stats.rows_truncated,
             dopt.model_max_length, data.stats.rows_skipped);

  // 2. Steps.
  const int64_t B = o.per_device_train_batch_size, G = o.gradient_accumulation_steps;
  // Data parallel: a global micro-batch holds world_size x B rows; rank r takes r, r + W, ...
  const int64_t global_b = B * world_size;
  const int64_t micro_per_epoch = (static_cast<int64_t>(data.rows.size()) + global_b - 1) / global_b;
  const int64_t steps_per_epoch = std::max<int64_t>(1, (micro_per_epoch + G - 1) / G);
  const int64_t total_steps =
      o.max_steps > 0 ? o.max_steps
                      : static_cast<int64_t>(std::ceil(o.num_train_epochs * steps_per_epoch));
  if (total_steps < 1) fail("nothing to train: --max_steps and --num_train_epochs give 0 steps");
  ScheduleSettings sched{sched_type, warmup_steps_for(o.warmup_steps, o.warmup_ratio, total_steps),
                         total_steps};

  // 3. Memory plan, then allocation (once).
  RunSettings rs;
  settings_from_options(o, config, max_micro_batch_tokens(data.rows, B), &rs);
  MemoryPlan plan;
  if (distributed) ZeroEngine::adjust_run_settings(zero, &rs);
  LlamaModel::plan(config, rs, &plan);
  const ParamTable table(config);
  if (distributed)
    ZeroEngine::plan(config, zero, world_size, rank, &plan);
  else
    AdamW::plan(table, &plan);
  fmt::print("model: {} ({} layers, hidden {}, vocab {}), {:.2f}M parameters\n",
             config.architecture, config.num_hidden_layers, config.hidden_size, config.vocab_size,
             static_cast<double>(table.total_numel()) / 1e6);
  fmt::print("settings: micro-batch up to {} tokens, mini-sequence MLP {} / LM head {} chunks, "
             "checkpointing {}, offload {}, flash attention {}\n",
             rs.max_tokens, rs.mlp_chunks, rs.lm_head_chunks, rs.checkpointing ? "on" : "off",
             rs.offload_checkpoints ? "on" : "off", rs.flash_attention ? "on" : "off");
  fmt::print("{}\n", plan.describe());

  auto backend = make_backend(o.device);
  LlamaModel model(config, *backend, rs);
  std::unique_ptr<AdamW> optimizer;
  std::unique_ptr<ZeroEngine> engine;
  if (distributed) {  // every rank reads the checkpoint and keeps its part
    engine = std::make_unique<ZeroEngine>(model, *backend, *world, zero, o.optimizer);
    std::vector<float> full(table.total_numel());
    load_weights(reader, model.table(), full.data());
    engine->load_full(full.data());
  } else {
    load_weights(reader, model.table(), model.params());
    optimizer = std::make_unique<AdamW>(model.table(), *backend, o.optimizer);
  }

  // 4. Train.
  fmt::print("training: {} steps ({} per epoch), batch {} x accumulation {}, lr {} ({}, warmup {})\n",
             total_steps, steps_per_epoch, B, G, o.optimizer.learning_rate,
             schedule_name(sched.type), sched.warmup_steps);
  int64_t step = 0, epoch = 0;
  double logged_loss = 0;
  int64_t logged_steps = 0, logged_tokens = 0;
  auto t_log = Clock::now();
  while (step < total_steps) {
    const auto batches =
        epoch_micro_batches(static_cast<int64_t>(data.rows.size()), global_b, o.seed, epoch);
    for (size_t i = 0; i < batches.size() && step < total_steps; i += G) {
      std::vector<MicroBatch> micro;
      for (size_t j = i; j < std::min(batches.size(), i + G); ++j) {
        std::vector<const Example*> rows;
        for (size_t k = rank; k < batches[j].size(); k += world_size)
          rows.push_back(&data.rows[batches[j][k]]);
        micro.push_back(make_micro_batch(rows));
      }
      const StepResult r = engine ? engine->train_step(micro, sched, step)
                                  : train_step(model, *optimizer, o.optimizer, sched, micro, step);
      ++step;
      logged_loss += r.loss;
      ++logged_steps;
      logged_tokens += r.tokens;
      if (step % o.logging_steps == 0 || step == total_steps) {
        const double secs = std::chrono::duration<double>(Clock::now() - t_log).count();
        fmt::print("step {}/{}  epoch {:.2f}  loss {:.4f}  lr {:.3e}  grad_norm {:.4f}  "
                   "tokens/s {:.0f}  peak mem {}\n",
                   step, total_steps,
                   epoch + static_cast<double>(i / G + 1) / static_cast<double>(steps_per_epoch),
                   logged_loss / logged_steps, r.learning_rate, r.grad_norm,
                   secs > 0 ? logged_tokens / secs : 0.0, format_bytes(measured_peak_rss()));
        std::fflush(stdout);
        logged_loss = 0;
        logged_steps = logged_tokens = 0;
        t_log = Clock::now();
      }
    }
    ++epoch;
  }

  // 5. Save.
  if (engine) {  // sharded runs are gathered and saved as one model by rank 0
    std::vector<float> full(table.total_numel());
    engine->gather_full(full.data());
    if (rank == 0) save_model(o.output_dir, config, model.table(), full.data(), save_dtype, model_dir);
    world->barrier();
  } else {
    save_model(o.output_dir, config, model.table(), model.params(), save_dtype, model_dir);
  }
  const double secs = std::chrono::duration<double>(Clock::now() - t_start).count();
  fmt::print("saved {} ({}) in {:.1f} s; planned {} , measured peak RSS {}\n",
             o.output_dir.string(), dtype_name(save_dtype), secs, format_bytes(plan.total_bytes()),
             format_bytes(measured_peak_rss()));
}

}  // namespace lt
