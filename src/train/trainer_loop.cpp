// The Trainer (see trainer_loop.h).
#include "train/trainer_loop.h"

#include <fmt/format.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <ctime>
#include <sstream>

#include "backend/arena.h"
#include "core/check.h"
#include "core/error.h"
#include "data/token_cache.h"
#include "dist/comm.h"
#include "dist/ds_config.h"
#include "dist/parallel.h"
#include "dist/zero.h"
#include "io/atomic_file.h"
#include "io/safetensors.h"
#include "model/adapter_io.h"
#include "model/model_io.h"
#include "plan/planner.h"
#include "train/batching.h"
#include "train/evaluate.h"
#include "train/logging/mlflow.h"
#include "train/logging/plot_svg.h"
#include "train/logging/tensorboard.h"
#include "train/stop_signal.h"

namespace lt {

namespace fs = std::filesystem;

namespace {

// The peak to report: resident memory on a host-addressable backend (the whole process), else the
// device memory the backend handed out.
size_t measured_peak(const Backend& be) {
  return be.host_addressable() ? measured_peak_rss() : be.device_memory_use().peak;
}

// The plan's bytes in the backend's host memory (host = true) or its device memory.
size_t planned_bytes(const MemoryPlan& plan, const Backend& be, bool host) {
  size_t bytes = 0;
  for (const auto& a : plan.arena_names())
    if (host_arena(be, a) == host) bytes += plan.arena_bytes(a);
  return bytes;
}

// On a device backend the host arenas (offloaded checkpoints, FPDT's store, ZeRO-Offload) are
// pinned host memory: refused before anything is allocated when they exceed
// --host_memory_budget (auto: what this machine has available now). On a host-addressable
// backend offloaded checkpoints go to a file and everything else is the plan's own memory.
void check_host_memory(const MemoryPlan& plan, const Backend& be, const std::string& flag) {
  size_t budget = 0;
  if (flag != "auto") budget = parse_bytes(flag, "--host_memory_budget");
  if (be.host_addressable()) return;
  const size_t pinned = planned_bytes(plan, be, true);
  const bool automatic = flag == "auto";
  if (automatic) budget = available_host_memory();
  if (pinned == 0 || budget == 0 || pinned <= budget) return;
  fail(
      "the plan pins {} of host memory for offloaded buffers (checkpoint offload, FPDT's store, "
      "ZeRO-Offload), more than {} ({}); shorten --model_max_length, turn off "
      "--offload_activations (longtune plan --device cuda shows both), or set "
      "--host_memory_budget",
      format_bytes(pinned), format_bytes(budget),
      automatic ? "available on this machine now" : "--host_memory_budget");
}

// The plan's device memory against what the GPU has free, before anything is allocated (a run
// that does not fit would fail at its first allocation the plan did not leave room for).
void check_device_memory(const MemoryPlan& plan, const Backend& be) {
  const Backend::DeviceMemoryInfo m = be.device_memory_info();
  const size_t need = planned_bytes(plan, be, false);
  if (m.total == 0 || need <= m.free) return;
  fail(
      "the plan needs {} of {} memory, {} of {} is free; turn on --gradient_checkpointing True "
      "or --offload_activations True, set --mini_sequence auto, shorten --model_max_length or "
      "--per_device_train_batch_size (longtune plan --device cuda --memory_budget {} shows what "
      "fits this GPU)",
      format_bytes(need), be.name(), format_bytes(m.free), format_bytes(m.total), m.total);
}

// A checkpoint's tensors in the one-process layout, as host buffers a ParallelEngine gathers
// into (save) or loads from (resume): the parameter block (full fine-tune) or the adapter (LoRA),
// and the optimizer moments. `t` views the buffers.
struct EngineCheckpoint {
  EngineCheckpoint(const ModelConfig& c, const LoraSpec& lora, int64_t moments_size)
      : whole(c), params(lora.enabled ? 0 : whole.total_numel()), moments(2 * moments_size) {
    t.table = &whole;
    t.params = params.data();
    if (lora.enabled) t.lora = &lora, t.adapter = &adapter;
    t.moments = moments.data();
    t.moments_size = moments_size;
  }
  EngineCheckpoint(const EngineCheckpoint&) = delete;
  EngineCheckpoint& operator=(const EngineCheckpoint&) = delete;
  const ParamTable whole;
  std::vector<float> params, moments;
  NamedTensors adapter;
  CheckpointTensors t;
};

double unix_now() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

Strategy parse_strategy(const std::string& flag, const std::string& v) {
  if (v == "no") return Strategy::kNo;
  if (v == "steps") return Strategy::kSteps;
  if (v == "epoch") return Strategy::kEpoch;
  fail("{}: '{}' is not allowed; use no, steps or epoch", flag, v);
}

DType parse_save_dtype(const std::string& s, DType loaded) {
  return s.empty() ? loaded : parse_float_dtype(s, "--save_dtype");
}

void settings_from_options(const TrainOptions& o, const ModelConfig& c, int64_t max_tokens,
                           RunSettings* s) {
  s->max_tokens = max_tokens;
  s->checkpointing = o.gradient_checkpointing || o.offload_activations;
  s->offload_checkpoints = o.offload_activations;
  s->keep_attention = parse_recompute_granularity(o.recompute_granularity);
  if (s->keep_attention && !s->checkpointing)
    fail(
        "--recompute_granularity selective chooses what --gradient_checkpointing recomputes; "
        "turn on --gradient_checkpointing True (or --offload_activations True)");
  s->offload_dir = o.output_dir.parent_path().empty() ? "." : o.output_dir.parent_path().string();
  s->flash_attention = o.use_flash_attn;
  s->bf16_residual = o.bf16;
  if (const auto m = parse_mini_sequence(o.mini_sequence))
    s->mlp_chunks = s->lm_head_chunks = *m;
  else
    mini_sequence_auto(c, max_tokens, s);
  s->mlp_chunks = std::min(s->mlp_chunks, max_tokens);
  s->lm_head_chunks = std::min(s->lm_head_chunks, max_tokens);
}

// report_to: a comma list of tensorboard, mlflow, none, all.
std::vector<std::string> parse_report_to(const std::string& v) {
  std::vector<std::string> out;
  std::stringstream ss(v);
  for (std::string item; std::getline(ss, item, ',');) {
    item.erase(0, item.find_first_not_of(' '));
    item.erase(item.find_last_not_of(' ') + 1);
    if (item == "none" || item.empty()) continue;
    if (item == "all") return {"tensorboard", "mlflow"};
    if (item != "tensorboard" && item != "mlflow")
      fail("--report_to: '{}' is not allowed; use a comma list of tensorboard, mlflow, none, all",
           item);
    out.push_back(item);
  }
  return out;
}

std::string default_logging_dir(const fs::path& output_dir) {
  // transformers' default logging_dir: runs/<%b%d_%H-%M-%S>_<hostname>.
  char host[256] = {}, when[64] = {};
  gethostname(host, sizeof host - 1);
  const std::time_t t = std::time(nullptr);
  std::strftime(when, sizeof when, "%b%d_%H-%M-%S", std::localtime(&t));
  return (output_dir / "runs" / fmt::format("{}_{}", when, host)).string();
}

}  // namespace

Trainer::Trainer(const TrainOptions& options) : o_(options) {
  t_start_ = std::chrono::steady_clock::now();
  init_dist();
  validate();
  load_data();
  setup_model();
  if (!o_.resume_from_checkpoint.empty()) resume();
  // No rank writes into output_dir before every rank has checked that it may.
  if (world_size_ > 1) world_->barrier();
}

// 0. The world of ranks: MPI when started by mpirun / srun, else one process. Rank 0 prints
// unless --log_all_ranks.
void Trainer::init_dist() {
  world_ = init_world(WorldOptions{o_.dist.dist_timeout});
  world_size_ = world_->size();
  rank_ = world_->rank();
  if (rank_ != 0 && !o_.dist.log_all_ranks) std::freopen("/dev/null", "w", stdout);
  layout_ = ParallelLayout::make(world_size_, rank_, o_.dist.sequence_parallel_size,
                                 o_.dist.pipeline_parallel_size);
  apply_fsdp(&o_);
}

Trainer::~Trainer() = default;

// 1. Every flag and input checked before anything is written.
void Trainer::validate() {
  const TrainOptions& o = o_;
  if (o.model_name_or_path.empty()) fail("--model_name_or_path is required");
  if (o.data_path.empty()) fail("--data_path is required");
  if (o.output_dir.empty()) fail("--output_dir is required");
  auto at_least = [](const char* flag, int64_t v, int64_t lo) {
    if (v < lo) fail("{} must be >= {} (got {})", flag, lo, v);
  };
  at_least("--per_device_train_batch_size", o.per_device_train_batch_size, 1);
  at_least("--per_device_eval_batch_size", o.per_device_eval_batch_size, 1);
  at_least("--gradient_accumulation_steps", o.gradient_accumulation_steps, 1);
  at_least("--logging_steps", o.logging_steps, 1);
  at_least("--save_total_limit", o.save_total_limit, 0);
  at_least("--eval_steps", o.eval_steps, 0);
  at_least("--warmup_steps", o.warmup_steps, 0);
  if (o.max_steps == 0 || o.max_steps < -1)
    fail("--max_steps must be >= 1, or -1 to use --num_train_epochs (got {})", o.max_steps);
  if (!(o.num_train_epochs > 0) && o.max_steps < 0)
    fail("--num_train_epochs must be > 0 (got {})", o.num_train_epochs);
  if (!(o.optimizer.learning_rate >= 0))
    fail("--learning_rate must be >= 0 (got {})", o.optimizer.learning_rate);
  if (!(o.optimizer.weight_decay >= 0))
    fail("--weight_decay must be >= 0 (got {})", o.optimizer.weight_decay);
  if (!(o.warmup_ratio >= 0 && o.warmup_ratio <= 1))
    fail("--warmup_ratio must be in [0, 1] (got {})", o.warmup_ratio);
  if (o.model_max_length < 0) fail("--model_max_length must be >= 1 (got {})", o.model_max_length);
  save_strategy_ = parse_strategy("--save_strategy", o.save_strategy);
  eval_strategy_ = parse_strategy("--evaluation_strategy", o.evaluation_strategy);
  if (save_strategy_ == Strategy::kSteps) at_least("--save_steps", o.save_steps, 1);
  if (eval_strategy_ != Strategy::kNo && o.eval_data_path.empty())
    fail("--evaluation_strategy {} needs --eval_data_path", o.evaluation_strategy);
  if (o_.eval_steps == 0) o_.eval_steps = o.logging_steps;
  parse_schedule(o.lr_scheduler_type);
  max_shard_bytes_ = parse_max_shard_size(o.max_shard_size);
  for (const auto& r : parse_report_to(o.report_to)) {
    const char* uri = std::getenv("MLFLOW_TRACKING_URI");
    if (r == "mlflow" && (!uri || !*uri))
      fail(
          "--report_to mlflow needs MLFLOW_TRACKING_URI=http://host:port of an MLflow tracking "
          "server");
  }
  if (o.resume_from_checkpoint.empty() && fs::is_directory(o.output_dir) &&
      !fs::is_empty(o.output_dir) && !o.overwrite_output_dir)
    fail(
        "--output_dir '{}' exists already and is not empty; pass --overwrite_output_dir True to "
        "reuse it, or --resume_from_checkpoint latest to continue its training",
        o.output_dir.string());
  model_dir_ = o.model_name_or_path;
  if (!fs::is_directory(model_dir_))
    fail("--model_name_or_path '{}' is not a folder", model_dir_.string());
  config_ = load_model_config(model_dir_ / "config.json");
  if (o.model_max_length > 0 && apply_position_interpolation(&config_, o.model_max_length))
    fmt::print(
        "context extension: model_max_length {} > max_position_embeddings {}: linear "
        "position interpolation with factor {} (saved in config.json)\n",
        o.model_max_length, config_.max_position_embeddings, config_.rope_scaling.factor);
  lora_ = resolve_lora(o.lora, o.seed);
  if (!o.lora.adapter_name_or_path.empty())  // continue an adapter: its r, alpha, targets
    lora_ = read_adapter_config(o.lora.adapter_name_or_path, config_, lora_);
  // ---- dist: DeepSpeed config (HF "auto" rules) and the ZeRO settings of this run ----
  if (!o_.dist.deepspeed.empty())
    for (const auto& note :
         apply_deepspeed_config_file(o_.dist.deepspeed, replicas(), config_.hidden_size, &o_))
      fmt::print("{}\n", note);
  // --bf16 True with LoRA: the frozen base projections in bf16, as PEFT over a bf16 model.
  lora_.base_bf16 = o_.bf16 && lora_.enabled && !lora_.quantize_4bit;
  lora_.embed_bf16 = o_.bf16 && lora_.enabled;  // as a model loaded in bf16: frozen embed/head
  distributed_ = world_size_ > 1 || o_.dist.zero_stage > 0 || o_.dist.fpdt_chunk_size > 0;
  if (distributed_) {
    const ZeroSettings z = zero_settings(o_.dist);
    fmt::print("distributed: {} ({}), ZeRO stage {}{}{}{}\n", layout_.describe(), world_->backend(),
               z.stage, z.offload_optimizer ? ", optimizer offload" : "",
               z.offload_params ? ", parameter offload" : "",
               o_.dist.fpdt_chunk_size > 0
                   ? fmt::format(", FPDT chunks of {} tokens", o_.dist.fpdt_chunk_size)
                   : "");
    if (lora_.enabled && z.stage >= 1 && z.stage <= 2)
      fmt::print(
          "note: --use_peft_lora with ZeRO stage {}: the adapter and its optimizer state are "
          "small and stay replicated on every rank (gradients are all-reduced)\n",
          z.stage);
  }
}

// 2. Data and the step count.
void Trainer::load_data() {
  const fs::path tok_path = o_.tokenizer.empty() ? model_dir_ : o_.tokenizer;
  if (!o_.tokenizer.empty() || fs::exists(model_dir_ / "tokenizer.json"))
    tokenizer_ = Tokenizer::load(tok_path);
  DatasetOptions dopt;
  dopt.format = parse_dataset_format(o_.dataset_format);
  dopt.model_max_length =
      o_.model_max_length > 0 ? o_.model_max_length : config_.max_position_embeddings;
  dopt.train_on_inputs = o_.train_on_inputs;
  dopt.packing = o_.packing;
  dopt.chat_template = o_.chat_template;
  dopt.max_rows = o_.max_train_samples;
  // Tokenized once per (data, tokenizer, settings): `longtune prepare` or an earlier run wrote
  // the cache this reuses (data/token_cache.h).
  const fs::path used_tok_path = tokenizer_ ? tok_path : fs::path();
  const fs::path cache_dir = o_.cache_dir.empty() ? default_cache_dir() : o_.cache_dir;
  auto load = [&](const fs::path& path) {
    CachedLoad c = load_dataset_cached(path, tokenizer_.get(), used_tok_path, dopt,
                                       config_.vocab_size, cache_dir, CacheWrite::kBestEffort);
    if (!c.note.empty()) fmt::print("note: {}\n", c.note);
    fmt::print("data: {}\n", c.summary());
    return std::move(c.dataset);
  };
  train_data_ = load(o_.data_path);
  if (train_data_.rows.empty()) fail("--data_path '{}' has no usable rows", o_.data_path.string());
  fmt::print("data: {} rows from {} ({} truncated to {} tokens, {} skipped)\n",
             train_data_.rows.size(), o_.data_path.string(), train_data_.stats.rows_truncated,
             dopt.model_max_length, train_data_.stats.rows_skipped);
  if (!o_.eval_data_path.empty()) {
    dopt.packing = false;
    dopt.max_rows = 0;
    eval_data_ = load(o_.eval_data_path);
    if (eval_data_.rows.empty())
      fail("--eval_data_path '{}' has no usable rows", o_.eval_data_path.string());
    has_eval_ = true;
    fmt::print("eval data: {} rows from {}\n", eval_data_.rows.size(), o_.eval_data_path.string());
    if (eval_strategy_ == Strategy::kNo)
      fmt::print(
          "note: --eval_data_path is given but --evaluation_strategy is no; evaluating at "
          "the end only\n");
  }
  const int64_t B = o_.per_device_train_batch_size, G = o_.gradient_accumulation_steps;
  const int64_t rows = static_cast<int64_t>(train_data_.rows.size());
  const int64_t global_b = B * replicas();  // rows of one micro-batch over all replicas
  const int64_t micro_per_epoch = (rows + global_b - 1) / global_b;
  steps_per_epoch_ = std::max<int64_t>(1, (micro_per_epoch + G - 1) / G);
  total_steps_ = o_.max_steps > 0
                     ? o_.max_steps
                     : static_cast<int64_t>(std::ceil(o_.num_train_epochs * steps_per_epoch_));
  if (total_steps_ < 1) fail("nothing to train: --max_steps and --num_train_epochs give 0 steps");
  schedule_ = {parse_schedule(o_.lr_scheduler_type),
               warmup_steps_for(o_.warmup_steps, o_.warmup_ratio, total_steps_), total_steps_};
  position_.shuffle_seed = o_.seed;
  position_.num_rows = rows;
}

// 3. Memory plan, allocation (once), weights.
void Trainer::setup_model() {
  CheckpointReader reader(model_dir_);
  save_dtype_ = parse_save_dtype(o_.save_dtype, reader.stored_dtype());
  RunSettings rs;
  int64_t max_tokens = max_micro_batch_tokens(train_data_.rows, o_.per_device_train_batch_size);
  if (has_eval_)
    max_tokens = std::max(max_tokens,
                          max_micro_batch_tokens(eval_data_.rows, o_.per_device_eval_batch_size));
  rs.lora = lora_;
  ParallelSettings ps;
  ps.zero = zero_settings(o_.dist);
  ps.optimizer = o_.optimizer;
  ps.fpdt_chunk = o_.dist.fpdt_chunk_size;
  ps.micro_per_step = o_.gradient_accumulation_steps;
  ps.max_tokens = max_tokens;
  ps.timeout_seconds = o_.dist.dist_timeout;
  // Mini-sequence chunks for the tokens this rank runs (its share of a sequence).
  settings_from_options(
      o_, config_, distributed_ ? ParallelEngine::local_max_tokens(layout_, ps) : max_tokens, &rs);
  if (distributed_) ParallelEngine::adjust_run_settings(config_, layout_, ps, &rs);
  LlamaModel::plan(config_, rs, &plan_);
  if (distributed_)
    ParallelEngine::plan(config_, rs, layout_, ps, &plan_);
  else
    AdamW::plan(LlamaModel::trainable_numel(config_, rs), &plan_);
  const ParamTable table(config_);
  fmt::print("model: {} ({} layers, hidden {}, vocab {}), {:.2f}M parameters\n",
             config_.architecture, config_.num_hidden_layers, config_.hidden_size,
             config_.vocab_size, static_cast<double>(table.total_numel()) / 1e6);
  fmt::print(
      "settings: micro-batch up to {} tokens, mini-sequence MLP {} / LM head {} chunks, "
      "checkpointing {}, offload {}, flash attention {}{}\n",
      rs.max_tokens, rs.mlp_chunks, rs.lm_head_chunks,
      !rs.checkpointing   ? "off"
      : rs.keep_attention ? "on (selective: attention outputs kept)"
                          : "on",
      rs.offload_checkpoints ? "on" : "off", rs.flash_attention ? "on" : "off",
      !rs.bf16_residual  ? ""
      : rs.checkpointing ? ", residual stream and checkpoints in bf16"
                         : ", residual stream in bf16");
  if (lora_.enabled)
    fmt::print("LoRA: r {}, alpha {}, scale {:.4g}, dropout {}, {} adapter parameters{}{}{}\n",
               lora_.r, lora_.alpha, lora_.scale(), lora_.dropout,
               LoraTable(config_, lora_).total_numel(),
               lora_.quantize_4bit ? ", base projections in NF4"
               : lora_.base_bf16   ? ", base projections in bf16"
                                   : "",
               lora_.embed_bf16 ? ", frozen embedding and LM head in bf16" : "",
               lora_.train_embed || lora_.train_norm ? ", plus embed/norm tensors" : "");
  backend_ = make_backend(o_.device, o_.bf16);
  backend_->set_deterministic(o_.full_determinism);
  // The backend's own temporaries, planned for this run's largest ops (none on the CPU).
  const BackendWorkspace ws = backend_->workspace_needs(workspace_shape(config_, rs));
  plan_workspace(ws, &plan_);
  fmt::print("{}\n", plan_.describe());
  check_host_memory(plan_, *backend_, o_.host_memory_budget);
  check_device_memory(plan_, *backend_);
  fmt::print("device: {}{}{}\n", backend_->name(),
             o_.bf16 && backend_->name() == "cuda" ? " (bf16 GEMMs, f32 accumulation)" : "",
             o_.full_determinism ? ", deterministic kernels" : "");
  workspace_ = bind_workspace_arena(*backend_, ws);
  model_ = std::make_unique<LlamaModel>(config_, *backend_, rs);
  if (distributed_) {  // every rank reads the checkpoint and keeps its part
    engine_ = std::make_unique<ParallelEngine>(*model_, *backend_, *world_, layout_, ps);
    if (!backend_->host_addressable())
      fmt::print("device collectives: {}\n", engine_->device_collectives());
    if (!lora_.enabled) {
      const ParamTable whole(config_);
      std::vector<float> full(whole.total_numel());
      load_weights(reader, whole, full.data());
      engine_->load_params(full.data());
      return;
    }
    load_base_weights(reader, *model_);  // this stage's tensors (NF4 where quantized)
    engine_->load_trainable(initial_adapter(reader));
    return;
  }
  if (lora_.enabled) {
    load_base_weights(reader, *model_);
    if (!o_.lora.adapter_name_or_path.empty()) {
      load_adapter(o_.lora.adapter_name_or_path, *model_);
    } else {
      std::vector<float> init(model_->lora_table().total_numel());
      init_lora_weights(model_->lora_table(), o_.seed, init.data());
      backend_->copy_to_device(model_->lora_params(), init.data(), init.size() * 4);
    }
  } else {
    load_weights(reader, model_->table(), model_->params(), *backend_);
  }
  optimizer_ = std::make_unique<AdamW>(model_->trainable(), *backend_, o_.optimizer);
}

// The adapter a LoRA run starts from, whole-model and by trainable name: --adapter_name_or_path,
// or PEFT's initialisation (seeded, the same values as one process) with the base tensors that
// also train as the base model has them.
NamedTensors Trainer::initial_adapter(const CheckpointReader& reader) const {
  if (!o_.lora.adapter_name_or_path.empty())
    return read_adapter_tensors(o_.lora.adapter_name_or_path, config_, lora_);
  NamedTensors t;
  const LoraTable lora(config_, lora_);
  std::vector<float> init(lora.total_numel());
  init_lora_weights(lora, o_.seed, init.data());
  for (const auto& x : lora.tensors())
    t[x.name].assign(init.begin() + x.offset, init.begin() + x.offset + x.numel);
  const ParamTable whole(config_);
  for (const auto& p : whole.params())
    if (LlamaModel::base_trains(lora_, p.name)) {
      auto& v = t[p.name];
      v.resize(p.numel);
      reader.read_f32(p.name, p.shape, v.data());
    }
  return t;
}

// 4. Resume: weights, moments, schedule position, data position and log history.
void Trainer::resume() {
  const fs::path dir = resolve_checkpoint(o_.resume_from_checkpoint, o_.output_dir);
  CheckpointState st;
  if (engine_) {  // every rank reads the whole checkpoint and keeps its part
    EngineCheckpoint c(config_, lora_, engine_->moments_size());
    st = load_checkpoint(dir, config_, &c.t);
    if (lora_.enabled)
      engine_->load_trainable(c.adapter);
    else
      engine_->load_params(c.params.data());
    engine_->load_moments(c.moments.data(), c.t.optimizer_step);
  } else {
    st = load_checkpoint(dir, config_, *model_, *optimizer_);
  }
  if (st.position.num_rows != position_.num_rows)
    fail(
        "--resume_from_checkpoint '{}' was trained on {} rows but --data_path has {}; the data "
        "position would not match",
        dir.string(), st.position.num_rows, position_.num_rows);
  if (st.step >= total_steps_)
    fail(
        "--resume_from_checkpoint '{}' is at step {}, and this run has {} steps in all; raise "
        "--max_steps or --num_train_epochs to train further",
        dir.string(), st.step, total_steps_);
  if (st.position.shuffle_seed != o_.seed)
    fmt::print(
        "note: continuing with the checkpoint's shuffle seed {} (--seed {} applies to new "
        "runs)\n",
        st.position.shuffle_seed, o_.seed);
  if (st.schedule.type != schedule_.type || st.schedule.warmup_steps != schedule_.warmup_steps)
    fmt::print(
        "note: the checkpoint was trained with --lr_scheduler_type {} (warmup {}); this run "
        "continues with {} (warmup {}) as its flags say\n",
        schedule_name(st.schedule.type), st.schedule.warmup_steps, schedule_name(schedule_.type),
        schedule_.warmup_steps);
  const int64_t global_batch = o_.per_device_train_batch_size * replicas();
  if (st.trainer_state.train_batch_size != global_batch)
    fmt::print(
        "note: the checkpoint was trained with {} rows per micro-batch over all ranks and this "
        "run has {} (per-device batch x ranks); its data position counts micro-batches, so the "
        "rows seen will not line up exactly\n",
        st.trainer_state.train_batch_size, global_batch);
  step_ = first_step_ = st.step;
  position_ = st.position;
  state_ = st.trainer_state;
  last_checkpoint_ = dir;
  last_saved_step_ = st.step;
  fmt::print("resumed from {}: step {}, epoch {}, micro-batch {} of that epoch\n", dir.string(),
             st.step, position_.epoch, position_.micro_batch_index);
}

void Trainer::open_sinks() {
  // Under an MPI launcher stdout is often a pseudo-terminal whose output is forwarded line by
  // line: plain log lines there, never the redrawn bar.
  const bool lines = o_.disable_tqdm || launched_by_mpi();
  progress_ = std::make_unique<Progress>(lines ? Progress::Mode::kLines : Progress::detect_mode(),
                                         first_step_, total_steps_);
  if (rank_ != 0) return;  // ---- dist: files and trackers belong to rank 0 ----
  fs::create_directories(o_.output_dir);
  metrics_ = std::make_unique<MetricsJsonl>(o_.output_dir / "metrics.jsonl",
                                            first_step_ > 0 ? first_step_ : -1);
  for (const auto& r : parse_report_to(o_.report_to)) {
    if (r == "tensorboard") {
      const fs::path dir =
          o_.logging_dir.empty() ? fs::path(default_logging_dir(o_.output_dir)) : o_.logging_dir;
      auto tb = std::make_unique<TensorBoardWriter>(dir);
      fmt::print("tensorboard: {}\n", tb->path().string());
      sinks_.push_back(std::move(tb));
    } else if (r == "mlflow") {
      const char* uri = std::getenv("MLFLOW_TRACKING_URI");
      if (!uri || !*uri)
        fail(
            "--report_to mlflow needs MLFLOW_TRACKING_URI=http://host:port of an MLflow "
            "tracking server");
      std::map<std::string, std::string> params = o_.flag_values;
      if (params.empty()) params["output_dir"] = o_.output_dir.string();
      const std::string name =
          o_.run_name.empty() ? o_.output_dir.filename().string() : o_.run_name;
      auto ml = std::make_unique<MlflowSink>(uri, name, params);
      fmt::print("mlflow: run {} at {}\n", ml->run_id(), uri);
      sinks_.push_back(std::move(ml));
    }
  }
  state_.max_steps = total_steps_;
  state_.logging_steps = o_.logging_steps;
  state_.eval_steps = o_.eval_steps;
  state_.save_steps = o_.save_steps;
  state_.train_batch_size = o_.per_device_train_batch_size * replicas();
  state_.num_train_epochs =
      static_cast<int64_t>(std::ceil(static_cast<double>(total_steps_) / steps_per_epoch_));
}

double Trainer::epoch_float() const {
  const int64_t G = o_.gradient_accumulation_steps;
  const int64_t steps_in = (position_.micro_batch_index + G - 1) / G;
  return position_.epoch + static_cast<double>(steps_in) / static_cast<double>(steps_per_epoch_);
}

std::vector<MicroBatch> Trainer::next_step_batches() {
  if (epoch_batches_.empty())
    epoch_batches_ =
        epoch_micro_batches(position_.num_rows, o_.per_device_train_batch_size * replicas(),
                            position_.shuffle_seed, position_.epoch);
  std::vector<MicroBatch> micro;
  const size_t end =
      std::min(epoch_batches_.size(),
               static_cast<size_t>(position_.micro_batch_index + o_.gradient_accumulation_steps));
  for (size_t j = position_.micro_batch_index; j < end; ++j) {
    // This replica's share: d, d + replicas, ... (all of it for one replica).
    std::vector<const Example*> rows;
    for (size_t k = size_t(layout_.replica()); k < epoch_batches_[j].size(); k += replicas())
      rows.push_back(&train_data_.rows[epoch_batches_[j][k]]);
    rows_seen_ += static_cast<int64_t>(epoch_batches_[j].size());
    micro.push_back(make_micro_batch(rows));
  }
  position_.micro_batch_index = static_cast<int64_t>(end);
  epoch_ended_ = end >= epoch_batches_.size();
  if (epoch_ended_) {
    ++position_.epoch;
    position_.micro_batch_index = 0;
    epoch_batches_.clear();
  }
  return micro;
}

void Trainer::emit(const LogRecord& r) {
  progress_->log(r);
  if (rank_ != 0) return;
  metrics_->log(r);
  TrainerStateSink(&state_).log(r);  // HF logs the final metrics into log_history too
  for (auto& s : sinks_) s->log(r);
}

void Trainer::log_train_window(double wall_time) {
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t_window_).count();
  LogRecord r;
  r.kind = LogRecord::Kind::kTrain;
  r.step = step_;
  r.epoch = epoch_float();
  r.wall_time = wall_time;
  r.hf = {{"loss", window_loss_ / window_steps_},
          {"grad_norm", last_.grad_norm},
          {"learning_rate", last_.learning_rate}};
  r.extra = {{"tokens_per_second", secs > 0 ? window_tokens_ / secs : 0.0},
             {"memory_bytes", measured_peak(*backend_)}};
  emit(r);
  window_loss_ = 0;
  window_steps_ = window_tokens_ = 0;
  t_window_ = std::chrono::steady_clock::now();
}

EvalResult Trainer::evaluate_distributed() {
  // Micro-batches of per_device_eval_batch_size x replicas rows in dataset order, split over
  // the replicas as training splits them; every rank runs the same number of passes.
  const auto t0 = std::chrono::steady_clock::now();
  const auto batches =
      epoch_micro_batches(int64_t(eval_data_.rows.size()),
                          o_.per_device_eval_batch_size * replicas(), 0, 0, /*shuffle=*/false);
  std::vector<MicroBatch> micro;
  EvalResult e;
  for (const auto& b : batches) {
    std::vector<const Example*> rows;
    for (size_t k = size_t(layout_.replica()); k < b.size(); k += replicas())
      rows.push_back(&eval_data_.rows[b[k]]);
    for (int64_t i : b) e.num_tokens += int64_t(eval_data_.rows[i].input_ids.size());
    micro.push_back(make_micro_batch(rows));
  }
  const auto [loss_sum, targets] = engine_->eval_loss(micro);
  e.num_targets = targets;
  e.num_rows = int64_t(eval_data_.rows.size());
  e.loss = targets > 0 ? loss_sum / double(targets) : 0.0;
  e.perplexity = std::exp(e.loss);
  e.runtime_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return e;
}

void Trainer::evaluate() {
  const EvalResult e = engine_
                           ? evaluate_distributed()
                           : evaluate_loss(*model_, eval_data_.rows, o_.per_device_eval_batch_size);
  LogRecord r;
  r.kind = LogRecord::Kind::kEval;
  r.step = step_;
  r.epoch = epoch_float();
  r.wall_time = unix_now();
  const double steps = std::ceil(static_cast<double>(e.num_rows) / o_.per_device_eval_batch_size);
  r.hf = {{"eval_loss", e.loss},
          {"eval_runtime", std::round(e.runtime_s * 1e4) / 1e4},
          {"eval_samples_per_second",
           e.runtime_s > 0 ? std::round(e.num_rows / e.runtime_s * 1e3) / 1e3 : 0.0},
          {"eval_steps_per_second",
           e.runtime_s > 0 ? std::round(steps / e.runtime_s * 1e3) / 1e3 : 0.0}};
  r.extra = {{"eval_perplexity", e.perplexity}, {"eval_tokens", e.num_targets}};
  emit(r);
  t_window_ = std::chrono::steady_clock::now();  // eval time is not training throughput
}

nlohmann::json Trainer::training_args() const {
  nlohmann::json j = nlohmann::json::object();
  for (const auto& [k, v] : o_.flag_values) j[k] = v;
  j["output_dir"] = o_.output_dir.string();
  j["model_name_or_path"] = o_.model_name_or_path.string();
  j["data_path"] = o_.data_path.string();
  return j;
}

void Trainer::save() {
  state_.global_step = step_;
  state_.epoch = epoch_float();
  CheckpointState st{step_, state_, position_, schedule_};
  std::string msg;
  if (engine_) {  // gathered by collectives, written by rank 0
    EngineCheckpoint c(config_, lora_, engine_->moments_size());
    if (lora_.enabled)
      c.adapter = engine_->gather_trainable();
    else
      engine_->gather_params(c.params.data());
    c.t.optimizer_step = engine_->gather_moments(c.moments.data());
    last_checkpoint_ = o_.output_dir / fmt::format("checkpoint-{}", step_);
    on_main_rank(
        [&] {
          save_checkpoint(o_.output_dir, st, config_, c.t, training_args(), model_dir_);
          msg = fmt::format("saved {}", last_checkpoint_.string());
          for (const auto& p : rotate_checkpoints(o_.output_dir, o_.save_total_limit))
            msg += fmt::format(" (deleted {}: --save_total_limit {})", p.filename().string(),
                               o_.save_total_limit);
        },
        fmt::format("saving checkpoint-{}", step_));
  } else {
    last_checkpoint_ = save_checkpoint(o_.output_dir, st, config_, *model_, *optimizer_,
                                       training_args(), model_dir_);
    msg = fmt::format("saved {}", last_checkpoint_.string());
    for (const auto& p : rotate_checkpoints(o_.output_dir, o_.save_total_limit))
      msg += fmt::format(" (deleted {}: --save_total_limit {})", p.filename().string(),
                         o_.save_total_limit);
  }
  last_saved_step_ = step_;
  if (!msg.empty()) progress_->note(msg);  // empty on ranks other than 0
}

void Trainer::on_main_rank(const std::function<void()>& write, const std::string& what) {
  if (world_size_ == 1) return write();
  // A failure on rank 0 (a full disk) must not leave the other ranks waiting in the next
  // collective: rank 0 broadcasts the outcome and every rank stops with an error.
  int ok = 1;
  std::exception_ptr error;
  if (rank_ == 0) {
    try {
      write();
    } catch (...) {
      error = std::current_exception();
      ok = 0;
    }
  }
  world_->broadcast(&ok, sizeof ok, 0);
  if (error) std::rethrow_exception(error);
  if (!ok) fail("{} failed on rank 0 (see its log)", what);
}

void Trainer::finish(const std::string& status) {
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start_).count();
  const int64_t steps = step_ - first_step_;
  LogRecord r;
  r.kind = LogRecord::Kind::kFinal;
  r.step = step_;
  r.epoch = epoch_float();
  r.wall_time = unix_now();
  r.hf = {{"train_runtime", std::round(secs * 1e4) / 1e4},
          {"train_samples_per_second", secs > 0 ? std::round(rows_seen_ / secs * 1e3) / 1e3 : 0.0},
          {"train_steps_per_second", secs > 0 ? std::round(steps / secs * 1e3) / 1e3 : 0.0},
          {"total_flos", 0.0},
          {"train_loss", steps > 0 ? total_loss_ / steps : 0.0}};
  emit(r);
  state_.global_step = step_;
  state_.epoch = epoch_float();
  if (rank_ == 0) {
    state_.save(o_.output_dir / "trainer_state.json");
    write_file_atomic(o_.output_dir / "training_plot.svg",
                      plot_training_svg(metrics_->history(),
                                        fmt::format("longtune train: {}", o_.output_dir.string())));
  }
  for (auto& s : sinks_) s->close(status);
  progress_->close(status);
}

void Trainer::report_op_profile(std::chrono::steady_clock::time_point start) {
  const std::vector<OpTime> ops = backend_->take_op_profile();  // waits for the step's work
  backend_->set_op_profiling(false);
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  if (rank_ != 0) return;
  std::string table = format_op_profile(ops, ms);
  if (!table.empty() && table.back() == '\n') table.pop_back();
  progress_->note(fmt::format("op profile of step {} on {}{}: {:.1f} ms\n{}", step_,
                              backend_->name(), world_size_ > 1 ? " (rank 0)" : "", ms, table));
}

TrainOutcome Trainer::train() {
  open_sinks();
  fmt::print(
      "training: {} steps ({} per epoch), batch {} x accumulation {}, lr {} ({}, warmup "
      "{}){}\n",
      total_steps_, steps_per_epoch_, o_.per_device_train_batch_size,
      o_.gradient_accumulation_steps, o_.optimizer.learning_rate, schedule_name(schedule_.type),
      schedule_.warmup_steps, first_step_ > 0 ? fmt::format(", from step {}", first_step_) : "");
  std::fflush(stdout);
  StopSignalGuard stop_guard;
  t_window_ = std::chrono::steady_clock::now();
  TrainOutcome out;
  try {
    while (step_ < total_steps_) {
      const std::vector<MicroBatch> micro = next_step_batches();
      const bool profiled = o_.profile_step == step_ + 1;
      const auto t_step = std::chrono::steady_clock::now();
      backend_->set_op_profiling(profiled);
      if (engine_) {
        const CommStats before = engine_->stats();
        last_ = engine_->train_step(micro, schedule_, step_);
        const CommStats after = engine_->stats();
        step_comm_.allreduce_bytes += after.allreduce_bytes - before.allreduce_bytes;
        step_comm_.reduce_scatter_bytes += after.reduce_scatter_bytes - before.reduce_scatter_bytes;
        step_comm_.allgather_bytes += after.allgather_bytes - before.allgather_bytes;
        step_comm_.alltoall_bytes += after.alltoall_bytes - before.alltoall_bytes;
        step_comm_.p2p_bytes += after.p2p_bytes - before.p2p_bytes;
        step_comm_.calls += after.calls - before.calls;
      } else {
        last_ = train_step(*model_, *optimizer_, o_.optimizer, schedule_, micro, step_);
      }
      ++step_;
      if (profiled) report_op_profile(t_step);
      window_loss_ += last_.loss;
      total_loss_ += last_.loss;
      ++window_steps_;
      window_tokens_ += last_.tokens;
      state_.num_input_tokens_seen += last_.tokens;
      const double secs =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t_window_).count();
      progress_->update({step_, total_steps_, epoch_float(), last_.loss, last_.learning_rate,
                         last_.grad_norm, secs > 0 ? window_tokens_ / secs : 0.0,
                         measured_peak(*backend_)});
      const bool last_step = step_ == total_steps_;
      if (step_ % o_.logging_steps == 0 || last_step) log_train_window(unix_now());
      if (has_eval_ && ((eval_strategy_ == Strategy::kSteps && step_ % o_.eval_steps == 0) ||
                        (eval_strategy_ == Strategy::kEpoch && epoch_ended_) ||
                        (eval_strategy_ == Strategy::kNo && last_step)))
        evaluate();
      // HF: save every save_steps, at the end of each epoch, and at the last step.
      if ((save_strategy_ == Strategy::kSteps && (step_ % o_.save_steps == 0 || last_step)) ||
          (save_strategy_ == Strategy::kEpoch && (epoch_ended_ || last_step)))
        save();
      int sig = StopSignalGuard::requested();
      if (world_size_ > 1) {  // every rank stops after the same step (mpirun forwards signals)
        int64_t any = sig != 0;
        world_->allreduce_sum(&any, 1);
        if (any && !sig) sig = SIGTERM;
      }
      if (sig && !last_step) {
        if (last_saved_step_ != step_) save();
        progress_->note(fmt::format(
            "stopped by {} after step {}/{}; checkpoint {} is complete. To continue, run the "
            "same command with --resume_from_checkpoint {} (or latest)",
            sig == SIGINT ? "SIGINT" : "SIGTERM", step_, total_steps_, last_checkpoint_.string(),
            last_checkpoint_.string()));
        out.stopped_by_signal = true;
        break;
      }
    }
  } catch (...) {
    for (auto& s : sinks_) s->close("FAILED");
    progress_->close("FAILED");
    throw;
  }
  if (out.stopped_by_signal) {
    finish("KILLED");
  } else {
    finish("FINISHED");
    if (engine_ && lora_.enabled) {  // the adapter, gathered from the stages, by rank 0
      const NamedTensors adapter = engine_->gather_trainable();
      on_main_rank(
          [&] {
            save_adapter_tensors(o_.output_dir, config_, lora_, adapter,
                                 o_.model_name_or_path.string());
          },
          "saving the adapter");
    } else if (engine_) {  // sharded runs are gathered and saved as one model by rank 0
      const ParamTable whole(config_);
      std::vector<float> full(whole.total_numel());
      engine_->gather_params(full.data());
      on_main_rank(
          [&] {
            save_model(o_.output_dir, config_, whole, full.data(), save_dtype_, model_dir_,
                       max_shard_bytes_);
          },
          "saving the model");
    } else if (lora_.enabled) {  // the adapter only, in PEFT's format (longtune merge: full model)
      save_adapter(o_.output_dir, *model_, o_.model_name_or_path.string());
    } else {
      const std::vector<float> params =
          backend_->download(model_->params(), size_t(model_->table().total_numel()));
      save_model(o_.output_dir, config_, model_->table(), params.data(), save_dtype_, model_dir_,
                 max_shard_bytes_);
    }
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start_).count();
    fmt::print("saved {} ({}) in {:.1f} s; planned {}, measured peak RSS {}\n",
               o_.output_dir.string(), dtype_name(save_dtype_), secs,
               format_bytes(plan_.total_bytes()), format_bytes(measured_peak_rss()));
    if (!backend_->host_addressable())
      fmt::print("device memory on {}: planned {}, measured peak {} (every backend allocation)\n",
                 backend_->name(), format_bytes(planned_bytes(plan_, *backend_, false)),
                 format_bytes(backend_->device_memory_use().peak));
    if (engine_ && step_ > first_step_) {
      const double n = double(step_ - first_step_);
      fmt::print(
          "communication per step on rank {}: all-reduce {:.0f}, reduce-scatter {:.0f}, "
          "all-gather {:.0f}, all-to-all {:.0f}, point-to-point {:.0f} bytes ({:.0f} calls)\n",
          rank_, step_comm_.allreduce_bytes / n, step_comm_.reduce_scatter_bytes / n,
          step_comm_.allgather_bytes / n, step_comm_.alltoall_bytes / n, step_comm_.p2p_bytes / n,
          step_comm_.calls / n);
    }
  }
  out.step = step_;
  out.last_checkpoint = last_checkpoint_;
  return out;
}

}  // namespace lt
