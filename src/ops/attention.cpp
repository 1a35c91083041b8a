// Causal grouped-query attention on CPU: the tiled flash-attention kernels (FlashAttention-2,
// Dao 2023, arXiv 2307.08691) and the plain O(T^2) versions that serve as their specification.
#include "ops/attention.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <unordered_set>
#include <vector>

#include "core/check.h"

namespace lt {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Query rows per tile (Br) and key columns per tile (Bc). 64 keeps a tile pair's working set
// (Q^T, S, O, K^T, V^T: 5 * 64 * HD floats) inside L2 and the 64-wide rows in 4 AVX-512 vectors.
constexpr int64_t kTile = 64;

// ---------------------------------------------------------------------------------------------
// 16-float vectors (GCC vector extensions: one zmm register with AVX-512, two ymm with AVX2).

using v16 = float __attribute__((vector_size(64)));
using i16 = int32_t __attribute__((vector_size(64)));

inline v16 load16(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store16(float* p, v16 v) { std::memcpy(p, &v, sizeof(v)); }
inline v16 splat(float x) { return v16{} + x; }
inline v16 vmax(v16 a, v16 b) { return a > b ? a : b; }

// exp(x) for 16 floats: Cephes' expf (range reduction x = n ln2 + r, degree-6 polynomial in r,
// 2^n built in the exponent bits), relative error ~2 ulp. exp(x) = 0 below -87 (including
// -inf), NaN stays NaN.
inline v16 vexp(v16 x) {
  const v16 lo = splat(-87.0f), hi = splat(88.0f);
  v16 xc = x < lo ? lo : x;  // NaN compares false and is kept
  xc = xc > hi ? hi : xc;
  // n = round(x / ln2) through the 1.5 * 2^23 trick: the low mantissa bits of t hold n.
  const v16 magic = splat(12582912.0f);
  v16 t = xc * 1.44269504088896341f + magic;
  v16 n = t - magic;
  v16 r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  v16 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  v16 y = p * r * r + r + 1.0f;
  i16 bits = ((i16)t - (i16)magic + 127) << 23;  // 2^n, n in [-126, 127]
  v16 e = y * (v16)bits;
  return x < lo ? splat(0.0f) : e;
}

// ---------------------------------------------------------------------------------------------
// Tile GEMM: C[M x N] (+)= A[M x K] * B[K x N]; A(m, k) = a[m * a_m + k * a_k] (so A or A^T of
// a stored matrix), B row-major with row stride ldb, C row stride ldc. Register-blocked
// broadcast-FMA kernel: MR rows of C times NV 16-float vectors stay in registers while k runs.
// No packing or call overhead: on 64-sized tiles it is faster than cblas_sgemm (see
// bench_attention, which measures both).

template <int NV, int MR>
inline void gemm_block(float* c, int64_t ldc, const float* a, int64_t a_m, int64_t a_k,
                       const float* b, int64_t ldb, int64_t K, bool accumulate) {
  v16 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? load16(c + r * ldc + 16 * v) : v16{};
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = b + k * ldb;
    v16 bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) bv[v] = load16(bk + 16 * v);
    const float* ak = a + k * a_k;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const float av = ak[r * a_m];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) store16(c + r * ldc + 16 * v, acc[r][v]);
}

template <int NV>
void gemm_cols(float* c, int64_t ldc, const float* a, int64_t a_m, int64_t a_k, const float* b,
               int64_t ldb, int64_t M, int64_t K, bool accumulate) {
  // Rows per block so that MR * NV accumulators + NV B vectors fit in 32 registers.
  constexpr int MR = NV >= 4 ? 6 : 12;
  int64_t m = 0;
  for (; m + MR <= M; m += MR)
    gemm_block<NV, MR>(c + m * ldc, ldc, a + m * a_m, a_m, a_k, b, ldb, K, accumulate);
  for (; m < M;) {
    const int64_t r = M - m;
    float* cm = c + m * ldc;
    const float* am = a + m * a_m;
    if (r >= 4) {
      gemm_block<NV, 4>(cm, ldc, am, a_m, a_k, b, ldb, K, accumulate), m += 4;
    } else if (r >= 2) {
      gemm_block<NV, 2>(cm, ldc, am, a_m, a_k, b, ldb, K, accumulate), m += 2;
    } else {
      gemm_block<NV, 1>(cm, ldc, am, a_m, a_k, b, ldb, K, accumulate), m += 1;
    }
  }
}

void tile_gemm(float* c, int64_t ldc, const float* a, int64_t a_m, int64_t a_k, const float* b,
               int64_t ldb, int64_t M, int64_t N, int64_t K, bool accumulate) {
  if (M <= 0 || N <= 0) return;
  if (N % 64 == 0) {
    for (int64_t n = 0; n < N; n += 64)
      gemm_cols<4>(c + n, ldc, a, a_m, a_k, b + n, ldb, M, K, accumulate);
  } else if (N % 16 == 0) {
    for (int64_t n = 0; n < N; n += 16)
      gemm_cols<1>(c + n, ldc, a, a_m, a_k, b + n, ldb, M, K, accumulate);
  } else {
    // Odd head sizes (HD = 8, 12, ...): plain loops, vectorized along n.
    for (int64_t m = 0; m < M; ++m) {
      float* cm = c + m * ldc;
      if (!accumulate) std::fill(cm, cm + N, 0.0f);
      for (int64_t k = 0; k < K; ++k) {
        const float av = a[m * a_m + k * a_k];
        const float* bk = b + k * ldb;
#pragma omp simd
        for (int64_t n = 0; n < N; ++n) cm[n] += av * bk[n];
      }
    }
  }
}

}  // namespace

void detail::attention_tile_gemm(float* c, int64_t ldc, const float* a, int64_t a_m, int64_t a_k,
                                 const float* b, int64_t ldb, int64_t M, int64_t N, int64_t K,
                                 bool accumulate) {
  tile_gemm(c, ldc, a, a_m, a_k, b, ldb, M, N, K, accumulate);
}

namespace {

// Copies rows x[i * ld + d] (i < rows, d < HD) into xt[d * kTile + i] times mul; columns
// i >= rows are zero, so a tile GEMM over the full kTile width reads no garbage.
void transpose_tile(float* xt, const float* x, int64_t ld, int64_t rows, int64_t HD, float mul) {
  for (int64_t d = 0; d < HD; ++d) std::fill(xt + d * kTile + rows, xt + (d + 1) * kTile, 0.0f);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t d = 0; d < HD; ++d) xt[d * kTile + i] = x[i * ld + d] * mul;
}

// 64-byte aligned float scratch owned by one thread.
struct Scratch {
  struct Free {
    void operator()(float* p) const { ::operator delete[](p, std::align_val_t(64)); }
  };
  std::unique_ptr<float[], Free> p;
  explicit Scratch(int64_t n)
      : p(static_cast<float*>(
            ::operator new[](sizeof(float) * std::max<int64_t>(n, 1), std::align_val_t(64)))) {}
  float* get() { return p.get(); }
};

// ---------------------------------------------------------------------------------------------
// The mask: which keys a query sees, and the ranges used to skip whole tiles.

class Mask {
 public:
  explicit Mask(const AttentionShape& s) : s_(s) {
    if (!s.doc_ids) return;
    const int64_t n = s.B * s.T;
    run_start_.resize(n);
    run_end_.resize(n);
    contiguous_.assign(s.B, 1);
    for (int64_t b = 0; b < s.B; ++b) {
      const int32_t* doc = s.doc_ids + b * s.T;
      std::unordered_set<int32_t> seen;
      int64_t start = 0;
      for (int64_t i = 0; i < s.T; ++i) {
        if (i > 0 && doc[i] != doc[i - 1]) start = i;
        if (start == i && !seen.insert(doc[i]).second) contiguous_[b] = 0;
        run_start_[b * s.T + i] = start;
      }
      int64_t end = s.T;
      for (int64_t i = s.T - 1; i >= 0; --i) {
        if (i < s.T - 1 && doc[i] != doc[i + 1]) end = i + 1;
        run_end_[b * s.T + i] = end;
      }
    }
  }

  bool visible(int64_t b, int64_t i, int64_t j) const {
    if (j > i) return false;
    if (s_.window > 0 && i - j >= s_.window) return false;
    if (s_.doc_ids && s_.doc_ids[b * s_.T + j] != s_.doc_ids[b * s_.T + i]) return false;
    return true;
  }
  // Whether the keys visible from a query form the interval [first_key, i] and the queries that
  // see a key the interval [j, last_query] (no doc ids, or each doc id in one run).
  bool intervals(int64_t b) const { return !s_.doc_ids || contiguous_[b]; }
  // First key that query i may see (every key before it is masked).
  int64_t first_key(int64_t b, int64_t i) const {
    int64_t lo = s_.window > 0 ? std::max<int64_t>(0, i - s_.window + 1) : 0;
    if (s_.doc_ids && contiguous_[b]) lo = std::max(lo, run_start_[b * s_.T + i]);
    return lo;
  }
  // Last query that may see key j.
  int64_t last_query(int64_t b, int64_t j) const {
    int64_t hi = s_.T - 1;
    if (s_.window > 0) hi = std::min(hi, j + s_.window - 1);
    if (s_.doc_ids && contiguous_[b]) hi = std::min(hi, run_end_[b * s_.T + j] - 1);
    return hi;
  }
  // Whether every query in [q0, q0+qn) sees every key in [k0, k0+kn).
  bool all_visible(int64_t b, int64_t q0, int64_t qn, int64_t k0, int64_t kn) const {
    if (k0 + kn - 1 > q0) return false;
    if (s_.window > 0 && q0 + qn - 1 - k0 >= s_.window) return false;
    if (s_.doc_ids && !(contiguous_[b] && run_start_[b * s_.T + q0 + qn - 1] <= k0)) return false;
    return true;
  }

 private:
  const AttentionShape& s_;
  std::vector<int64_t> run_start_, run_end_;  // (B,T) bounds of the run of equal doc ids
  std::vector<char> contiguous_;              // (B) each doc id forms a single run
};

void check_shape(const AttentionShape& s) {
  LT_CHECK(s.B >= 0 && s.T >= 0 && s.H > 0 && s.KVH > 0 && s.HD > 0, "B={} T={} H={} KVH={} HD={}",
           s.B, s.T, s.H, s.KVH, s.HD);
  LT_CHECK(s.H % s.KVH == 0, "H={} is not a multiple of KVH={}", s.H, s.KVH);
  LT_CHECK(s.window >= 0, "window={}", s.window);
  LT_CHECK(s.scale > 0 && std::isfinite(s.scale), "softmax scale={} (set it, e.g. 1/sqrt(HD))",
           s.scale);
  LT_CHECK(s.q_begin >= 0 && s.Tq >= 0 && s.q_begin + s.q_rows() <= s.T && s.k_begin >= 0 &&
               s.Tk >= 0 && s.k_begin + s.k_rows() <= s.T,
           "block queries [{}, +{}) keys [{}, +{}) outside T={}", s.q_begin, s.q_rows(), s.k_begin,
           s.k_rows(), s.T);
}

bool whole_sequence(const AttentionShape& s) {
  return s.q_begin == 0 && s.k_begin == 0 && s.q_rows() == s.T && s.k_rows() == s.T;
}

// D[b,h,i] = sum_d dout[b,i,h,d] * out[b,i,h,d] (FlashAttention-2's rowsum(dO * O)) over the
// query rows (all T, or the block's Tq).
std::vector<float> dout_dot_out(const float* dout, const float* out, const AttentionShape& s) {
  const int64_t B = s.B, T = s.q_rows(), H = s.H, HD = s.HD;
  std::vector<float> D(B * H * T);
#pragma omp parallel for schedule(static)
  for (int64_t bt = 0; bt < B * T; ++bt) {
    const int64_t b = bt / T, t = bt % T;
    for (int64_t h = 0; h < H; ++h) {
      const float* x = dout + (bt * H + h) * HD;
      const float* y = out + (bt * H + h) * HD;
      float acc = 0;
      for (int64_t d = 0; d < HD; ++d) acc += x[d] * y[d];
      D[(b * H + h) * T + t] = acc;
    }
  }
  return D;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Flash forward. One task = (b, h, query tile); the task keeps Q^T of its tile (scaled), the
// running max m and sum l of each row, and the unnormalized output O (all O(kTile * HD)), and
// streams over the visible key tiles. Scores are computed transposed, S^T = K Q^T (keys x
// queries), so the online-softmax reductions run down columns with whole vectors.

void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                       const AttentionShape& s) {
  check_shape(s);
  const int64_t B = s.B, H = s.H, KVH = s.KVH, HD = s.HD, G = H / KVH;
  // Rows of the q / k buffers and where they start in the sequence (whole: T rows from 0).
  const int64_t TQ = s.q_rows(), TK = s.k_rows(), QB = s.q_begin, KB = s.k_begin;
  if (B == 0 || TQ == 0) return;
  const Mask mask(s);
  const int64_t ldq = H * HD, ldk = KVH * HD;
  const int64_t n_qt = (TQ + kTile - 1) / kTile;
  const int64_t n_tasks = B * H * n_qt;

#pragma omp parallel
  {
    Scratch qt_buf(HD * kTile), st_buf(kTile * kTile), o_buf(kTile * HD), ml_buf(4 * kTile);
    float* qt = qt_buf.get();  // (HD, kTile) scaled Q^T
    float* st = st_buf.get();  // (kTile keys, kTile queries) S^T, then P^T
    float* o = o_buf.get();    // (kTile, HD) unnormalized output
    float* m = ml_buf.get();   // (kTile) running row max
    float* l = m + kTile;      // (kTile) running row sum
    float* alpha = l + kTile;  // (kTile) rescale factor of this step
    float* m_use = alpha + kTile;

#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n_tasks; ++task) {
      // Longest tasks (last query tiles under the causal mask) first.
      const int64_t qtile = n_qt - 1 - task / (B * H);
      const int64_t b = (task % (B * H)) / H, h = task % H, kvh = h / G;
      // q0 and key indices below are positions in the whole sequence; buffers are offset.
      const int64_t q0l = qtile * kTile, q0 = QB + q0l, qn = std::min(kTile, TQ - q0l);
      const float* qp = q + ((b * TQ + q0l) * H + h) * HD;
      transpose_tile(qt, qp, ldq, qn, HD, s.scale);
      std::fill(m, m + kTile, kNegInf);
      std::fill(l, l + kTile, 0.0f);
      std::fill(o, o + qn * HD, 0.0f);

      int64_t k_first = q0;
      for (int64_t i = q0; i < q0 + qn; ++i) k_first = std::min(k_first, mask.first_key(b, i));
      k_first = std::max(k_first, KB);
      // Causal: no query of the tile sees a later key; nor any key past the block.
      const int64_t k_end = std::min(q0 + qn, KB + TK);
      for (int64_t k0 = KB + (k_first - KB) / kTile * kTile; k0 < k_end; k0 += kTile) {
        const int64_t kn = std::min(kTile, k_end - k0);
        const float* kp = k + ((b * TK + k0 - KB) * KVH + kvh) * HD;
        const float* vp = v + ((b * TK + k0 - KB) * KVH + kvh) * HD;
        // S^T (kn, kTile) = K (kn, HD) * Q^T (HD, kTile)
        tile_gemm(st, kTile, kp, ldk, 1, qt, kTile, kn, kTile, HD, false);
        if (!mask.all_visible(b, q0, qn, k0, kn)) {
          if (mask.intervals(b)) {  // key j is seen by queries [j, last_query(j)]
            for (int64_t j = 0; j < kn; ++j) {
              float* row = st + j * kTile;
              const int64_t lo = std::clamp<int64_t>(k0 + j - q0, 0, kTile);
              const int64_t hi =
                  std::clamp<int64_t>(mask.last_query(b, k0 + j) + 1 - q0, lo, kTile);
              std::fill(row, row + lo, kNegInf);
              std::fill(row + hi, row + kTile, kNegInf);
            }
          } else {
            for (int64_t j = 0; j < kn; ++j)
              for (int64_t i = 0; i < qn; ++i)
                if (!mask.visible(b, q0 + i, k0 + j)) st[j * kTile + i] = kNegInf;
          }
        }
        // Online softmax (FlashAttention-2, Alg. 1): m' = max(m, rowmax S), P = exp(S - m'),
        // l' = exp(m - m') l + rowsum P, O' = exp(m - m') O + P V.
        for (int64_t i = 0; i < kTile; i += 16) {
          v16 mx = load16(m + i);
          for (int64_t j = 0; j < kn; ++j) mx = vmax(mx, load16(st + j * kTile + i));
          const v16 m_old = load16(m + i);
          const v16 mu = mx == splat(kNegInf) ? splat(0.0f) : mx;  // a row with no key yet
          store16(m + i, mx);
          store16(m_use + i, mu);
          store16(alpha + i, vexp(m_old - mu));
          v16 sum{};
          for (int64_t j = 0; j < kn; ++j) {
            const v16 p = vexp(load16(st + j * kTile + i) - mu);
            store16(st + j * kTile + i, p);
            sum += p;
          }
          store16(l + i, load16(alpha + i) * load16(l + i) + sum);
        }
        for (int64_t i = 0; i < qn; ++i) {
          if (alpha[i] == 1.0f) continue;
          float* oi = o + i * HD;
          const float a = alpha[i];
#pragma omp simd
          for (int64_t d = 0; d < HD; ++d) oi[d] *= a;
        }
        // O (qn, HD) += P (qn, kn) * V (kn, HD), P read from P^T.
        tile_gemm(o, HD, st, 1, kTile, vp, ldk, qn, HD, kn, true);
      }
      for (int64_t i = 0; i < qn; ++i) {
        float* oi = out + ((b * TQ + q0l + i) * H + h) * HD;
        const float inv = l[i] == 0.0f ? 0.0f : 1.0f / l[i];
        for (int64_t d = 0; d < HD; ++d) oi[d] = o[i * HD + d] * inv;
        lse[(b * H + h) * TQ + q0l + i] = l[i] == 0.0f ? kNegInf : m[i] + std::log(l[i]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Flash backward (FlashAttention-2, Alg. 2): D = rowsum(dO * O); per tile pair P = exp(S - lse),
// dV += P^T dO, dP = dO V^T, dS = P (dP - D), dQ += scale dS K, dK += scale dS^T Q.
//
// Race-free, deterministic work split. dk/dv rows of a kv head receive contributions from all
// query heads of its group; dq rows from all key tiles. Key-tile tasks own dK/dV: a task
// accumulates dK and dV of one key tile in local (kTile, HD) buffers over all query heads of the
// group and all query tiles that see the tile, then writes them (one owner per dk/dv row).
//  - One pass, when B * KVH >= threads: one task = (b, kv head) walking all its key tiles in
//    order, so it also owns dq of the group's heads and adds dS K into it directly. 5 tile
//    GEMMs per tile pair, no memory beyond the tiles.
//  - Two passes, when B * KVH < threads (too few groups to fill the machine): pass 1, one task
//    = (b, kv head, key tile), computes dK and dV only (4 GEMMs per pair); pass 2, one task =
//    (b, h, query tile), recomputes S and dP and accumulates its dQ tile locally (3 GEMMs per
//    pair). 40% more arithmetic, but every thread busy and still no T*T or per-thread dq copy.

namespace {

struct BackwardBuffers {
  Scratch a, b, s, dp, acc1, acc2;
  explicit BackwardBuffers(int64_t HD)
      : a(HD * kTile),
        b(HD * kTile),
        s(kTile * kTile),
        dp(kTile * kTile),
        acc1(kTile * HD),
        acc2(kTile * HD) {}
};

struct BackwardArgs {
  float *dq, *dk, *dv;
  const float *dout, *lse, *q, *k, *v, *D;  // D (B,H,T)
  const AttentionShape& s;
  const Mask& mask;
  const int64_t* q_last;  // (B, key tiles) last query that sees any key of the tile
};
// Positions in the whole sequence below; buffers hold TQ query rows from QB and TK key rows from
// KB (the whole sequence: T rows from 0).

// dK, dV of key tile `ktile` of (b, kvh), summed over the group's query heads; with
// `with_dq`, also dq += scale dS K for every visible query tile.
void backward_key_tile(const BackwardArgs& x, BackwardBuffers& buf, int64_t b, int64_t kvh,
                       int64_t ktile, bool with_dq) {
  const AttentionShape& s = x.s;
  const int64_t H = s.H, KVH = s.KVH, HD = s.HD, G = H / KVH;
  const int64_t TQ = s.q_rows(), TK = s.k_rows(), QB = s.q_begin, KB = s.k_begin;
  const int64_t ldq = H * HD, ldk = KVH * HD, n_kt = (TK + kTile - 1) / kTile;
  float* kt_tile = buf.a.get();  // (HD, kTile) K^T
  float* vt_tile = buf.b.get();  // (HD, kTile) V^T
  float* sp = buf.s.get();       // (kTile, kTile) S, then P
  float* dps = buf.dp.get();     // (kTile, kTile) dP, then scale * dS
  float* dk_acc = buf.acc1.get();
  float* dv_acc = buf.acc2.get();
  const int64_t k0 = KB + ktile * kTile, kn = std::min(kTile, KB + TK - k0);
  const float* kp = x.k + ((b * TK + k0 - KB) * KVH + kvh) * HD;
  const float* vp = x.v + ((b * TK + k0 - KB) * KVH + kvh) * HD;
  transpose_tile(kt_tile, kp, ldk, kn, HD, 1.0f);
  transpose_tile(vt_tile, vp, ldk, kn, HD, 1.0f);
  std::fill(dk_acc, dk_acc + kn * HD, 0.0f);
  std::fill(dv_acc, dv_acc + kn * HD, 0.0f);
  const int64_t q_end = std::min(x.q_last[b * n_kt + ktile] + 1, QB + TQ);
  for (int64_t h = kvh * G; h < (kvh + 1) * G; ++h) {
    for (int64_t q0 = std::max(k0, QB); q0 < q_end; q0 += kTile) {
      const int64_t qn = std::min(kTile, q_end - q0);
      const int64_t row0 = (b * TQ + q0 - QB) * H + h;
      const float* qp = x.q + row0 * HD;
      const float* dop = x.dout + row0 * HD;
      // S (qn, kTile) = Q K^T; dP (qn, kTile) = dO V^T.
      tile_gemm(sp, kTile, qp, ldq, 1, kt_tile, kTile, qn, kTile, HD, false);
      tile_gemm(dps, kTile, dop, ldq, 1, vt_tile, kTile, qn, kTile, HD, false);
      const float* lse_row = x.lse + (b * H + h) * TQ + q0 - QB;
      const float* d_row = x.D + (b * H + h) * TQ + q0 - QB;
      for (int64_t i = 0; i < qn; ++i) {
        // A row that saw no key (lse = -inf) gets P = 0.
        const v16 li = splat(lse_row[i] == kNegInf ? -kNegInf : lse_row[i]);
        const v16 di = splat(d_row[i]);
        for (int64_t j = 0; j < kTile; j += 16) {
          const v16 p = vexp(load16(sp + i * kTile + j) * s.scale - li);
          store16(sp + i * kTile + j, p);
          store16(dps + i * kTile + j, p * (load16(dps + i * kTile + j) - di) * s.scale);
        }
      }
      if (kn < kTile || !x.mask.all_visible(b, q0, qn, k0, kn)) {
        for (int64_t i = 0; i < qn; ++i) {
          float* p_row = sp + i * kTile;
          float* ds_row = dps + i * kTile;
          if (x.mask.intervals(b)) {  // query i sees keys [first_key(i), i]
            const int64_t lo = std::clamp<int64_t>(x.mask.first_key(b, q0 + i) - k0, 0, kn);
            const int64_t hi = std::clamp<int64_t>(q0 + i + 1 - k0, lo, kn);
            std::fill(p_row, p_row + lo, 0.0f);
            std::fill(ds_row, ds_row + lo, 0.0f);
            std::fill(p_row + hi, p_row + kTile, 0.0f);
            std::fill(ds_row + hi, ds_row + kTile, 0.0f);
          } else {
            for (int64_t j = 0; j < kTile; ++j)
              if (j >= kn || !x.mask.visible(b, q0 + i, k0 + j)) p_row[j] = ds_row[j] = 0.0f;
          }
        }
      }
      // dV (kn, HD) += P^T dO; dK (kn, HD) += dS^T Q; dQ (qn, HD) += dS K.
      tile_gemm(dv_acc, HD, sp, 1, kTile, dop, ldq, kn, HD, qn, true);
      tile_gemm(dk_acc, HD, dps, 1, kTile, qp, ldq, kn, HD, qn, true);
      if (with_dq) tile_gemm(x.dq + row0 * HD, ldq, dps, kTile, 1, kp, ldk, qn, HD, kn, true);
    }
  }
  for (int64_t j = 0; j < kn; ++j) {
    const int64_t row = ((b * TK + k0 - KB + j) * KVH + kvh) * HD;
    std::memcpy(x.dk + row, dk_acc + j * HD, HD * sizeof(float));
    std::memcpy(x.dv + row, dv_acc + j * HD, HD * sizeof(float));
  }
}

// dq of query tile `qtile` of (b, h), overwritten: sum over visible key tiles of scale dS K.
// Works in the transposed layout of the forward (S^T = K Q^T, dP^T = V dO^T) so that Q^T and
// dO^T are built once per query tile.
void backward_query_tile(const BackwardArgs& x, BackwardBuffers& buf, int64_t b, int64_t h,
                         int64_t qtile) {
  const AttentionShape& s = x.s;
  const int64_t H = s.H, KVH = s.KVH, HD = s.HD, kvh = h / (H / KVH);
  const int64_t TQ = s.q_rows(), TK = s.k_rows(), QB = s.q_begin, KB = s.k_begin;
  const int64_t ldq = H * HD, ldk = KVH * HD;
  float* qt = buf.a.get();    // (HD, kTile) Q^T
  float* dot = buf.b.get();   // (HD, kTile) dO^T
  float* st = buf.s.get();    // (kTile keys, kTile queries) S^T, then P^T
  float* dst = buf.dp.get();  // (kTile, kTile) dP^T, then scale * dS^T
  float* dq_acc = buf.acc1.get();
  float* ld = buf.acc2.get();  // (kTile) lse, then (kTile) D
  const int64_t q0l = qtile * kTile, q0 = QB + q0l, qn = std::min(kTile, TQ - q0l);
  const int64_t row0 = (b * TQ + q0l) * H + h;
  transpose_tile(qt, x.q + row0 * HD, ldq, qn, HD, 1.0f);
  transpose_tile(dot, x.dout + row0 * HD, ldq, qn, HD, 1.0f);
  for (int64_t i = 0; i < kTile; ++i) {
    const float l = i < qn ? x.lse[(b * H + h) * TQ + q0l + i] : kNegInf;
    ld[i] = l == kNegInf ? -kNegInf : l;  // no key seen: P = 0
    ld[kTile + i] = i < qn ? x.D[(b * H + h) * TQ + q0l + i] : 0.0f;
  }
  std::fill(dq_acc, dq_acc + qn * HD, 0.0f);
  int64_t k_first = q0;
  for (int64_t i = q0; i < q0 + qn; ++i) k_first = std::min(k_first, x.mask.first_key(b, i));
  k_first = std::max(k_first, KB);
  const int64_t k_end = std::min(q0 + qn, KB + TK);
  for (int64_t k0 = KB + (k_first - KB) / kTile * kTile; k0 < k_end; k0 += kTile) {
    const int64_t kn = std::min(kTile, k_end - k0);
    const float* kp = x.k + ((b * TK + k0 - KB) * KVH + kvh) * HD;
    const float* vp = x.v + ((b * TK + k0 - KB) * KVH + kvh) * HD;
    tile_gemm(st, kTile, kp, ldk, 1, qt, kTile, kn, kTile, HD, false);
    tile_gemm(dst, kTile, vp, ldk, 1, dot, kTile, kn, kTile, HD, false);
    for (int64_t j = 0; j < kn; ++j) {
      for (int64_t i = 0; i < kTile; i += 16) {
        const v16 p = vexp(load16(st + j * kTile + i) * s.scale - load16(ld + i));
        store16(dst + j * kTile + i,
                p * (load16(dst + j * kTile + i) - load16(ld + kTile + i)) * s.scale);
      }
    }
    if (!x.mask.all_visible(b, q0, qn, k0, kn)) {
      for (int64_t j = 0; j < kn; ++j) {
        float* row = dst + j * kTile;
        if (x.mask.intervals(b)) {  // key j is seen by queries [j, last_query(j)]
          const int64_t lo = std::clamp<int64_t>(k0 + j - q0, 0, kTile);
          const int64_t hi = std::clamp<int64_t>(x.mask.last_query(b, k0 + j) + 1 - q0, lo, kTile);
          std::fill(row, row + lo, 0.0f);
          std::fill(row + hi, row + kTile, 0.0f);
        } else {
          for (int64_t i = 0; i < qn; ++i)
            if (!x.mask.visible(b, q0 + i, k0 + j)) row[i] = 0.0f;
        }
      }
    }
    // dQ (qn, HD) += dS (qn, kn) K (kn, HD), dS read from dS^T.
    tile_gemm(dq_acc, HD, dst, 1, kTile, kp, ldk, qn, HD, kn, true);
  }
  for (int64_t i = 0; i < qn; ++i)
    std::memcpy(x.dq + (row0 + i * H) * HD, dq_acc + i * HD, HD * sizeof(float));
}

}  // namespace

void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* out,
                        const float* lse, const float* q, const float* k, const float* v,
                        const AttentionShape& s) {
  check_shape(s);
  const int64_t B = s.B, H = s.H, KVH = s.KVH, HD = s.HD;
  const int64_t TQ = s.q_rows(), TK = s.k_rows(), KB = s.k_begin;
  if (B == 0 || (TQ == 0 && TK == 0)) return;
  const Mask mask(s);
  const int64_t n_kt = (TK + kTile - 1) / kTile, n_qt = (TQ + kTile - 1) / kTile;
  const std::vector<float> D = dout_dot_out(dout, out, s);
  std::vector<int64_t> q_last(B * n_kt);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t kt = 0; kt < n_kt; ++kt) {
      const int64_t j0 = KB + kt * kTile;
      int64_t hi = j0;
      for (int64_t j = j0; j < std::min(KB + TK, j0 + kTile); ++j)
        hi = std::max(hi, mask.last_query(b, j));
      q_last[b * n_kt + kt] = hi;
    }
  const BackwardArgs args{dq, dk, dv, dout, lse, q, k, v, D.data(), s, mask, q_last.data()};
  const bool one_pass = B * KVH >= omp_get_max_threads();
  if (one_pass) std::fill(dq, dq + B * TQ * H * HD, 0.0f);

#pragma omp parallel
  {
    BackwardBuffers buf(HD);
    if (one_pass) {
#pragma omp for schedule(dynamic, 1)
      for (int64_t task = 0; task < B * KVH; ++task)
        for (int64_t kt = 0; kt < n_kt; ++kt)
          backward_key_tile(args, buf, task / KVH, task % KVH, kt, true);
    } else {
      // Pass 1 then pass 2 without a barrier between them (they write disjoint outputs and
      // read only inputs); heaviest tiles first (early key tiles, late query tiles).
#pragma omp for schedule(dynamic, 1) nowait
      for (int64_t task = 0; task < B * KVH * n_kt; ++task)
        backward_key_tile(args, buf, (task % (B * KVH)) / KVH, task % KVH, task / (B * KVH), false);
#pragma omp for schedule(dynamic, 1)
      for (int64_t task = 0; task < B * H * n_qt; ++task)
        backward_query_tile(args, buf, (task % (B * H)) / H, task % H, n_qt - 1 - task / (B * H));
    }
  }
}

void attention_merge(float* out, float* lse, const float* out_b, const float* lse_b, int64_t rows,
                     int64_t H, int64_t HD) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t h = 0; h < H; ++h) {
      float& la = lse[h * rows + i];
      const float lb = lse_b[h * rows + i];
      if (lb == kNegInf) continue;  // the new block saw no key of this row
      float* o = out + (i * H + h) * HD;
      const float* ob = out_b + (i * H + h) * HD;
      // lse = log(e^la + e^lb); each part weighs e^(l - lse). NaN propagates through both.
      const float mx = std::max(la, lb);
      const float merged = mx + std::log(std::exp(la - mx) + std::exp(lb - mx));
      const float wa = la == kNegInf ? 0.0f : std::exp(la - merged);
      const float wb = std::exp(lb - merged);
      for (int64_t d = 0; d < HD; ++d) o[d] = wa * o[d] + wb * ob[d];
      la = merged;
    }
}

// ---------------------------------------------------------------------------------------------
// Naive versions: per (b, h) the whole (T, T) score matrix, as eager attention does:
// S = Q K^T * scale + mask, P = softmax(S), out = P V. The GEMMs are OpenBLAS calls (threaded
// inside), the row-wise softmax runs on OpenMP threads.

namespace {

// Writes S (T, T) = scale * Q_bh K_bh^T with masked entries -inf.
void naive_scores(float* S, const float* q, const float* k, const AttentionShape& s,
                  const Mask& mask, int64_t b, int64_t h) {
  const int64_t T = s.T, H = s.H, KVH = s.KVH, HD = s.HD, kvh = h / (H / KVH);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, HD, s.scale, q + (b * T * H + h) * HD,
              H * HD, k + (b * T * KVH + kvh) * HD, KVH * HD, 0.0f, S, T);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < T; ++i)
    for (int64_t j = 0; j < T; ++j)
      if (!mask.visible(b, i, j)) S[i * T + j] = kNegInf;
}

}  // namespace

void attention_forward_naive(float* out, float* lse, const float* q, const float* k, const float* v,
                             const AttentionShape& s) {
  check_shape(s);
  LT_CHECK(whole_sequence(s), "the naive attention runs whole sequences only");
  const int64_t B = s.B, T = s.T, H = s.H, KVH = s.KVH, HD = s.HD;
  if (B == 0 || T == 0) return;
  const Mask mask(s);
  std::vector<float> S(T * T);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      naive_scores(S.data(), q, k, s, mask, b, h);
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < T; ++i) {
        float* row = S.data() + i * T;
        float mx = kNegInf;
        for (int64_t j = 0; j < T; ++j) mx = std::isnan(row[j]) ? row[j] : std::max(mx, row[j]);
        if (mx == kNegInf) {  // no visible key
          std::fill(row, row + T, 0.0f);
          lse[(b * H + h) * T + i] = kNegInf;
          continue;
        }
        float sum = 0;
        for (int64_t j = 0; j < T; ++j) sum += (row[j] = std::exp(row[j] - mx));
        for (int64_t j = 0; j < T; ++j) row[j] /= sum;
        lse[(b * H + h) * T + i] = mx + std::log(sum);
      }
      const int64_t kvh = h / (H / KVH);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, HD, T, 1.0f, S.data(), T,
                  v + (b * T * KVH + kvh) * HD, KVH * HD, 0.0f, out + (b * T * H + h) * HD, H * HD);
    }
  }
}

void attention_backward_naive(float* dq, float* dk, float* dv, const float* dout, const float* out,
                              const float* lse, const float* q, const float* k, const float* v,
                              const AttentionShape& s) {
  check_shape(s);
  LT_CHECK(whole_sequence(s), "the naive attention runs whole sequences only");
  const int64_t B = s.B, T = s.T, H = s.H, KVH = s.KVH, HD = s.HD;
  if (B == 0 || T == 0) return;
  const Mask mask(s);
  const std::vector<float> D = dout_dot_out(dout, out, s);
  std::fill(dk, dk + B * T * KVH * HD, 0.0f);
  std::fill(dv, dv + B * T * KVH * HD, 0.0f);
  std::vector<float> P(T * T), dP(T * T);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      const int64_t kvh = h / (H / KVH);
      const float* qb = q + (b * T * H + h) * HD;
      const float* dob = dout + (b * T * H + h) * HD;
      const float* kb = k + (b * T * KVH + kvh) * HD;
      const float* vb = v + (b * T * KVH + kvh) * HD;
      naive_scores(P.data(), q, k, s, mask, b, h);
      // dP = dO V^T
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, HD, 1.0f, dob, H * HD, vb,
                  KVH * HD, 0.0f, dP.data(), T);
      // P = exp(S - lse); dS = P * (dP - D) * scale (stored in dP).
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < T; ++i) {
        const float L = lse[(b * H + h) * T + i], Di = D[(b * H + h) * T + i];
        for (int64_t j = 0; j < T; ++j) {
          const float p = L == kNegInf ? 0.0f : std::exp(P[i * T + j] - L);
          P[i * T + j] = p;
          dP[i * T + j] = p * (dP[i * T + j] - Di) * s.scale;
        }
      }
      // dQ = dS K (overwrites), dK += dS^T Q, dV += P^T dO.
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, HD, T, 1.0f, dP.data(), T, kb,
                  KVH * HD, 0.0f, dq + (b * T * H + h) * HD, H * HD);
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, T, HD, T, 1.0f, dP.data(), T, qb, H * HD,
                  1.0f, dk + (b * T * KVH + kvh) * HD, KVH * HD);
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, T, HD, T, 1.0f, P.data(), T, dob, H * HD,
                  1.0f, dv + (b * T * KVH + kvh) * HD, KVH * HD);
    }
  }
}

}  // namespace lt
