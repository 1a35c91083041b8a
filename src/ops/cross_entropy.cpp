// CPU fused LM head + cross-entropy over row chunks (mini-sequence, arXiv 2407.15892).
// Differences from the published implementation, each covered by tests/test_ops.cpp:
//  - every row is processed (the last chunk may be short; no tail is dropped);
//  - dweight is accumulated exactly once per call (+=), whatever chunk has labels first;
//  - the normalisation is the caller's grad_scale (1 / labelled tokens of the whole batch).
#include "ops/cross_entropy.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/check.h"
#include "ops/linear.h"

namespace lt {

namespace {

// The chunked loop over rows, with the head's products supplied by the caller:
// logits(z, h, rows): z (rows,V) = h @ W^T; dh(out, z, rows): out (rows,D) = z @ W;
// dw(z, h, rows): dweight += z^T @ h (or nothing).
template <class Logits, class Dh, class Dw>
double cross_entropy_rows(float* dhidden, bool want_dweight, const float* hidden,
                          const int32_t* targets, int64_t N, int64_t D, int64_t V, int64_t chunk,
                          float grad_scale, float* scratch, Logits logits, Dh dh_product,
                          Dw dw_product) {
  LT_CHECK(chunk >= 1, "lm_head_cross_entropy: chunk={} must be >= 1", chunk);
  LT_CHECK(N >= 0 && D >= 1 && V >= 1, "lm_head_cross_entropy: N={} D={} V={}", N, D, V);
  for (int64_t n = 0; n < N; ++n) {
    const int32_t t = targets[n];
    LT_CHECK(t == kIgnoreIndex || (t >= 0 && t < V), "target[{}]={} outside [0,{}) and not {}", n,
             t, V, kIgnoreIndex);
  }
  const bool want_grad = dhidden || want_dweight;
  double loss = 0;
  std::vector<double> row_loss(size_t(std::min(chunk, std::max<int64_t>(N, 1))));
  for (int64_t r0 = 0; r0 < N; r0 += chunk) {
    const int64_t rows = std::min(chunk, N - r0);
    const int32_t* y = targets + r0;
    const float* h = hidden + r0 * D;
    float* dh = dhidden ? dhidden + r0 * D : nullptr;
    int64_t labelled = 0;
    for (int64_t i = 0; i < rows; ++i) labelled += y[i] != kIgnoreIndex;
    if (labelled == 0) {  // no loss and no gradient here, but dhidden is still overwritten
      if (dh) std::memset(dh, 0, size_t(rows * D) * sizeof(float));
      continue;
    }
    // logits (rows,V) = h (rows,D) @ weight (V,D)^T, in scratch.
    logits(scratch, h, rows);
#pragma omp parallel for schedule(static) if (rows * V > (1 << 15))
    for (int64_t i = 0; i < rows; ++i) {
      float* z = scratch + i * V;
      if (y[i] == kIgnoreIndex) {
        row_loss[size_t(i)] = 0;
        if (want_grad) std::fill(z, z + V, 0.0f);
        continue;
      }
      // Stable log-softmax: lse = m + log(sum exp(z - m)), the sum in double. A NaN logit makes
      // the sum, the loss and the whole gradient row NaN (it is never silently dropped).
      const float z_target = z[y[i]];
      float m = z[0];
      for (int64_t j = 1; j < V; ++j) m = z[j] > m ? z[j] : m;
      double sum = 0;
      for (int64_t j = 0; j < V; ++j) {  // e = exp(z - m) kept in place: one exp per logit
        z[j] = std::exp(z[j] - m);
        sum += double(z[j]);
      }
      row_loss[size_t(i)] = double(m) + std::log(sum) - double(z_target);
      if (want_grad) {
        // g = grad_scale * (softmax(z) - onehot(y)) = e * (grad_scale / sum) - grad_scale [y].
        const float f = float(double(grad_scale) / sum);
#pragma omp simd
        for (int64_t j = 0; j < V; ++j) z[j] *= f;
        z[y[i]] -= grad_scale;
      }
    }
    for (int64_t i = 0; i < rows; ++i) loss += row_loss[size_t(i)];  // fixed order
    // dh (rows,D) = g (rows,V) @ weight (V,D): overwritten.
    if (dh) dh_product(dh, scratch, rows);
    // dweight (V,D) += g^T (V,rows) @ h (rows,D): accumulated, once.
    if (want_dweight) dw_product(scratch, h, rows);
  }
  return loss;
}

}  // namespace

double lm_head_cross_entropy(float* dhidden, float* dweight, const float* hidden,
                             const float* weight, const int32_t* targets, int64_t N, int64_t D,
                             int64_t V, int64_t chunk, float grad_scale, float* scratch) {
  return cross_entropy_rows(
      dhidden, dweight != nullptr, hidden, targets, N, D, V, chunk, grad_scale, scratch,
      [&](float* z, const float* h, int64_t rows) {
        gemm(z, h, weight, rows, V, D, false, true, 1.0f, 0.0f);
      },
      [&](float* dh, const float* z, int64_t rows) {
        gemm(dh, z, weight, rows, D, V, false, false, 1.0f, 0.0f);
      },
      [&](const float* z, const float* h, int64_t rows) {
        gemm(dweight, z, h, V, D, rows, true, false, 1.0f, 1.0f);
      });
}

double lm_head_cross_entropy_bf16w(float* dhidden, const float* hidden, const uint16_t* weight,
                                   const int32_t* targets, int64_t N, int64_t D, int64_t V,
                                   int64_t chunk, float grad_scale, float* scratch, float* expand,
                                   int64_t expand_rows) {
  return cross_entropy_rows(
      dhidden, false, hidden, targets, N, D, V, chunk, grad_scale, scratch,
      [&](float* z, const float* h, int64_t rows) {
        linear_forward_bf16w(z, h, weight, nullptr, rows, D, V, expand, expand_rows);
      },
      [&](float* dh, const float* z, int64_t rows) {
        linear_backward_bf16w(dh, nullptr, z, weight, rows, D, V, Accumulate::kNo, expand,
                              expand_rows);
      },
      [](const float*, const float*, int64_t) {});
}

}  // namespace lt
