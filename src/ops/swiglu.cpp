// CPU SwiGLU gate: out = silu(gate) * up and its gradient.
#include "ops/swiglu.h"

#include <cmath>

namespace lt {
namespace {

// 1 / (1 + e^-x): for x << 0, e^-x overflows to +inf and the result is an exact 0, never NaN.
inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

}  // namespace

void swiglu_forward(float* out, const float* gate, const float* up, int64_t n) {
#pragma omp parallel for simd schedule(static) if (n > (1 << 15))
  for (int64_t i = 0; i < n; ++i) out[i] = gate[i] * sigmoid(gate[i]) * up[i];
}

void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate,
                     const float* up, int64_t n) {
  // d silu(g)/dg = sig(g) (1 + g (1 - sig(g))). For g -> -inf, sig = 0 and the product is 0
  // (the order keeps the huge g factor inside a finite 1 + g term multiplied by 0).
#pragma omp parallel for simd schedule(static) if (n > (1 << 15))
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i], s = sigmoid(g);
    const float dy = dout[i];
    dgate[i] = dy * up[i] * (s * (1.0f + g * (1.0f - s)));
    dup[i] = dy * (g * s);
  }
}

}  // namespace lt
