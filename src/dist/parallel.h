// The parallel strategies composed over one world of ranks: data-parallel replicas (ZeRO over
// the ranks of each pipeline stage), sequence groups (DeepSpeed-Ulysses, FPDT chunks) and
// pipeline stages (1F1B schedule, point-to-point activations and gradients). Every layout
// computes the one-process step: the same losses, gradients and updates within float rounding.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "backend/backend.h"
#include "dist/comm.h"
#include "dist/sequence.h"
#include "dist/zero.h"
#include "model/llama.h"
#include "train/optimizer.h"
#include "train/trainer.h"

namespace lt {

// world = pipeline stages x data-parallel replicas x sequence-parallel ranks, with
// rank = (stage * dp + replica) * sp + seq: the ranks of a sequence group are adjacent (they
// exchange the most), then the replicas of a stage, then the stages.
struct ParallelLayout {
  int world = 1, dp = 1, sp = 1, pp = 1, rank = 0;
  int stage() const { return rank / (dp * sp); }
  int replica() const { return (rank / sp) % dp; }
  int seq() const { return rank % sp; }
  // The world rank of (stage, replica, seq).
  int rank_of(int stage, int replica, int seq) const { return (stage * dp + replica) * sp + seq; }
  // UserError naming the flags when sp x pp does not divide the world size.
  static ParallelLayout make(int world, int rank, int64_t sp, int64_t pp);
  std::string describe() const;  // "8 ranks = 2 data-parallel x 2 sequence x 2 pipeline"
};

// Decoder layers [begin, end) of `stage` when L layers are split into `stages` (as even as
// possible; the earlier stages take the extra layers).
std::pair<int64_t, int64_t> stage_layers(int64_t layers, int stages, int stage);

struct ParallelSettings {
  ZeroSettings zero;
  OptimizerSettings optimizer;
  int64_t fpdt_chunk = 0;        // FPDT: the most tokens of a chunk (a multiple of sp; 0: off)
  int64_t micro_per_step = 1;    // micro-batches of a step (gradient accumulation)
  int64_t max_tokens = 0;        // the longest micro-batch of a replica (whole sequences)
  double timeout_seconds = 600;  // NCCL calls (MPI's watchdog has its own)
};

class ParallelEngine {
 public:
  // The settings of this rank's model: its stage's layers and micro-batches in flight, the
  // sequence degree and chunk, this rank's share of the longest sequence, and external
  // parameters for ZeRO-2/3. UserError for layouts that cannot run (heads not divisible by
  // the sequence degree, more stages than layers, ZeRO-2/3 or LoRA with ZeRO-3 across stages).
  static void adjust_run_settings(const ModelConfig& c, const ParallelLayout& lay,
                                  const ParallelSettings& ps, RunSettings* rs);
  // This rank's share of the longest micro-batch (the model's max_tokens).
  static int64_t local_max_tokens(const ParallelLayout& lay, const ParallelSettings& ps);
  // This rank's buffers beyond the model's (ZeRO or the replicated LoRA optimizer, pipeline
  // staging).
  static void plan(const ModelConfig& c, const RunSettings& rs, const ParallelLayout& lay,
                   const ParallelSettings& ps, MemoryPlan* plan);

  ParallelEngine(LlamaModel& model, Backend& backend, Communicator& world,
                 const ParallelLayout& lay, const ParallelSettings& ps);
  ~ParallelEngine();
  const ParallelLayout& layout() const { return lay_; }

  // One optimizer step over this replica's micro-batches (whole sequences; every rank of a
  // replica passes the same ones, every replica the same number; an empty one is allowed).
  StepResult train_step(const std::vector<MicroBatch>& micro, const ScheduleSettings& schedule,
                        int64_t step_index);
  // Forward only over this replica's micro-batches: the loss sum and the labelled tokens over
  // every replica (every rank gets them).
  std::pair<double, int64_t> eval_loss(const std::vector<MicroBatch>& micro);

  // Weights and optimizer state in the one-process layouts (those of a checkpoint), so any
  // layout resumes from any other:
  //  - full fine-tuning: the ParamTable(config) block (P floats) and its moments (2P);
  //  - LoRA: the trainable tensors by name (the adapter's PEFT names, base tensors that train by
  //    their own) and the moments in LlamaModel::trainable_layout order of one process.
  // load_* take the whole thing on every rank; gather_* are collectives whose result is valid on
  // world rank 0 (which saves).
  void load_params(const float* full);
  void gather_params(float* full);
  void load_trainable(const NamedTensors& t);
  NamedTensors gather_trainable();
  void load_moments(const float* full, int64_t optimizer_step);
  int64_t gather_moments(float* full);  // returns the optimizer's step count
  int64_t moments_size() const;         // of the one-process layout (per moment)
  int64_t steps_done() const;

  // Bytes handed to each kind of communication by this rank since the last reset, over all of
  // its groups.
  CommStats stats() const;
  void reset_stats();
  // What carries the collectives on device buffers: "nccl", "mpi-staged" (host copies, or device
  // copies in a world of one) or the host group's own ("mpi", "local") on a host backend.
  std::string_view device_collectives() const;

 private:
  class Optimizer;
  class ZeroOptimizer;
  class ReplicatedOptimizer;
  MicroBatch local(const MicroBatch& mb) const;  // this rank's share (sequence path)
  double run_micro_batches(const std::vector<MicroBatch>& micro, float scale, bool training);
  void pipeline_1f1b(const std::vector<MicroBatch>& local, float scale, bool training,
                     double* loss);
  // n floats of a device buffer to / from a neighbouring stage; bf16: the values are bf16
  // already (the bf16 residual stream) and travel as 16-bit values, half the bytes.
  void send_activation(const float* dev, int64_t n, int dst, int tag, bool bf16);
  void recv_activation(float* dev, int64_t n, int src, int tag, bool bf16);
  void finish_sends();
  void exchange_tied_gradient();
  // Every stage leader's block to world rank 0, by stage (a collective of the leaders); each
  // block holds per_value floats per value of the stage's layout (2: both moments).
  std::vector<std::vector<float>> gather_to_root(const std::vector<float>& mine, int per_value);
  RunSettings stage_settings(int stage) const;

  LlamaModel& model_;
  Backend& be_;
  Communicator& world_;
  ParallelLayout lay_;
  ParallelSettings ps_;
  std::unique_ptr<Communicator> stage_group_;  // the dp x sp ranks of this stage (ZeRO)
  std::unique_ptr<Communicator> seq_group_;    // the sp ranks of this replica and stage
  std::unique_ptr<Communicator> pipe_group_;   // the pp ranks of this (replica, seq)
  std::unique_ptr<Communicator> leaders_;      // the (replica 0, seq 0) rank of every stage
  // A device backend's stage and sequence groups on device buffers: NCCL, or MPI staged
  // through host memory (null on a host-addressable backend).
  std::unique_ptr<Communicator> stage_nccl_, seq_nccl_;
  std::unique_ptr<CommSequenceExchange> exchange_;
  std::unique_ptr<Optimizer> opt_;
  std::string tied_copy_;  // last stage with tied embeddings: the copy's name ("" if none)
  // Point-to-point staging (pipeline): a ring of send buffers and one receive buffer.
  struct Send {
    std::vector<float> host;
    std::vector<uint16_t> host16;  // bf16 activations (--bf16 True)
    std::unique_ptr<CommRequest> request;
  };
  std::vector<Send> sends_;
  size_t next_send_ = 0;
  float* recv_device_ = nullptr;
  std::vector<float> recv_host_;
  std::vector<uint16_t> recv_host16_;
  uint16_t* stage16_ = nullptr;  // device backends: bf16 activations on their way to the host
  RunSettings rs_;
};

}  // namespace lt
