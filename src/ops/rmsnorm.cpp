// CPU RMSNorm forward/backward, following transformers' LlamaRMSNorm in f32:
//   var = mean(x^2); y = weight * (x * rsqrt(var + eps)).
#include "ops/rmsnorm.h"

#include <algorithm>
#include <cmath>

namespace lt {

void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int64_t N,
                     int64_t D, float eps) {
#pragma omp parallel for schedule(static) if (N * D > (1 << 15))
  for (int64_t n = 0; n < N; ++n) {
    const float* x = inp + n * D;
    float* y = out + n * D;
    double ss = 0;  // the mean of squares in double: exact to f32 rounding, cheap next to the row
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < D; ++j) ss += double(x[j]) * double(x[j]);
    const float var = float(ss / double(D));
    const float r = 1.0f / std::sqrt(var + eps);
    rstd[n] = r;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) y[j] = weight[j] * (x[j] * r);
  }
}

void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp,
                      const float* weight, const float* rstd, int64_t N, int64_t D,
                      Accumulate acc) {
  // y_j = w_j x_j r, r = (mean(x^2) + eps)^(-1/2), dr/dx_k = -r^3 x_k / D, so
  //   dx_k = r w_k dy_k - x_k r^3 / D * sum_j dy_j w_j x_j.
  // A null dinp or dweight skips that gradient.
#pragma omp parallel for schedule(static) if (N * D > (1 << 15))
  for (int64_t n = 0; n < (dinp ? N : 0); ++n) {
    const float* x = inp + n * D;
    const float* dy = dout + n * D;
    float* dx = dinp + n * D;
    const float r = rstd[n];
    double dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < D; ++j) dot += double(dy[j]) * double(weight[j]) * double(x[j]);
    const float c = float(dot * double(r) * double(r) * double(r) / double(D));
    if (acc == Accumulate::kYes) {
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) dx[j] += r * weight[j] * dy[j] - x[j] * c;
    } else {
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) dx[j] = r * weight[j] * dy[j] - x[j] * c;
    }
  }
  if (!dweight) return;
  // dweight_j += sum_n dy_nj x_nj r_n: column blocks per thread, rows in order (deterministic).
  constexpr int64_t kCols = 64;
  const int64_t blocks = (D + kCols - 1) / kCols;
#pragma omp parallel for schedule(static) if (N * D > (1 << 15))
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t j0 = b * kCols, j1 = std::min(D, j0 + kCols);
    double sum[kCols] = {};
    for (int64_t n = 0; n < N; ++n) {
      const float* x = inp + n * D;
      const float* dy = dout + n * D;
      const double r = rstd[n];
#pragma omp simd
      for (int64_t j = j0; j < j1; ++j) sum[j - j0] += double(dy[j]) * double(x[j]) * r;
    }
    for (int64_t j = j0; j < j1; ++j) dweight[j] += float(sum[j - j0]);
  }
}

}  // namespace lt
