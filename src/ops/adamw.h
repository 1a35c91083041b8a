// AdamW exactly as torch.optim.AdamW (decoupled weight decay, bias-corrected moments), and the
// helpers for global-norm gradient clipping.
#pragma once
#include "ops/common.h"

namespace lt {

struct AdamWParams {
  float lr = 0, beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f, weight_decay = 0;
  int64_t step = 1;  // 1-based step count after increment, as torch's state['step']
};

// param, m, v (n) updated in place from grad (n):
//   param *= 1 - lr*wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
//   param -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps).
void adamw_update(float* param, const float* grad, float* m, float* v, int64_t n,
                  const AdamWParams& p);
// Sum of squares of x (n), accumulated in double.
double sum_squares(const float* x, int64_t n);
// x (n) *= s.
void scale_inplace(float* x, int64_t n, float s);

}  // namespace lt
