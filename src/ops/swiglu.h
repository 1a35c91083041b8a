// SwiGLU gate of the Llama MLP: out = silu(gate) * up, silu(x) = x * sigmoid(x).
#pragma once
#include "ops/common.h"

namespace lt {

// out (n) = silu(gate (n)) * up (n); n = N*F.
void swiglu_forward(float* out, const float* gate, const float* up, int64_t n);
// dgate (n), dup (n): overwritten; dout (n), gate and up from the forward.
void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate,
                     const float* up, int64_t n);

}  // namespace lt
