// AdamW with HF Trainer parameter groups and torch-style global-norm clipping.
#include "train/optimizer.h"

#include <cmath>

namespace lt {

AdamW::AdamW(const ParamTable& table, Backend& backend, const OptimizerSettings& s)
    : table_(table), be_(backend), s_(s) {
  MemoryPlan plan;
  AdamW::plan(table, &plan);
  arena_ = Arena("optimizer", plan.arena_bytes("optimizer"));
  m_ = arena_.take<float>("adamw.exp_avg", table.total_numel());
  v_ = arena_.take<float>("adamw.exp_avg_sq", table.total_numel());
  be_.memset_zero(m_, table.total_numel() * 4);
  be_.memset_zero(v_, table.total_numel() * 4);
}

void AdamW::plan(const ParamTable& table, MemoryPlan* plan) {
  plan->add("adamw.exp_avg", table.total_numel() * 4, MemCategory::kOptimizer, "optimizer");
  plan->add("adamw.exp_avg_sq", table.total_numel() * 4, MemCategory::kOptimizer, "optimizer");
}

double AdamW::clip(float* grads) {
  double ss = 0;
  for (const auto& p : table_.params()) ss += be_.sum_squares(grads + p.offset, p.numel);
  const double norm = std::sqrt(ss);
  if (s_.max_grad_norm > 0) {
    // torch: clip_coef = max_norm / (total_norm + 1e-6), clamped to 1.0 (computed in f32).
    const float coef = static_cast<float>(s_.max_grad_norm) / (static_cast<float>(norm) + 1e-6f);
    if (coef < 1.0f)
      for (const auto& p : table_.params()) be_.scale_inplace(grads + p.offset, p.numel, coef);
  }
  return norm;
}

void AdamW::update(float* params, const float* grads, double lr) {
  ++step_;
  for (const auto& p : table_.params()) {
    AdamWParams a;
    a.lr = static_cast<float>(lr);
    a.beta1 = static_cast<float>(s_.beta1);
    a.beta2 = static_cast<float>(s_.beta2);
    a.eps = static_cast<float>(s_.eps);
    a.weight_decay = p.decay ? static_cast<float>(s_.weight_decay) : 0.0f;
    a.step = step_;
    be_.adamw_update(params + p.offset, grads + p.offset, m_ + p.offset, v_ + p.offset, p.numel, a);
  }
}

}  // namespace lt
