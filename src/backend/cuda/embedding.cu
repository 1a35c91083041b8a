// CUDA token embedding: row gather (forward) and atomicAdd scatter (backward). The backward's
// summation order over duplicate ids is not fixed (atomics): results can differ from the CPU op
// in the last bits when an id repeats. With Context::deterministic each thread owns one column
// and walks the rows in order, as the CPU op does: bit-identical to it (fewer threads: D).
#include "backend/cuda/common.cuh"
#include "backend/cuda/kernels.h"

namespace lt::cuda {
namespace {

// One block per row n (grid-stride over rows), threads over the D columns.
__global__ void embedding_forward_kernel(float* out, const int32_t* ids, const float* weight,
                                         int64_t N, int64_t D) {
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    const float* w = weight + int64_t(ids[n]) * D;
    for (int64_t j = threadIdx.x; j < D; j += blockDim.x) out[n * D + j] = w[j];
  }
}

__global__ void embedding_forward_bf16_kernel(float* out, const int32_t* ids,
                                              const uint16_t* weight, int64_t N, int64_t D) {
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    const uint16_t* w = weight + int64_t(ids[n]) * D;
    for (int64_t j = threadIdx.x; j < D; j += blockDim.x)
      out[n * D + j] = __uint_as_float(uint32_t(w[j]) << 16);  // exact widening
  }
}

__global__ void embedding_backward_kernel(float* dweight, const float* dout, const int32_t* ids,
                                          int64_t N, int64_t D) {
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    float* dw = dweight + int64_t(ids[n]) * D;
    for (int64_t j = threadIdx.x; j < D; j += blockDim.x) atomicAdd(dw + j, dout[n * D + j]);
  }
}

// Deterministic: thread j owns column j of every row of dweight and adds dout's rows in order
// (one warp per 32 columns, coalesced). The same f32 additions in the same order as the CPU op.
__global__ void embedding_backward_ordered_kernel(float* __restrict__ dweight,
                                                  const float* __restrict__ dout,
                                                  const int32_t* __restrict__ ids, int64_t N,
                                                  int64_t D) {
  const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (j >= D) return;
  for (int64_t n = 0; n < N; ++n) dweight[int64_t(ids[n]) * D + j] += dout[n * D + j];
}

}  // namespace

void embedding_forward(const Context& ctx, float* out, const int32_t* ids, const float* weight,
                       int64_t N, int64_t D) {
  if (N <= 0 || D <= 0) return;
  const unsigned blocks = unsigned(N < 65535 ? N : 65535);
  embedding_forward_kernel<<<blocks, 256, 0, ctx.stream>>>(out, ids, weight, N, D);
  LT_CUDA_CHECK_LAUNCH();
}

void embedding_forward_bf16(const Context& ctx, float* out, const int32_t* ids,
                            const uint16_t* weight, int64_t N, int64_t D) {
  if (N <= 0 || D <= 0) return;
  const unsigned blocks = unsigned(N < 65535 ? N : 65535);
  embedding_forward_bf16_kernel<<<blocks, 256, 0, ctx.stream>>>(out, ids, weight, N, D);
  LT_CUDA_CHECK_LAUNCH();
}

void embedding_backward(const Context& ctx, float* dweight, const float* dout, const int32_t* ids,
                        int64_t N, int64_t D) {
  if (N <= 0 || D <= 0) return;
  if (ctx.deterministic) {
    embedding_backward_ordered_kernel<<<unsigned((D + kWarp - 1) / kWarp), kWarp, 0, ctx.stream>>>(
        dweight, dout, ids, N, D);
    LT_CUDA_CHECK_LAUNCH();
    return;
  }
  const unsigned blocks = unsigned(N < 65535 ? N : 65535);
  embedding_backward_kernel<<<blocks, 256, 0, ctx.stream>>>(dweight, dout, ids, N, D);
  LT_CUDA_CHECK_LAUNCH();
}

}  // namespace lt::cuda
