// Token embedding lookup and its gradient.
#pragma once
#include "ops/common.h"

namespace lt {

// out (N,D) = weight (V,D) rows at ids (N). Ids are validated by the caller (0 <= id < V).
void embedding_forward(float* out, const int32_t* ids, const float* weight, int64_t N, int64_t D);
// The same from a bf16 table (a frozen embedding with --bf16 True): rows widened exactly.
void embedding_forward_bf16(float* out, const int32_t* ids, const uint16_t* weight, int64_t N,
                            int64_t D);
// dweight (V,D) += dout (N,D) scattered to the rows at ids (N).  [accumulates]
void embedding_backward(float* dweight, const float* dout, const int32_t* ids, int64_t N,
                        int64_t D);

}  // namespace lt
