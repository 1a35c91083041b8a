// CUDA SwiGLU gate: out = silu(gate) * up and its gradient (formulas of src/ops/swiglu.cpp).
#include "backend/cuda/common.cuh"
#include "backend/cuda/kernels.h"

namespace lt::cuda {
namespace {

// 1 / (1 + e^-x) with the accurate expf: for x << 0, e^-x = +inf and the result is exactly 0.
__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

__global__ void swiglu_forward_kernel(float* out, const float* gate, const float* up,
                                      int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    out[i] = gate[i] * sigmoid(gate[i]) * up[i];
}

// d silu(g)/dg = sig(g) (1 + g (1 - sig(g))).
__global__ void swiglu_backward_kernel(float* dgate, float* dup, const float* dout,
                                       const float* gate, const float* up, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float g = gate[i], s = sigmoid(g), dy = dout[i];
    dgate[i] = dy * up[i] * (s * (1.0f + g * (1.0f - s)));
    dup[i] = dy * (g * s);
  }
}

}  // namespace

void swiglu_forward(const Context& ctx, float* out, const float* gate, const float* up,
                    int64_t n) {
  if (n <= 0) return;
  swiglu_forward_kernel<<<grid_for(n, 256, ctx.num_sms), 256, 0, ctx.stream>>>(out, gate, up, n);
  LT_CUDA_CHECK_LAUNCH();
}

void swiglu_backward(const Context& ctx, float* dgate, float* dup, const float* dout,
                     const float* gate, const float* up, int64_t n) {
  if (n <= 0) return;
  swiglu_backward_kernel<<<grid_for(n, 256, ctx.num_sms), 256, 0, ctx.stream>>>(dgate, dup, dout,
                                                                               gate, up, n);
  LT_CUDA_CHECK_LAUNCH();
}

}  // namespace lt::cuda
