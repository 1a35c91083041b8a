// Causal grouped-query attention, tiled flash-attention style (online softmax; memory O(T*HD),
// never T*T), with sliding window and packed documents. The log-sum-exp of each query row is
// saved for backward (FlashAttention-2).
#pragma once
#include "ops/common.h"

namespace lt {

struct AttentionShape {
  int64_t B = 1, T = 0, H = 0, KVH = 0, HD = 0;
  // Key j is visible from query i when j <= i, i - j < window (if window > 0) and
  // doc_ids[j] == doc_ids[i] (if doc_ids is set). Matches transformers' sliding-window masks.
  int64_t window = 0;
  const int32_t* doc_ids = nullptr;  // (B,T) document index of each token, or null
  float scale = 0;                   // softmax scale, usually 1/sqrt(HD)
  // One block of the attention (FPDT's chunk pairs): the queries [q_begin, q_begin + Tq) against
  // the keys [k_begin, k_begin + Tk) of the T tokens, masks in the coordinates of the whole
  // sequence. q, out, dout, dq then hold Tq rows per batch, k, v, dk, dv Tk rows, lse (B,H,Tq);
  // doc_ids still covers all T. Tq = 0 / Tk = 0 mean the whole sequence (the default).
  int64_t q_begin = 0, Tq = 0, k_begin = 0, Tk = 0;
  int64_t q_rows() const { return Tq ? Tq : T; }
  int64_t k_rows() const { return Tk ? Tk : T; }
};

// out (B,T,H,HD), lse (B,H,T) saved; q (B,T,H,HD), k and v (B,T,KVH,HD).
// Query head h reads kv head h / (H / KVH). A row that sees no key gets out = 0, lse = -inf.
void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                       const AttentionShape& s);
// dq (B,T,H,HD), dk and dv (B,T,KVH,HD): overwritten. dout, out, lse from the forward.
// For a block (see AttentionShape), out and lse are the final ones of its query rows (merged
// over every key block), so that the blocks' dq / dk / dv sum to the whole gradient.
void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* out,
                        const float* lse, const float* q, const float* k, const float* v,
                        const AttentionShape& s);

// Online-softmax merge of two partial results over disjoint key sets of the same query rows
// (B = 1): (out, lse) becomes the attention over both. out, out_b (rows,H,HD); lse, lse_b
// (H,rows); a partial that saw no key has lse -inf (and out 0).
void attention_merge(float* out, float* lse, const float* out_b, const float* lse_b, int64_t rows,
                     int64_t H, int64_t HD);

// The plain O(T^2)-memory version (specification and baseline for benchmarks); same contract,
// whole sequences only (no blocks).
void attention_forward_naive(float* out, float* lse, const float* q, const float* k, const float* v,
                             const AttentionShape& s);
void attention_backward_naive(float* dq, float* dk, float* dv, const float* dout, const float* out,
                              const float* lse, const float* q, const float* k, const float* v,
                              const AttentionShape& s);

namespace detail {
// The tile GEMM inside the flash kernels: C (M,N) (+)= A (M,K) B (K,N), A(m,k) = a[m*a_m + k*a_k],
// B and C row-major with row strides ldb, ldc. Exported for bench_attention's comparison with
// cblas_sgemm on the same tiles.
void attention_tile_gemm(float* c, int64_t ldc, const float* a, int64_t a_m, int64_t a_k,
                         const float* b, int64_t ldb, int64_t M, int64_t N, int64_t K,
                         bool accumulate);
}  // namespace detail

}  // namespace lt
