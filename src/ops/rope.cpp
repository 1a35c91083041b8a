// CPU rotary position embedding (Hugging Face rotate-half layout): tables, forward, backward.
#include "ops/rope.h"

#include <cmath>

namespace lt {

void rope_tables(float* cos, float* sin, const int32_t* pos, const float* inv_freq,
                 float attention_scaling, int64_t N, int64_t HD) {
  const int64_t half = HD / 2;
#pragma omp parallel for schedule(static) if (N * half > (1 << 14))
  for (int64_t n = 0; n < N; ++n) {
    const float p = float(pos[n]);
    for (int64_t i = 0; i < half; ++i) {
      // transformers: freqs = inv_freq.float() @ position_ids.float() (an f32 product), then
      // emb.cos() * attention_scaling, all in f32.
      const float angle = p * inv_freq[i];
      cos[n * half + i] = std::cos(angle) * attention_scaling;
      sin[n * half + i] = std::sin(angle) * attention_scaling;
    }
  }
}

void rope_forward(float* out, const float* inp, const float* cos, const float* sin, int64_t N,
                  int64_t H, int64_t HD) {
  // out = x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1): for each pair
  // (x1, x2) = (x[j], x[j + HD/2]): (x1 c - x2 s, x2 c + x1 s). Both reads precede the writes,
  // so out == inp is safe.
  const int64_t half = HD / 2;
#pragma omp parallel for schedule(static) if (N * H * HD > (1 << 15))
  for (int64_t n = 0; n < N; ++n) {
    const float* c = cos + n * half;
    const float* s = sin + n * half;
    for (int64_t h = 0; h < H; ++h) {
      const float* x = inp + (n * H + h) * HD;
      float* y = out + (n * H + h) * HD;
#pragma omp simd
      for (int64_t j = 0; j < half; ++j) {
        const float x1 = x[j], x2 = x[j + half];
        y[j] = x1 * c[j] - x2 * s[j];
        y[j + half] = x2 * c[j] + x1 * s[j];
      }
    }
  }
}

void rope_backward(float* dinp, const float* dout, const float* cos, const float* sin, int64_t N,
                   int64_t H, int64_t HD) {
  // The transpose of the per-pair rotation [[c, -s], [s, c]] is [[c, s], [-s, c]].
  const int64_t half = HD / 2;
#pragma omp parallel for schedule(static) if (N * H * HD > (1 << 15))
  for (int64_t n = 0; n < N; ++n) {
    const float* c = cos + n * half;
    const float* s = sin + n * half;
    for (int64_t h = 0; h < H; ++h) {
      const float* dy = dout + (n * H + h) * HD;
      float* dx = dinp + (n * H + h) * HD;
#pragma omp simd
      for (int64_t j = 0; j < half; ++j) {
        const float g1 = dy[j], g2 = dy[j + half];
        dx[j] = g1 * c[j] + g2 * s[j];
        dx[j + half] = g2 * c[j] - g1 * s[j];
      }
    }
  }
}

}  // namespace lt
