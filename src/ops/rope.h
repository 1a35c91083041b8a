// Rotary position embedding in Hugging Face's rotate-half layout:
//   x' = x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x[HD/2:], x[:HD/2]),
//   cos/sin of angle pos * inv_freq[i] for i < HD/2, repeated for both halves, times attention_scaling.
#pragma once
#include "ops/common.h"

namespace lt {

// cos, sin (N, HD/2): the tables for positions pos (N). Angles are computed in f32 as
// transformers does (pos * inv_freq), then cos/sin, then multiplied by attention_scaling.
void rope_tables(float* cos, float* sin, const int32_t* pos, const float* inv_freq,
                 float attention_scaling, int64_t N, int64_t HD);
// out (N,H,HD) = rope(inp (N,H,HD)); may be called in place (out == inp).
void rope_forward(float* out, const float* inp, const float* cos, const float* sin, int64_t N,
                  int64_t H, int64_t HD);
// dinp (N,H,HD) = rope^T(dout); overwrites; may be in place.
void rope_backward(float* dinp, const float* dout, const float* cos, const float* sin, int64_t N,
                   int64_t H, int64_t HD);

}  // namespace lt
