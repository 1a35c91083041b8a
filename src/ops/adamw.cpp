// CPU AdamW with the exact arithmetic of torch.optim.AdamW (single-tensor path), and the
// global-norm helpers for gradient clipping.
#include "ops/adamw.h"

// Rounding follows torch's AVX512 kernels, checked element by element against torch 2.15: lerp and
// addcmul are fused multiply-adds, everything else rounds after each operation. GCC must not
// contract any other a*b + c, hence fp-contract=off here and the explicit std::fma calls.
#pragma GCC optimize("fp-contract=off")

#include <algorithm>
#include <cmath>
#include <vector>

namespace lt {

void adamw_update(float* param, const float* grad, float* m, float* v, int64_t n,
                  const AdamWParams& p) {
  // torch computes the scalars from python floats (double) and casts them to f32 at each op.
  const double lr = p.lr, b1 = p.beta1, b2 = p.beta2, wd = p.weight_decay;
  const double step = double(p.step);
  const float decay = float(1.0 - lr * wd);           // param.mul_(1 - lr*wd)
  const float w1 = float(1.0 - b1);                   // exp_avg.lerp_(grad, 1 - b1)
  const float b2f = float(b2), w2 = float(1.0 - b2);  // exp_avg_sq.mul_(b2).addcmul_
  const double bc1 = 1.0 - std::pow(b1, step);        // 1 - beta1**step
  const double bc2 = 1.0 - std::pow(b2, step);        // 1 - beta2**step
  const float neg_step_size = float(-(lr / bc1));     // addcdiv_(value=-step_size)
  const float bc2_sqrt = float(std::sqrt(bc2));       // bias_correction2**0.5
  const float eps = p.eps;
  const bool weight_small = std::fabs(w1) < 0.5f;  // torch's lerp branch
  const bool decays = p.weight_decay != 0;
#pragma omp parallel for simd schedule(static) if (n > (1 << 16))
  for (int64_t i = 0; i < n; ++i) {
    const float g = grad[i];
    float x = decays ? param[i] * decay : param[i];
    // torch's lerp (ATen Lerp.h, the vectorized path uses fmadd):
    //   |w| < 0.5: start + w (end - start), else end - (end - start)(1 - w).
    const float d = g - m[i];
    const float mi = weight_small ? std::fma(w1, d, m[i]) : std::fma(w1 - 1.0f, d, g);
    const float vi = std::fma(w2 * g, g, v[i] * b2f);  // mul_(b2).addcmul_: self + (value*t1)*t2
    const float denom = std::sqrt(vi) / bc2_sqrt + eps;
    x = x + (neg_step_size * mi) / denom;  // addcdiv: self + (value*t1)/t2
    m[i] = mi;
    v[i] = vi;
    param[i] = x;
  }
}

double sum_squares(const float* x, int64_t n) {
  // Fixed blocks summed in block order: the result does not depend on the thread count.
  constexpr int64_t kBlock = 1 << 14;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> partial(size_t(std::max<int64_t>(blocks, 1)), 0.0);
#pragma omp parallel for schedule(static) if (blocks > 1)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t i1 = std::min(n, (b + 1) * kBlock);
    double s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = b * kBlock; i < i1; ++i) s += double(x[i]) * double(x[i]);
    partial[size_t(b)] = s;
  }
  double total = 0;
  for (double s : partial) total += s;
  return total;
}

void scale_inplace(float* x, int64_t n, float s) {
#pragma omp parallel for simd schedule(static) if (n > (1 << 16))
  for (int64_t i = 0; i < n; ++i) x[i] *= s;
}

}  // namespace lt
