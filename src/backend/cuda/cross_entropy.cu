// CUDA fused LM head + cross-entropy over row chunks (mini-sequence, arXiv 2407.15892), the same
// contract and chunking as src/ops/cross_entropy.cpp: per chunk the logits GEMM writes into the
// caller's scratch, a row-wise softmax kernel turns them into the gradient in place, then dh via
// one GEMM (overwritten) and dW via one GEMM (accumulated).
#include <cmath>
#include <vector>

#include "backend/cuda/common.cuh"
#include "backend/cuda/kernels.h"

namespace lt::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T, typename Op>
__device__ T block_reduce(T x, T* shared, Op op) {
  // shared holds kThreads / kWarp values; every thread returns the block's result.
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = op(x, __shfl_xor_sync(0xffffffffu, x, o));
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  __syncthreads();  // shared may still be read by a previous reduction
  if (lane == 0) shared[warp] = x;
  __syncthreads();
  T r = shared[0];
  for (int w = 1; w < kThreads / kWarp; ++w) r = op(r, shared[w]);
  return r;
}

// One block per row of the chunk: row_loss[i] = logsumexp(z) - z[y] (double, as the CPU op);
// when want_grad, z is overwritten with grad_scale * (softmax(z) - onehot(y)) (0 for an
// unlabelled row). A NaN logit makes the loss and the gradient row NaN.
__global__ void softmax_xent_kernel(float* logits, double* row_loss, const int32_t* targets,
                                    int64_t V, float grad_scale, bool want_grad) {
  __shared__ float shared_f[kThreads / kWarp];
  __shared__ double shared_d[kThreads / kWarp];
  const int64_t i = blockIdx.x;
  float* z = logits + i * V;
  const int32_t y = targets[i];
  if (y == kIgnoreIndex) {
    if (threadIdx.x == 0) row_loss[i] = 0;
    if (want_grad)
      for (int64_t j = threadIdx.x; j < V; j += kThreads) z[j] = 0.0f;
    return;
  }
  float m = -INFINITY;
  for (int64_t j = threadIdx.x; j < V; j += kThreads) m = fmaxf(m, z[j]);
  m = block_reduce(m, shared_f, [](float a, float b) { return fmaxf(a, b); });
  double sum = 0;
  for (int64_t j = threadIdx.x; j < V; j += kThreads) sum += double(expf(z[j] - m));
  sum = block_reduce(sum, shared_d, [](double a, double b) { return a + b; });
  const double lse = double(m) + log(sum);
  const float zy = z[y];
  __syncthreads();  // every thread has read z[y] before it is overwritten
  if (threadIdx.x == 0) row_loss[i] = lse - double(zy);
  if (want_grad) {
    const float lse_f = float(lse);
    for (int64_t j = threadIdx.x; j < V; j += kThreads) {
      const float p = __fmul_rn(expf(z[j] - lse_f), grad_scale);
      z[j] = j == y ? __fsub_rn(p, grad_scale) : p;
    }
  }
}

}  // namespace

namespace {

// The chunked loop over rows with the head's products supplied: logits(z, h, rows),
// dh_product(dh, z, rows), dw_product(z, h, rows) (as ops/cross_entropy.cpp).
template <class Logits, class Dh, class Dw>
double cross_entropy_rows(const Context& ctx, float* dhidden, bool want_dweight,
                          const float* hidden, const int32_t* targets, const int32_t* host_targets,
                          int64_t N, int64_t D, int64_t V, int64_t chunk, float grad_scale,
                          float* scratch, Logits logits, Dh dh_product, Dw dw_product) {
  if (N <= 0) return 0.0;
  const bool want_grad = dhidden || want_dweight;
  auto* row_loss =
      static_cast<double*>(ctx.scratch->get(cuda_scratch::cross_entropy(N), ctx.stream));
  LT_CUDA_CHECK(cudaMemsetAsync(row_loss, 0, size_t(N) * sizeof(double), ctx.stream));
  for (int64_t r0 = 0; r0 < N; r0 += chunk) {
    const int64_t rows = chunk < N - r0 ? chunk : N - r0;
    const float* h = hidden + r0 * D;
    float* dh = dhidden ? dhidden + r0 * D : nullptr;
    int64_t labelled = 0;
    for (int64_t i = 0; i < rows; ++i) labelled += host_targets[r0 + i] != kIgnoreIndex;
    if (labelled == 0) {  // no loss and no gradient, but dhidden is still overwritten
      if (dh) LT_CUDA_CHECK(cudaMemsetAsync(dh, 0, size_t(rows * D) * 4, ctx.stream));
      continue;
    }
    logits(scratch, h, rows);  // (rows,V) = h (rows,D) @ weight (V,D)^T
    softmax_xent_kernel<<<unsigned(rows), kThreads, 0, ctx.stream>>>(
        scratch, row_loss + r0, targets + r0, V, grad_scale, want_grad);
    LT_CUDA_CHECK_LAUNCH();
    if (dh) dh_product(dh, scratch, rows);  // dh (rows,D) = g (rows,V) @ weight: overwritten
    if (want_dweight) dw_product(scratch, h, rows);  // dweight (V,D) += g^T @ h: accumulated
  }
  std::vector<double> host(static_cast<size_t>(N));
  LT_CUDA_CHECK(cudaMemcpyAsync(host.data(), row_loss, size_t(N) * sizeof(double),
                                cudaMemcpyDeviceToHost, ctx.stream));
  LT_CUDA_CHECK(cudaStreamSynchronize(ctx.stream));
  double loss = 0;
  for (double l : host) loss += l;  // row order, as the CPU op
  return loss;
}

}  // namespace

double lm_head_cross_entropy(const Context& ctx, float* dhidden, float* dweight,
                             const float* hidden, const float* weight, const int32_t* targets,
                             const int32_t* host_targets, int64_t N, int64_t D, int64_t V,
                             int64_t chunk, float grad_scale, float* scratch) {
  return cross_entropy_rows(
      ctx, dhidden, dweight != nullptr, hidden, targets, host_targets, N, D, V, chunk, grad_scale,
      scratch,
      [&](float* z, const float* h, int64_t rows) {
        gemm(ctx, z, h, weight, rows, V, D, false, true, 1.0f, 0.0f);
      },
      [&](float* dh, const float* z, int64_t rows) {
        gemm(ctx, dh, z, weight, rows, D, V, false, false, 1.0f, 0.0f);
      },
      [&](const float* z, const float* h, int64_t rows) {
        gemm(ctx, dweight, z, h, V, D, rows, true, false, 1.0f, 1.0f);
      });
}

double lm_head_cross_entropy_bf16w(const Context& ctx, float* dhidden, const float* hidden,
                                   const uint16_t* weight, const int32_t* targets,
                                   const int32_t* host_targets, int64_t N, int64_t D, int64_t V,
                                   int64_t chunk, float grad_scale, float* scratch, float* expand,
                                   int64_t expand_rows) {
  return cross_entropy_rows(
      ctx, dhidden, false, hidden, targets, host_targets, N, D, V, chunk, grad_scale, scratch,
      [&](float* z, const float* h, int64_t rows) {
        linear_forward_bf16w(ctx, z, h, weight, nullptr, rows, D, V, expand, expand_rows);
      },
      [&](float* dh, const float* z, int64_t rows) {
        linear_backward_bf16w(ctx, dh, nullptr, z, weight, rows, D, V, Accumulate::kNo, expand,
                              expand_rows);
      },
      [](const float*, const float*, int64_t) {});
}

}  // namespace lt::cuda
