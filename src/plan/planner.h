// The memory planner: predicted peak memory by category for a model, sequence length, batch
// and settings (from the same buffer list the engine allocates), the longest sequence that fits
// a budget, and the choice of memory-saving settings for a budget.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "core/memory.h"
#include "model/config.h"
#include "model/llama.h"

namespace lt {

// Where the plan is for. Both backends allocate every buffer as the model declares it (f32,
// and bf16 where a buffer is named so: frozen bf16 bases, bf16 checkpoints); the CUDA backend
// adds its planned workspace (op scratch, bf16 GEMM staging) and a larger fixed runtime (CUDA
// context, cuBLAS and NCCL).
enum class PlanDevice { kCpu, kCuda };

// The largest op calls of a run, for sizing a backend's workspace (backend.h).
WorkspaceShape workspace_shape(const ModelConfig& c, const RunSettings& s);

struct PlanRequest {
  ModelConfig config;
  int64_t seq_len = 0;              // tokens per row
  int64_t batch = 1;                // rows per micro-batch
  RunSettings settings;             // max_tokens is filled from seq_len * batch
  bool mini_sequence_auto = false;  // chunks from MST's rule for the sequence (overrides)
  PlanDevice device = PlanDevice::kCpu;
  bool bf16_gemms = false;  // CUDA: --bf16 True multiplies in bf16 (its GEMM staging planned)
  // The cluster layout (src/dist/parallel.h): world_size ranks = data-parallel replicas x
  // sequence_parallel x pipeline_parallel; ZeRO over the ranks of each pipeline stage.
  int world_size = 1;
  int zero_stage = 0;
  bool offload_optimizer = false;  // ZeRO-Offload: optimizer state counted as host memory
  bool offload_params = false;     // ZeRO-3: the parameter shard in host memory
  int sequence_parallel = 1;
  int pipeline_parallel = 1;
  int64_t fpdt_chunk = 0;      // FPDT chunk tokens (0: off)
  int64_t micro_per_step = 1;  // gradient accumulation (the pipeline's micro-batches)
  int only_stage = -1;         // plan this pipeline stage (-1: the largest of all)
  // CUDA: the host memory the offloaded buffers (checkpoints, FPDT's store, ZeRO-Offload) may
  // take; they are pinned, so they must fit the host's RAM. 0: not checked.
  size_t host_budget = 0;
  bool parallel() const {
    return world_size > 1 || zero_stage > 0 || fpdt_chunk > 0 || sequence_parallel > 1 ||
           pipeline_parallel > 1;
  }
};

struct PlanResult {
  MemoryPlan plan;             // buffers as the engine allocates them (f32 element counts)
  int stage = 0;               // pipeline: the stage planned (the one with the largest peak)
  RunSettings settings;        // the stage's settings as planned (automatic mini-sequence applied)
  size_t device_bytes = 0;     // predicted peak on the compute device
  size_t offloaded_bytes = 0;  // off the device: host arenas, checkpoints (host RAM or a file)
  size_t runtime_bytes = 0;    // fixed per-process overhead (libraries, thread pools, context)
  std::vector<std::pair<std::string, size_t>> by_category;  // device bytes per category
  std::string describe() const;
};

// The peak of the rank that needs the most (UserError for a layout that cannot run).
PlanResult plan_memory(const PlanRequest& r);

// A GPU for the step-time estimate: dense bf16 peak, memory, and the bandwidths its
// collectives, point-to-point messages and host copies see (per GPU, one direction).
struct GpuSpec {
  std::string name;
  size_t memory_bytes = 0;
  double peak_flops = 0;     // dense bf16 tensor-core FLOP/s
  double intra_node_bw = 0;  // NVLink, bytes/s
  double inter_node_bw = 0;  // network per GPU, bytes/s
  double host_bw = 0;        // PCIe, bytes/s
  int gpus_per_node = 8;
};
// a100-40gb, a100-80gb, h100-80gb, h200; UserError lists them for an unknown name.
GpuSpec gpu_spec(const std::string& name);

// Model FLOPs of one training step of `tokens` tokens in rows of `row_tokens` (PaLM's
// convention, recomputation not counted): 6 per matmul parameter per token plus causal
// attention, 6 x row_tokens x tokens per unit of L x H x HD.
double training_flops(const ModelConfig& c, double tokens, double row_tokens);

// Step time of a layout from its FLOPs and communication volumes (the volumes the multi-rank
// tests measure): compute at assumed_mfu of the peak with the 1F1B bubble, plus the
// all-to-all and point-to-point time (on the critical path), the gradient reduction beyond what
// overlaps the backward, and host copies (offload, FPDT) beyond what overlaps compute.
struct StepEstimate {
  double flops_per_device = 0;  // executed (recomputation included)
  double compute_s = 0, alltoall_s = 0, p2p_s = 0, grad_sync_s = 0, host_copy_s = 0;
  // Bytes one device hands to each kind of transfer per step (bf16 payloads).
  double alltoall_bytes = 0, p2p_bytes = 0, grad_sync_bytes = 0, host_bytes = 0;
  double step_s = 0, tokens_per_s = 0, mfu = 0;  // mfu: model FLOPs / (world x peak x step)
  std::string describe() const;
};
StepEstimate estimate_step(const PlanRequest& r, const GpuSpec& gpu, double assumed_mfu);

// Whether a plan fits: its device bytes within device_budget and, for a CUDA plan with a host
// budget, its offloaded (pinned host) bytes within r.host_budget.
bool plan_fits(const PlanResult& p, const PlanRequest& r, size_t device_budget);

// Longest seq_len (multiple of `granularity`) whose plan fits budget_bytes (and
// r.host_budget); 0 if none.
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
// --recompute_granularity: full (false) or selective (true: RunSettings::keep_attention);
// UserError otherwise.
bool parse_recompute_granularity(const std::string& value);

// MST's published chunk rules: MLP chunks of ~hidden_size tokens, ceil(V/D) LM-head chunks.
void mini_sequence_auto(const ModelConfig& c, int64_t tokens, RunSettings* s);

// "80GiB", "512MiB", "1.5G", "1000000": bytes; UserError names the flag on bad input.
size_t parse_bytes(const std::string& s, const std::string& flag);

// LongLoRA's context extension: when model_max_length exceeds max_position_embeddings and the
// config has no rope scaling, linear position interpolation with factor
// ceil(model_max_length / max_position_embeddings). Returns true when it changed the config.
bool apply_position_interpolation(ModelConfig* c, int64_t model_max_length);

}  // namespace lt
