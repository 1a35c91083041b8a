// Data x sequence x pipeline parallelism (see parallel.h).
#include "dist/parallel.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/check.h"
#include "core/error.h"
#include "train/schedule.h"

namespace lt {

ParallelLayout ParallelLayout::make(int world, int rank, int64_t sp, int64_t pp) {
  if (sp < 1) fail("--sequence_parallel_size must be >= 1 (got {})", sp);
  if (pp < 1) fail("--pipeline_parallel_size must be >= 1 (got {})", pp);
  if (world % (sp * pp) != 0)
    fail(
        "--sequence_parallel_size {} x --pipeline_parallel_size {} = {} does not divide the {} "
        "ranks of this run (mpirun -np N: N must be a multiple of their product; the quotient "
        "is the number of data-parallel replicas)",
        sp, pp, sp * pp, world);
  ParallelLayout l;
  l.world = world;
  l.rank = rank;
  l.sp = int(sp);
  l.pp = int(pp);
  l.dp = world / int(sp * pp);
  return l;
}

std::string ParallelLayout::describe() const {
  return fmt::format("{} rank{} = {} data-parallel x {} sequence-parallel x {} pipeline", world,
                     world == 1 ? "" : "s", dp, sp, pp);
}

std::pair<int64_t, int64_t> stage_layers(int64_t layers, int stages, int stage) {
  LT_CHECK(stages >= 1 && stage >= 0 && stage < stages && layers >= stages);
  const int64_t base = layers / stages, extra = layers % stages;
  const int64_t begin = stage * base + std::min<int64_t>(stage, extra);
  return {begin, begin + base + (stage < extra ? 1 : 0)};
}

namespace {

// A tensor of a flat block: its name, where it starts, how many floats.
struct Entry {
  std::string name;
  int64_t offset = 0, numel = 0;
};

std::vector<Entry> entries(const ParamTable& t) {
  std::vector<Entry> e;
  for (const auto& p : t.params()) e.push_back({p.name, p.offset, p.numel});
  return e;
}

std::vector<Entry> entries(const std::vector<TrainableTensor>& set, int64_t* total) {
  const std::vector<int64_t> at = AdamW::set_offsets(set, total);
  std::vector<Entry> e;
  for (size_t i = 0; i < set.size(); ++i) e.push_back({set[i].name, at[i], set[i].numel});
  return e;
}

// dst (dst_entries layout) <- src (src_entries layout), tensor by tensor for the names both have.
void copy_by_name(float* dst, const std::vector<Entry>& dst_e, const float* src,
                  const std::vector<Entry>& src_e) {
  std::map<std::string, const Entry*> by_name;
  for (const auto& e : src_e) by_name[e.name] = &e;
  for (const auto& d : dst_e) {
    auto it = by_name.find(d.name);
    if (it == by_name.end()) continue;
    LT_CHECK(it->second->numel == d.numel, "tensor {}: {} vs {} values", d.name, d.numel,
             it->second->numel);
    std::memcpy(dst + d.offset, src + it->second->offset, size_t(d.numel) * 4);
  }
}

// Blocking point to point of any length (MPI counts are int).
constexpr size_t kP2pChunk = size_t(1) << 28;
void send_all(Communicator& c, const float* p, size_t n, int dst, int tag) {
  for (size_t at = 0; at < n; at += kP2pChunk)
    c.send(p + at, std::min(kP2pChunk, n - at), dst, tag);
}
void recv_all(Communicator& c, float* p, size_t n, int src, int tag) {
  for (size_t at = 0; at < n; at += kP2pChunk)
    c.recv(p + at, std::min(kP2pChunk, n - at), src, tag);
}

void add_stats(CommStats* a, const CommStats& b) {
  a->allreduce_bytes += b.allreduce_bytes;
  a->reduce_scatter_bytes += b.reduce_scatter_bytes;
  a->allgather_bytes += b.allgather_bytes;
  a->alltoall_bytes += b.alltoall_bytes;
  a->p2p_bytes += b.p2p_bytes;
  a->broadcast_bytes += b.broadcast_bytes;
  a->calls += b.calls;
}

constexpr int kTagForward = 1, kTagBackward = 2, kTagTied = 3, kTagGather = 4;

}  // namespace

// ---- Optimizers: ZeRO for full fine-tuning, a replicated AdamW for the LoRA trainable set ----

class ParallelEngine::Optimizer {
 public:
  virtual ~Optimizer() = default;
  virtual void zero_grads() = 0;
  virtual void reduce_gradients() = 0;
  // This stage's squares of the gradients (every rank of the stage group gets the same sum).
  virtual double square_sum(const std::string& excluded) = 0;
  virtual void clip_and_update(double norm, double lr) = 0;
  virtual int64_t steps() const = 0;
  virtual void set_steps(int64_t s) = 0;
};

class ParallelEngine::ZeroOptimizer final : public Optimizer {
 public:
  ZeroOptimizer(LlamaModel& m, Backend& be, Communicator& group, const ZeroSettings& z,
                const OptimizerSettings& o, Communicator* device_group)
      : zero(m, be, group, z, o, device_group) {}
  void zero_grads() override { zero.zero_grads(); }
  void reduce_gradients() override { zero.reduce_gradients(); }
  double square_sum(const std::string& excluded) override { return zero.square_sum(excluded); }
  void clip_and_update(double norm, double lr) override { zero.clip_and_update(norm, lr); }
  int64_t steps() const override { return zero.steps_done(); }
  void set_steps(int64_t s) override { zero.set_steps_done(s); }
  ZeroEngine zero;
};

// LoRA: the adapter (and any base tensors that train) is small; every rank of the stage holds
// it and its AdamW state, and the gradients are all-reduced over the stage group.
class ParallelEngine::ReplicatedOptimizer final : public Optimizer {
 public:
  ReplicatedOptimizer(LlamaModel& m, Backend& be, Communicator& group, const OptimizerSettings& o)
      : model(m), be_(be), group_(group), adam(m.trainable(), be, o) {}
  void zero_grads() override { model.zero_grads(); }
  void reduce_gradients() override {
    if (group_.size() == 1) return;
    for (const auto& t : model.trainable()) {
      if (group_.device_memory() || be_.host_addressable()) {
        group_.allreduce_sum(t.grad, size_t(t.numel));
        continue;
      }
      host_.resize(size_t(t.numel));
      be_.copy_to_host(host_.data(), t.grad, host_.size() * 4);
      group_.allreduce_sum(host_.data(), host_.size());
      be_.copy_to_device(t.grad, host_.data(), host_.size() * 4);
    }
  }
  double square_sum(const std::string& excluded) override {
    return adam.square_sum(nullptr, excluded);
  }
  void clip_and_update(double norm, double lr) override {
    adam.clip_to(nullptr, norm);
    adam.update(nullptr, nullptr, lr);
  }
  int64_t steps() const override { return adam.steps_done(); }
  void set_steps(int64_t s) override { adam.set_steps_done(s); }
  LlamaModel& model;
  Backend& be_;
  Communicator& group_;
  AdamW adam;
  std::vector<float> host_;
};

// ---- Settings and plan ---------------------------------------------------------------------

void ParallelEngine::adjust_run_settings(const ModelConfig& c, const ParallelLayout& lay,
                                         const ParallelSettings& ps, RunSettings* rs) {
  const bool seq = lay.sp > 1 || ps.fpdt_chunk > 0;
  if (lay.pp > c.num_hidden_layers)
    fail("--pipeline_parallel_size {} is more than the model's {} decoder layers", lay.pp,
         c.num_hidden_layers);
  if (seq && (c.num_attention_heads % lay.sp || c.num_key_value_heads % lay.sp))
    fail(
        "--sequence_parallel_size {}: the model's {} attention heads and {} key/value heads must "
        "both be multiples of it (DeepSpeed-Ulysses gives each rank of the sequence group whole "
        "heads)",
        lay.sp, c.num_attention_heads, c.num_key_value_heads);
  if (ps.fpdt_chunk > 0 && ps.fpdt_chunk % lay.sp)
    fail("--fpdt_chunk_size {} must be a multiple of --sequence_parallel_size {}", ps.fpdt_chunk,
         lay.sp);
  if (ps.fpdt_chunk > 0 && !rs->flash_attention)
    fail("--fpdt_chunk_size needs flash attention (--use_flash_attn True)");
  if (lay.pp > 1 && ps.zero.stage >= 2)
    fail(
        "--pipeline_parallel_size {} with ZeRO stage {}: pipeline stages shard with ZeRO stage 0 "
        "or 1 only (as DeepSpeed's pipeline engine); use stage 1",
        lay.pp, ps.zero.stage);
  if (rs->lora.enabled && ps.zero.stage >= 3)
    fail(
        "--use_peft_lora with ZeRO stage 3: the frozen base is not sharded; use ZeRO stage 0-2 "
        "(the adapter is replicated), --load_in_4bit for a smaller base, or "
        "--pipeline_parallel_size to split the base over stages");
  const auto [l0, l1] = stage_layers(c.num_hidden_layers, lay.pp, lay.stage());
  rs->layer_begin = l0;
  rs->layer_end = l1;
  rs->micro_slots =
      lay.pp > 1 ? std::max<int64_t>(1, std::min<int64_t>(lay.pp - lay.stage(), ps.micro_per_step))
                 : 1;
  rs->sp_degree = lay.sp;
  rs->seq_chunk = ps.fpdt_chunk;
  rs->max_tokens = local_max_tokens(lay, ps);
  rs->mlp_chunks = std::min(rs->mlp_chunks, rs->max_tokens);
  rs->lm_head_chunks = std::min(rs->lm_head_chunks, rs->max_tokens);
  if (!rs->lora.enabled) ZeroEngine::adjust_run_settings(ps.zero, rs);
}

int64_t ParallelEngine::local_max_tokens(const ParallelLayout& lay, const ParallelSettings& ps) {
  const bool seq = lay.sp > 1 || ps.fpdt_chunk > 0;
  return seq ? sequence_max_local_tokens(ps.max_tokens, lay.sp, ps.fpdt_chunk) : ps.max_tokens;
}

void ParallelEngine::plan(const ModelConfig& c, const RunSettings& rs, const ParallelLayout& lay,
                          const ParallelSettings& ps, MemoryPlan* plan) {
  if (rs.lora.enabled)
    AdamW::plan(LlamaModel::trainable_numel(c, rs), plan);
  else
    ZeroEngine::plan(LlamaModel::param_table(c, rs), ps.zero, lay.dp * lay.sp,
                     lay.replica() * lay.sp + lay.seq(), plan);
  const size_t act = size_t(rs.max_tokens) * size_t(c.hidden_size);
  if (lay.pp > 1) {  // point-to-point staging of activations and their gradients
    const size_t ring = size_t(std::min<int64_t>(ps.micro_per_step, lay.pp + 1));
    plan->add("pipeline.send_ring", ring * act * 4, MemCategory::kScratch, "pipeline_host");
    plan->add("pipeline.recv_host", act * 4, MemCategory::kScratch, "pipeline_host");
    plan->add("pipeline.recv", act * 4, MemCategory::kScratch, "pipeline");
    if (rs.bf16_residual) {  // activations travel as bf16 (gradients stay f32)
      plan->add("pipeline.send_ring_bf16", ring * act * 2, MemCategory::kScratch, "pipeline_host");
      plan->add("pipeline.recv_host_bf16", act * 2, MemCategory::kScratch, "pipeline_host");
      plan->add("pipeline.bf16", act * 2, MemCategory::kScratch, "pipeline");
    }
  }
  const bool first = lay.stage() == 0, last = lay.stage() == lay.pp - 1;
  if (lay.pp > 1 && c.tie_word_embeddings && (first || last))
    plan->add("pipeline.tied_embedding", size_t(c.vocab_size) * c.hidden_size * 4 * 2,
              MemCategory::kGradients, "pipeline_host");
}

// ---- Construction --------------------------------------------------------------------------

ParallelEngine::ParallelEngine(LlamaModel& model, Backend& backend, Communicator& world,
                               const ParallelLayout& lay, const ParallelSettings& ps)
    : model_(model), be_(backend), world_(world), lay_(lay), ps_(ps), rs_(model.settings()) {
  LT_CHECK(world_.size() == lay_.world && world_.rank() == lay_.rank,
           "layout of {} ranks (rank {}) for a world of {} (rank {})", lay_.world, lay_.rank,
           world_.size(), world_.rank());
  LT_CHECK(rs_.sp_degree == lay_.sp &&
               model_.layer_begin() ==
                   stage_layers(model_.config().num_hidden_layers, lay_.pp, lay_.stage()).first,
           "the model's settings were not adjusted for this layout");
  // Every rank makes the same splits in the same order.
  const int stage = lay_.stage(), replica = lay_.replica(), seq = lay_.seq();
  stage_group_ = world_.split(stage, replica * lay_.sp + seq, fmt::format("stage{}", stage));
  seq_group_ = world_.split(stage * lay_.dp + replica, seq, "sequence");
  pipe_group_ = world_.split(replica * lay_.sp + seq, stage, "pipeline");
  leaders_ = world_.split(replica == 0 && seq == 0 ? 0 : 1, stage, "stage_leaders");
  // A device backend's collectives on device buffers go over NCCL (bootstrapped over the MPI
  // groups); MPI keeps the host-memory ones. The pipeline stages' messages are staged through
  // host buffers over MPI either way.
  // Without NCCL (or without a GPU for it) they are staged through host memory over MPI. In a
  // world of one they are device copies (the local world's memmove cannot reach the device).
  if (!be_.host_addressable()) {
    std::string why;
    if (world_.size() > 1)
      stage_nccl_ = make_nccl_communicator(*stage_group_, ps_.timeout_seconds, &why);
    if (!stage_nccl_) stage_nccl_ = make_staged_communicator(*stage_group_, be_);
    if (lay_.sp > 1) {
      seq_nccl_ = make_nccl_communicator(*seq_group_, ps_.timeout_seconds, &why);
      if (!seq_nccl_) seq_nccl_ = make_staged_communicator(*seq_group_, be_);
    }
  }
  Communicator& stage_dev = stage_nccl_ ? *stage_nccl_ : *stage_group_;
  if (model_.settings().sequence_path()) {
    exchange_ = std::make_unique<CommSequenceExchange>(seq_nccl_ ? *seq_nccl_ : *seq_group_, be_);
    model_.set_sequence_exchange(exchange_.get());
  }
  if (model_.settings().lora.enabled)
    opt_ = std::make_unique<ReplicatedOptimizer>(model_, be_, stage_dev, ps_.optimizer);
  else
    opt_ = std::make_unique<ZeroOptimizer>(model_, be_, *stage_group_, ps_.zero, ps_.optimizer,
                                           stage_nccl_.get());
  if (lay_.pp > 1 && model_.config().tie_word_embeddings && model_.last_stage())
    tied_copy_ = "model.embed_tokens.weight";
  if (lay_.pp > 1) {
    const size_t act = size_t(rs_.max_tokens) * size_t(model_.config().hidden_size);
    sends_.resize(size_t(std::min<int64_t>(ps_.micro_per_step, lay_.pp + 1)));
    for (auto& s : sends_) s.host.resize(act);
    recv_host_.resize(act);
    recv_device_ = static_cast<float*>(be_.alloc(act * 4));
    if (rs_.bf16_residual) {
      for (auto& s : sends_) s.host16.resize(act);
      recv_host16_.resize(act);
      if (!be_.host_addressable()) stage16_ = static_cast<uint16_t*>(be_.alloc(act * 2));
    }
  }
}

ParallelEngine::~ParallelEngine() {
  for (auto& s : sends_)
    if (s.request) s.request->wait();
  if (recv_device_) be_.free(recv_device_);
  if (stage16_) be_.free(stage16_);
  if (exchange_) model_.set_sequence_exchange(nullptr);
}

RunSettings ParallelEngine::stage_settings(int stage) const {
  RunSettings s = rs_;
  std::tie(s.layer_begin, s.layer_end) =
      stage_layers(model_.config().num_hidden_layers, lay_.pp, stage);
  return s;
}

// ---- Steps ---------------------------------------------------------------------------------

MicroBatch ParallelEngine::local(const MicroBatch& mb) const {
  const MicroBatch& m = mb.num_tokens() > 0 ? mb : empty_micro_batch();
  if (!rs_.sequence_path()) return m;
  return sequence_shard(m, lay_.sp, lay_.seq(), rs_.seq_chunk);
}

double ParallelEngine::run_micro_batches(const std::vector<MicroBatch>& micro, float scale,
                                         bool training) {
  std::vector<MicroBatch> locals;
  for (const auto& mb : micro) locals.push_back(local(mb));
  double loss = 0;
  if (lay_.pp == 1) {
    for (const auto& mb : locals)
      loss += training ? model_.forward_backward(mb, scale) : model_.forward_loss(mb);
    return loss;
  }
  pipeline_1f1b(locals, scale, training, &loss);
  return loss;
}

// One pipeline step (PipeDream-Flush's 1F1B, Narayanan et al. 2021): stage s runs
// min(S - s - 1, M) forwards, then alternates one forward and one backward, then runs the
// remaining backwards. Sends are nonblocking (a ring of staging buffers), receives blocking:
// every rank waits only for data its neighbour has already been able to compute, so the
// schedule cannot deadlock.
void ParallelEngine::pipeline_1f1b(const std::vector<MicroBatch>& locals, float scale,
                                   bool training, double* loss) {
  const int S = lay_.pp, s = lay_.stage();
  const int64_t M = int64_t(locals.size()), D = model_.config().hidden_size;
  const int64_t slots = model_.settings().micro_slots;
  auto forward = [&](int64_t i) {
    const int64_t slot = training ? i % slots : 0;
    const int64_t n = locals[i].num_tokens() * D;
    const float* in = nullptr;
    if (s > 0) {
      recv_activation(recv_device_, n, s - 1, kTagForward, rs_.bf16_residual);
      in = recv_device_;
    }
    model_.stage_forward(locals[i], slot, in, training);
    if (s < S - 1)
      send_activation(model_.stage_output(slot), n, s + 1, kTagForward, rs_.bf16_residual);
    else if (!training)
      *loss += model_.stage_loss(slot);
  };
  auto backward = [&](int64_t i) {
    const int64_t slot = i % slots;
    const int64_t n = locals[i].num_tokens() * D;
    if (s == S - 1) {
      *loss += model_.stage_loss_backward(slot, scale);
    } else {
      recv_activation(recv_device_, n, s + 1, kTagBackward, false);
      model_.stage_backward(slot, recv_device_);
    }
    if (s > 0) send_activation(model_.stage_input_grad(), n, s - 1, kTagBackward, false);
  };
  if (!training) {
    for (int64_t i = 0; i < M; ++i) forward(i);
  } else {
    const int64_t warm = std::min<int64_t>(S - s - 1, M);
    for (int64_t i = 0; i < warm; ++i) forward(i);
    for (int64_t j = 0; j + warm < M; ++j) {
      forward(j + warm);
      backward(j);
    }
    for (int64_t j = M - warm; j < M; ++j) backward(j);
  }
  finish_sends();
}

void ParallelEngine::send_activation(const float* dev, int64_t n, int dst, int tag, bool bf16) {
  Send& b = sends_[next_send_++ % sends_.size()];
  if (b.request) b.request->wait();  // its previous message has been taken
  LT_CHECK(size_t(n) <= b.host.size(), "activation of {} floats, staging for {}", n, b.host.size());
  if (!bf16) {
    be_.copy_to_host(b.host.data(), dev, size_t(n) * 4);
    b.request = pipe_group_->isend(b.host.data(), size_t(n), dst, tag);
    return;
  }
  // The stage output is bf16-rounded (bf16_residual): the conversion is exact.
  if (be_.host_addressable()) {
    be_.f32_to_bf16(b.host16.data(), dev, n);
  } else {
    be_.f32_to_bf16(stage16_, dev, n);
    be_.copy_to_host(b.host16.data(), stage16_, size_t(n) * 2);
  }
  b.request = pipe_group_->isend_bf16(b.host16.data(), size_t(n), dst, tag);
}

void ParallelEngine::recv_activation(float* dev, int64_t n, int src, int tag, bool bf16) {
  LT_CHECK(size_t(n) <= recv_host_.size());
  if (bf16) {
    pipe_group_->recv_bf16(recv_host16_.data(), size_t(n), src, tag);
    if (be_.host_addressable()) return be_.bf16_to_f32(dev, recv_host16_.data(), n);
    be_.copy_to_device(stage16_, recv_host16_.data(), size_t(n) * 2);
    return be_.bf16_to_f32(dev, stage16_, n);
  }
  if (be_.host_addressable()) return pipe_group_->recv(dev, size_t(n), src, tag);
  pipe_group_->recv(recv_host_.data(), size_t(n), src, tag);
  be_.copy_to_device(dev, recv_host_.data(), size_t(n) * 4);
}

void ParallelEngine::finish_sends() {
  for (auto& s : sends_)
    if (s.request) s.request->wait(), s.request.reset();
}

// Tied embeddings over stages: the first stage's embedding and the last stage's copy (its LM
// head) are one tensor; each adds the other's gradient, so both update identically.
void ParallelEngine::exchange_tied_gradient() {
  if (lay_.pp == 1 || !model_.config().tie_word_embeddings) return;
  if (!model_.first_stage() && !model_.last_stage()) return;
  const TrainableTensor* t = nullptr;
  for (const auto& x : model_.trainable())
    if (x.name == "model.embed_tokens.weight") t = &x;
  if (!t) return;  // frozen (LoRA without embed training): nothing to exchange
  const size_t n = size_t(t->numel);
  std::vector<float> mine(n), theirs(n);
  be_.copy_to_host(mine.data(), t->grad, n * 4);
  const int peer = model_.first_stage() ? lay_.pp - 1 : 0;
  auto req = pipe_group_->isend(mine.data(), n, peer, kTagTied);
  pipe_group_->recv(theirs.data(), n, peer, kTagTied);
  req->wait();
  for (size_t i = 0; i < n; ++i) mine[i] += theirs[i];
  be_.copy_to_device(t->grad, mine.data(), n * 4);
}

StepResult ParallelEngine::train_step(const std::vector<MicroBatch>& micro,
                                      const ScheduleSettings& schedule, int64_t step_index) {
  StepResult r;
  // Each replica's tokens counted once (by its first-stage, first-sequence rank).
  int64_t counts[2] = {0, 0};
  if (lay_.stage() == 0 && lay_.seq() == 0)
    for (const auto& mb : micro) counts[0] += mb.num_targets(), counts[1] += mb.num_tokens();
  world_.allreduce_sum(counts, 2);
  r.num_items = counts[0];
  r.tokens = counts[1];
  const float scale = r.num_items > 0 ? 1.0f / static_cast<float>(r.num_items) : 0.0f;
  opt_->zero_grads();
  double loss = run_micro_batches(micro, scale, true);
  exchange_tied_gradient();
  opt_->reduce_gradients();
  double ss = opt_->square_sum(tied_copy_);
  if (lay_.pp > 1) pipe_group_->allreduce_sum(&ss, 1);  // one rank of each stage
  r.grad_norm = std::sqrt(ss);
  r.learning_rate =
      ps_.optimizer.learning_rate *
      lr_multiplier(schedule.type, step_index, schedule.warmup_steps, schedule.total_steps);
  opt_->clip_and_update(r.grad_norm, r.learning_rate);
  world_.allreduce_sum(&loss, 1);  // the last stages' partial sums (one per sequence rank)
  r.loss = r.num_items > 0 ? loss / static_cast<double>(r.num_items) : 0.0;
  return r;
}

std::pair<double, int64_t> ParallelEngine::eval_loss(const std::vector<MicroBatch>& micro) {
  int64_t items = 0;
  if (lay_.stage() == 0 && lay_.seq() == 0)
    for (const auto& mb : micro) items += mb.num_targets();
  world_.allreduce_sum(&items, 1);
  double loss = run_micro_batches(micro, 0.0f, false);
  world_.allreduce_sum(&loss, 1);
  return {loss, items};
}

// ---- Weights and optimizer state in one-process layouts -------------------------------------

std::vector<std::vector<float>> ParallelEngine::gather_to_root(const std::vector<float>& mine,
                                                               int per_value) {
  std::vector<std::vector<float>> out;
  if (lay_.replica() != 0 || lay_.seq() != 0) return out;
  Communicator& g = *leaders_;  // rank = stage
  if (g.rank() != 0) {
    send_all(g, mine.data(), mine.size(), 0, kTagGather);
    return out;
  }
  out.resize(size_t(lay_.pp));
  out[0] = mine;
  for (int s = 1; s < lay_.pp; ++s) {
    // Each stage's size follows from its settings.
    const RunSettings st = stage_settings(s);
    size_t n = 0;
    if (rs_.lora.enabled) {
      int64_t total = 0;
      entries(LlamaModel::trainable_layout(model_.config(), st), &total);
      n = size_t(total);
    } else {
      n = size_t(LlamaModel::param_table(model_.config(), st).total_numel());
    }
    out[s].resize(n * size_t(per_value));
    recv_all(g, out[s].data(), out[s].size(), s, kTagGather);
  }
  return out;
}

int64_t ParallelEngine::moments_size() const {
  RunSettings whole = rs_;
  whole.layer_begin = 0;
  whole.layer_end = -1;
  whole.external_params = false;
  if (rs_.lora.enabled) return LlamaModel::trainable_numel(model_.config(), whole);
  return ParamTable(model_.config()).total_numel();
}

int64_t ParallelEngine::steps_done() const { return opt_->steps(); }

void ParallelEngine::load_params(const float* full) {
  LT_CHECK(!rs_.lora.enabled);
  const ParamTable whole(model_.config());
  const ParamTable& mine = model_.table();
  std::vector<float> block(size_t(mine.total_numel()));
  copy_by_name(block.data(), entries(mine), full, entries(whole));
  static_cast<ZeroOptimizer&>(*opt_).zero.load_full(block.data());
}

void ParallelEngine::gather_params(float* full) {
  LT_CHECK(!rs_.lora.enabled);
  const ParamTable& mine = model_.table();
  std::vector<float> block(size_t(mine.total_numel()));
  static_cast<ZeroOptimizer&>(*opt_).zero.gather_full(block.data());  // over the stage group
  const auto stages = gather_to_root(block, 1);
  if (world_.rank() != 0) return;
  const ParamTable whole(model_.config());
  // Later stages first, so that a tied embedding comes from the first stage's copy.
  for (int s = lay_.pp - 1; s >= 0; --s)
    copy_by_name(full, entries(whole), stages[s].data(),
                 entries(LlamaModel::param_table(model_.config(), stage_settings(s))));
}

void ParallelEngine::load_trainable(const NamedTensors& t) {
  LT_CHECK(rs_.lora.enabled);
  for (const auto& x : model_.trainable()) {
    auto it = t.find(x.name);
    LT_CHECK(it != t.end() && int64_t(it->second.size()) == x.numel, "trainable tensor {}", x.name);
    be_.copy_to_device(x.param, it->second.data(), size_t(x.numel) * 4);
  }
}

NamedTensors ParallelEngine::gather_trainable() {
  LT_CHECK(rs_.lora.enabled);
  int64_t total = 0;
  const auto mine_e = entries(model_.trainable(), &total);
  std::vector<float> block(static_cast<size_t>(total));
  for (size_t i = 0; i < mine_e.size(); ++i)
    be_.copy_to_host(block.data() + mine_e[i].offset, model_.trainable()[i].param,
                     size_t(mine_e[i].numel) * 4);
  const auto stages = gather_to_root(block, 1);
  NamedTensors out;
  if (world_.rank() != 0) return out;
  for (int s = lay_.pp - 1; s >= 0; --s) {
    int64_t t = 0;
    for (const auto& e :
         entries(LlamaModel::trainable_layout(model_.config(), stage_settings(s)), &t))
      out[e.name].assign(stages[s].begin() + e.offset, stages[s].begin() + e.offset + e.numel);
  }
  return out;
}

// The one-process moment layout: exp_avg (size) then exp_avg_sq (size); this rank's optimizer
// holds its stage's tensors in its own layout.
void ParallelEngine::load_moments(const float* full, int64_t optimizer_step) {
  const int64_t F = moments_size();
  RunSettings whole = rs_;
  whole.layer_begin = 0, whole.layer_end = -1, whole.external_params = false;
  if (rs_.lora.enabled) {
    auto& r = static_cast<ReplicatedOptimizer&>(*opt_);
    int64_t t = 0, tw = 0;
    const auto mine = entries(model_.trainable(), &t);
    const auto all = entries(LlamaModel::trainable_layout(model_.config(), whole), &tw);
    LT_CHECK(tw == F);
    std::vector<float> host(size_t(2 * t));
    for (int k = 0; k < 2; ++k) copy_by_name(host.data() + k * t, mine, full + k * F, all);
    be_.copy_to_device(r.adam.moments(), host.data(), host.size() * 4);
  } else {
    auto& z = static_cast<ZeroOptimizer&>(*opt_).zero;
    const int64_t P = model_.table().total_numel();
    std::vector<float> block(size_t(2 * P));
    for (int k = 0; k < 2; ++k)
      copy_by_name(block.data() + k * P, entries(model_.table()), full + k * F,
                   entries(ParamTable(model_.config())));
    z.load_moments(block.data());
  }
  opt_->set_steps(optimizer_step);
}

int64_t ParallelEngine::gather_moments(float* full) {
  const int64_t F = moments_size();
  RunSettings whole = rs_;
  whole.layer_begin = 0, whole.layer_end = -1, whole.external_params = false;
  std::vector<float> block;
  int64_t mine_total = 0;
  if (rs_.lora.enabled) {
    auto& r = static_cast<ReplicatedOptimizer&>(*opt_);
    block.resize(size_t(r.adam.moments_count()));
    be_.copy_to_host(block.data(), r.adam.moments(), block.size() * 4);
    mine_total = r.adam.moments_count() / 2;
  } else {
    auto& z = static_cast<ZeroOptimizer&>(*opt_).zero;
    mine_total = model_.table().total_numel();
    block.resize(size_t(2 * mine_total));
    z.gather_moments(block.data());  // over the stage group
  }
  const auto stages = gather_to_root(block, 2);
  if (world_.rank() != 0) return opt_->steps();
  int64_t tw = 0;
  const auto all = rs_.lora.enabled
                       ? entries(LlamaModel::trainable_layout(model_.config(), whole), &tw)
                       : entries(ParamTable(model_.config()));
  for (int s = lay_.pp - 1; s >= 0; --s) {
    const RunSettings st = stage_settings(s);
    int64_t T = 0;
    const auto se = rs_.lora.enabled
                        ? entries(LlamaModel::trainable_layout(model_.config(), st), &T)
                        : entries(LlamaModel::param_table(model_.config(), st));
    if (!rs_.lora.enabled) T = LlamaModel::param_table(model_.config(), st).total_numel();
    for (int k = 0; k < 2; ++k) copy_by_name(full + k * F, all, stages[s].data() + k * T, se);
  }
  return opt_->steps();
}

CommStats ParallelEngine::stats() const {
  CommStats s = world_.stats();
  for (const auto* g : {stage_group_.get(), seq_group_.get(), pipe_group_.get(), leaders_.get(),
                        stage_nccl_.get(), seq_nccl_.get()})
    if (g) add_stats(&s, g->stats());
  return s;
}

std::string_view ParallelEngine::device_collectives() const {
  return stage_nccl_ ? stage_nccl_->backend() : stage_group_->backend();
}

void ParallelEngine::reset_stats() {
  world_.reset_stats();
  for (auto* g : {stage_group_.get(), seq_group_.get(), pipe_group_.get(), leaders_.get(),
                  stage_nccl_.get(), seq_nccl_.get()})
    if (g) g->reset_stats();
}

}  // namespace lt
