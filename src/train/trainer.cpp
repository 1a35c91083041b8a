// The training loop (see trainer.h).
#include "train/trainer.h"

#include <algorithm>

namespace lt {

StepResult accumulate_step_gradients(LlamaModel& model, const std::vector<MicroBatch>& micro) {
  StepResult r;
  for (const auto& mb : micro) {
    r.num_items += mb.num_targets();
    r.tokens += mb.num_tokens();
  }
  model.zero_grads();
  // HF Trainer: each micro-batch's loss is its CE sum / labelled tokens of the whole step.
  const float scale = r.num_items > 0 ? 1.0f / static_cast<float>(r.num_items) : 0.0f;
  double loss_sum = 0;
  for (const auto& mb : micro) loss_sum += model.forward_backward(mb, scale);
  r.loss = r.num_items > 0 ? loss_sum / static_cast<double>(r.num_items) : 0.0;
  return r;
}

void apply_step_update(LlamaModel& model, AdamW& optimizer, const OptimizerSettings& opt,
                       const ScheduleSettings& schedule, int64_t step_index, StepResult* r) {
  r->grad_norm = optimizer.clip(model.grads());
  r->learning_rate = opt.learning_rate * lr_multiplier(schedule.type, step_index,
                                                       schedule.warmup_steps, schedule.total_steps);
  optimizer.update(model.params(), model.grads(), r->learning_rate);
}

StepResult train_step(LlamaModel& model, AdamW& optimizer, const OptimizerSettings& opt,
                      const ScheduleSettings& schedule, const std::vector<MicroBatch>& micro,
                      int64_t step_index) {
  StepResult r = accumulate_step_gradients(model, micro);
  apply_step_update(model, optimizer, opt, schedule, step_index, &r);
  return r;
}

}  // namespace lt
