// CUDA reductions and elementwise helpers for gradient clipping and residuals: sum of squares
// (double, fixed block order: deterministic), scale, add.
#include <algorithm>
#include <vector>

#include "backend/cuda/common.cuh"
#include "backend/cuda/kernels.h"

namespace lt::cuda {
namespace {

constexpr int kThreads = 256;

// partial[block] (+)= sum of x^2 over a grid-stride walk (double), fixed per block; with
// accumulate, launches in stream order add to the same partials (no atomics: deterministic).
__global__ void sum_squares_kernel(double* partial, const float* x, int64_t n, bool accumulate) {
  __shared__ double warp_sums[kThreads / kWarp];
  double s = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    s += double(x[i]) * double(x[i]);
  s = warp_sum(s);
  if (threadIdx.x % kWarp == 0) warp_sums[threadIdx.x / kWarp] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    double t = 0;
    for (int w = 0; w < kThreads / kWarp; ++w) t += warp_sums[w];
    partial[blockIdx.x] = accumulate ? partial[blockIdx.x] + t : t;
  }
}

__global__ void scale_kernel(float* x, int64_t n, float s) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    x[i] *= s;
}

__global__ void add_kernel(float* y, const float* x, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    y[i] += x[i];
}

// bf16 is the upper half of an f32: the widening is a shift (NaN and Inf stay themselves).
__global__ void bf16_to_f32_kernel(float* out, const uint16_t* in, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    out[i] = __uint_as_float(uint32_t(in[i]) << 16);
}

// Round to nearest even with core/dtype.h's integer formula (the same bits as the CPU; a NaN
// stays a quiet NaN of its sign).
__device__ __forceinline__ uint16_t rne_bf16(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

__global__ void f32_to_bf16_kernel(uint16_t* out, const float* in, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    out[i] = rne_bf16(in[i]);
}

__global__ void round_to_bf16_kernel(float* x, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    x[i] = __uint_as_float(uint32_t(rne_bf16(x[i])) << 16);
}

// The block count depends only on n and the SM count, so a given device always sums the same
// way (the result is deterministic run to run). Returns the blocks launched.
unsigned launch_sum_squares(const Context& ctx, double* partial, const float* x, int64_t n,
                            bool accumulate) {
  const unsigned blocks = grid_for(n, kThreads, ctx.num_sms);
  sum_squares_kernel<<<blocks, kThreads, 0, ctx.stream>>>(partial, x, n, accumulate);
  LT_CUDA_CHECK_LAUNCH();
  return blocks;
}

// The sum of the first `blocks` partials, read back (synchronizes).
double read_partials(const Context& ctx, const double* partial, unsigned blocks) {
  std::vector<double> host(blocks);
  LT_CUDA_CHECK(cudaMemcpyAsync(host.data(), partial, blocks * sizeof(double),
                                cudaMemcpyDeviceToHost, ctx.stream));
  LT_CUDA_CHECK(cudaStreamSynchronize(ctx.stream));
  double total = 0;
  for (unsigned b = 0; b < blocks; ++b) total += host[b];
  return total;
}

}  // namespace

// grid_for caps blocks at 32 per SM: cuda_scratch::sum_squares(num_sms) bytes at most.
double sum_squares(const Context& ctx, const float* x, int64_t n) {
  if (n <= 0) return 0.0;
  const unsigned blocks = grid_for(n, kThreads, ctx.num_sms);
  auto* partial = static_cast<double*>(ctx.scratch->get(blocks * sizeof(double), ctx.stream));
  return read_partials(ctx, partial, launch_sum_squares(ctx, partial, x, n, false));
}

double sum_squares_many(const Context& ctx, const Backend::SquaresPart* parts, size_t count) {
  int64_t longest = 0;
  for (size_t i = 0; i < count; ++i) longest = std::max(longest, parts[i].n);
  if (longest <= 0) return 0.0;
  const unsigned cap = grid_for(longest, kThreads, ctx.num_sms);
  auto* partial = static_cast<double*>(ctx.scratch->get(cap * sizeof(double), ctx.stream));
  LT_CUDA_CHECK(cudaMemsetAsync(partial, 0, cap * sizeof(double), ctx.stream));
  for (size_t i = 0; i < count; ++i)
    if (parts[i].n > 0) launch_sum_squares(ctx, partial, parts[i].x, parts[i].n, true);
  return read_partials(ctx, partial, cap);
}

void scale_inplace(const Context& ctx, float* x, int64_t n, float s) {
  if (n <= 0) return;
  scale_kernel<<<grid_for(n, kThreads, ctx.num_sms), kThreads, 0, ctx.stream>>>(x, n, s);
  LT_CUDA_CHECK_LAUNCH();
}

void add_inplace(const Context& ctx, float* y, const float* x, int64_t n) {
  if (n <= 0) return;
  add_kernel<<<grid_for(n, kThreads, ctx.num_sms), kThreads, 0, ctx.stream>>>(y, x, n);
  LT_CUDA_CHECK_LAUNCH();
}

void bf16_to_f32(const Context& ctx, float* out, const uint16_t* in, int64_t n) {
  if (n <= 0) return;
  bf16_to_f32_kernel<<<grid_for(n, kThreads, ctx.num_sms), kThreads, 0, ctx.stream>>>(out, in, n);
  LT_CUDA_CHECK_LAUNCH();
}

void f32_to_bf16(const Context& ctx, uint16_t* out, const float* in, int64_t n) {
  if (n <= 0) return;
  f32_to_bf16_kernel<<<grid_for(n, kThreads, ctx.num_sms), kThreads, 0, ctx.stream>>>(out, in, n);
  LT_CUDA_CHECK_LAUNCH();
}

void round_to_bf16(const Context& ctx, float* x, int64_t n) {
  if (n <= 0) return;
  round_to_bf16_kernel<<<grid_for(n, kThreads, ctx.num_sms), kThreads, 0, ctx.stream>>>(x, n);
  LT_CUDA_CHECK_LAUNCH();
}

}  // namespace lt::cuda
