// CPU linear layers and the general GEMM helper, on OpenBLAS cblas_sgemm.
#include "ops/linear.h"

#include <cblas.h>

#include <algorithm>

#include "core/check.h"
#include "core/dtype.h"

namespace lt {

void gemm(float* C, const float* A, const float* B, int64_t M, int64_t N, int64_t K, bool trans_a,
          bool trans_b, float alpha, float beta) {
  LT_CHECK(M >= 0 && N >= 0 && K >= 0, "gemm sizes M={} N={} K={}", M, N, K);
  if (M == 0 || N == 0) return;
  if (K == 0) {  // BLAS would leave C untouched for beta == 1 only; make the empty sum explicit.
    for (int64_t i = 0; i < M * N; ++i) C[i] = beta == 0 ? 0.0f : beta * C[i];
    return;
  }
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
              trans_b ? CblasTrans : CblasNoTrans, blasint(M), blasint(N), blasint(K), alpha, A,
              blasint(trans_a ? M : K), B, blasint(trans_b ? K : N), beta, C, blasint(N));
}

void gemm_ld(float* C, int64_t ldc, const float* A, int64_t lda, const float* B, int64_t ldb,
             int64_t M, int64_t N, int64_t K, bool trans_a, bool trans_b, float alpha, float beta) {
  LT_CHECK(M >= 0 && N >= 0 && K >= 0, "gemm sizes M={} N={} K={}", M, N, K);
  if (M == 0 || N == 0) return;
  if (K == 0) {
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == 0 ? 0.0f : beta * C[i * ldc + j];
    return;
  }
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
              trans_b ? CblasTrans : CblasNoTrans, blasint(M), blasint(N), blasint(K), alpha, A,
              blasint(lda), B, blasint(ldb), beta, C, blasint(ldc));
}

namespace {
void widen(float* out, const uint16_t* in, int64_t n) {
#pragma omp parallel for simd schedule(static) if (n > (1 << 16))
  for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_f32(in[i]);
}
}  // namespace

void linear_forward_bf16w(float* out, const float* inp, const uint16_t* weight, const float* bias,
                          int64_t N, int64_t IN, int64_t OUT, float* expand, int64_t expand_rows) {
  LT_CHECK(expand_rows >= 1, "linear_forward_bf16w: expand_rows={}", expand_rows);
  if (expand_rows >= OUT) {  // one widening: the f32 linear on the widened weight
    widen(expand, weight, OUT * IN);
    return linear_forward(out, inp, expand, bias, N, IN, OUT);
  }
  if (bias) {
#pragma omp parallel for schedule(static) if (N * OUT > (1 << 15))
    for (int64_t n = 0; n < N; ++n) std::copy(bias, bias + OUT, out + n * OUT);
  }
  for (int64_t o0 = 0; o0 < OUT; o0 += expand_rows) {  // out[:, o0:o1] = inp @ W[o0:o1]^T
    const int64_t rows = std::min(expand_rows, OUT - o0);
    widen(expand, weight + o0 * IN, rows * IN);
    gemm_ld(out + o0, OUT, inp, IN, expand, IN, N, rows, IN, false, true, 1.0f, bias ? 1.0f : 0.0f);
  }
}

void linear_backward_bf16w(float* dinp, float* dbias, const float* dout, const uint16_t* weight,
                           int64_t N, int64_t IN, int64_t OUT, Accumulate acc, float* expand,
                           int64_t expand_rows) {
  LT_CHECK(expand_rows >= 1, "linear_backward_bf16w: expand_rows={}", expand_rows);
  if (expand_rows >= OUT) {
    if (dinp) widen(expand, weight, OUT * IN);
    return linear_backward(dinp, nullptr, dbias, dout, nullptr, dinp ? expand : nullptr, N, IN, OUT,
                           acc);
  }
  if (dinp) {  // dinp (+)= sum over blocks of dout[:, o0:o1] @ W[o0:o1]
    for (int64_t o0 = 0; o0 < OUT; o0 += expand_rows) {
      const int64_t rows = std::min(expand_rows, OUT - o0);
      widen(expand, weight + o0 * IN, rows * IN);
      const bool first = o0 == 0 && acc == Accumulate::kNo;
      gemm_ld(dinp, IN, dout + o0, OUT, expand, IN, N, IN, rows, false, false, 1.0f,
              first ? 0.0f : 1.0f);
    }
  }
  if (dbias) linear_backward(nullptr, nullptr, dbias, dout, nullptr, nullptr, N, IN, OUT, acc);
}

void linear_forward(float* out, const float* inp, const float* weight, const float* bias, int64_t N,
                    int64_t IN, int64_t OUT) {
  float beta = 0.0f;
  if (bias) {  // out starts as the broadcast bias, then out += inp @ weight^T.
#pragma omp parallel for schedule(static) if (N * OUT > (1 << 15))
    for (int64_t n = 0; n < N; ++n) std::copy(bias, bias + OUT, out + n * OUT);
    beta = 1.0f;
  }
  gemm(out, inp, weight, N, OUT, IN, /*trans_a=*/false, /*trans_b=*/true, 1.0f, beta);
}

void linear_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                     const float* weight, int64_t N, int64_t IN, int64_t OUT, Accumulate acc) {
  // dinp (N,IN) = dout (N,OUT) @ weight (OUT,IN)
  if (dinp) {
    gemm(dinp, dout, weight, N, IN, OUT, false, false, 1.0f, acc == Accumulate::kYes ? 1.0f : 0.0f);
  }
  // dweight (OUT,IN) += dout^T (OUT,N) @ inp (N,IN)
  if (dweight) gemm(dweight, dout, inp, OUT, IN, N, true, false, 1.0f, 1.0f);
  if (dbias) {
    // Column sums: threads own column blocks, rows in order (deterministic), sums in double.
    constexpr int64_t kCols = 64;
    const int64_t blocks = (OUT + kCols - 1) / kCols;
#pragma omp parallel for schedule(static) if (N * OUT > (1 << 15))
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t j0 = b * kCols, j1 = std::min(OUT, j0 + kCols);
      double sum[kCols] = {};
      for (int64_t n = 0; n < N; ++n) {
        const float* g = dout + n * OUT;
#pragma omp simd
        for (int64_t j = j0; j < j1; ++j) sum[j - j0] += g[j];
      }
      for (int64_t j = j0; j < j1; ++j) dbias[j] += float(sum[j - j0]);
    }
  }
}

}  // namespace lt
