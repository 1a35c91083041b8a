// ZeRO stages 0-3 and ZeRO-Offload over flat ranges of the parameter block (see zero.h).
#include "dist/zero.h"

#include <fmt/format.h>

#include <cmath>
#include <cstring>

#include "backend/arena.h"
#include "core/check.h"

namespace lt {

ShardLayout::ShardLayout(int64_t total_floats, int world_size)
    : total(total_floats), world(world_size) {
  LT_CHECK(world_size >= 1 && total_floats >= 0);
  shard = (total + world - 1) / world;
  shard = (shard + 15) / 16 * 16;  // every shard starts 64-byte aligned
}

std::vector<int64_t> ShardLayout::counts(int64_t b, int64_t e) const {
  std::vector<int64_t> c(world);
  for (int r = 0; r < world; ++r)
    c[r] = std::max<int64_t>(0, std::min(e, end(r)) - std::max(b, begin(r)));
  return c;
}

namespace {

// Where the decoder layers of the table sit in its block: layer i of them is [b[i], b[i+1]);
// [0, b[0]) holds the embedding and [b.back(), P) the final norm and the LM head (ParamTable's
// order; a pipeline stage's table holds a range of layers and may lack either end).
std::vector<int64_t> layer_extents(const ParamTable& t) {
  std::vector<int64_t> b;
  int64_t last = -1;
  for (const auto& p : t.params()) {
    if (p.name.rfind("model.layers.", 0) != 0) continue;
    const int64_t l = std::strtoll(p.name.c_str() + 13, nullptr, 10);
    if (l != last) b.push_back(p.offset);
    LT_CHECK(l >= last, "layers out of order at {}", p.name);
    last = l;
  }
  const ParamInfo* norm = t.find("model.norm.weight");
  b.push_back(norm ? norm->offset : t.total_numel());
  if (b.size() == 1) b.insert(b.begin(), b.front());
  return b;
}

int64_t max_layer(const std::vector<int64_t>& b) {
  int64_t m = 0;
  for (size_t i = 0; i + 1 < b.size(); ++i) m = std::max(m, b[i + 1] - b[i]);
  return m;
}

class PlanTaker final : public BufferBinder {
 public:
  explicit PlanTaker(MemoryPlan* plan) : plan_(plan) {}
  float* take(const std::string& name, size_t count, MemCategory c,
              const std::string& arena) override {
    if (count) plan_->add(name, count * sizeof(float), c, arena);
    return nullptr;
  }

 private:
  MemoryPlan* plan_;
};

class ArenaTaker final : public BufferBinder {
 public:
  explicit ArenaTaker(std::map<std::string, Arena>* arenas) : arenas_(arenas) {}
  float* take(const std::string& name, size_t count, MemCategory,
              const std::string& arena) override {
    if (!count) return nullptr;
    auto it = arenas_->find(arena);
    LT_CHECK(it != arenas_->end(), "arena '{}' was not planned (buffer '{}')", arena, name);
    return it->second.take<float>(name, count);
  }

 private:
  std::map<std::string, Arena>* arenas_;
};

}  // namespace

// This rank's buffers. Device memory unless the arena is "*_host" (the same memory on CPU runs).
struct ZeroEngine::Buffers {
  float* full_params = nullptr;      // stage 2: (P) every parameter
  float* param_shard = nullptr;      // stage 3: (S) this rank's parameters
  float* grad_shard = nullptr;       // stages 2, 3: (S) this rank's gradients, summed over ranks
  float* outer_params = nullptr;     // stage 3: (head + P - tail) gathered embedding / norm / head
  float* layer_params[2] = {};       // stage 3: (max layer) two gathered layers (use + prefetch)
  float* outer_grads = nullptr;      // stages 2, 3: (head + P - tail) this rank's local gradients
  float* layer_grads = nullptr;      // stages 2, 3: (max layer) one layer's local gradients
  float* scratch = nullptr;          // stages 1-3: reduce-scatter receive buffer
  float *m = nullptr, *v = nullptr;  // (S) AdamW moments ((P) at stage 0)
  float* master = nullptr;           // offload: (S) f32 master weights, host
  float* host_grads = nullptr;       // offload: (S) gradients copied to the host for the update
};

void ZeroEngine::declare(const ParamTable& table, const ZeroSettings& z, const ShardLayout& layout,
                         int rank, BufferBinder& b, Buffers* out) {
  const int64_t P = table.total_numel();
  const auto ext = layer_extents(table);
  const int64_t outer = ext.front() + (P - ext.back()), layer = max_layer(ext);
  const int64_t S = z.stage == 0 ? P : layout.end(rank) - layout.begin(rank);
  const MemCategory W = MemCategory::kWeights, G = MemCategory::kGradients;
  const MemCategory O = MemCategory::kOptimizer;
  if (z.stage == 2) out->full_params = b.take("zero.params", P, W, "weights");
  if (z.stage == 3 && !z.offload_params)
    out->param_shard = b.take("zero.param_shard", S, W, "weights");
  if (z.stage >= 2) out->grad_shard = b.take("zero.grad_shard", S, G, "grads");
  if (z.stage == 3) {
    out->outer_params = b.take("zero.gathered.outer", outer, W, "weights_gathered");
    out->layer_params[0] = b.take("zero.gathered.layer0", layer, W, "weights_gathered");
    out->layer_params[1] = b.take("zero.gathered.layer1", layer, W, "weights_gathered");
  }
  if (z.stage >= 2) {
    out->outer_grads = b.take("zero.local_grads.outer", outer, G, "grads_local");
    out->layer_grads = b.take("zero.local_grads.layer", layer, G, "grads_local");
  }
  if (z.stage == 1)
    out->scratch = b.take("zero.rs_scratch", std::min(z.reduce_bucket_size, S), G, "grads_local");
  if (z.stage >= 2)
    out->scratch = b.take("zero.rs_scratch", std::min(std::max(outer, layer), S), G, "grads_local");
  // With a host master (either offload) the update runs on the host: moments there too.
  const std::string opt_arena =
      z.offload_optimizer || z.offload_params ? "optimizer_host" : "optimizer";
  out->m = b.take("zero.exp_avg", S, O, opt_arena);
  out->v = b.take("zero.exp_avg_sq", S, O, opt_arena);
  if (z.offload_optimizer || z.offload_params) {
    out->master = b.take("zero.master", S, z.stage == 3 && z.offload_params ? W : O, opt_arena);
    out->host_grads = b.take("zero.host_grads", S, O, opt_arena);
  }
}

void ZeroEngine::adjust_run_settings(const ZeroSettings& z, RunSettings* rs) {
  rs->external_params = z.stage >= 2;
}

void ZeroEngine::plan(const ModelConfig& c, const ZeroSettings& z, int world, int rank,
                      MemoryPlan* plan) {
  ZeroEngine::plan(ParamTable(c), z, world, rank, plan);
}

void ZeroEngine::plan(const ParamTable& table, const ZeroSettings& z, int world, int rank,
                      MemoryPlan* plan) {
  PlanTaker taker(plan);
  Buffers sizes;
  declare(table, z, ShardLayout(table.total_numel(), world), rank, taker, &sizes);
}

ZeroEngine::ZeroEngine(LlamaModel& model, Backend& backend, Communicator& dp, const ZeroSettings& z,
                       const OptimizerSettings& opt, Communicator* device_dp)
    : model_(model),
      be_(backend),
      dp_(dp),
      dev_(device_dp ? *device_dp : dp),
      z_(z),
      opt_(opt),
      table_(model.table()),
      layout_(model.table().total_numel(), dp.size()) {
  LT_CHECK(z_.stage >= 0 && z_.stage <= 3, "ZeRO stage {}", z_.stage);
  LT_CHECK(model_.settings().external_params == (z_.stage >= 2),
           "the model's settings were not adjusted for ZeRO stage {}", z_.stage);
  LT_CHECK(z_.reduce_bucket_size > 0 && z_.allgather_bucket_size > 0);
  const int64_t P = table_.total_numel();
  lo_ = z_.stage == 0 ? 0 : layout_.begin(dp_.rank());
  hi_ = z_.stage == 0 ? P : layout_.end(dp_.rank());
  LT_CHECK(z_.stage <= 1 || (model_.first_stage() && model_.last_stage()),
           "ZeRO stage {} on a pipeline stage (stages 0 and 1 only)", z_.stage);
  layer_begin_ = layer_extents(table_);
  LT_CHECK(int64_t(layer_begin_.size()) == model_.layer_end() - model_.layer_begin() + 1);
  outer_head_ = layer_begin_.front();
  outer_tail_ = layer_begin_.back();

  MemoryPlan plan;
  declare_sizes(&plan);
  for (const auto& name : plan.arena_names())
    arenas_.emplace(name, make_backend_arena(be_, name, plan.arena_bytes(name)));
  buf_ = std::make_unique<Buffers>();
  ArenaTaker taker(&arenas_);
  declare(table_, z_, layout_, dp_.rank(), taker, buf_.get());
  const size_t S = static_cast<size_t>(hi_ - lo_);
  // ZeRO-Offload's moments are host memory (pinned on a GPU, where cudaMemset refuses it).
  for (float* moment : {buf_->m, buf_->v}) {
    if (optimizer_on_host())
      std::memset(moment, 0, S * 4);
    else
      be_.memset_zero(moment, S * 4);
  }
  if (buf_->full_params) full_views_ = table_.bind(buf_->full_params);
  if (z_.stage >= 2) model_.set_weights_provider(this);
}

ZeroEngine::~ZeroEngine() {
  for (auto& p : pending_)
    if (p) p->wait();
  if (z_.stage >= 2) model_.set_weights_provider(nullptr);
}

void ZeroEngine::declare_sizes(MemoryPlan* plan) const {
  PlanTaker taker(plan);
  Buffers sizes;
  declare(table_, z_, layout_, dp_.rank(), taker, &sizes);
}

size_t ZeroEngine::bytes(MemCategory c) const {
  MemoryPlan plan;
  declare_sizes(&plan);
  LlamaModel::plan(model_.config(), model_.settings(), &plan);
  return plan.category_bytes(c);
}

float* ZeroEngine::shard_params() {
  switch (z_.stage) {
    case 0:
    case 1:
      return model_.params() + lo_;
    case 2:
      return buf_->full_params + lo_;
    default:
      return buf_->param_shard ? buf_->param_shard : buf_->master;
  }
}

float* ZeroEngine::shard_grads() { return z_.stage <= 1 ? model_.grads() + lo_ : buf_->grad_shard; }

void ZeroEngine::load_full(const float* full) {
  const int64_t P = table_.total_numel();
  switch (z_.stage) {
    case 0:
    case 1:
      be_.copy_to_device(model_.params(), full, P * 4);
      break;
    case 2:
      be_.copy_to_device(buf_->full_params, full, P * 4);
      break;
    default:
      if (buf_->param_shard) be_.copy_to_device(buf_->param_shard, full + lo_, (hi_ - lo_) * 4);
  }
  if (buf_->master) std::memcpy(buf_->master, full + lo_, (hi_ - lo_) * 4);
  invalidate_gathered();
}

void ZeroEngine::gather_full(float* out) {
  const int64_t P = table_.total_numel();
  if (z_.stage <= 2) {
    be_.copy_to_host(out, z_.stage == 2 ? buf_->full_params : model_.params(), P * 4);
    return;
  }
  std::vector<float> mine(hi_ - lo_);
  if (shard_in_host_memory())
    std::memcpy(mine.data(), shard_params(), mine.size() * 4);
  else
    be_.copy_to_host(mine.data(), shard_params(), mine.size() * 4);
  std::memcpy(out + lo_, mine.data(), mine.size() * 4);
  for (int64_t b = 0; b < P; b += z_.allgather_bucket_size) {
    const int64_t e = std::min(P, b + z_.allgather_bucket_size);
    dp_.allgather(out + b, nullptr, layout_.counts(b, e));
  }
}

void ZeroEngine::gather_moments(float* moments) {
  const int64_t P = table_.total_numel(), S = hi_ - lo_;
  const float* mine[2] = {buf_->m, buf_->v};
  for (int k = 0; k < 2; ++k) {
    float* out = moments + k * P;
    // ZeRO-Offload keeps the moments in host memory; otherwise they are device buffers.
    if (optimizer_on_host())
      std::memcpy(out + lo_, mine[k], S * 4);
    else
      be_.copy_to_host(out + lo_, mine[k], S * 4);
    if (z_.stage == 0) continue;  // every rank holds every moment
    for (int64_t b = 0; b < P; b += z_.allgather_bucket_size) {
      const int64_t e = std::min(P, b + z_.allgather_bucket_size);
      dp_.allgather(out + b, nullptr, layout_.counts(b, e));
    }
  }
}

void ZeroEngine::load_moments(const float* moments) {
  const int64_t P = table_.total_numel(), S = hi_ - lo_;
  float* mine[2] = {buf_->m, buf_->v};
  for (int k = 0; k < 2; ++k) {
    const float* in = moments + k * P + lo_;
    if (optimizer_on_host())
      std::memcpy(mine[k], in, S * 4);
    else
      be_.copy_to_device(mine[k], in, S * 4);
  }
}

// ---- Gathering and reducing ranges of the block -------------------------------------------

bool ZeroEngine::optimizer_on_host() const {
  return buf_->master != nullptr;  // either offload: master, moments and the update on the host
}

bool ZeroEngine::shard_in_host_memory() const {
  return z_.stage == 3 && !buf_->param_shard;  // offload_params: the shard is the host master
}

// This rank's part of [b, e) for an allgather into dst: its shard, or, when that is host memory,
// null after copying the part into place on the device (the collectives take device buffers).
const float* ZeroEngine::gather_source(int64_t b, int64_t e, float* dst) {
  const auto counts = layout_.counts(b, e);
  const int64_t own = counts[dp_.rank()];
  const float* src = own > 0 ? shard_params() + (std::max(b, lo_) - lo_) : shard_params();
  if (!shard_in_host_memory()) return src;
  int64_t at = 0;
  for (int r = 0; r < dp_.rank(); ++r) at += counts[r];
  if (own > 0) be_.copy_to_device(dst + at, src, size_t(own) * 4);
  return nullptr;
}

void ZeroEngine::gather_range(int64_t b, int64_t e, float* dst) {
  dev_.allgather(dst, gather_source(b, e, dst), layout_.counts(b, e));
}

void ZeroEngine::reduce_scatter_add(int64_t b, int64_t e, const float* src) {
  if (e <= b) return;
  const auto counts = layout_.counts(b, e);
  dev_.reduce_scatter_sum(buf_->scratch, src, counts);
  const int64_t own = counts[dp_.rank()];
  if (own > 0) be_.add_inplace(buf_->grad_shard + (std::max(b, lo_) - lo_), buf_->scratch, own);
}

// Stages 0 and 1: the model's full gradient block, summed over ranks in buckets (stage 0: every
// rank gets every sum; stage 1: each rank only the sums of its shard, written in place).
void ZeroEngine::reduce_full_grads() {
  const int64_t P = table_.total_numel();
  float* g = model_.grads();
  for (int64_t b = 0; b < P; b += z_.reduce_bucket_size) {
    const int64_t e = std::min(P, b + z_.reduce_bucket_size);
    if (z_.stage == 0) {
      dev_.allreduce_sum(g + b, e - b);
      continue;
    }
    const auto counts = layout_.counts(b, e);
    dev_.reduce_scatter_sum(buf_->scratch, g + b, counts);
    const int64_t own = counts[dp_.rank()];
    if (own > 0) be_.copy_device(g + std::max(b, lo_), buf_->scratch, size_t(own) * 4);
  }
}

void ZeroEngine::allgather_full_params() {
  const int64_t P = table_.total_numel();
  float* p = z_.stage == 2 ? buf_->full_params : model_.params();
  for (int64_t b = 0; b < P; b += z_.allgather_bucket_size) {
    const int64_t e = std::min(P, b + z_.allgather_bucket_size);
    dev_.allgather(p + b, nullptr, layout_.counts(b, e));
  }
}

void ZeroEngine::invalidate_gathered() {
  for (int i = 0; i < 2; ++i) {
    if (pending_[i]) pending_[i]->wait();
    pending_[i].reset();
    slot_unit_[i] = -1;
  }
  outer_valid_ = false;
}

// ---- LayerWeightsProvider -----------------------------------------------------------------

void ZeroEngine::acquire(int64_t unit, Pass pass, ModelWeights* w, ModelWeights* g) {
  const int64_t P = table_.total_numel(), L = model_.config().num_hidden_layers;
  const int64_t head = outer_head_, tail = outer_tail_;
  if (unit == kOuter) {
    // Parameters: the embedding [0, head) then the final norm / LM head [tail, P).
    ModelWeights a, b;
    if (z_.stage == 3) {
      if (!outer_valid_) {
        gather_range(0, head, buf_->outer_params);
        gather_range(tail, P, buf_->outer_params + head);
        outer_valid_ = true;
      }
      a = table_.bind_at(buf_->outer_params, 0);
      b = table_.bind_at(buf_->outer_params + head, tail);
    } else {
      a = b = full_views_;
    }
    w->embed = a.embed;
    w->final_norm = b.final_norm;
    w->lm_head = model_.config().tie_word_embeddings ? a.embed : b.lm_head;
    if (g) {
      be_.memset_zero(buf_->outer_grads, (head + P - tail) * 4);
      const ModelWeights ga = table_.bind_at(buf_->outer_grads, 0);
      const ModelWeights gb = table_.bind_at(buf_->outer_grads + head, tail);
      g->embed = ga.embed;
      g->final_norm = gb.final_norm;
      g->lm_head = model_.config().tie_word_embeddings ? ga.embed : gb.lm_head;
    }
    return;
  }
  LT_CHECK(unit >= 0 && unit < L);
  const int64_t b = layer_begin_[unit];
  if (z_.stage == 3) {
    const int s = static_cast<int>(unit % 2);
    if (slot_unit_[s] != unit) {
      if (pending_[s]) pending_[s]->wait();
      pending_[s].reset();
      gather_range(b, layer_begin_[unit + 1], buf_->layer_params[s]);
      slot_unit_[s] = unit;
    } else if (pending_[s]) {
      pending_[s]->wait();
      pending_[s].reset();
    }
    w->layers[unit] = table_.bind_at(buf_->layer_params[s], b).layers[unit];
    // Prefetch the layer that runs next into the other slot (its previous layer is done).
    const int64_t next = pass == Pass::kForward ? unit + 1 : unit - 1;
    if (z_.prefetch && next >= 0 && next < L && slot_unit_[1 - s] != next) {
      if (pending_[1 - s]) pending_[1 - s]->wait();
      const int64_t nb = layer_begin_[next], ne = layer_begin_[next + 1];
      float* slot = buf_->layer_params[1 - s];
      pending_[1 - s] =
          dev_.allgather_async(slot, gather_source(nb, ne, slot), layout_.counts(nb, ne));
      slot_unit_[1 - s] = next;
    }
  } else {
    w->layers[unit] = full_views_.layers[unit];
  }
  if (g) {
    be_.memset_zero(buf_->layer_grads, (layer_begin_[unit + 1] - b) * 4);
    g->layers[unit] = table_.bind_at(buf_->layer_grads, b).layers[unit];
  }
}

void ZeroEngine::release(int64_t unit, Pass pass) {
  if (pass != Pass::kBackward) return;  // gathered parameters stay in their slot until reused
  // This micro-batch's gradients of the unit are complete: each rank adds the sum over ranks
  // of its own part to its gradient shard.
  if (unit == kOuter) {
    const int64_t P = table_.total_numel();
    reduce_scatter_add(0, outer_head_, buf_->outer_grads);
    reduce_scatter_add(outer_tail_, P, buf_->outer_grads + outer_head_);
    return;
  }
  reduce_scatter_add(layer_begin_[unit], layer_begin_[unit + 1], buf_->layer_grads);
}

// ---- The step -----------------------------------------------------------------------------

void ZeroEngine::update_shard(double lr) {
  ++step_;
  float* params = shard_params();
  float* grads = shard_grads();
  const size_t S = static_cast<size_t>(hi_ - lo_);
  const bool host = optimizer_on_host();
  if (host) be_.copy_to_host(buf_->host_grads, grads, S * 4);
  for (const auto& p : table_.params()) {
    const int64_t b = std::max(p.offset, lo_), e = std::min(p.offset + p.numel, hi_);
    if (e <= b) continue;
    AdamWParams a;
    a.lr = static_cast<float>(lr);
    a.beta1 = static_cast<float>(opt_.beta1);
    a.beta2 = static_cast<float>(opt_.beta2);
    a.eps = static_cast<float>(opt_.eps);
    a.weight_decay = p.decay ? static_cast<float>(opt_.weight_decay) : 0.0f;
    a.step = step_;
    const int64_t at = b - lo_;
    if (host)  // ZeRO-Offload: the vectorized CPU AdamW on the host master weights
      adamw_update(buf_->master + at, buf_->host_grads + at, buf_->m + at, buf_->v + at, e - b, a);
    else
      be_.adamw_update(params + at, grads + at, buf_->m + at, buf_->v + at, e - b, a);
  }
  if (host && params != buf_->master) be_.copy_to_device(params, buf_->master, S * 4);
}

void ZeroEngine::zero_grads() {
  if (z_.stage <= 1)
    be_.memset_zero(model_.grads(), table_.total_numel() * 4);
  else
    be_.memset_zero(buf_->grad_shard, (hi_ - lo_) * 4);
}

void ZeroEngine::reduce_gradients() {
  if (z_.stage <= 1) reduce_full_grads();
}

double ZeroEngine::square_sum(const std::string& excluded) {
  // Global-norm clipping as torch.nn.utils.clip_grad_norm_: squares of this rank's part, summed
  // over the ranks (stage 0: every rank holds every gradient, no sum needed).
  float* grads = shard_grads();
  std::vector<Backend::SquaresPart> parts;
  for (const auto& p : table_.params()) {
    if (p.name == excluded) continue;
    const int64_t b = std::max(p.offset, lo_), e = std::min(p.offset + p.numel, hi_);
    if (e > b) parts.push_back({grads + (b - lo_), e - b});
  }
  double ss = be_.sum_squares_many(parts);
  if (z_.stage >= 1) dp_.allreduce_sum(&ss, 1);
  return ss;
}

void ZeroEngine::clip_and_update(double grad_norm, double lr) {
  float* grads = shard_grads();
  if (opt_.max_grad_norm > 0) {
    const float coef =
        static_cast<float>(opt_.max_grad_norm) / (static_cast<float>(grad_norm) + 1e-6f);
    if (coef < 1.0f)
      for (const auto& p : table_.params()) {
        const int64_t b = std::max(p.offset, lo_), e = std::min(p.offset + p.numel, hi_);
        if (e > b) be_.scale_inplace(grads + (b - lo_), e - b, coef);
      }
  }
  update_shard(lr);
  if (z_.stage == 1 || z_.stage == 2) allgather_full_params();
  if (z_.stage == 3) invalidate_gathered();
}

StepResult ZeroEngine::train_step(const std::vector<MicroBatch>& micro,
                                  const ScheduleSettings& schedule, int64_t step_index) {
  StepResult r;
  int64_t counts[2] = {0, 0};
  for (const auto& mb : micro) {
    counts[0] += mb.num_targets();
    counts[1] += mb.num_tokens();
  }
  dp_.allreduce_sum(counts, 2);
  r.num_items = counts[0];
  r.tokens = counts[1];
  // HF Trainer with num_items_in_batch gathered over devices: every rank scales by 1 / the
  // labelled tokens of the whole step on all ranks, and the sums over ranks add up.
  const float scale = r.num_items > 0 ? 1.0f / static_cast<float>(r.num_items) : 0.0f;
  zero_grads();
  // A rank whose share of a micro-batch is empty still runs (stages 2/3 communicate per layer):
  // one token without a label contributes nothing.
  double loss_sum = 0;
  for (const auto& mb : micro)
    loss_sum += model_.forward_backward(mb.num_tokens() > 0 ? mb : empty_micro_batch(), scale);
  dp_.allreduce_sum(&loss_sum, 1);
  r.loss = r.num_items > 0 ? loss_sum / static_cast<double>(r.num_items) : 0.0;
  reduce_gradients();
  r.grad_norm = std::sqrt(square_sum());
  r.learning_rate = opt_.learning_rate * lr_multiplier(schedule.type, step_index,
                                                       schedule.warmup_steps, schedule.total_steps);
  clip_and_update(r.grad_norm, r.learning_rate);
  return r;
}

const MicroBatch& empty_micro_batch() {
  static const MicroBatch empty = [] {
    MicroBatch e;
    e.ids = {0};
    e.pos = {0};
    e.docs = {0};
    e.targets = {kIgnoreIndex};
    e.row_start = {0, 1};
    return e;
  }();
  return empty;
}

}  // namespace lt
