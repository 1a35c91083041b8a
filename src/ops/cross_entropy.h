// Fused LM head + token cross-entropy over row chunks (mini-sequence, arXiv 2407.15892):
// logits exist for at most `chunk` rows at a time; the gradient is formed at once per chunk.
#pragma once
#include "ops/common.h"

namespace lt {

// hidden (N,D), weight (V,D), targets (N) already shifted, kIgnoreIndex = no loss.
// Returns the sum of -log softmax(hidden @ weight^T)[target] over labelled rows (in double).
// If dhidden is set, dhidden (N,D) is overwritten with grad_scale * d(sum)/d(hidden);
// rows without a label get 0. If dweight is set, dweight (V,D) += grad_scale * d(sum)/d(weight).
// scratch holds chunk*V floats. Any N and chunk >= 1 (the last chunk may be short).
double lm_head_cross_entropy(float* dhidden, float* dweight, const float* hidden,
                             const float* weight, const int32_t* targets, int64_t N, int64_t D,
                             int64_t V, int64_t chunk, float grad_scale, float* scratch);

// The same over a frozen bf16 head weight (--bf16 True): no weight gradient; its products are
// ops/linear.h's bf16-weight linears, widening expand_rows vocabulary rows at a time into
// expand (expand_rows * D floats; expand_rows >= V: bit for bit the f32 op on the widened
// weight).
double lm_head_cross_entropy_bf16w(float* dhidden, const float* hidden, const uint16_t* weight,
                                   const int32_t* targets, int64_t N, int64_t D, int64_t V,
                                   int64_t chunk, float grad_scale, float* scratch, float* expand,
                                   int64_t expand_rows);

}  // namespace lt
