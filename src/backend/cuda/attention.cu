// CUDA flash attention forward and backward (FlashAttention-2, Dao 2023, arXiv 2307.08691) on
// tensor cores: mma.sync m16n8k16 with bf16 operands and f32 accumulation; softmax statistics
// (running max, running sum, log-sum-exp) in f32. Causal, grouped-query, sliding window and
// packed documents, the contract of src/ops/attention.h. Inputs are f32; tiles are rounded to
// bf16 when they are staged in shared memory (head dim zero-padded to 32, 64 or 128).
//
// Forward: one block of 4 warps per (query tile of 64 rows, b, h); each warp owns 16 query rows
// and keeps their Q fragments, the output accumulator and (m, l) in registers while it streams
// the visible 64-key tiles (K row-major and V transposed in shared memory). Key tiles that no
// query of the tile can see (causal, window, or disjoint document ranges) are skipped whole.
//
// Blocks (AttentionShape::q_begin/Tq/k_begin/Tk, FPDT's chunk pairs): q, out, dout, dq hold TQ
// rows per batch starting at sequence position QB, k, v, dk, dv TK rows from KB; indices i, j
// below are positions in the whole sequence (masks, doc ids), buffers are offset by QB / KB.
//
// Backward: one block per (key tile of 64, b, kv head); each warp owns 16 keys and accumulates
// their dK and dV in registers over every query head of the group and every query tile that
// sees the key tile, recomputing P = exp(S * scale - lse) from the saved lse. The B operands
// whose contraction runs down a tile's rows (dO and Q for dV and dK, K for dQ) are read down the
// columns of the row-major tiles, two 16-bit loads a register (conflict-free), so the block
// needs no transposed copies: 78 KB of shared memory at head dim 128 instead of 132, two blocks
// per SM (255 registers, no spills, on sm_90). Context::attention_transposed_tiles selects the
// former kernel, which stages transposed copies and loads them 32 bits at a time (one block per SM
// at head dim 128), for comparison on a GPU (LONGTUNE_ATTENTION_TRANSPOSED_TILES=1). dK and dV rows
// have one owner (written once, overwritten); dQ rows receive contributions from many key tiles
// and are accumulated with f32 atomicAdd into dq (zeroed first): their summation order, hence
// the last bits of dq, is not deterministic.
//
// Deterministic backward (Context::deterministic, `--full_determinism True`): the key-tile kernel
// leaves dQ out, and a second kernel owns the query tiles as the forward does: one block per
// (query tile, b, h), each warp 16 queries, dQ accumulated in registers over the visible key
// tiles in order (S, P and dP recomputed: three tile products where the atomics took one) and
// written once. Every output then has one owner and a fixed summation order: bit-identical run
// to run.
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "backend/cuda/common.cuh"
#include "backend/cuda/kernels.h"

namespace lt::cuda {
namespace {

constexpr int kTileQ = 64;  // query rows per tile (4 warps x 16)
constexpr int kTileK = 64;  // keys per tile
constexpr int kThreads = 128;
constexpr int kPad = 8;  // bf16 padding per shared-memory row: 16 bytes, conflict-free frags

struct FlashParams {
  const float* q;      // (B,TQ,H,HD)
  const float* k;      // (B,TK,KVH,HD)
  const float* v;      // (B,TK,KVH,HD)
  const float* out;    // (B,TQ,H,HD)   backward only
  const float* dout;   // (B,TQ,H,HD)   backward only
  const float* lse;    // (B,H,TQ)      backward only (forward writes lse_out)
  const float* dvec;   // (B,H,TQ) rowsum(dO * O), backward only
  const int32_t* doc;  // (B,T) or null
  float* o_out;        // (B,TQ,H,HD)   forward output
  float* lse_out;      // (B,H,TQ)      forward output
  float* dq;           // (B,TQ,H,HD)   backward: += (atomics; zeroed by the launcher), or
                       //               written once by the deterministic dQ kernel
  float* dk;           // (B,TK,KVH,HD) backward: overwritten
  float* dv;           // (B,TK,KVH,HD) backward: overwritten
  int64_t B, T, H, KVH, HD, window;
  int64_t TQ, TK, QB, KB;  // the block: query rows [QB, QB+TQ), key rows [KB, KB+TK)
  float scale;
};

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low half) = lo: the lower column
  return *reinterpret_cast<uint32_t*>(&v);
}

// C fragment nt (16 x 8 f32) of a 16 x 64 product into the A fragments of the next product,
// whose k-step nt / 2 it half fills (FlashAttention-2's register reuse: the C layout of tiles 2kk
// and 2kk + 1 is the A layout of k-step kk), rounded to bf16.
__device__ __forceinline__ void c_to_a_frag(uint32_t (&a)[kTileK / 16][4], const float (&c)[4],
                                            int nt) {
  a[nt / 2][(nt % 2) * 2 + 0] = pack_bf16(c[0], c[1]);
  a[nt / 2][(nt % 2) * 2 + 1] = pack_bf16(c[2], c[3]);
}

__device__ __forceinline__ uint32_t lds32(const __nv_bfloat16* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// The two bf16 at p and p + stride, the first in the low half: a pair of B-fragment elements read
// down a column of a row-major tile.
__device__ __forceinline__ uint32_t lds_column_pair(const __nv_bfloat16* p, int stride) {
  const auto* u = reinterpret_cast<const uint16_t*>(p);
  return uint32_t(u[0]) | (uint32_t(u[stride]) << 16);
}

// B fragment (16 x 8, rows k0 .. k0 + 15 of the contraction, column n) of an mma whose B is
// a row-major tile (rows = the contraction index): b0 holds rows k0 + 2t, + 1; b1 rows + 8, + 9.
__device__ __forceinline__ void load_b_frag_down(uint32_t& b0, uint32_t& b1,
                                                 const __nv_bfloat16* tile, int stride, int k0,
                                                 int n, int t) {
  const __nv_bfloat16* p = tile + (k0 + 2 * t) * stride + n;
  b0 = lds_column_pair(p, stride);
  b1 = lds_column_pair(p + 8 * stride, stride);
}

// c (16x8 f32) += a (16x16 bf16, row-major fragment) * b (16x8 bf16, column-major fragment).
// Fragment layouts (PTX ISA, mma.m16n8k16): with g = lane / 4, t = lane % 4,
//   a0: (g, 2t..2t+1)  a1: (g+8, 2t..)  a2: (g, 2t+8..)  a3: (g+8, 2t+8..)
//   b0: (k 2t..2t+1, n g)  b1: (k 2t+8.., n g)
//   c0,c1: (g, 2t..2t+1)  c2,c3: (g+8, 2t..2t+1)
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// A fragment of rows [r0, r0+16) and columns [c0, c0+16) of a row-major bf16 tile.
__device__ __forceinline__ void load_a_frag(uint32_t (&a)[4], const __nv_bfloat16* tile, int stride,
                                            int r0, int c0, int g, int t) {
  a[0] = lds32(tile + (r0 + g) * stride + c0 + 2 * t);
  a[1] = lds32(tile + (r0 + g + 8) * stride + c0 + 2 * t);
  a[2] = lds32(tile + (r0 + g) * stride + c0 + 2 * t + 8);
  a[3] = lds32(tile + (r0 + g + 8) * stride + c0 + 2 * t + 8);
}

// The warp's two products over the head dim, x = A1 B1^T and y = A2 B2^T (16 x 64 each): A tiles
// row-major, the warp's 16 rows from row r0; B tiles row-major, 64 rows (the products' columns).
// All four tiles have row stride `stride`. The backward's S^T = K Q^T and dP^T = V dO^T, the dQ
// kernel's S = Q K^T and dP = dO V^T.
template <int HDP, int kStride>
__device__ __forceinline__ void warp_tile_products(float (&x)[8][4], float (&y)[8][4],
                                                   const __nv_bfloat16* a1, const __nv_bfloat16* b1,
                                                   const __nv_bfloat16* a2, const __nv_bfloat16* b2,
                                                   int r0, int g, int t) {
#pragma unroll
  for (int nt = 0; nt < 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) x[nt][e] = y[nt][e] = 0.0f;
#pragma unroll
  for (int kk = 0; kk < HDP / 16; ++kk) {
    uint32_t f1[4], f2[4];
    load_a_frag(f1, a1, kStride, r0, kk * 16, g, t);
    load_a_frag(f2, a2, kStride, r0, kk * 16, g, t);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      const __nv_bfloat16* r1 = b1 + (nt * 8 + g) * kStride + kk * 16 + 2 * t;
      const __nv_bfloat16* r2 = b2 + (nt * 8 + g) * kStride + kk * 16 + 2 * t;
      mma_bf16(x[nt], f1, lds32(r1), lds32(r1 + 8));
      mma_bf16(y[nt], f2, lds32(r2), lds32(r2 + 8));
    }
  }
}

// Key j is visible from query i under the mask of AttentionShape, both inside the block (rows
// past the block's queries or keys see nothing).
__device__ __forceinline__ bool visible(const FlashParams& p, int64_t i, int64_t j, int32_t doc_i,
                                        int32_t doc_j) {
  return i < p.QB + p.TQ && j < p.KB + p.TK && j <= i && (p.window <= 0 || i - j < p.window) &&
         doc_i == doc_j;
}

// Stages rows [row0, row0 + 64) of a (.., ld) f32 matrix, columns < HD, as bf16 into a
// row-major tile (64, HDP + kPad) and/or a transposed tile (HDP, 64 + kPad). Rows >= T and
// columns >= HD are zero.
template <int HDP>
__device__ void stage_tile(__nv_bfloat16* rows_tile, __nv_bfloat16* cols_tile, const float* src,
                           int64_t ld, int64_t row0, int64_t T, int64_t HD) {
  for (int idx = threadIdx.x; idx < 64 * HDP; idx += kThreads) {
    const int r = idx / HDP, d = idx % HDP;
    float x = 0.0f;
    if (row0 + r < T && d < HD) x = src[(row0 + r) * ld + d];
    const __nv_bfloat16 b = __float2bfloat16_rn(x);
    if (rows_tile) rows_tile[r * (HDP + kPad) + d] = b;
    if (cols_tile) cols_tile[d * (64 + kPad) + r] = b;
  }
}

// Whether any of the 64 entries doc[row0 ..] (< T) lies in [lo, hi]; the entries are also
// stored in doc_s. Must be called by every thread of the block.
__device__ bool stage_docs(int32_t* doc_s, const int32_t* doc, int64_t row0, int64_t T, int32_t lo,
                           int32_t hi) {
  bool any = false;
  if (threadIdx.x < 64) {
    const int64_t j = row0 + threadIdx.x;
    const int32_t d = j < T ? doc[j] : INT32_MIN;
    doc_s[threadIdx.x] = d;
    any = j < T && d >= lo && d <= hi;
  }
  return __syncthreads_or(any) != 0;
}

// The first key tile (a multiple of 64 from KB) and the end of the keys that a query tile
// [q0, q0 + 64) can see: nothing before its window, nothing after its last query (causal).
__device__ __forceinline__ void key_tiles_of(const FlashParams& p, int64_t q0, int64_t& first,
                                             int64_t& end) {
  const int64_t k_first = p.window > 0 ? max(p.KB, q0 - p.window + 1) : p.KB;
  first = p.KB + (k_first - p.KB) / kTileK * kTileK;
  end = min(p.KB + p.TK, q0 + kTileQ);
}

// For a query tile's loop over key tiles (the forward, the dQ kernel): after a barrier (the
// previous tile is no longer read), stages key tile k0 of (b, kvh): its doc ids (kdoc_s; false,
// and nothing staged, when none meets the query tile's documents [qlo, qhi]: skip it), K
// row-major, V row-major (v_rows) and/or transposed (v_cols), then a barrier. Every thread must
// call it.
template <int HDP>
__device__ bool stage_key_tile(__nv_bfloat16* k_s, __nv_bfloat16* v_rows, __nv_bfloat16* v_cols,
                               int32_t* kdoc_s, const FlashParams& p, const int32_t* doc, int64_t b,
                               int64_t kvh, int64_t k0, int32_t qlo, int32_t qhi) {
  __syncthreads();
  const int64_t k_stop = p.KB + p.TK;
  if (doc && !stage_docs(kdoc_s, doc, k0, k_stop, qlo, qhi)) return false;
  const int64_t base = (b * p.TK * p.KVH + kvh) * p.HD;
  stage_tile<HDP>(k_s, nullptr, p.k + base, p.KVH * p.HD, k0 - p.KB, p.TK, p.HD);
  stage_tile<HDP>(v_rows, v_cols, p.v + base, p.KVH * p.HD, k0 - p.KB, p.TK, p.HD);
  __syncthreads();
  return true;
}

// [min, max] of doc[row0 .. row0 + 64) (< T) into range[0..1]; every thread must call it.
__device__ void doc_range(int32_t* range, const int32_t* doc, int64_t row0, int64_t T) {
  if (threadIdx.x == 0) {
    int32_t lo = INT32_MAX, hi = INT32_MIN;
    for (int64_t j = row0; j < row0 + 64 && j < T; ++j) lo = min(lo, doc[j]), hi = max(hi, doc[j]);
    range[0] = lo;
    range[1] = hi;
  }
  __syncthreads();
}

// ---------------------------------------------------------------------------------------------
// Forward

template <int HDP>
constexpr size_t forward_shared_bytes() {
  return size_t(2 * 64 * (HDP + kPad) + HDP * (64 + kPad)) * 2 + 64 * 4 + 2 * 4;
}

template <int HDP>
__global__ void __launch_bounds__(kThreads) flash_forward_kernel(FlashParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int kStride = HDP + kPad, kStrideT = 64 + kPad;
  auto* q_s = reinterpret_cast<__nv_bfloat16*>(smem);                // (64 queries, HDP)
  __nv_bfloat16* k_s = q_s + 64 * kStride;                           // (64 keys, HDP)
  __nv_bfloat16* vt_s = k_s + 64 * kStride;                          // (HDP, 64 keys)
  auto* kdoc_s = reinterpret_cast<int32_t*>(vt_s + HDP * kStrideT);  // (64)
  int32_t* qrange_s = kdoc_s + 64;                                   // (2)

  const int64_t T = p.T, H = p.H, KVH = p.KVH, HD = p.HD;
  const int64_t TQ = p.TQ, QB = p.QB;
  const int64_t q_stop = QB + TQ;  // past the block's last query
  const int64_t n_qt = (TQ + kTileQ - 1) / kTileQ;
  const int64_t q0 = QB + (n_qt - 1 - blockIdx.x) * kTileQ;  // longest (last) query tiles first
  const int64_t b = blockIdx.y / H, h = blockIdx.y % H, kvh = h / (H / KVH);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, g = lane / 4, t = lane % 4;
  const int32_t* doc = p.doc ? p.doc + b * T : nullptr;

  stage_tile<HDP>(q_s, nullptr, p.q + (b * TQ * H + h) * HD, H * HD, q0 - QB, TQ, HD);
  int32_t qlo = 0, qhi = 0;
  if (doc) {
    doc_range(qrange_s, doc, q0, q_stop);
    qlo = qrange_s[0], qhi = qrange_s[1];
  }
  __syncthreads();
  uint32_t qf[HDP / 16][4];
#pragma unroll
  for (int kk = 0; kk < HDP / 16; ++kk) load_a_frag(qf[kk], q_s, kStride, warp * 16, kk * 16, g, t);

  // This thread's two query rows (fragment rows g and g + 8 of the warp's 16).
  const int64_t qi[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
  const int32_t qdoc[2] = {doc && qi[0] < q_stop ? doc[qi[0]] : 0,
                           doc && qi[1] < q_stop ? doc[qi[1]] : 0};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  float o[HDP / 8][4];
#pragma unroll
  for (int nt = 0; nt < HDP / 8; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.0f;

  int64_t k_tile0, k_end;
  key_tiles_of(p, q0, k_tile0, k_end);
  for (int64_t k0 = k_tile0; k0 < k_end; k0 += kTileK) {
    if (!stage_key_tile<HDP>(k_s, nullptr, vt_s, kdoc_s, p, doc, b, kvh, k0, qlo, qhi)) continue;

    // S (16 x 64 per warp) = Q K^T
    float s[kTileK / 8][4];
#pragma unroll
    for (int nt = 0; nt < kTileK / 8; ++nt) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < HDP / 16; ++kk) {
        const __nv_bfloat16* kr = k_s + (nt * 8 + g) * kStride + kk * 16 + 2 * t;
        mma_bf16(s[nt], qf[kk], lds32(kr), lds32(kr + 8));
      }
    }
    // Scale and mask; the row max over this tile (the 4 threads of a quad share a row).
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < kTileK / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e / 2;
        const int64_t j = k0 + nt * 8 + 2 * t + (e & 1);
        const bool vis = visible(p, qi[r], j, qdoc[r], doc ? kdoc_s[j - k0] : 0);
        s[nt][e] = vis ? s[nt][e] * p.scale : -INFINITY;
        mx[r] = fmaxf(mx[r], s[nt][e]);
      }
    }
    // Online softmax (FlashAttention-2, Alg. 1): m' = max(m, rowmax S), P = exp(S - m'),
    // l' = exp(m - m') l + rowsum P, O' = exp(m - m') O + P V. A row that has seen no key yet
    // keeps m = -inf and uses 0 as its reference, so exp(-inf - 0) = 0 and nothing is NaN.
    float alpha[2], m_use[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      const float m_new = fmaxf(m[r], mx[r]);
      m_use[r] = m_new == -INFINITY ? 0.0f : m_new;
      alpha[r] = __expf(m[r] - m_use[r]);
      m[r] = m_new;
      l[r] *= alpha[r];
    }
    uint32_t pf[kTileK / 16][4];
#pragma unroll
    for (int nt = 0; nt < kTileK / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = __expf(s[nt][e] - m_use[e / 2]);
        l[e / 2] += s[nt][e];
      }
      c_to_a_frag(pf, s[nt], nt);
    }
#pragma unroll
    for (int nt = 0; nt < HDP / 8; ++nt) {
      o[nt][0] *= alpha[0], o[nt][1] *= alpha[0], o[nt][2] *= alpha[1], o[nt][3] *= alpha[1];
#pragma unroll
      for (int kk = 0; kk < kTileK / 16; ++kk) {
        const __nv_bfloat16* vr = vt_s + (nt * 8 + g) * kStrideT + kk * 16 + 2 * t;
        mma_bf16(o[nt], pf[kk], lds32(vr), lds32(vr + 8));
      }
    }
  }

  // Final: O / l, lse = m + log l (natural log); a row with no visible key: O = 0, lse = -inf.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (qi[r] >= q_stop) continue;
    const float inv = l[r] == 0.0f ? 0.0f : 1.0f / l[r];
    float* orow = p.o_out + ((b * TQ + qi[r] - QB) * H + h) * HD;
#pragma unroll
    for (int nt = 0; nt < HDP / 8; ++nt) {
      const int d = nt * 8 + 2 * t;
      if (d < HD) orow[d] = o[nt][2 * r] * inv;
      if (d + 1 < HD) orow[d + 1] = o[nt][2 * r + 1] * inv;
    }
    if (t == 0)
      p.lse_out[(b * H + h) * TQ + qi[r] - QB] = l[r] == 0.0f ? -INFINITY : m[r] + logf(l[r]);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward

// dvec[b,h,i] = sum_d dout[b,i,h,d] * out[b,i,h,d] (FlashAttention-2's D = rowsum(dO * O)); one
// warp per (b, i, h) row.
__global__ void dout_dot_out_kernel(float* dvec, const float* dout, const float* out, int64_t B,
                                    int64_t T, int64_t H, int64_t HD) {
  const int64_t row = blockIdx.x * int64_t(blockDim.x / kWarp) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= B * T * H) return;
  float acc = 0;
  for (int64_t d = lane; d < HD; d += kWarp) acc += dout[row * HD + d] * out[row * HD + d];
  acc = warp_sum(acc);
  const int64_t bt = row / H, h = row % H, b = bt / T, i = bt % T;
  if (lane == 0) dvec[(b * H + h) * T + i] = acc;
}

// Row-major k, v, q, dO tiles, dS (kDq only), and with kTransposed the transposed K, Q and dO
// copies.
template <int HDP, bool kTransposed, bool kDq>
constexpr size_t backward_shared_bytes() {
  return size_t(4 * 64 * (HDP + kPad) + (kTransposed ? 3 * HDP * (64 + kPad) : 0) +
                (kDq ? 64 * (64 + kPad) : 0)) *
             2 +
         3 * 64 * 4 + 2 * 4;
}

// kDq: this kernel also adds dQ, with atomics; without it flash_backward_dq_kernel writes dQ
// (the deterministic backward).
template <int HDP, bool kTransposed, bool kDq>
__global__ void __launch_bounds__(kThreads) flash_backward_kernel(FlashParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int kStride = HDP + kPad, kStrideT = 64 + kPad;
  constexpr int kTransposedTile = kTransposed ? HDP * kStrideT : 0;
  auto* k_s = reinterpret_cast<__nv_bfloat16*>(smem);  // (64 keys, HDP)
  __nv_bfloat16* v_s = k_s + 64 * kStride;             // (64 keys, HDP)
  __nv_bfloat16* q_s = v_s + 64 * kStride;             // (64 queries, HDP)
  __nv_bfloat16* do_s = q_s + 64 * kStride;            // (64 queries, HDP)
  // kTransposed only: (HDP, 64 keys), (HDP, 64 queries) twice; else empty (null).
  __nv_bfloat16* kt_s = kTransposed ? do_s + 64 * kStride : nullptr;
  __nv_bfloat16* qt_s = kTransposed ? kt_s + kTransposedTile : nullptr;
  __nv_bfloat16* dot_s = kTransposed ? qt_s + kTransposedTile : nullptr;
  // (64 queries, 64 keys) dS, kDq only
  __nv_bfloat16* ds_s = do_s + 64 * kStride + 3 * kTransposedTile;
  auto* lse_s = reinterpret_cast<float*>(ds_s + (kDq ? 64 * kStrideT : 0));  // (64)
  float* dvec_s = lse_s + 64;                                                // (64)
  auto* qdoc_s = reinterpret_cast<int32_t*>(dvec_s + 64);                    // (64)
  int32_t* krange_s = qdoc_s + 64;                                           // (2)

  const int64_t T = p.T, H = p.H, KVH = p.KVH, HD = p.HD, G = H / KVH;
  const int64_t TQ = p.TQ, TK = p.TK, QB = p.QB, KB = p.KB;
  const int64_t q_stop = QB + TQ, k_stop = KB + TK;  // past the block's last query / key
  const int64_t k0 = KB + int64_t(blockIdx.x) * kTileK;
  const int64_t b = blockIdx.y / KVH, kvh = blockIdx.y % KVH;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, g = lane / 4, t = lane % 4;
  const int32_t* doc = p.doc ? p.doc + b * T : nullptr;

  stage_tile<HDP>(k_s, kt_s, p.k + (b * TK * KVH + kvh) * HD, KVH * HD, k0 - KB, TK, HD);
  stage_tile<HDP>(v_s, nullptr, p.v + (b * TK * KVH + kvh) * HD, KVH * HD, k0 - KB, TK, HD);
  int32_t klo = 0, khi = 0;
  if (doc) {
    doc_range(krange_s, doc, k0, k_stop);
    klo = krange_s[0], khi = krange_s[1];
  }
  // This thread's two keys (fragment rows g and g + 8 of the warp's 16).
  const int64_t kj[2] = {k0 + warp * 16 + g, k0 + warp * 16 + g + 8};
  const int32_t kdoc[2] = {doc && kj[0] < k_stop ? doc[kj[0]] : 0,
                           doc && kj[1] < k_stop ? doc[kj[1]] : 0};

  float dk_acc[HDP / 8][4], dv_acc[HDP / 8][4];
#pragma unroll
  for (int nt = 0; nt < HDP / 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk_acc[nt][e] = dv_acc[nt][e] = 0.0f;

  // Queries before k0 see none of these keys (causal); with a window, none after
  // k0 + 63 + window - 1.
  const int64_t q_end = p.window > 0 ? min(q_stop, k0 + kTileK - 1 + p.window) : q_stop;
  for (int64_t h = kvh * G; h < (kvh + 1) * G; ++h) {
    const int64_t row_base = b * TQ * H + h;  // row (b, i, h) = row_base + (i - QB) * H
    for (int64_t q0 = max(k0, QB); q0 < q_end; q0 += kTileQ) {
      __syncthreads();  // the previous query tile's shared data is no longer read
      if (doc) {
        if (!stage_docs(qdoc_s, doc, q0, q_stop, klo, khi)) continue;  // disjoint documents
      }
      stage_tile<HDP>(q_s, qt_s, p.q + row_base * HD, H * HD, q0 - QB, TQ, HD);
      stage_tile<HDP>(do_s, dot_s, p.dout + row_base * HD, H * HD, q0 - QB, TQ, HD);
      if (threadIdx.x < 64) {
        const int64_t i = q0 + threadIdx.x;
        // lse = -inf (a row that sees nothing) -> +inf, so P = exp(S - lse) = 0; as rows past
        // the block.
        const float L = i < q_stop ? p.lse[(b * H + h) * TQ + i - QB] : INFINITY;
        lse_s[threadIdx.x] = L == -INFINITY ? INFINITY : L;
        dvec_s[threadIdx.x] = i < q_stop ? p.dvec[(b * H + h) * TQ + i - QB] : 0.0f;
      }
      __syncthreads();

      // S^T (16 keys x 64 queries per warp) = K Q^T and dP^T = V dO^T.
      float st[kTileQ / 8][4], dpt[kTileQ / 8][4];
      warp_tile_products<HDP, kStride>(st, dpt, k_s, q_s, v_s, do_s, warp * 16, g, t);
      // P^T = exp(S^T scale - lse) (0 where masked); dS^T = P^T (dP^T - D) scale.
      uint32_t pf[kTileQ / 16][4], dsf[kTileQ / 16][4];
#pragma unroll
      for (int nt = 0; nt < kTileQ / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e / 2, c = nt * 8 + 2 * t + (e & 1);
          const int64_t i = q0 + c;
          const bool vis = visible(p, i, kj[r], doc ? qdoc_s[c] : 0, kdoc[r]);
          const float pv = vis ? __expf(st[nt][e] * p.scale - lse_s[c]) : 0.0f;
          st[nt][e] = pv;
          dpt[nt][e] = vis ? pv * (dpt[nt][e] - dvec_s[c]) * p.scale : 0.0f;
          if constexpr (kDq)
            ds_s[c * kStrideT + warp * 16 + g + 8 * r] = __float2bfloat16_rn(dpt[nt][e]);
        }
        c_to_a_frag(pf, st[nt], nt);
        c_to_a_frag(dsf, dpt[nt], nt);
      }
      // dV (16 keys x HDP) += P^T dO; dK += dS^T Q (B operands down the columns of dO and Q).
#pragma unroll
      for (int nt = 0; nt < HDP / 8; ++nt) {
#pragma unroll
        for (int kk = 0; kk < kTileQ / 16; ++kk) {
          uint32_t db0, db1, qb0, qb1;
          if constexpr (kTransposed) {
            const __nv_bfloat16* dr = dot_s + (nt * 8 + g) * kStrideT + kk * 16 + 2 * t;
            const __nv_bfloat16* qr = qt_s + (nt * 8 + g) * kStrideT + kk * 16 + 2 * t;
            db0 = lds32(dr), db1 = lds32(dr + 8), qb0 = lds32(qr), qb1 = lds32(qr + 8);
          } else {
            load_b_frag_down(db0, db1, do_s, kStride, kk * 16, nt * 8 + g, t);
            load_b_frag_down(qb0, qb1, q_s, kStride, kk * 16, nt * 8 + g, t);
          }
          mma_bf16(dv_acc[nt], pf[kk], db0, db1);
          mma_bf16(dk_acc[nt], dsf[kk], qb0, qb1);
        }
      }
      if constexpr (kDq) {  // else flash_backward_dq_kernel writes dQ
        __syncthreads();    // dS of every warp is in ds_s

        // dQ (64 queries x HDP) += dS (64 x 64 keys) K: warp w takes queries 16w..16w+15, one
        // 8-column slice at a time, and adds it to dq with atomics.
        uint32_t af[kTileK / 16][4];
#pragma unroll
        for (int kk = 0; kk < kTileK / 16; ++kk)
          load_a_frag(af[kk], ds_s, kStrideT, warp * 16, kk * 16, g, t);
        const int64_t qrow[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
#pragma unroll 4
        for (int nt = 0; nt < HDP / 8; ++nt) {
          if (nt * 8 >= HD) break;  // warp-uniform (mma.sync needs the whole warp): padding only
          const int d = nt * 8 + 2 * t;
          float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
          for (int kk = 0; kk < kTileK / 16; ++kk) {
            uint32_t kb0, kb1;
            if constexpr (kTransposed) {
              const __nv_bfloat16* kr = kt_s + (nt * 8 + g) * kStrideT + kk * 16 + 2 * t;
              kb0 = lds32(kr), kb1 = lds32(kr + 8);
            } else {
              load_b_frag_down(kb0, kb1, k_s, kStride, kk * 16, nt * 8 + g, t);
            }
            mma_bf16(acc, af[kk], kb0, kb1);
          }
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            if (qrow[r] >= q_stop || d >= HD) continue;
            float* dst = p.dq + (row_base + (qrow[r] - QB) * H) * HD + d;
            atomicAdd(dst, acc[2 * r]);
            if (d + 1 < HD) atomicAdd(dst + 1, acc[2 * r + 1]);
          }
        }
      }
    }
  }

  // dK and dV rows of this key tile: one owner, overwritten.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (kj[r] >= k_stop) continue;
    float* dkrow = p.dk + ((b * TK + kj[r] - KB) * KVH + kvh) * HD;
    float* dvrow = p.dv + ((b * TK + kj[r] - KB) * KVH + kvh) * HD;
#pragma unroll
    for (int nt = 0; nt < HDP / 8; ++nt) {
      const int d = nt * 8 + 2 * t;
      if (d < HD) dkrow[d] = dk_acc[nt][2 * r], dvrow[d] = dv_acc[nt][2 * r];
      if (d + 1 < HD) dkrow[d + 1] = dk_acc[nt][2 * r + 1], dvrow[d + 1] = dv_acc[nt][2 * r + 1];
    }
  }
}

// Deterministic dQ: one block per (query tile of 64, b, h), longest tiles first as the forward;
// each warp owns 16 queries and accumulates their dQ (16 x HDP) in registers over the visible
// key tiles in order: S = Q K^T and dP = dO V^T (A fragments from the row-major Q and dO tiles,
// B from the key rows), P = exp(S scale - lse), dS = P (dP - D) scale, dQ += dS K (dS in the
// C-to-A register layout, K read down its columns). Written once (overwritten): every row of the
// block, also those that see no key (zero).
template <int HDP>
constexpr size_t backward_dq_shared_bytes() {
  return size_t(4 * 64 * (HDP + kPad)) * 2 + 64 * 4 + 2 * 4;
}

template <int HDP>
__global__ void __launch_bounds__(kThreads) flash_backward_dq_kernel(FlashParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int kStride = HDP + kPad;
  auto* q_s = reinterpret_cast<__nv_bfloat16*>(smem);             // (64 queries, HDP)
  __nv_bfloat16* do_s = q_s + 64 * kStride;                       // (64 queries, HDP)
  __nv_bfloat16* k_s = do_s + 64 * kStride;                       // (64 keys, HDP)
  __nv_bfloat16* v_s = k_s + 64 * kStride;                        // (64 keys, HDP)
  auto* kdoc_s = reinterpret_cast<int32_t*>(v_s + 64 * kStride);  // (64)
  int32_t* qrange_s = kdoc_s + 64;                                // (2)

  const int64_t T = p.T, H = p.H, KVH = p.KVH, HD = p.HD;
  const int64_t TQ = p.TQ, QB = p.QB;
  const int64_t q_stop = QB + TQ;
  const int64_t n_qt = (TQ + kTileQ - 1) / kTileQ;
  const int64_t q0 = QB + (n_qt - 1 - blockIdx.x) * kTileQ;
  const int64_t b = blockIdx.y / H, h = blockIdx.y % H, kvh = h / (H / KVH);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, g = lane / 4, t = lane % 4;
  const int32_t* doc = p.doc ? p.doc + b * T : nullptr;
  const int64_t row_base = b * TQ * H + h;  // row (b, i, h) = row_base + (i - QB) * H

  stage_tile<HDP>(q_s, nullptr, p.q + row_base * HD, H * HD, q0 - QB, TQ, HD);
  stage_tile<HDP>(do_s, nullptr, p.dout + row_base * HD, H * HD, q0 - QB, TQ, HD);
  int32_t qlo = 0, qhi = 0;
  if (doc) {
    doc_range(qrange_s, doc, q0, q_stop);
    qlo = qrange_s[0], qhi = qrange_s[1];
  }

  // This thread's two query rows; lse = -inf (a row that sees nothing) -> +inf so P = 0, as
  // rows past the block.
  const int64_t qi[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
  int32_t qdoc[2];
  float lse[2], dvec[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const bool in = qi[r] < q_stop;
    qdoc[r] = doc && in ? doc[qi[r]] : 0;
    const float L = in ? p.lse[(b * H + h) * TQ + qi[r] - QB] : INFINITY;
    lse[r] = L == -INFINITY ? INFINITY : L;
    dvec[r] = in ? p.dvec[(b * H + h) * TQ + qi[r] - QB] : 0.0f;
  }
  float dq_acc[HDP / 8][4];
#pragma unroll
  for (int nt = 0; nt < HDP / 8; ++nt)
    dq_acc[nt][0] = dq_acc[nt][1] = dq_acc[nt][2] = dq_acc[nt][3] = 0.0f;

  int64_t k_tile0, k_end;
  key_tiles_of(p, q0, k_tile0, k_end);
  for (int64_t k0 = k_tile0; k0 < k_end; k0 += kTileK) {
    if (!stage_key_tile<HDP>(k_s, v_s, nullptr, kdoc_s, p, doc, b, kvh, k0, qlo, qhi)) continue;

    // S (16 x 64 per warp) = Q K^T and dP = dO V^T.
    float s[kTileK / 8][4], dp[kTileK / 8][4];
    warp_tile_products<HDP, kStride>(s, dp, q_s, k_s, do_s, v_s, warp * 16, g, t);
    // dS = P (dP - D) scale with P = exp(S scale - lse) (0 where masked), packed as A fragments.
    uint32_t dsf[kTileK / 16][4];
#pragma unroll
    for (int nt = 0; nt < kTileK / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e / 2;
        const int64_t j = k0 + nt * 8 + 2 * t + (e & 1);
        const bool vis = visible(p, qi[r], j, qdoc[r], doc ? kdoc_s[j - k0] : 0);
        const float pv = vis ? __expf(s[nt][e] * p.scale - lse[r]) : 0.0f;
        dp[nt][e] = vis ? pv * (dp[nt][e] - dvec[r]) * p.scale : 0.0f;
      }
      c_to_a_frag(dsf, dp[nt], nt);
    }
    // dQ (16 x HDP) += dS (16 x 64 keys) K (64 keys x HDP).
#pragma unroll
    for (int nt = 0; nt < HDP / 8; ++nt) {
#pragma unroll
      for (int kk = 0; kk < kTileK / 16; ++kk) {
        uint32_t kb0, kb1;
        load_b_frag_down(kb0, kb1, k_s, kStride, kk * 16, nt * 8 + g, t);
        mma_bf16(dq_acc[nt], dsf[kk], kb0, kb1);
      }
    }
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (qi[r] >= q_stop) continue;
    float* dqrow = p.dq + (row_base + (qi[r] - QB) * H) * HD;
#pragma unroll
    for (int nt = 0; nt < HDP / 8; ++nt) {
      const int d = nt * 8 + 2 * t;
      if (d < HD) dqrow[d] = dq_acc[nt][2 * r];
      if (d + 1 < HD) dqrow[d + 1] = dq_acc[nt][2 * r + 1];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Merge of two partial results (FPDT's chunks): one warp per (row, head).

__global__ void attention_merge_kernel(float* out, float* lse, const float* out_b,
                                       const float* lse_b, int64_t rows, int64_t H, int64_t HD) {
  const int64_t task = blockIdx.x * int64_t(blockDim.x / kWarp) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (task >= rows * H) return;
  const int64_t i = task / H, h = task % H;
  const float la = lse[h * rows + i], lb = lse_b[h * rows + i];
  if (lb == -INFINITY) return;  // the new partial saw no key of this row
  const float mx = fmaxf(la, lb);
  // fmaxf drops a NaN operand: keep NaN in its row as the CPU op does.
  const float merged = (isnan(la) || isnan(lb)) ? NAN : mx + logf(expf(la - mx) + expf(lb - mx));
  const float wa = la == -INFINITY ? 0.0f : expf(la - merged), wb = expf(lb - merged);
  float* o = out + task * HD;
  const float* ob = out_b + task * HD;
  for (int64_t d = lane; d < HD; d += kWarp) o[d] = wa * o[d] + wb * ob[d];
  __syncwarp();
  if (lane == 0) lse[h * rows + i] = merged;
}

// ---------------------------------------------------------------------------------------------
// Dispatch over the padded head dim.

template <typename F>
void with_padded_head_dim(int64_t HD, F&& f) {
  if (HD <= 32) {
    f(std::integral_constant<int, 32>{});
  } else if (HD <= 64) {
    f(std::integral_constant<int, 64>{});
  } else {
    f(std::integral_constant<int, 128>{});
  }
}

FlashParams make_params(const AttentionShape& s) {
  FlashParams p{};
  p.B = s.B, p.T = s.T, p.H = s.H, p.KVH = s.KVH, p.HD = s.HD, p.window = s.window;
  p.TQ = s.q_rows(), p.TK = s.k_rows(), p.QB = s.q_begin, p.KB = s.k_begin;
  p.scale = s.scale;
  p.doc = s.doc_ids;
  return p;
}

}  // namespace

void attention_merge(const Context& ctx, float* out, float* lse, const float* out_b,
                     const float* lse_b, int64_t rows, int64_t H, int64_t HD) {
  const int64_t tasks = rows * H;
  if (tasks == 0) return;
  attention_merge_kernel<<<unsigned((tasks + 7) / 8), 256, 0, ctx.stream>>>(out, lse, out_b, lse_b,
                                                                            rows, H, HD);
  LT_CUDA_CHECK_LAUNCH();
}

size_t attention_shared_bytes(int64_t HD) {
  size_t bytes = 0;
  with_padded_head_dim(HD, [&](auto hdp) {
    constexpr int kHdp = decltype(hdp)::value;
    bytes = std::max({forward_shared_bytes<kHdp>(), backward_shared_bytes<kHdp, true, true>(),
                      backward_dq_shared_bytes<kHdp>()});
  });
  return bytes;
}

void attention_forward(const Context& ctx, float* out, float* lse, const float* q, const float* k,
                       const float* v, const AttentionShape& s) {
  if (s.B == 0 || s.q_rows() == 0) return;
  FlashParams p = make_params(s);
  p.q = q, p.k = k, p.v = v, p.o_out = out, p.lse_out = lse;
  const int64_t n_qt = (s.q_rows() + kTileQ - 1) / kTileQ;
  with_padded_head_dim(s.HD, [&](auto hdp) {
    constexpr int kHdp = decltype(hdp)::value;
    constexpr size_t bytes = forward_shared_bytes<kHdp>();
    LT_CUDA_CHECK(cudaFuncSetAttribute(flash_forward_kernel<kHdp>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
    flash_forward_kernel<kHdp>
        <<<dim3(unsigned(n_qt), unsigned(s.B * s.H)), kThreads, bytes, ctx.stream>>>(p);
    LT_CUDA_CHECK_LAUNCH();
  });
}

void attention_backward(const Context& ctx, float* dq, float* dk, float* dv, const float* dout,
                        const float* out, const float* lse, const float* q, const float* k,
                        const float* v, const AttentionShape& s) {
  if (s.B == 0 || (s.q_rows() == 0 && s.k_rows() == 0)) return;
  const int64_t rows = s.B * s.q_rows() * s.H;
  auto* dvec =
      static_cast<float*>(ctx.scratch->get(cuda_scratch::attention_backward(rows), ctx.stream));
  if (rows > 0) {
    dout_dot_out_kernel<<<unsigned((rows + 7) / 8), 256, 0, ctx.stream>>>(dvec, dout, out, s.B,
                                                                          s.q_rows(), s.H, s.HD);
    LT_CUDA_CHECK_LAUNCH();
    // The deterministic dQ kernel writes every row; the atomics add to zeros.
    if (!ctx.deterministic)
      LT_CUDA_CHECK(cudaMemsetAsync(dq, 0, size_t(rows * s.HD) * 4, ctx.stream));
  }
  FlashParams p = make_params(s);
  p.q = q, p.k = k, p.v = v, p.out = out, p.dout = dout, p.lse = lse, p.dvec = dvec;
  p.dq = dq, p.dk = dk, p.dv = dv;
  const int64_t n_kt = (s.k_rows() + kTileK - 1) / kTileK;
  const int64_t n_qt = (s.q_rows() + kTileQ - 1) / kTileQ;
  const auto launch = [&](auto hdp, auto transposed, auto with_dq) {
    constexpr int kHdp = decltype(hdp)::value;
    constexpr bool kT = decltype(transposed)::value, kDq = decltype(with_dq)::value;
    constexpr size_t bytes = backward_shared_bytes<kHdp, kT, kDq>();
    LT_CUDA_CHECK(cudaFuncSetAttribute(flash_backward_kernel<kHdp, kT, kDq>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
    flash_backward_kernel<kHdp, kT, kDq>
        <<<dim3(unsigned(n_kt), unsigned(s.B * s.KVH)), kThreads, bytes, ctx.stream>>>(p);
    LT_CUDA_CHECK_LAUNCH();
  };
  const auto launch_dq = [&](auto hdp) {
    constexpr int kHdp = decltype(hdp)::value;
    constexpr size_t bytes = backward_dq_shared_bytes<kHdp>();
    LT_CUDA_CHECK(cudaFuncSetAttribute(flash_backward_dq_kernel<kHdp>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
    flash_backward_dq_kernel<kHdp>
        <<<dim3(unsigned(n_qt), unsigned(s.B * s.H)), kThreads, bytes, ctx.stream>>>(p);
    LT_CUDA_CHECK_LAUNCH();
  };
  with_padded_head_dim(s.HD, [&](auto hdp) {
    if (n_kt > 0) {
      const auto with_dq = [&](auto transposed) {
        if (ctx.deterministic)
          launch(hdp, transposed, std::false_type{});
        else
          launch(hdp, transposed, std::true_type{});
      };
      if (ctx.attention_transposed_tiles)
        with_dq(std::true_type{});
      else
        with_dq(std::false_type{});
    }
    if (ctx.deterministic && n_qt > 0) launch_dq(hdp);
  });
}

}  // namespace lt::cuda
