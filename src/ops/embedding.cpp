// CPU token embedding: row gather (forward) and deterministic scatter-add (backward).
#include "ops/embedding.h"

#include <algorithm>
#include <cstring>

#include "core/dtype.h"

namespace lt {

void embedding_forward(float* out, const int32_t* ids, const float* weight, int64_t N, int64_t D) {
#pragma omp parallel for schedule(static) if (N * D > (1 << 15))
  for (int64_t n = 0; n < N; ++n) {
    std::memcpy(out + n * D, weight + int64_t(ids[n]) * D, size_t(D) * sizeof(float));
  }
}

void embedding_forward_bf16(float* out, const int32_t* ids, const uint16_t* weight, int64_t N,
                            int64_t D) {
#pragma omp parallel for schedule(static) if (N * D > (1 << 15))
  for (int64_t n = 0; n < N; ++n) {
    const uint16_t* row = weight + int64_t(ids[n]) * D;
    float* o = out + n * D;
    for (int64_t j = 0; j < D; ++j) o[j] = bf16_to_f32(row[j]);
  }
}

void embedding_backward(float* dweight, const float* dout, const int32_t* ids, int64_t N,
                        int64_t D) {
  // Threads own disjoint column blocks and walk all rows in order, so duplicate ids are summed
  // without races and the result is bit-identical to the serial loop whatever the thread count.
  constexpr int64_t kCols = 64;
  const int64_t blocks = (D + kCols - 1) / kCols;
#pragma omp parallel for schedule(static) if (N * D > (1 << 15))
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t j0 = b * kCols, j1 = std::min(D, j0 + kCols);
    for (int64_t n = 0; n < N; ++n) {
      float* dw = dweight + int64_t(ids[n]) * D;
      const float* g = dout + n * D;
#pragma omp simd
      for (int64_t j = j0; j < j1; ++j) dw[j] += g[j];
    }
  }
}

}  // namespace lt
