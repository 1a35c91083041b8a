// CUDA AdamW with the exact rounding of torch.optim.AdamW as src/ops/adamw.cpp reproduces it:
// lerp and addcmul are fused multiply-adds (__fmaf_rn), every other operation rounds on its own
// (__fmul_rn, __fadd_rn, __fdiv_rn, __fsqrt_rn are never contracted by nvcc). The scalars are
// computed on the host in double exactly as the CPU op does.
#include <cmath>

#include "backend/cuda/common.cuh"
#include "backend/cuda/kernels.h"

namespace lt::cuda {
namespace {

struct AdamWScalars {
  float decay, w1, b2f, w2, neg_step_size, bc2_sqrt, eps;
  bool weight_small, decays;
};

__global__ void adamw_kernel(float* param, const float* grad, float* m, float* v, int64_t n,
                             AdamWScalars a) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float g = grad[i];
    float x = a.decays ? __fmul_rn(param[i], a.decay) : param[i];
    const float mi0 = m[i];
    const float d = __fsub_rn(g, mi0);
    const float mi = a.weight_small ? __fmaf_rn(a.w1, d, mi0)
                                    : __fmaf_rn(__fsub_rn(a.w1, 1.0f), d, g);
    const float vi = __fmaf_rn(__fmul_rn(a.w2, g), g, __fmul_rn(v[i], a.b2f));
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), a.bc2_sqrt), a.eps);
    x = __fadd_rn(x, __fdiv_rn(__fmul_rn(a.neg_step_size, mi), denom));
    m[i] = mi;
    v[i] = vi;
    param[i] = x;
  }
}

}  // namespace

void adamw_update(const Context& ctx, float* param, const float* grad, float* m, float* v,
                  int64_t n, const AdamWParams& p) {
  if (n <= 0) return;
  const double lr = p.lr, b1 = p.beta1, b2 = p.beta2, wd = p.weight_decay;
  const double step = double(p.step);
  AdamWScalars a;
  a.decay = float(1.0 - lr * wd);
  a.w1 = float(1.0 - b1);
  a.b2f = float(b2);
  a.w2 = float(1.0 - b2);
  const double bc1 = 1.0 - std::pow(b1, step);
  const double bc2 = 1.0 - std::pow(b2, step);
  a.neg_step_size = float(-(lr / bc1));
  a.bc2_sqrt = float(std::sqrt(bc2));
  a.eps = p.eps;
  a.weight_small = std::fabs(a.w1) < 0.5f;
  a.decays = p.weight_decay != 0;
  adamw_kernel<<<grid_for(n, 256, ctx.num_sms), 256, 0, ctx.stream>>>(param, grad, m, v, n, a);
  LT_CUDA_CHECK_LAUNCH();
}

}  // namespace lt::cuda
