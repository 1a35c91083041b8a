// AdamW over the parameter table (HF Trainer's groups: no weight decay for biases and norms)
// with global-norm gradient clipping as torch.nn.utils.clip_grad_norm_.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "core/memory.h"
#include "model/params.h"

namespace lt {

struct OptimizerSettings {
  double learning_rate = 5e-5, weight_decay = 0, beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  double max_grad_norm = 1.0;  // <= 0: no clipping
};

class AdamW {
 public:
  // Over every tensor of a table; params and grads blocks are passed to clip/update.
  AdamW(const ParamTable& table, Backend& backend, const OptimizerSettings& s);
  // Over a trainable set (LlamaModel::trainable()): each tensor carries its own param and grad
  // pointers, so the block arguments of clip/update are ignored (pass null).
  AdamW(const std::vector<TrainableTensor>& set, Backend& backend, const OptimizerSettings& s);
  static void plan(const ParamTable& table, MemoryPlan* plan);
  // Moments for `numel` trainable values (LoRA: the adapter and the tensors that also train).
  static void plan(int64_t numel, MemoryPlan* plan);

  // Global L2 norm of grads (before clipping), as clip_grad_norm_ returns it; scales grads by
  // max_norm / (norm + 1e-6) when that is below 1.
  double clip(float* grads);
  // The halves of clip for gradients spread over processes (src/dist/parallel.h): the sum of
  // squares of this optimizer's gradients (skipping the tensor named `excluded`, set mode), and
  // the clipping for a given global norm.
  double square_sum(float* grads, const std::string& excluded = "");
  void clip_to(float* grads, double norm);
  // Where each tensor of a trainable set starts in the moments (aligned as the set mode lays
  // them out), and their total.
  static std::vector<int64_t> set_offsets(const std::vector<TrainableTensor>& set, int64_t* total);
  // One update with learning rate lr; step() counts from 1.
  void update(float* params, const float* grads, double lr);
  int64_t steps_done() const { return step_; }
  void set_steps_done(int64_t s) { step_ = s; }
  float* moments() { return m_; }  // (2 * total) device memory: m then v, the params' layout
  int64_t moments_count() const { return 2 * total_; }

 private:
  struct Entry {
    int64_t offset;  // into the moments (and, table mode, into the params/grads blocks)
    int64_t numel;
    bool decay;
    float* param;  // set mode; null in table mode
    float* grad;
    std::string name;
  };
  float* grad_of(const Entry& e, float* grads) const;
  void allocate();
  Backend& be_;
  OptimizerSettings s_;
  std::vector<Entry> entries_;
  int64_t total_ = 0;
  Arena arena_;
  float *m_ = nullptr, *v_ = nullptr;
  int64_t step_ = 0;
};

}  // namespace lt
