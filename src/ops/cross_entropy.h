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

}  // namespace lt
