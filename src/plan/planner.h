// The memory planner: predicted peak memory by category for a model, sequence length, batch
// and settings (from the same buffer list the engine allocates), the longest sequence that fits
// a budget, and the choice of memory-saving settings for a budget.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "core/memory.h"
#include "model/config.h"
#include "model/llama.h"

namespace lt {

// Where the plan is for: the CPU backend keeps everything in f32; the CUDA backend in bf16
// keeps bf16 weights/activations/gradients plus f32 master weights and moments.
enum class PlanDevice { kCpuF32, kCudaBf16 };

struct PlanRequest {
  ModelConfig config;
  int64_t seq_len = 0;     // tokens per row
  int64_t batch = 1;       // rows per micro-batch
  RunSettings settings;    // max_tokens is filled from seq_len * batch
  bool mini_sequence_auto = false;   // chunks from MST's rule for the sequence (overrides)
  PlanDevice device = PlanDevice::kCpuF32;
  // Data parallel layout (src/dist/zero.h): weights / gradients / optimizer state per rank.
  int world_size = 1;
  int zero_stage = 0;
  bool offload_optimizer = false;  // ZeRO-Offload: optimizer state counted as host memory
};

struct PlanResult {
  MemoryPlan plan;          // buffers as the engine allocates them (f32 element counts)
  size_t device_bytes = 0;  // predicted peak on the compute device
  size_t offloaded_bytes = 0;  // checkpoints kept off the device (host RAM or a file)
  size_t runtime_bytes = 0;    // fixed per-process overhead (libraries, thread pools, context)
  std::vector<std::pair<std::string, size_t>> by_category;  // device bytes per category
  std::string describe() const;
};

PlanResult plan_memory(const PlanRequest& r);

// Longest seq_len (multiple of `granularity`) whose plan fits budget_bytes; 0 if none.
int64_t longest_sequence(PlanRequest r, size_t budget_bytes, int64_t granularity = 256,
                         int64_t limit = int64_t(1) << 26);

// The candidate settings from fastest to most frugal: vanilla, mini-sequence, + checkpointing,
// + offload. With auto flags, the first that fits the budget is chosen; `why` says why.
struct AutoChoice {
  RunSettings settings;
  bool fits = false;
  std::string why;
};
AutoChoice choose_settings(const PlanRequest& base, size_t budget_bytes, bool auto_mini_sequence,
                           bool auto_checkpointing);

// --mini_sequence: a positive chunk count M, or nullopt for "auto"; UserError otherwise.
std::optional<int64_t> parse_mini_sequence(const std::string& value);

// MST's published chunk rules: MLP chunks of ~hidden_size tokens, ceil(V/D) LM-head chunks.
void mini_sequence_auto(const ModelConfig& c, int64_t tokens, RunSettings* s);

// "80GiB", "512MiB", "1.5G", "1000000": bytes; UserError names the flag on bad input.
size_t parse_bytes(const std::string& s, const std::string& flag);

// LongLoRA's context extension: when model_max_length exceeds max_position_embeddings and the
// config has no rope scaling, linear position interpolation with factor
// ceil(model_max_length / max_position_embeddings). Returns true when it changed the config.
bool apply_position_interpolation(ModelConfig* c, int64_t model_max_length);

}  // namespace lt
