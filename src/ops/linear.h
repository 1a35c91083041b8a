// Linear layers (nn.Linear layout: weight is (OUT,IN)) on BLAS sgemm.
#pragma once
#include "ops/common.h"

namespace lt {

// out (N,OUT) = inp (N,IN) @ weight (OUT,IN)^T + bias (OUT); bias may be null.
void linear_forward(float* out, const float* inp, const float* weight, const float* bias,
                    int64_t N, int64_t IN, int64_t OUT);
// dinp (N,IN) = dout @ weight, overwritten or accumulated per acc (null: skipped);
// dweight (OUT,IN) += dout^T @ inp (null: skipped); dbias (OUT) += column sums of dout (null: skipped).
void linear_backward(float* dinp, float* dweight, float* dbias, const float* dout,
                     const float* inp, const float* weight, int64_t N, int64_t IN, int64_t OUT,
                     Accumulate acc);

// General row-major GEMM helper: C (M,N) = alpha * op(A) op(B) + beta * C.
// op(A) is (M,K): A is (M,K) or, when trans_a, (K,M); likewise B is (K,N) or, when trans_b, (N,K).
void gemm(float* C, const float* A, const float* B, int64_t M, int64_t N, int64_t K, bool trans_a,
          bool trans_b, float alpha, float beta);

}  // namespace lt
