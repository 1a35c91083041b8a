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
      : p(static_cast<float*>(::operator new[](sizeof(float) * std::max<int64_t>(n, 1),
                                               std::align_val_t(64)))) {}
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
}

// D[b,h,i] = sum_d dout[b,i,h,d] * out[b,i,h,d] (FlashAttention-2's rowsum(dO * O)).
std::vector<float> dout_dot_out(const float* dout, const float* out, const AttentionShape& s) {
  const int64_t B = s.B, T = s.T, H = s.H, HD = s.HD;
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
  const int64_t B = s.B, T = s.T, H = s.H, KVH = s.KVH, HD = s.HD, G = H / KVH;
  if (B == 0 || T == 0) return;
  const Mask mask(s);
  const int64_t ldq = H * HD, ldk = KVH * HD;
  const int64_t n_qt = (T + kTile - 1) / kTile;
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
      const int64_t q0 = qtile * kTile, qn = std::min(kTile, T - q0);
      const float* qp = q + ((b * T + q0) * H + h) * HD;
      transpose_tile(qt, qp, ldq, qn, HD, s.scale);
      std::fill(m, m + kTile, kNegInf);
      std::fill(l, l + kTile, 0.0f);
      std::fill(o, o + qn * HD, 0.0f);

      int64_t k_first = q0;
      for (int64_t i = q0; i < q0 + qn; ++i) k_first = std::min(k_first, mask.first_key(b, i));
      const int64_t k_end = q0 + qn;  // causal: no query of the tile sees a later key
      for (int64_t k0 = k_first / kTile * kTile; k0 < k_end; k0 += kTile) {
        const int64_t kn = std::min(kTile, k_end - k0);
        const float* kp = k + ((b * T + k0) * KVH + kvh) * HD;
        const float* vp = v + ((b * T + k0) * KVH + kvh) * HD;
        // S^T (kn, kTile) = K (kn, HD) * Q^T (HD, kTile)
        tile_gemm(st, kTile, kp, ldk, 1, qt, kTile, kn, kTile, HD, false);
        if (!mask.all_visible(b, q0, qn, k0, kn)) {
          if (mask.intervals(b)) {  // key j is seen by queries [j, last_query(j)]
            for (int64_t j = 0; j < kn; ++j) {
              float* row = st + j * kTile;
              const int64_t lo = std::clamp<int64_t>(k0 + j - q0, 0, kTile);
              const int64_t hi = std::clamp<int64_t>(mask.last_query(b, k0 + j) + 1 - q0, lo, kTile);
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
        float* oi = out + ((b * T + q0 + i) * H + h) * HD;
        const float inv = l[i] == 0.0f ? 0.0f : 1.0f / l[i];
        for (int64_t d = 0; d < HD; ++d) oi[d] = o[i * HD + d] * inv;
        lse[(b * H + h) * T + q0 + i] = l[i] == 0.0f ? kNegInf : m[i] + std::log(l[i]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Flash backward (FlashAttention-2, Alg. 2), race-free scheme:
//   one task = (b, kv head, slice of key tiles). For each key tile the task accumulates dK and
//   dV in local (kTile, HD) buffers over all query heads of the group and all query tiles that
//   see the tile, then writes them: dk/dv rows have exactly one owner. dQ rows receive
//   contributions from every key tile, so each slice adds into its own dQ copy: slice 0 into dq
//   itself, slice s > 0 into scratch copy s-1, summed into dq at the end in a fixed order
//   (deterministic). Slices = ceil(threads / (B * KVH)): with B * KVH >= threads there is one
//   slice and no extra memory; otherwise (slices - 1) copies of dq, O(T * H * HD), never T*T.
//   Slices cut the key tiles into contiguous ranges of equal work (visible tile pairs).

void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* out,
                        const float* lse, const float* q, const float* k, const float* v,
                        const AttentionShape& s) {
  check_shape(s);
  const int64_t B = s.B, T = s.T, H = s.H, KVH = s.KVH, HD = s.HD, G = H / KVH;
  if (B == 0 || T == 0) return;
  const Mask mask(s);
  const int64_t ldq = H * HD, ldk = KVH * HD;
  const int64_t n_kt = (T + kTile - 1) / kTile;
  const std::vector<float> D = dout_dot_out(dout, out, s);

  const int64_t threads = omp_get_max_threads();
  const int64_t slices = std::min(n_kt, std::max<int64_t>(1, (threads + B * KVH - 1) / (B * KVH)));
  // slice_begin[(b * KVH + kvh) * (slices + 1) + sl]: first key tile of each slice.
  std::vector<int64_t> slice_begin(B * KVH * (slices + 1));
  std::vector<int64_t> q_last(B * n_kt);  // last query that sees any key of the tile
  for (int64_t b = 0; b < B; ++b) {
    std::vector<double> work(n_kt);
    for (int64_t kt = 0; kt < n_kt; ++kt) {
      const int64_t k0 = kt * kTile, kn = std::min(kTile, T - k0);
      int64_t hi = k0;
      for (int64_t j = k0; j < k0 + kn; ++j) hi = std::max(hi, mask.last_query(b, j));
      q_last[b * n_kt + kt] = hi;
      work[kt] = static_cast<double>(hi / kTile - kt + 1);
    }
    double total = 0;
    for (double w : work) total += w;
    for (int64_t kvh = 0; kvh < KVH; ++kvh) {
      int64_t* sb = slice_begin.data() + (b * KVH + kvh) * (slices + 1);
      double acc = 0;
      int64_t sl = 1;
      sb[0] = 0;
      for (int64_t kt = 0; kt < n_kt && sl < slices; ++kt) {
        acc += work[kt];
        while (sl < slices && acc >= total * sl / slices) sb[sl++] = kt + 1;
      }
      while (sl < slices) sb[sl++] = n_kt;
      sb[slices] = n_kt;
    }
  }

  std::fill(dq, dq + B * T * H * HD, 0.0f);
  std::vector<float> dq_extra((slices - 1) * B * T * H * HD, 0.0f);

#pragma omp parallel
  {
    Scratch kt_buf(HD * kTile), vt_buf(HD * kTile), s_buf(kTile * kTile), dp_buf(kTile * kTile),
        dk_buf(kTile * HD), dv_buf(kTile * HD);
    float* kt_tile = kt_buf.get();  // (HD, kTile) K^T
    float* vt_tile = vt_buf.get();  // (HD, kTile) V^T
    float* sp = s_buf.get();        // (kTile, kTile) S, then P
    float* dps = dp_buf.get();      // (kTile, kTile) dP, then dS * scale
    float* dk_acc = dk_buf.get();   // (kTile, HD)
    float* dv_acc = dv_buf.get();   // (kTile, HD)
    const int64_t n_tasks = B * KVH * slices;

#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n_tasks; ++task) {
      const int64_t sl = task % slices, bk = task / slices, b = bk / KVH, kvh = bk % KVH;
      const int64_t* sb = slice_begin.data() + bk * (slices + 1);
      float* dq_dst = sl == 0 ? dq : dq_extra.data() + (sl - 1) * B * T * H * HD;
      for (int64_t ktile = sb[sl]; ktile < sb[sl + 1]; ++ktile) {
        const int64_t k0 = ktile * kTile, kn = std::min(kTile, T - k0);
        const float* kp = k + ((b * T + k0) * KVH + kvh) * HD;
        const float* vp = v + ((b * T + k0) * KVH + kvh) * HD;
        transpose_tile(kt_tile, kp, ldk, kn, HD, 1.0f);
        transpose_tile(vt_tile, vp, ldk, kn, HD, 1.0f);
        std::fill(dk_acc, dk_acc + kn * HD, 0.0f);
        std::fill(dv_acc, dv_acc + kn * HD, 0.0f);
        const int64_t q_end = q_last[b * n_kt + ktile] + 1;
        for (int64_t h = kvh * G; h < (kvh + 1) * G; ++h) {
          for (int64_t q0 = k0; q0 < q_end; q0 += kTile) {
            const int64_t qn = std::min(kTile, q_end - q0);
            const int64_t row0 = (b * T + q0) * H + h;
            const float* qp = q + row0 * HD;
            const float* dop = dout + row0 * HD;
            // S (qn, kTile) = Q K^T; dP (qn, kTile) = dO V^T.
            tile_gemm(sp, kTile, qp, ldq, 1, kt_tile, kTile, qn, kTile, HD, false);
            tile_gemm(dps, kTile, dop, ldq, 1, vt_tile, kTile, qn, kTile, HD, false);
            const float* lse_row = lse + (b * H + h) * T + q0;
            const float* d_row = D.data() + (b * H + h) * T + q0;
            // P = exp(S * scale - lse); dS = P * (dP - D), times scale for dQ and dK.
            for (int64_t i = 0; i < qn; ++i) {
              const v16 li = splat(lse_row[i] == kNegInf ? std::numeric_limits<float>::infinity()
                                                         : lse_row[i]);
              const v16 di = splat(d_row[i]);
              for (int64_t j = 0; j < kTile; j += 16) {
                const v16 p = vexp(load16(sp + i * kTile + j) * s.scale - li);
                store16(sp + i * kTile + j, p);
                store16(dps + i * kTile + j, p * (load16(dps + i * kTile + j) - di) * s.scale);
              }
            }
            if (kn < kTile || !mask.all_visible(b, q0, qn, k0, kn)) {
              for (int64_t i = 0; i < qn; ++i) {
                float* p_row = sp + i * kTile;
                float* ds_row = dps + i * kTile;
                if (mask.intervals(b)) {  // query i sees keys [first_key(i), i]
                  const int64_t lo = std::clamp<int64_t>(mask.first_key(b, q0 + i) - k0, 0, kn);
                  const int64_t hi = std::clamp<int64_t>(q0 + i + 1 - k0, lo, kn);
                  std::fill(p_row, p_row + lo, 0.0f);
                  std::fill(ds_row, ds_row + lo, 0.0f);
                  std::fill(p_row + hi, p_row + kTile, 0.0f);
                  std::fill(ds_row + hi, ds_row + kTile, 0.0f);
                } else {
                  for (int64_t j = 0; j < kTile; ++j)
                    if (j >= kn || !mask.visible(b, q0 + i, k0 + j)) p_row[j] = ds_row[j] = 0.0f;
                }
              }
            }
            // dV (kn, HD) += P^T dO; dK (kn, HD) += dS^T Q; dQ (qn, HD) += dS K.
            tile_gemm(dv_acc, HD, sp, 1, kTile, dop, ldq, kn, HD, qn, true);
            tile_gemm(dk_acc, HD, dps, 1, kTile, qp, ldq, kn, HD, qn, true);
            tile_gemm(dq_dst + row0 * HD, ldq, dps, kTile, 1, kp, ldk, qn, HD, kn, true);
          }
        }
        for (int64_t j = 0; j < kn; ++j) {
          const int64_t row = ((b * T + k0 + j) * KVH + kvh) * HD;
          std::memcpy(dk + row, dk_acc + j * HD, HD * sizeof(float));
          std::memcpy(dv + row, dv_acc + j * HD, HD * sizeof(float));
        }
      }
    }
    if (slices > 1) {
#pragma omp for schedule(static)
      for (int64_t i = 0; i < B * T * H * HD; ++i)
        for (int64_t sl = 1; sl < slices; ++sl) dq[i] += dq_extra[(sl - 1) * B * T * H * HD + i];
    }
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
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, HD, s.scale,
              q + (b * T * H + h) * HD, H * HD, k + (b * T * KVH + kvh) * HD, KVH * HD, 0.0f, S,
              T);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < T; ++i)
    for (int64_t j = 0; j < T; ++j)
      if (!mask.visible(b, i, j)) S[i * T + j] = kNegInf;
}

}  // namespace

void attention_forward_naive(float* out, float* lse, const float* q, const float* k,
                             const float* v, const AttentionShape& s) {
  check_shape(s);
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
                  v + (b * T * KVH + kvh) * HD, KVH * HD, 0.0f, out + (b * T * H + h) * HD,
                  H * HD);
    }
  }
}

void attention_backward_naive(float* dq, float* dk, float* dv, const float* dout,
                              const float* out, const float* lse, const float* q, const float* k,
                              const float* v, const AttentionShape& s) {
  check_shape(s);
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
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, T, HD, T, 1.0f, dP.data(), T, qb,
                  H * HD, 1.0f, dk + (b * T * KVH + kvh) * HD, KVH * HD);
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, T, HD, T, 1.0f, P.data(), T, dob,
                  H * HD, 1.0f, dv + (b * T * KVH + kvh) * HD, KVH * HD);
    }
  }
}

}  // namespace lt
