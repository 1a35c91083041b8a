// CUDA rotary position embedding (Hugging Face rotate-half layout): tables, forward, backward.
// One thread per (row, head, pair); the formulas are those of src/ops/rope.cpp.
#include "backend/cuda/common.cuh"
#include "backend/cuda/kernels.h"

namespace lt::cuda {
namespace {

__global__ void rope_tables_kernel(float* cos_t, float* sin_t, const int32_t* pos,
                                   const float* inv_freq, float scaling, int64_t N,
                                   int64_t half) {
  const int64_t total = N * half;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = idx / half, i = idx % half;
    // f32 angle (pos * inv_freq), then accurate cosf/sinf (full range reduction, not __cosf).
    const float angle = __fmul_rn(float(pos[n]), inv_freq[i]);
    cos_t[idx] = cosf(angle) * scaling;
    sin_t[idx] = sinf(angle) * scaling;
  }
}

// sign = +1: forward rotation (x1 c - x2 s, x2 c + x1 s); -1: its transpose (backward).
template <int kSign>
__global__ void rope_kernel(float* out, const float* inp, const float* cos_t,
                            const float* sin_t, int64_t N, int64_t H, int64_t HD) {
  const int64_t half = HD / 2;
  const int64_t total = N * H * half;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = idx % half, nh = idx / half, n = nh / H;
    const float c = cos_t[n * half + j], s = kSign * sin_t[n * half + j];
    const float* x = inp + nh * HD;
    float* y = out + nh * HD;
    const float x1 = x[j], x2 = x[j + half];  // both reads precede the writes: in place is safe
    y[j] = x1 * c - x2 * s;
    y[j + half] = x2 * c + x1 * s;
  }
}

}  // namespace

void rope_tables(const Context& ctx, float* cos, float* sin, const int32_t* pos,
                 const float* inv_freq, float attention_scaling, int64_t N, int64_t HD) {
  const int64_t half = HD / 2;
  if (N * half <= 0) return;
  rope_tables_kernel<<<grid_for(N * half, 256, ctx.num_sms), 256, 0, ctx.stream>>>(
      cos, sin, pos, inv_freq, attention_scaling, N, half);
  LT_CUDA_CHECK_LAUNCH();
}

void rope_forward(const Context& ctx, float* out, const float* inp, const float* cos,
                  const float* sin, int64_t N, int64_t H, int64_t HD) {
  const int64_t half = HD / 2;
  if (N * H * half <= 0) return;
  rope_kernel<1><<<grid_for(N * H * half, 256, ctx.num_sms), 256, 0, ctx.stream>>>(
      out, inp, cos, sin, N, H, HD);
  LT_CUDA_CHECK_LAUNCH();
}

void rope_backward(const Context& ctx, float* dinp, const float* dout, const float* cos,
                   const float* sin, int64_t N, int64_t H, int64_t HD) {
  const int64_t half = HD / 2;
  if (N * H * half <= 0) return;
  rope_kernel<-1><<<grid_for(N * H * half, 256, ctx.num_sms), 256, 0, ctx.stream>>>(
      dinp, dout, cos, sin, N, H, HD);
  LT_CUDA_CHECK_LAUNCH();
}

}  // namespace lt::cuda
