// CUDA RMSNorm forward/backward (one warp per row; sums of squares and dots in double, as the
// CPU op) and the deterministic two-stage weight gradient.
#include "backend/cuda/common.cuh"
#include "backend/cuda/kernels.h"

namespace lt::cuda {
namespace {

constexpr int kRowsPerBlock = 8;  // warps per block, one row each

__global__ void rmsnorm_forward_kernel(float* out, float* rstd, const float* inp,
                                       const float* weight, int64_t N, int64_t D, float eps) {
  const int64_t n = blockIdx.x * int64_t(kRowsPerBlock) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (n >= N) return;
  const float* x = inp + n * D;
  double ss = 0;
  for (int64_t j = lane; j < D; j += kWarp) ss += double(x[j]) * double(x[j]);
  ss = warp_sum(ss);
  const float var = float(ss / double(D));
  const float r = 1.0f / sqrtf(var + eps);
  if (lane == 0) rstd[n] = r;
  float* y = out + n * D;
  for (int64_t j = lane; j < D; j += kWarp) y[j] = weight[j] * (x[j] * r);
}

// dx_k = r w_k dy_k - x_k r^3 / D * sum_j dy_j w_j x_j  (derivation in src/ops/rmsnorm.cpp).
__global__ void rmsnorm_backward_dinp_kernel(float* dinp, const float* dout, const float* inp,
                                             const float* weight, const float* rstd, int64_t N,
                                             int64_t D, bool accumulate) {
  const int64_t n = blockIdx.x * int64_t(kRowsPerBlock) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (n >= N) return;
  const float* x = inp + n * D;
  const float* dy = dout + n * D;
  float* dx = dinp + n * D;
  const float r = rstd[n];
  double dot = 0;
  for (int64_t j = lane; j < D; j += kWarp) dot += double(dy[j]) * double(weight[j]) * double(x[j]);
  dot = warp_sum(dot);
  const float c = float(dot * double(r) * double(r) * double(r) / double(D));
  for (int64_t j = lane; j < D; j += kWarp) {
    const float g = r * weight[j] * dy[j] - x[j] * c;
    dx[j] = accumulate ? dx[j] + g : g;
  }
}

// dweight_j += sum_n dy_nj x_nj r_n. Stage 1: partial[slice, j] over a slice of rows (block:
// 32 columns x 8 row lanes); stage 2 sums the slices in order (deterministic).
constexpr int kColTile = 32, kRowLanes = 8;
__global__ void rmsnorm_dweight_partial_kernel(double* partial, const float* dout,
                                               const float* inp, const float* rstd, int64_t N,
                                               int64_t D, int64_t rows_per_slice) {
  __shared__ double sums[kRowLanes][kColTile + 1];
  const int64_t col = blockIdx.x * int64_t(kColTile) + threadIdx.x;
  const int64_t r0 = blockIdx.y * rows_per_slice;
  const int64_t r1 = min(N, r0 + rows_per_slice);
  double s = 0;
  if (col < D)
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kRowLanes)
      s += double(dout[r * D + col]) * double(inp[r * D + col]) * double(rstd[r]);
  sums[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < D) {
    double t = 0;
    for (int i = 0; i < kRowLanes; ++i) t += sums[i][threadIdx.x];
    partial[blockIdx.y * D + col] = t;
  }
}
__global__ void rmsnorm_dweight_finish_kernel(float* dweight, const double* partial,
                                              int64_t slices, int64_t D) {
  const int64_t col = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (col >= D) return;
  double t = 0;
  for (int64_t s = 0; s < slices; ++s) t += partial[s * D + col];
  dweight[col] += float(t);
}

}  // namespace

void rmsnorm_forward(const Context& ctx, float* out, float* rstd, const float* inp,
                     const float* weight, int64_t N, int64_t D, float eps) {
  if (N <= 0) return;
  const unsigned blocks = unsigned((N + kRowsPerBlock - 1) / kRowsPerBlock);
  rmsnorm_forward_kernel<<<blocks, kRowsPerBlock * kWarp, 0, ctx.stream>>>(out, rstd, inp,
                                                                           weight, N, D, eps);
  LT_CUDA_CHECK_LAUNCH();
}

void rmsnorm_backward(const Context& ctx, float* dinp, float* dweight, const float* dout,
                      const float* inp, const float* weight, const float* rstd, int64_t N,
                      int64_t D, Accumulate acc) {
  if (N <= 0) return;
  if (dinp) {
    const unsigned blocks = unsigned((N + kRowsPerBlock - 1) / kRowsPerBlock);
    rmsnorm_backward_dinp_kernel<<<blocks, kRowsPerBlock * kWarp, 0, ctx.stream>>>(
        dinp, dout, inp, weight, rstd, N, D, acc == Accumulate::kYes);
    LT_CUDA_CHECK_LAUNCH();
  }
  if (dweight) {
    const int64_t rows_per_slice = cuda_scratch::kSliceRows;
    const int64_t slices = (N + rows_per_slice - 1) / rows_per_slice;
    auto* partial = static_cast<double*>(
        ctx.scratch->get(cuda_scratch::column_partials(N, D, sizeof(double)), ctx.stream));
    const dim3 grid(unsigned((D + kColTile - 1) / kColTile), unsigned(slices));
    rmsnorm_dweight_partial_kernel<<<grid, dim3(kColTile, kRowLanes), 0, ctx.stream>>>(
        partial, dout, inp, rstd, N, D, rows_per_slice);
    LT_CUDA_CHECK_LAUNCH();
    rmsnorm_dweight_finish_kernel<<<unsigned((D + 255) / 256), 256, 0, ctx.stream>>>(
        dweight, partial, slices, D);
    LT_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace lt::cuda
