// LoRA (Hu et al. 2021, arXiv 2106.09685) on a linear layer: the low-rank path
// out += scale * dropout(inp) A^T B^T, and its backward; dropout masks come from a counter-based
// hash of (seed, token row, column), so backward regenerates exactly the mask of forward.
#pragma once
#include <cstdint>

#include "ops/common.h"
#include "ops/lora_mask.h"

namespace lt {

// What a LoRA call needs besides its tensors.
struct LoraCall {
  int64_t R = 0;         // rank r
  float scale = 1.0f;    // alpha / r, or alpha / sqrt(r) with rsLoRA
  float dropout = 0.0f;  // probability of zeroing an input element (0 = off)
  uint64_t seed = 0;     // mask key (one per micro-batch, layer and projection)
  int64_t row0 = 0;      // absolute row of inp's first row (mini-sequence chunks keep their mask)
};

// out (N,OUT) += scale * (dropout(inp) (N,IN) @ a^T) @ b^T, with a (R,IN) and b (OUT,R).
// t (N,R) and xd (N,IN, only used when dropout > 0) are scratch.
void lora_forward(float* out, float* t, float* xd, const float* inp, const float* a, const float* b,
                  int64_t N, int64_t IN, int64_t OUT, const LoraCall& c);
// Gradients of the LoRA path, all accumulated (+=), any of them null to skip:
//   t = dropout(inp) @ a^T (recomputed), u (N,R) = dout @ b
//   dinp (N,IN) += scale * dropout'(u @ a)      da (R,IN) += scale * u^T @ dropout(inp)
//   db (OUT,R) += scale * dout^T @ t
// t, u (N,R) and xd, dxd (N,IN) are scratch.
void lora_backward(float* dinp, float* da, float* db, float* t, float* u, float* xd, float* dxd,
                   const float* dout, const float* inp, const float* a, const float* b, int64_t N,
                   int64_t IN, int64_t OUT, const LoraCall& c);

}  // namespace lt
