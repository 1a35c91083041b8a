// Small device helpers shared by the .cu files: grid sizing, warp reductions.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "backend/cuda/cuda_check.h"

namespace lt::cuda {

inline constexpr int kWarp = 32;

// Blocks for a grid-stride loop over n items with `threads` per block (at most 32 per SM).
inline unsigned grid_for(int64_t n, int threads, int num_sms) {
  const int64_t want = (n + threads - 1) / threads;
  const int64_t cap = int64_t(num_sms) * 32;
  return unsigned(want < 1 ? 1 : (want < cap ? want : cap));
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
__device__ __forceinline__ double warp_sum(double x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

}  // namespace lt::cuda
