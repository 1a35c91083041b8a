// AdamW with HF Trainer parameter groups and torch-style global-norm clipping.
#include "train/optimizer.h"

#include <cmath>

#include "backend/arena.h"
#include "core/check.h"

namespace lt {

AdamW::AdamW(const ParamTable& table, Backend& backend, const OptimizerSettings& s)
    : be_(backend), s_(s) {
  for (const auto& p : table.params())
    entries_.push_back({p.offset, p.numel, p.decay, nullptr, nullptr, p.name});
  total_ = table.total_numel();
  allocate();
}

AdamW::AdamW(const std::vector<TrainableTensor>& set, Backend& backend, const OptimizerSettings& s)
    : be_(backend), s_(s) {
  const std::vector<int64_t> at = set_offsets(set, &total_);
  for (size_t i = 0; i < set.size(); ++i) {
    const auto& t = set[i];
    LT_CHECK(t.param && t.grad, "trainable tensor {} without param or grad", t.name);
    entries_.push_back({at[i], t.numel, t.decay, t.param, t.grad, t.name});
  }
  allocate();
}

std::vector<int64_t> AdamW::set_offsets(const std::vector<TrainableTensor>& set, int64_t* total) {
  std::vector<int64_t> at;
  int64_t n = 0;
  for (const auto& t : set) {
    at.push_back(n);
    n += static_cast<int64_t>(align_up(size_t(t.numel) * 4) / 4);
  }
  if (total) *total = n;
  return at;
}

void AdamW::allocate() {
  MemoryPlan plan;
  AdamW::plan(total_, &plan);
  arena_ = make_backend_arena(be_, "optimizer", plan.arena_bytes("optimizer"));
  m_ = arena_.take<float>("adamw.exp_avg", total_);
  v_ = arena_.take<float>("adamw.exp_avg_sq", total_);
  be_.memset_zero(m_, total_ * 4);
  be_.memset_zero(v_, total_ * 4);
}

void AdamW::plan(const ParamTable& table, MemoryPlan* plan) {
  AdamW::plan(table.total_numel(), plan);
}

void AdamW::plan(int64_t numel, MemoryPlan* plan) {
  plan->add("adamw.exp_avg", size_t(numel) * 4, MemCategory::kOptimizer, "optimizer");
  plan->add("adamw.exp_avg_sq", size_t(numel) * 4, MemCategory::kOptimizer, "optimizer");
}

float* AdamW::grad_of(const Entry& e, float* grads) const {
  LT_CHECK(e.grad || grads, "AdamW over a table needs the gradient block");
  return e.grad ? e.grad : grads + e.offset;
}

double AdamW::square_sum(float* grads, const std::string& excluded) {
  std::vector<Backend::SquaresPart> parts;
  for (const auto& e : entries_)
    if (e.name != excluded) parts.push_back({grad_of(e, grads), e.numel});
  return be_.sum_squares_many(parts);  // one read-back for every tensor
}

void AdamW::clip_to(float* grads, double norm) {
  if (s_.max_grad_norm <= 0) return;
  // torch: clip_coef = max_norm / (total_norm + 1e-6), clamped to 1.0 (computed in f32).
  const float coef = static_cast<float>(s_.max_grad_norm) / (static_cast<float>(norm) + 1e-6f);
  if (coef < 1.0f)
    for (const auto& e : entries_) be_.scale_inplace(grad_of(e, grads), e.numel, coef);
}

double AdamW::clip(float* grads) {
  const double norm = std::sqrt(square_sum(grads));
  clip_to(grads, norm);
  return norm;
}

void AdamW::update(float* params, const float* grads, double lr) {
  ++step_;
  for (const auto& p : entries_) {
    LT_CHECK(p.param || (params && grads), "AdamW over a table needs the parameter blocks");
    AdamWParams a;
    a.lr = static_cast<float>(lr);
    a.beta1 = static_cast<float>(s_.beta1);
    a.beta2 = static_cast<float>(s_.beta2);
    a.eps = static_cast<float>(s_.eps);
    a.weight_decay = p.decay ? static_cast<float>(s_.weight_decay) : 0.0f;
    a.step = step_;
    be_.adamw_update(p.param ? p.param : params + p.offset, p.grad ? p.grad : grads + p.offset,
                     m_ + p.offset, v_ + p.offset, p.numel, a);
  }
}

}  // namespace lt
