// CUDA LoRA forward and backward (the contract of src/ops/lora.h): the low-rank GEMMs on cuBLAS
// and inverted dropout with the CPU op's masks (ops/lora_mask.h, shared with the host code), so a
// GPU run drops exactly the elements a CPU run drops.
#include <algorithm>

#include "backend/cuda/common.cuh"
#include "backend/cuda/kernels.h"
#include "ops/lora_mask.h"

namespace lt::cuda {
namespace {

// xd (N,IN) = inp * mask.
__global__ void dropout_kernel(float* xd, const float* inp, int64_t N, int64_t IN, uint64_t seed,
                               int64_t row0, float p) {
  const int64_t n = N * IN;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    xd[i] = inp[i] * lora_dropout_factor(seed, row0 + i / IN, i % IN, IN, p);
}

// dinp (N,IN) += dxd * mask.
__global__ void dropout_grad_kernel(float* dinp, const float* dxd, int64_t N, int64_t IN,
                                    uint64_t seed, int64_t row0, float p) {
  const int64_t n = N * IN;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    dinp[i] += dxd[i] * lora_dropout_factor(seed, row0 + i / IN, i % IN, IN, p);
}

unsigned blocks_for(const Context& ctx, int64_t n) {
  return unsigned(std::max<int64_t>(1, std::min<int64_t>((n + 255) / 256, ctx.num_sms * 8)));
}

}  // namespace

void lora_forward(const Context& ctx, float* out, float* t, float* xd, const float* inp,
                  const float* a, const float* b, int64_t N, int64_t IN, int64_t OUT,
                  const LoraCall& c) {
  if (N <= 0) return;
  const float* x = inp;
  if (c.dropout > 0) {
    dropout_kernel<<<blocks_for(ctx, N * IN), 256, 0, ctx.stream>>>(xd, inp, N, IN, c.seed, c.row0,
                                                                    c.dropout);
    LT_CUDA_CHECK_LAUNCH();
    x = xd;
  }
  gemm(ctx, t, x, a, N, c.R, IN, false, true, 1.0f, 0.0f);        // t (N,R) = x @ a^T
  gemm(ctx, out, t, b, N, OUT, c.R, false, true, c.scale, 1.0f);  // out += scale t @ b^T
}

void lora_backward(const Context& ctx, float* dinp, float* da, float* db, float* t, float* u,
                   float* xd, float* dxd, const float* dout, const float* inp, const float* a,
                   const float* b, int64_t N, int64_t IN, int64_t OUT, const LoraCall& c) {
  if (N <= 0) return;
  const float* x = inp;
  if (c.dropout > 0 && (da || db)) {
    dropout_kernel<<<blocks_for(ctx, N * IN), 256, 0, ctx.stream>>>(xd, inp, N, IN, c.seed, c.row0,
                                                                    c.dropout);
    LT_CUDA_CHECK_LAUNCH();
    x = xd;
  }
  gemm(ctx, u, dout, b, N, c.R, OUT, false, false, 1.0f, 0.0f);  // u (N,R) = dout @ b
  if (db) {
    gemm(ctx, t, x, a, N, c.R, IN, false, true, 1.0f, 0.0f);          // t = x @ a^T
    gemm(ctx, db, dout, t, OUT, c.R, N, true, false, c.scale, 1.0f);  // db += scale dout^T t
  }
  if (da) gemm(ctx, da, u, x, c.R, IN, N, true, false, c.scale, 1.0f);  // da += scale u^T x
  if (!dinp) return;
  if (c.dropout <= 0) {
    gemm(ctx, dinp, u, a, N, IN, c.R, false, false, c.scale, 1.0f);  // dinp += scale u @ a
    return;
  }
  gemm(ctx, dxd, u, a, N, IN, c.R, false, false, c.scale, 0.0f);
  dropout_grad_kernel<<<blocks_for(ctx, N * IN), 256, 0, ctx.stream>>>(dinp, dxd, N, IN, c.seed,
                                                                       c.row0, c.dropout);
  LT_CUDA_CHECK_LAUNCH();
}

}  // namespace lt::cuda
