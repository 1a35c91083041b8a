// RMSNorm as Llama/Mistral/Qwen2 use it: y = x * rsqrt(mean(x^2) + eps) * weight.
#pragma once
#include "ops/common.h"

namespace lt {

// out (N,D), rstd (N) saved for backward; inp (N,D), weight (D).
void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int64_t N,
                     int64_t D, float eps);
// dinp (N,D) overwritten or accumulated per acc; dweight (D) +=.
// dout (N,D), inp (N,D), weight (D), rstd (N) from the forward.
void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp,
                      const float* weight, const float* rstd, int64_t N, int64_t D, Accumulate acc);

}  // namespace lt
