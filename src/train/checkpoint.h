// Training checkpoints, output_dir/checkpoint-N as Hugging Face's Trainer lays them out: the model
// (config.json + model.safetensors, f32 master weights), optimizer state (AdamW moments and step
// count), scheduler state, RNG state with the data position, trainer_state.json and the training
// arguments. Written into checkpoint-N.tmp and renamed whole, so a checkpoint folder either is
// complete or does not exist.
#pragma once
#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/llama.h"
#include "model/params.h"
#include "train/logging/trainer_state.h"
#include "train/optimizer.h"
#include "train/trainer.h"

namespace lt {

// Where the data stream stands after the last step of a checkpoint.
struct DataPosition {
  int64_t epoch = 0;              // current epoch (0-based)
  int64_t micro_batch_index = 0;  // next micro-batch of that epoch's shuffled order
  uint64_t shuffle_seed = 42;     // the epoch order is a function of (seed, epoch) only
  int64_t num_rows = 0;           // dataset rows (a resumed run must see the same data)
};

// What a checkpoint holds besides the weights and moments.
struct CheckpointState {
  int64_t step = 0;
  TrainerState trainer_state;
  DataPosition position;
  ScheduleSettings schedule;
};

// The files every complete checkpoint has.
const std::vector<std::string>& checkpoint_files();

// Writes output_dir/checkpoint-<step> (replacing one of that step). On any error (a full disk)
// the partial checkpoint-<step>.tmp is removed, earlier checkpoints are untouched, and a
// UserError says so. Returns the folder.
std::filesystem::path save_checkpoint(const std::filesystem::path& output_dir,
                                      const CheckpointState& state, const ModelConfig& config,
                                      LlamaModel& model, AdamW& optimizer,
                                      const nlohmann::json& training_args,
                                      const std::filesystem::path& source_dir);

// The tensors of a checkpoint when no single LlamaModel + AdamW holds them: a distributed run
// (src/dist/parallel.h) gathers them into host memory in the one-process layouts.
//  - Full fine-tuning: the whole parameter block in `table` layout, moments in the same layout.
//  - LoRA (`lora` set): the adapter's trainable tensors by name (read_adapter_tensors' keys),
//    moments in LlamaModel::trainable_layout order (the layout AdamW over trainable() uses).
struct CheckpointTensors {
  const ParamTable* table = nullptr;
  float* params = nullptr;  // (P) f32, P = table->total_numel()
  const LoraSpec* lora = nullptr;
  NamedTensors* adapter = nullptr;
  float* moments = nullptr;  // (2 x moments_size) f32: exp_avg then exp_avg_sq
  int64_t moments_size = 0;  // per moment; 0: table->total_numel()
  int64_t optimizer_step = 0;
  int64_t size() const { return moments_size ? moments_size : table->total_numel(); }
};
std::filesystem::path save_checkpoint(const std::filesystem::path& output_dir,
                                      const CheckpointState& state, const ModelConfig& config,
                                      const CheckpointTensors& tensors,
                                      const nlohmann::json& training_args,
                                      const std::filesystem::path& source_dir);

// Complete checkpoints in output_dir, oldest (lowest step) first.
std::vector<std::filesystem::path> list_checkpoints(const std::filesystem::path& output_dir);

// HF's _rotate_checkpoints: while more than limit remain, delete the oldest. limit <= 0 keeps
// all. Returns the folders deleted.
std::vector<std::filesystem::path> rotate_checkpoints(const std::filesystem::path& output_dir,
                                                      int64_t limit);

// "latest" -> the newest complete checkpoint of output_dir; otherwise the folder as given.
// UserError when there is none.
std::filesystem::path resolve_checkpoint(const std::string& spec,
                                         const std::filesystem::path& output_dir);

// Loads weights and optimizer state into place after checking that the checkpoint is complete
// and made for this model shape (UserError names the file or the config field otherwise).
// With LoRA the checkpoint holds the adapter (PEFT format) instead of the whole model.
CheckpointState load_checkpoint(const std::filesystem::path& dir, const ModelConfig& config,
                                LlamaModel& model, AdamW& optimizer);
// The same into host tensors (fills params, moments and optimizer_step).
CheckpointState load_checkpoint(const std::filesystem::path& dir, const ModelConfig& config,
                                CheckpointTensors* tensors);

}  // namespace lt
