// CUDA NF4 dequantization of a double-quantized weight (layout of src/ops/nf4.h): one
// thread per packed byte, i.e. two output elements.
#include "backend/cuda/common.cuh"
#include "backend/cuda/kernels.h"
#include "ops/nf4.h"

namespace lt::cuda {
namespace {

__constant__ float kNf4Table[16];

__global__ void nf4_dequantize_kernel(float* out, const uint8_t* codes,
                                      const uint8_t* absmax_codes, const float* absmax_table,
                                      const float* absmax_scale, float absmax_offset,
                                      int64_t bytes) {
  for (int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; b < bytes;
       b += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = 2 * b;  // both elements share a 64-block (64 is even)
    // code * scale, then + offset, each rounded (bitsandbytes dequantizes, then adds the offset).
    const float absmax =
        __fadd_rn(__fmul_rn(absmax_table[absmax_codes[i / kNf4Block]],
                            absmax_scale[i / (kNf4Block * kNf4AbsmaxBlock)]),
                  absmax_offset);
    const uint8_t byte = codes[b];
    float2 pair;
    pair.x = __fmul_rn(kNf4Table[byte >> 4], absmax);
    pair.y = __fmul_rn(kNf4Table[byte & 15], absmax);
    out[i] = pair.x;
    out[i + 1] = pair.y;
  }
}

}  // namespace

void nf4_dequantize(const Context& ctx, float* out, const Nf4Device& w) {
  if (w.n <= 0) return;
  LT_CUDA_CHECK(cudaMemcpyToSymbolAsync(kNf4Table, nf4_code().data(), 16 * sizeof(float), 0,
                                        cudaMemcpyHostToDevice, ctx.stream));
  const int64_t bytes = w.n / 2;
  nf4_dequantize_kernel<<<grid_for(bytes, 256, ctx.num_sms), 256, 0, ctx.stream>>>(
      out, w.codes, w.absmax_codes, w.absmax_table, w.absmax_scale, w.absmax_offset, bytes);
  LT_CUDA_CHECK_LAUNCH();
}

}  // namespace lt::cuda
