// CUDA linear layers: cuBLAS GEMMs (f32, or bf16 inputs with f32 accumulation), bias add and
// the deterministic bias gradient.
#include <cuda_bf16.h>

#include "backend/cuda/common.cuh"
#include "backend/cuda/kernels.h"

namespace lt::cuda {
namespace {

__global__ void to_bf16_kernel(__nv_bfloat16* out, const float* in, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    out[i] = __float2bfloat16_rn(in[i]);
}

// out (N,OUT) += bias (OUT) broadcast over rows.
__global__ void add_bias_kernel(float* out, const float* bias, int64_t N, int64_t OUT) {
  const int64_t n = N * OUT;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    out[i] += bias[i % OUT];
}

// Column sums of dout (N,OUT), stage 1: block (x: 32 columns, y: 8 row lanes) sums a slice of
// rows into partial[slice, col]. Stage 2 adds the slices in order: the result is deterministic.
constexpr int kColTile = 32, kRowLanes = 8;
__global__ void column_sum_partial_kernel(float* partial, const float* dout, int64_t N,
                                          int64_t OUT, int64_t rows_per_slice) {
  __shared__ float sums[kRowLanes][kColTile + 1];
  const int64_t col = blockIdx.x * int64_t(kColTile) + threadIdx.x;
  const int64_t r0 = blockIdx.y * rows_per_slice;
  const int64_t r1 = min(N, r0 + rows_per_slice);
  float s = 0;
  if (col < OUT)
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kRowLanes) s += dout[r * OUT + col];
  sums[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < OUT) {
    float t = 0;
    for (int i = 0; i < kRowLanes; ++i) t += sums[i][threadIdx.x];
    partial[blockIdx.y * OUT + col] = t;
  }
}
__global__ void column_sum_finish_kernel(float* dbias, const float* partial, int64_t slices,
                                         int64_t OUT) {
  const int64_t col = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (col >= OUT) return;
  float t = 0;
  for (int64_t s = 0; s < slices; ++s) t += partial[s * OUT + col];
  dbias[col] += t;
}

}  // namespace

void gemm(const Context& ctx, float* C, const float* A, const float* B, int64_t M, int64_t N,
          int64_t K, bool trans_a, bool trans_b, float alpha, float beta) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {  // C = beta * C (cuBLAS needs leading dimensions >= 1)
    if (beta == 0.0f) {
      LT_CUDA_CHECK(cudaMemsetAsync(C, 0, size_t(M * N) * sizeof(float), ctx.stream));
    } else if (beta != 1.0f) {
      scale_inplace(ctx, C, M * N, beta);
    }
    return;
  }
  // cuBLAS is column-major: the row-major C (M,N) is the column-major C^T (N,M) = op(B)^T
  // op(A)^T, so B goes first. A row-major (M,K) is a column-major (K,M) with leading dim K.
  const cublasOperation_t op_a = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_b = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const int64_t lda = trans_a ? M : K, ldb = trans_b ? K : N;
  if (ctx.precision == GemmPrecision::kF32) {
    // CUBLAS_COMPUTE_32F_PEDANTIC: true f32 products, never TF32 (NVIDIA_TF32_OVERRIDE aside).
    LT_CUBLAS_CHECK(cublasGemmEx(ctx.cublas, op_b, op_a, int(N), int(M), int(K), &alpha, B,
                                 CUDA_R_32F, int(ldb), A, CUDA_R_32F, int(lda), &beta, C,
                                 CUDA_R_32F, int(N), CUBLAS_COMPUTE_32F_PEDANTIC,
                                 CUBLAS_GEMM_DEFAULT));
    return;
  }
  // kBf16: round both inputs to bf16 in the GEMM scratch, multiply on tensor cores with f32
  // accumulation and an f32 output.
  const int64_t na = M * K, nb = K * N;
  const size_t a_bytes = (size_t(na) * 2 + 255) / 256 * 256;
  auto* a16 = static_cast<__nv_bfloat16*>(ctx.gemm_scratch->get(a_bytes + size_t(nb) * 2,
                                                                ctx.stream));
  auto* b16 = reinterpret_cast<__nv_bfloat16*>(reinterpret_cast<char*>(a16) + a_bytes);
  if (na > 0) {
    to_bf16_kernel<<<grid_for(na, 256, ctx.num_sms), 256, 0, ctx.stream>>>(a16, A, na);
    LT_CUDA_CHECK_LAUNCH();
  }
  if (nb > 0) {
    to_bf16_kernel<<<grid_for(nb, 256, ctx.num_sms), 256, 0, ctx.stream>>>(b16, B, nb);
    LT_CUDA_CHECK_LAUNCH();
  }
  LT_CUBLAS_CHECK(cublasGemmEx(ctx.cublas, op_b, op_a, int(N), int(M), int(K), &alpha, b16,
                               CUDA_R_16BF, int(ldb), a16, CUDA_R_16BF, int(lda), &beta, C,
                               CUDA_R_32F, int(N), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

void linear_forward(const Context& ctx, float* out, const float* inp, const float* weight,
                    const float* bias, int64_t N, int64_t IN, int64_t OUT) {
  // out (N,OUT) = inp (N,IN) @ weight (OUT,IN)^T (+ bias)
  gemm(ctx, out, inp, weight, N, OUT, IN, false, true, 1.0f, 0.0f);
  if (bias && N * OUT > 0) {
    add_bias_kernel<<<grid_for(N * OUT, 256, ctx.num_sms), 256, 0, ctx.stream>>>(out, bias, N,
                                                                                 OUT);
    LT_CUDA_CHECK_LAUNCH();
  }
}

void linear_backward(const Context& ctx, float* dinp, float* dweight, float* dbias,
                     const float* dout, const float* inp, const float* weight, int64_t N,
                     int64_t IN, int64_t OUT, Accumulate acc) {
  // dinp (N,IN) (+)= dout (N,OUT) @ weight (OUT,IN)
  if (dinp)
    gemm(ctx, dinp, dout, weight, N, IN, OUT, false, false, 1.0f,
         acc == Accumulate::kYes ? 1.0f : 0.0f);
  // dweight (OUT,IN) += dout^T (OUT,N) @ inp (N,IN)
  if (dweight) gemm(ctx, dweight, dout, inp, OUT, IN, N, true, false, 1.0f, 1.0f);
  if (dbias && N > 0 && OUT > 0) {
    const int64_t rows_per_slice = 256;
    const int64_t slices = (N + rows_per_slice - 1) / rows_per_slice;
    auto* partial = static_cast<float*>(ctx.scratch->get(size_t(slices * OUT) * 4, ctx.stream));
    const dim3 grid(unsigned((OUT + kColTile - 1) / kColTile), unsigned(slices));
    column_sum_partial_kernel<<<grid, dim3(kColTile, kRowLanes), 0, ctx.stream>>>(
        partial, dout, N, OUT, rows_per_slice);
    LT_CUDA_CHECK_LAUNCH();
    column_sum_finish_kernel<<<unsigned((OUT + 255) / 256), 256, 0, ctx.stream>>>(
        dbias, partial, slices, OUT);
    LT_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace lt::cuda
