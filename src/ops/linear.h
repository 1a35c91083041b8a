// Linear layers (nn.Linear layout: weight is (OUT,IN)) on BLAS sgemm.
#pragma once
#include "ops/common.h"

namespace lt {

// out (N,OUT) = inp (N,IN) @ weight (OUT,IN)^T + bias (OUT); bias may be null.
void linear_forward(float* out, const float* inp, const float* weight, const float* bias, int64_t N,
                    int64_t IN, int64_t OUT);
// dinp (N,IN) = dout @ weight, overwritten or accumulated per acc (null: skipped);
// dweight (OUT,IN) += dout^T @ inp (null: skipped); dbias (OUT) += column sums of dout (null:
// skipped).
void linear_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                     const float* weight, int64_t N, int64_t IN, int64_t OUT, Accumulate acc);

// Linear layers on a bf16 weight (OUT,IN) (frozen, --bf16 True): the results of linear_forward
// and linear_backward (no weight gradient) on the weight widened to f32, widened expand_rows
// weight rows at a time into expand (expand_rows * IN floats). When expand_rows >= OUT that is
// one widening and the f32 op on it, bit for bit; fewer rows run the weight in row blocks (the
// forward's output columns; the backward's reduction over OUT, accumulated block by block).
void linear_forward_bf16w(float* out, const float* inp, const uint16_t* weight, const float* bias,
                          int64_t N, int64_t IN, int64_t OUT, float* expand, int64_t expand_rows);
void linear_backward_bf16w(float* dinp, float* dbias, const float* dout, const uint16_t* weight,
                           int64_t N, int64_t IN, int64_t OUT, Accumulate acc, float* expand,
                           int64_t expand_rows);

// General row-major GEMM helper: C (M,N) = alpha * op(A) op(B) + beta * C.
// op(A) is (M,K): A is (M,K) or, when trans_a, (K,M); likewise B is (K,N) or, when trans_b, (N,K).
void gemm(float* C, const float* A, const float* B, int64_t M, int64_t N, int64_t K, bool trans_a,
          bool trans_b, float alpha, float beta);
// The same with each matrix's row pitch (lda, ldb, ldc elements): sub-blocks of larger ones.
void gemm_ld(float* C, int64_t ldc, const float* A, int64_t lda, const float* B, int64_t ldb,
             int64_t M, int64_t N, int64_t K, bool trans_a, bool trans_b, float alpha, float beta);

}  // namespace lt
