// Data parallelism with ZeRO (Rajbhandari et al., arXiv 1910.02054) over flat ranges of the
// parameter block: stage 0 (all-reduce), 1 (sharded optimizer state), 2 (+ sharded gradients),
// 3 (+ sharded parameters gathered layer by layer), and ZeRO-Offload of the optimizer.
#pragma once
#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/memory.h"
#include "dist/comm.h"
#include "model/llama.h"
#include "train/trainer.h"

namespace lt {

struct ZeroSettings {
  int stage = 0;                   // 0, 1, 2 or 3
  bool offload_optimizer = false;  // master weights + AdamW moments in host memory, CPU AdamW
  bool offload_params = false;     // stage 3: the parameter shard lives only in host memory
  int64_t reduce_bucket_size = 500'000'000;     // elements per gradient all-reduce / reduce-scatter
  int64_t allgather_bucket_size = 500'000'000;  // elements per parameter all-gather (stages 1, 2)
  bool prefetch = true;  // stage 3: gather the next layer while the current one runs
};

// Which floats of the parameter block (P floats) each rank owns: rank r holds
// [r*S, (r+1)*S) clipped to P, with S = ceil(P/W) rounded up to 16 floats.
struct ShardLayout {
  int64_t total = 0, shard = 0;
  int world = 1;
  ShardLayout(int64_t total_floats, int world_size);
  int64_t begin(int r) const { return std::min(total, r * shard); }
  int64_t end(int r) const { return std::min(total, (r + 1) * shard); }
  // counts[r] = floats of [b, e) that rank r owns (the counts of a reduce-scatter / all-gather
  // of that range).
  std::vector<int64_t> counts(int64_t b, int64_t e) const;
};

// One token without a label: what a rank runs when its share of a micro-batch is empty (every
// rank must make the same calls); it adds nothing to the loss or any gradient.
const MicroBatch& empty_micro_batch();

class ZeroEngine final : public LayerWeightsProvider {
 public:
  // The model must have been built with settings adjusted by adjust_run_settings (stages 2 and 3
  // supply its parameters and gradients); the engine registers itself as its provider.
  // dp runs the collectives on host memory (gathers for checkpoints, scalars); device_dp, when
  // given (NCCL over the same ranks), those on the device's gradients and parameters.
  ZeroEngine(LlamaModel& model, Backend& backend, Communicator& dp, const ZeroSettings& z,
             const OptimizerSettings& opt, Communicator* device_dp = nullptr);
  ~ZeroEngine() override;
  static void adjust_run_settings(const ZeroSettings& z, RunSettings* rs);
  // This rank's buffers (weights, gradients, optimizer) beyond those the model declares.
  static void plan(const ModelConfig& c, const ZeroSettings& z, int world, int rank,
                   MemoryPlan* plan);
  // The same for a pipeline stage's table (the model's table()).
  static void plan(const ParamTable& table, const ZeroSettings& z, int world, int rank,
                   MemoryPlan* plan);

  // full: the whole parameter block (P floats, host) on every rank; each keeps its part.
  void load_full(const float* full);
  // out (P floats, host) = the whole parameter block, on every rank (stage 3: all-gathered).
  void gather_full(float* out);

  // One optimizer step over this rank's micro-batches (every rank passes the same number; an
  // empty one is allowed). Loss normalisation uses the labelled tokens of all ranks, so the step
  // equals one process running every rank's micro-batches. The composition of the phases below.
  StepResult train_step(const std::vector<MicroBatch>& micro, const ScheduleSettings& schedule,
                        int64_t step_index);

  // The phases of a step, for callers that run the micro-batches themselves (src/dist/
  // parallel.h: sequence and pipeline parallelism): zero the gradients; run every forward and
  // backward; reduce_gradients (stages 0-1: the bucketed all-reduce / reduce-scatter; 2-3:
  // already done layer by layer); square_sum = this rank's squares of the gradients summed over
  // the group (stage 0: every rank holds all of them), skipping tensor `excluded`;
  // clip_and_update with the global norm and the learning rate.
  void zero_grads();
  void reduce_gradients();
  double square_sum(const std::string& excluded = "");
  void clip_and_update(double grad_norm, double lr);
  // moments (2P floats, host) = AdamW exp_avg then exp_avg_sq of the whole block in ParamTable
  // layout, on every rank (stages 1-3: all-gathered; a collective).
  void gather_moments(float* moments);
  // moments (2P floats, host, same layout) on every rank; each keeps its part (checkpoint resume).
  void load_moments(const float* moments);
  void set_steps_done(int64_t s) { step_ = s; }
  int64_t steps_done() const { return step_; }

  const ShardLayout& layout() const { return layout_; }
  int stage() const { return z_.stage; }
  // Bytes of this rank's arenas (the engine's plus the model's weights and gradients) by category.
  size_t bytes(MemCategory c) const;

  // LayerWeightsProvider (stages 2 and 3).
  void acquire(int64_t unit, Pass pass, ModelWeights* w, ModelWeights* g) override;
  void release(int64_t unit, Pass pass) override;

 private:
  struct Buffers;
  static void declare(const ParamTable& table, const ZeroSettings& z, const ShardLayout& layout,
                      int rank, BufferBinder& b, Buffers* out);
  void declare_sizes(MemoryPlan* plan) const;
  float* shard_params();  // this rank's slice of the parameters (device)
  float* shard_grads();   // this rank's slice of the gradients (device)
  void reduce_full_grads();
  void reduce_scatter_add(int64_t b, int64_t e, const float* src);
  void gather_range(int64_t b, int64_t e, float* dst);
  bool optimizer_on_host() const;
  bool shard_in_host_memory() const;
  const float* gather_source(int64_t b, int64_t e, float* dst);
  void allgather_full_params();
  void update_shard(double lr);
  void invalidate_gathered();

  LlamaModel& model_;
  Backend& be_;
  Communicator& dp_;
  Communicator& dev_;  // device-buffer collectives (dp_ unless NCCL)
  ZeroSettings z_;
  OptimizerSettings opt_;
  const ParamTable& table_;
  ShardLayout layout_;
  int64_t lo_ = 0, hi_ = 0;                  // this rank's range
  int64_t outer_head_ = 0, outer_tail_ = 0;  // [0, head) and [tail, P): outside the layers
  std::vector<int64_t> layer_begin_;         // (L+1) layer l is [layer_begin_[l], [l+1])
  std::map<std::string, Arena> arenas_;
  std::unique_ptr<Buffers> buf_;
  ModelWeights full_views_;  // stage 2: views into the full parameter block
  int64_t slot_unit_[2] = {-1, -1};
  std::unique_ptr<CommRequest> pending_[2];
  bool outer_valid_ = false;
  int64_t step_ = 0;
};

}  // namespace lt
