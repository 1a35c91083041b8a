// The `longtune train` job as a Trainer: validation and data, the memory plan, the step loop,
// the log sinks (progress, metrics.jsonl, TensorBoard, MLflow, trainer_state.json, plot),
// evaluation, checkpoints with resume, and a clean stop on SIGINT/SIGTERM. Over MPI (several
// ranks, or a ZeRO stage) the steps run through the ZeRO engine and rank 0 writes every file.
#pragma once
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "backend/backend.h"
#include "data/dataset.h"
#include "data/tokenizer.h"
#include "dist/parallel.h"
#include "io/safetensors.h"
#include "model/config.h"
#include "model/llama.h"
#include "train/checkpoint.h"
#include "train/evaluate.h"
#include "train/logging/log_sink.h"
#include "train/logging/metrics_jsonl.h"
#include "train/logging/progress.h"
#include "train/logging/trainer_state.h"
#include "train/trainer.h"

namespace lt {

class Communicator;
class ParallelEngine;

enum class Strategy { kNo, kSteps, kEpoch };

// How a train() call ended.
struct TrainOutcome {
  bool stopped_by_signal = false;
  int64_t step = 0;                       // global step reached
  std::filesystem::path last_checkpoint;  // empty when none was written
};

class Trainer {
 public:
  // Validates every option and input, loads data and weights (and the checkpoint when
  // resuming), plans and allocates memory. UserError before anything is written.
  explicit Trainer(const TrainOptions& options);
  ~Trainer();
  TrainOutcome train();

 private:
  void init_dist();  // the world of ranks (before validate)
  void validate();
  void load_data();
  void setup_model();
  void resume();
  NamedTensors initial_adapter(const CheckpointReader& reader) const;
  void open_sinks();
  std::vector<MicroBatch> next_step_batches();  // advances the data position
  void log_train_window(double wall_time);
  void evaluate();
  EvalResult evaluate_distributed();
  void save();
  void emit(const LogRecord& r);
  void finish(const std::string& status);
  // Runs write on rank 0; every rank learns whether it failed (a collective when distributed).
  void on_main_rank(const std::function<void()>& write, const std::string& what);
  // --profile_step: the step that began at `start` has run with op timing; prints the table.
  void report_op_profile(std::chrono::steady_clock::time_point start);
  double epoch_float() const;
  nlohmann::json training_args() const;

  TrainOptions o_;
  std::filesystem::path model_dir_;
  ModelConfig config_;
  LoraSpec lora_;  // LoRA / QLoRA (disabled for full fine-tuning)
  Strategy save_strategy_ = Strategy::kSteps, eval_strategy_ = Strategy::kNo;
  DType save_dtype_ = DType::kF32;
  size_t max_shard_bytes_ = 0;  // --max_shard_size
  std::unique_ptr<Tokenizer> tokenizer_;
  Dataset train_data_, eval_data_;
  bool has_eval_ = false;

  int64_t steps_per_epoch_ = 1, total_steps_ = 1;
  ScheduleSettings schedule_;
  MemoryPlan plan_;
  std::unique_ptr<Backend> backend_;
  Arena workspace_;  // the backend's planned workspace (CUDA: op scratch, bf16 GEMM staging)
  std::unique_ptr<LlamaModel> model_;
  std::unique_ptr<AdamW> optimizer_;  // single process; the engine holds it otherwise

  // ---- dist: world_ = data x sequence x pipeline (src/dist/parallel.h); rows of a global
  // micro-batch of replicas x B are dealt out by replica (d, d + replicas, ...); the ranks of
  // a replica (its sequence and pipeline ranks) share the same rows ----
  std::unique_ptr<Communicator> world_;
  int world_size_ = 1, rank_ = 0;
  ParallelLayout layout_;
  bool distributed_ = false;  // several ranks, a ZeRO stage or FPDT: steps go through engine_
  std::unique_ptr<ParallelEngine> engine_;
  CommStats step_comm_;  // what the training steps handed to communication (this rank)
  int replicas() const { return layout_.dp; }

  // Position: global step and where the data stream stands.
  int64_t step_ = 0, first_step_ = 0;
  DataPosition position_;
  std::vector<std::vector<int64_t>> epoch_batches_;  // of position_.epoch
  bool epoch_ended_ = false;                         // the last step finished an epoch

  // Logging.
  TrainerState state_;
  std::unique_ptr<Progress> progress_;
  std::unique_ptr<MetricsJsonl> metrics_;
  std::vector<std::unique_ptr<LogSink>> sinks_;  // TensorBoard, MLflow
  double window_loss_ = 0;
  int64_t window_steps_ = 0, window_tokens_ = 0;
  StepResult last_;
  double total_loss_ = 0;  // over the steps of this call (train_loss)
  int64_t rows_seen_ = 0;
  std::chrono::steady_clock::time_point t_start_, t_window_;
  std::filesystem::path last_checkpoint_;
  int64_t last_saved_step_ = -1;
};

}  // namespace lt
