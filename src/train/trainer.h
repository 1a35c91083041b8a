// The training loop with Hugging Face Trainer semantics: gradient accumulation normalised by
// the labelled tokens of the whole effective batch, global-norm clipping, AdamW, LR schedule.
#pragma once
#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "dist/dist_options.h"
#include "model/llama.h"
#include "model/lora.h"
#include "train/optimizer.h"
#include "train/schedule.h"

namespace lt {

struct ScheduleSettings {
  ScheduleType type = ScheduleType::kLinear;
  int64_t warmup_steps = 0;
  int64_t total_steps = 1;
};

struct StepResult {
  double loss = 0;       // sum of token CE / labelled tokens of the step (what HF logs)
  double grad_norm = 0;  // before clipping
  double learning_rate = 0;
  int64_t num_items = 0;  // labelled tokens of the step
  int64_t tokens = 0;     // all tokens of the step
};

// The two halves of a step: gradients of all micro-batches (zeroed first, then accumulated,
// each micro-batch scaled by 1 / labelled tokens of the whole step) ...
StepResult accumulate_step_gradients(LlamaModel& model, const std::vector<MicroBatch>& micro);
// ... then clipping and the AdamW update with the scheduled learning rate (fills grad_norm and
// learning_rate of r).
void apply_step_update(LlamaModel& model, AdamW& optimizer, const OptimizerSettings& opt,
                       const ScheduleSettings& schedule, int64_t step_index, StepResult* r);
// One optimizer step over the micro-batches of an effective batch (step_index is 0-based).
StepResult train_step(LlamaModel& model, AdamW& optimizer, const OptimizerSettings& opt,
                      const ScheduleSettings& schedule, const std::vector<MicroBatch>& micro,
                      int64_t step_index);

// Everything `longtune train` takes (HF TrainingArguments names).
struct TrainOptions {
  std::filesystem::path model_name_or_path, data_path, output_dir, tokenizer;
  int64_t max_steps = -1;
  double num_train_epochs = 3.0;
  int64_t per_device_train_batch_size = 8;
  int64_t gradient_accumulation_steps = 1;
  OptimizerSettings optimizer;  // learning_rate, weight_decay, adam_*, max_grad_norm
  int64_t warmup_steps = 0;
  double warmup_ratio = 0;
  std::string lr_scheduler_type = "linear";
  int64_t model_max_length = 0;  // 0 = the model's max_position_embeddings
  uint64_t seed = 42;
  int64_t logging_steps = 500;
  bool bf16 = false;
  bool overwrite_output_dir = false;
  std::string device = "auto";      // auto: cuda when built and a GPU is present, else cpu
  std::string mini_sequence = "1";  // M or "auto"
  bool gradient_checkpointing = false;
  // full: the backward recomputes each checkpointed layer whole; selective (Megatron-LM's
  // --recompute-granularity): attention outputs are kept, the recompute skips attention.
  std::string recompute_granularity = "full";
  bool offload_activations = false;
  // Host memory a GPU run may pin for offloaded buffers: bytes, or auto (what this machine has
  // available when the run starts).
  std::string host_memory_budget = "auto";
  bool use_flash_attn = true;
  // Bit-identical runs (HF's full_determinism): Backend::set_deterministic.
  bool full_determinism = false;
  // This step (1-based; 0: none) runs with Backend::set_op_profiling: where its time went is
  // printed after it (rank 0's backend).
  int64_t profile_step = 0;
  std::string dataset_format = "auto";
  bool train_on_inputs = false;
  bool packing = false;
  std::string chat_template;
  int64_t max_train_samples = 0;        // 0 = all; else only the data file's first N rows
  std::filesystem::path cache_dir;      // token cache ("" = $LONGTUNE_CACHE or ~/.cache/longtune)
  std::string save_dtype;               // "" = as loaded; f32, bf16, f16
  std::string max_shard_size = "50GB";  // transformers' spelling (io/safetensors.h)
  LoraOptions lora;  // LoRA / QLoRA (cli/lora_flags.cpp); the adapter is saved, not the model

  // The trainer as a product (trainer_loop.h): evaluation, checkpoints, tracking, progress.
  std::filesystem::path eval_data_path;
  int64_t per_device_eval_batch_size = 8;
  std::string evaluation_strategy = "no";  // no, steps, epoch
  int64_t eval_steps = 0;                  // 0: logging_steps (as HF)
  std::string save_strategy = "steps";     // no, steps, epoch
  int64_t save_steps = 500;
  int64_t save_total_limit = 0;           // 0: keep every checkpoint
  std::string resume_from_checkpoint;     // "", a checkpoint folder, or "latest"
  std::string report_to = "tensorboard";  // comma list: tensorboard, mlflow, none, all
  std::string run_name;                   // MLflow run name (default: output_dir's name)
  std::filesystem::path logging_dir;  // TensorBoard folder (default output_dir/runs/<time>_<host>)
  bool disable_tqdm = false;          // plain log lines even on a terminal
  // Every flag's value as given or defaulted (training_args.json, MLflow params).
  std::map<std::string, std::string> flag_values;
  DistOptions dist;  // multi-process runs (src/dist, flags in src/cli/dist_flags.cpp)
};

// Runs a whole training job; UserError on bad input before anything is written.
void run_train(const TrainOptions& o);

}  // namespace lt
