// CUDA NF4 dequantization of a double-quantized weight (layout of src/ops/nf4.h): one
// thread per packed byte, i.e. two output elements. The two code tables live in constant memory
// (uploaded once per backend, nf4_upload_tables): no device allocation outside the plan, and a
// warp's 64 elements share one absmax code (a broadcast read).
#include "backend/cuda/common.cuh"
#include "backend/cuda/kernels.h"
#include "ops/nf4.h"

namespace lt::cuda {
namespace {

__constant__ float kNf4Table[16];      // nf4_code()
__constant__ float kAbsmaxTable[256];  // dynamic_map_code(): the absmax's 8-bit codes

__global__ void nf4_dequantize_kernel(float* out, const uint8_t* codes, const uint8_t* absmax_codes,
                                      const float* absmax_scale, float absmax_offset,
                                      int64_t bytes) {
  for (int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; b < bytes;
       b += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = 2 * b;  // both elements share a 64-block (64 is even)
    // code * scale, then + offset, each rounded (bitsandbytes dequantizes, then adds the offset).
    const float absmax = __fadd_rn(__fmul_rn(kAbsmaxTable[absmax_codes[i / kNf4Block]],
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

void nf4_upload_tables(const Context& ctx) {
  LT_CUDA_CHECK(cudaMemcpyToSymbolAsync(kNf4Table, nf4_code().data(), 16 * sizeof(float), 0,
                                        cudaMemcpyHostToDevice, ctx.stream));
  LT_CUDA_CHECK(cudaMemcpyToSymbolAsync(kAbsmaxTable, dynamic_map_code().data(),
                                        256 * sizeof(float), 0, cudaMemcpyHostToDevice,
                                        ctx.stream));
}

void nf4_dequantize(const Context& ctx, float* out, const Nf4Device& w) {
  if (w.n <= 0) return;
  const int64_t bytes = w.n / 2;
  nf4_dequantize_kernel<<<grid_for(bytes, 256, ctx.num_sms), 256, 0, ctx.stream>>>(
      out, w.codes, w.absmax_codes, w.absmax_scale, w.absmax_offset, bytes);
  LT_CUDA_CHECK_LAUNCH();
}

}  // namespace lt::cuda
