// Attention: flash and naive forward/backward against an independent double-precision reference
// (plain loops), finite-difference gradients, guard bytes, NaN propagation and peak memory.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "core/memory.h"
#include "ops/attention.h"

namespace lt {
namespace {

using Vec = std::vector<float>;
using DVec = std::vector<double>;

// ---------------------------------------------------------------------------------------------
// Double-precision reference, written from the definition: out_i = sum_j softmax_j(s_ij) v_j
// over visible keys j, s_ij = scale * q_i . k_j; lse_i = log sum_j exp(s_ij).

struct Shape {
  int64_t B, T, H, KVH, HD, window;
  std::vector<int32_t> docs;  // (B,T) or empty
  AttentionShape lt() const {
    AttentionShape s;
    s.B = B, s.T = T, s.H = H, s.KVH = KVH, s.HD = HD, s.window = window;
    s.doc_ids = docs.empty() ? nullptr : docs.data();
    s.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(HD)));
    return s;
  }
  double scale() const { return static_cast<float>(1.0 / std::sqrt(static_cast<double>(HD))); }
  bool sees(int64_t b, int64_t i, int64_t j) const {
    // transformers: causal (kv_idx <= q_idx) and sliding_window_overlay (kv_idx > q_idx - window)
    // and packed sequences (same document id).
    bool ok = j <= i;
    if (window > 0) ok = ok && j > i - window;
    if (!docs.empty()) ok = ok && docs[b * T + j] == docs[b * T + i];
    return ok;
  }
  int64_t nq() const { return B * T * H * HD; }
  int64_t nkv() const { return B * T * KVH * HD; }
};

int64_t qi(const Shape& s, int64_t b, int64_t t, int64_t h) {
  return ((b * s.T + t) * s.H + h) * s.HD;
}
int64_t kvi(const Shape& s, int64_t b, int64_t t, int64_t h) {
  return ((b * s.T + t) * s.KVH + h / (s.H / s.KVH)) * s.HD;
}

// Per-row softmax probabilities of query (b,h,i); returns lse (-inf when no key is visible).
double ref_probs(const Shape& s, const DVec& q, const DVec& k, int64_t b, int64_t h, int64_t i,
                 DVec& p) {
  p.assign(s.T, 0.0);
  double mx = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < s.T; ++j) {
    if (!s.sees(b, i, j)) continue;
    double dot = 0;
    for (int64_t d = 0; d < s.HD; ++d) dot += q[qi(s, b, i, h) + d] * k[kvi(s, b, j, h) + d];
    p[j] = dot * s.scale();
    mx = std::max(mx, p[j]);
  }
  if (mx == -std::numeric_limits<double>::infinity()) return mx;
  double sum = 0;
  for (int64_t j = 0; j < s.T; ++j) sum += s.sees(b, i, j) ? std::exp(p[j] - mx) : 0.0;
  for (int64_t j = 0; j < s.T; ++j) p[j] = s.sees(b, i, j) ? std::exp(p[j] - mx) / sum : 0.0;
  return mx + std::log(sum);
}

void ref_forward(const Shape& s, const DVec& q, const DVec& k, const DVec& v, DVec& out,
                 DVec& lse) {
  out.assign(s.nq(), 0.0);
  lse.assign(s.B * s.H * s.T, 0.0);
  DVec p;
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t h = 0; h < s.H; ++h)
      for (int64_t i = 0; i < s.T; ++i) {
        lse[(b * s.H + h) * s.T + i] = ref_probs(s, q, k, b, h, i, p);
        for (int64_t j = 0; j < s.T; ++j)
          for (int64_t d = 0; d < s.HD; ++d)
            out[qi(s, b, i, h) + d] += p[j] * v[kvi(s, b, j, h) + d];
      }
}

// dL/dq, dL/dk, dL/dv for L = sum(out * dout): with P the probabilities,
// dP_ij = dout_i . v_j, dS_ij = P_ij (dP_ij - sum_l P_il dP_il), dq_i = scale sum_j dS_ij k_j, ...
void ref_backward(const Shape& s, const DVec& q, const DVec& k, const DVec& v, const DVec& dout,
                  DVec& dq, DVec& dk, DVec& dv) {
  dq.assign(s.nq(), 0.0);
  dk.assign(s.nkv(), 0.0);
  dv.assign(s.nkv(), 0.0);
  DVec p, dp(s.T);
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t h = 0; h < s.H; ++h)
      for (int64_t i = 0; i < s.T; ++i) {
        ref_probs(s, q, k, b, h, i, p);
        double pdp = 0;
        for (int64_t j = 0; j < s.T; ++j) {
          dp[j] = 0;
          for (int64_t d = 0; d < s.HD; ++d)
            dp[j] += dout[qi(s, b, i, h) + d] * v[kvi(s, b, j, h) + d];
          pdp += p[j] * dp[j];
        }
        for (int64_t j = 0; j < s.T; ++j) {
          if (p[j] == 0) continue;
          const double ds = p[j] * (dp[j] - pdp) * s.scale();
          for (int64_t d = 0; d < s.HD; ++d) {
            dq[qi(s, b, i, h) + d] += ds * k[kvi(s, b, j, h) + d];
            dk[kvi(s, b, j, h) + d] += ds * q[qi(s, b, i, h) + d];
            dv[kvi(s, b, j, h) + d] += p[j] * dout[qi(s, b, i, h) + d];
          }
        }
      }
}

DVec to_double(const Vec& x) { return DVec(x.begin(), x.end()); }

// Largest violation of |got - want| <= abs_tol + rel_tol * |want|; prints the worst element.
::testing::AssertionResult close(const std::string& what, const float* got, const DVec& want,
                                 double abs_tol, double rel_tol) {
  double worst = 0;
  int64_t at = -1;
  for (size_t i = 0; i < want.size(); ++i) {
    const double g = got[i], w = want[i];
    double excess;
    if (std::isinf(w) || std::isinf(g)) {
      excess = g == w ? 0 : std::numeric_limits<double>::infinity();
    } else {
      excess = std::fabs(g - w) - (abs_tol + rel_tol * std::fabs(w));
      if (std::isnan(g) || std::isnan(w)) excess = std::numeric_limits<double>::infinity();
    }
    if (excess > worst || (at < 0 && excess > 0)) worst = excess, at = static_cast<int64_t>(i);
  }
  if (at < 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << what << ": worst element " << at << " of " << want.size() << ": got " << got[at]
         << " want " << want[at] << " (abs tol " << abs_tol << ", rel tol " << rel_tol << ")";
}

Vec random_vec(int64_t n, float lo, float hi, std::mt19937& rng) {
  std::uniform_real_distribution<float> u(lo, hi);
  Vec x(n);
  for (auto& e : x) e = u(rng);
  return x;
}

// Three documents of uneven lengths in row 0, a different layout in row 1 (two documents, the
// first one split in two runs: doc ids need not be contiguous), arbitrary id values.
std::vector<int32_t> make_docs(int64_t B, int64_t T) {
  std::vector<int32_t> d(B * T);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      if (b % 2 == 0) {
        d[b * T + t] = t < T / 5 ? 7 : t < (T * 7) / 10 ? 3 : 11;
      } else {
        d[b * T + t] = t < T / 3 ? 5 : t < T / 2 ? 9 : 5;
      }
    }
  return d;
}

struct Case {
  int64_t T, HD, H, KVH;
  int64_t window;
  bool docs;
  std::string name() const {
    return "T" + std::to_string(T) + "_HD" + std::to_string(HD) + "_H" + std::to_string(H) +
           "_KVH" + std::to_string(KVH) + "_w" + std::to_string(window) + (docs ? "_docs" : "");
  }
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name(); }

std::vector<Case> all_cases() {
  std::vector<Case> cases;
  const int64_t Ts[] = {1, 7, 33, 100, 257};
  const int64_t HDs[] = {8, 12, 64};
  const int64_t heads[][2] = {{4, 2}, {4, 4}, {8, 1}};
  int n = 0;
  for (int64_t T : Ts) {
    // causal; window 1, 5, larger than T; documents; window + documents
    const std::pair<int64_t, bool> masks[] = {{0, false},      {1, false}, {5, false},
                                              {T + 10, false}, {0, true},  {5, true}};
    for (auto [w, docs] : masks) {
      const int64_t HD = HDs[n % 3], H = heads[(n / 3) % 3][0], KVH = heads[(n / 3) % 3][1];
      cases.push_back({T, HD, H, KVH, w, docs});
      ++n;
    }
  }
  // Every head size with every head layout at the largest size, causal.
  for (int64_t HD : HDs)
    for (auto& hk : heads) cases.push_back({257, HD, hk[0], hk[1], 0, false});
  cases.push_back({257, 64, 4, 2, 100, true});
  cases.push_back({200, 128, 4, 2, 0, true});
  std::vector<Case> unique;
  for (const Case& c : cases) {
    bool dup = false;
    for (const Case& u : unique) dup = dup || u.name() == c.name();
    if (!dup) unique.push_back(c);
  }
  return unique;
}

class AttentionCase : public ::testing::TestWithParam<Case> {};

TEST_P(AttentionCase, FlashAndNaiveMatchDoubleReference) {
  const Case c = GetParam();
  Shape s{2, c.T, c.H, c.KVH, c.HD, c.window, {}};
  if (c.docs) s.docs = make_docs(s.B, s.T);
  std::mt19937 rng(1234 + c.T * 7 + c.HD);
  const Vec q = random_vec(s.nq(), -2, 2, rng), k = random_vec(s.nkv(), -2, 2, rng),
            v = random_vec(s.nkv(), -1, 1, rng), dout = random_vec(s.nq(), -1, 1, rng);
  DVec out_ref, lse_ref, dq_ref, dk_ref, dv_ref;
  ref_forward(s, to_double(q), to_double(k), to_double(v), out_ref, lse_ref);
  ref_backward(s, to_double(q), to_double(k), to_double(v), to_double(dout), dq_ref, dk_ref,
               dv_ref);
  const AttentionShape as = s.lt();
  const double fwd_abs = 2e-5, fwd_rel = 1e-4, bwd_abs = 5e-5, bwd_rel = 2e-4;

  struct Impl {
    const char* name;
    decltype(&attention_forward) fwd;
    decltype(&attention_backward) bwd;
  };
  const Impl impls[] = {{"flash", attention_forward, attention_backward},
                        {"naive", attention_forward_naive, attention_backward_naive}};
  for (const Impl& impl : impls) {
    SCOPED_TRACE(impl.name);
    Vec out(s.nq(), 99.0f), lse(s.B * s.H * s.T, 99.0f);
    impl.fwd(out.data(), lse.data(), q.data(), k.data(), v.data(), as);
    EXPECT_TRUE(close("out", out.data(), out_ref, fwd_abs, fwd_rel));
    EXPECT_TRUE(close("lse", lse.data(), lse_ref, fwd_abs, fwd_rel));
    Vec dq(s.nq(), 99.0f), dk(s.nkv(), 99.0f), dv(s.nkv(), 99.0f);
    impl.bwd(dq.data(), dk.data(), dv.data(), dout.data(), out.data(), lse.data(), q.data(),
             k.data(), v.data(), as);
    EXPECT_TRUE(close("dq", dq.data(), dq_ref, bwd_abs, bwd_rel));
    EXPECT_TRUE(close("dk", dk.data(), dk_ref, bwd_abs, bwd_rel));
    EXPECT_TRUE(close("dv", dv.data(), dv_ref, bwd_abs, bwd_rel));
  }
  // The flash backward splits work by (b, kv head) when B * KVH >= threads and in two passes
  // (key tiles, then query tiles) otherwise: check both schemes.
  const int threads = omp_get_max_threads();
  for (int n : {1, 16}) {
    SCOPED_TRACE(n == 1 ? "flash backward, one pass (1 thread)" : "flash backward, two passes");
    omp_set_num_threads(n);
    Vec out(s.nq()), lse(s.B * s.H * s.T), dq(s.nq(), 99.0f), dk(s.nkv(), 99.0f),
        dv(s.nkv(), 99.0f);
    attention_forward(out.data(), lse.data(), q.data(), k.data(), v.data(), as);
    attention_backward(dq.data(), dk.data(), dv.data(), dout.data(), out.data(), lse.data(),
                       q.data(), k.data(), v.data(), as);
    omp_set_num_threads(threads);
    EXPECT_TRUE(close("dq", dq.data(), dq_ref, bwd_abs, bwd_rel));
    EXPECT_TRUE(close("dk", dk.data(), dk_ref, bwd_abs, bwd_rel));
    EXPECT_TRUE(close("dv", dv.data(), dv_ref, bwd_abs, bwd_rel));
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, AttentionCase, ::testing::ValuesIn(all_cases()),
                         [](const auto& info) { return info.param.name(); });

// ---------------------------------------------------------------------------------------------
// Blocks (FPDT's chunk pairs): the sequence cut into uneven chunks; each query chunk's output is
// the online-softmax merge of its blocks against every key chunk (later chunks see nothing),
// and the blocks' gradients sum to the whole gradient. Both backward work splits.

struct BlockCase {
  int64_t T, H, KVH, HD, window;
  bool docs;
  std::vector<int64_t> cuts;  // chunk boundaries, 0 ... T
};

// Rows [r0, r0 + n) of a (T, width) tensor.
Vec rows_of(const Vec& x, int64_t r0, int64_t n, int64_t width) {
  return Vec(x.begin() + r0 * width, x.begin() + (r0 + n) * width);
}

TEST(Attention, BlocksMergeToWholeAttention) {
  const BlockCase cases[] = {{150, 4, 2, 8, 0, false, {0, 40, 97, 150}},
                             {150, 4, 1, 12, 0, true, {0, 64, 128, 150}},
                             {200, 8, 2, 16, 37, true, {0, 1, 70, 71, 199, 200}},
                             {97, 4, 4, 64, 0, true, {0, 97}}};
  const int threads = omp_get_max_threads();
  for (const BlockCase& c : cases) {
    Shape s{1, c.T, c.H, c.KVH, c.HD, c.window, {}};
    if (c.docs) s.docs = make_docs(1, c.T);
    SCOPED_TRACE("T " + std::to_string(c.T) + " H " + std::to_string(c.H) + " KVH " +
                 std::to_string(c.KVH) + " HD " + std::to_string(c.HD));
    std::mt19937 rng(99 + c.T);
    const Vec q = random_vec(s.nq(), -2, 2, rng), k = random_vec(s.nkv(), -2, 2, rng),
              v = random_vec(s.nkv(), -1, 1, rng), dout = random_vec(s.nq(), -1, 1, rng);
    DVec out_ref, lse_ref, dq_ref, dk_ref, dv_ref;
    ref_forward(s, to_double(q), to_double(k), to_double(v), out_ref, lse_ref);
    ref_backward(s, to_double(q), to_double(k), to_double(v), to_double(dout), dq_ref, dk_ref,
                 dv_ref);
    const int64_t QD = c.H * c.HD, KVD = c.KVH * c.HD, U = int64_t(c.cuts.size()) - 1;
    Vec out(s.nq()), lse(c.H * c.T), dq(s.nq(), 0.0f), dk(s.nkv(), 0.0f), dv(s.nkv(), 0.0f);
    auto block_shape = [&](int64_t i, int64_t j) {
      AttentionShape a = s.lt();
      a.q_begin = c.cuts[i], a.Tq = c.cuts[i + 1] - c.cuts[i];
      a.k_begin = c.cuts[j], a.Tk = c.cuts[j + 1] - c.cuts[j];
      return a;
    };
    for (int64_t i = 0; i < U; ++i) {
      const int64_t q0 = c.cuts[i], qn = c.cuts[i + 1] - q0;
      const Vec qi = rows_of(q, q0, qn, QD);
      Vec o(qn * QD, 0.0f), l(c.H * qn, -std::numeric_limits<float>::infinity());
      for (int64_t j = 0; j < U; ++j) {  // j > i: fully masked, must merge as nothing
        const AttentionShape a = block_shape(i, j);
        const Vec kj = rows_of(k, a.k_begin, a.Tk, KVD), vj = rows_of(v, a.k_begin, a.Tk, KVD);
        Vec ob(qn * QD, 77.0f), lb(c.H * qn, 77.0f);
        attention_forward(ob.data(), lb.data(), qi.data(), kj.data(), vj.data(), a);
        attention_merge(o.data(), l.data(), ob.data(), lb.data(), qn, c.H, c.HD);
      }
      std::copy(o.begin(), o.end(), out.begin() + q0 * QD);
      for (int64_t h = 0; h < c.H; ++h)
        std::copy(l.begin() + h * qn, l.begin() + (h + 1) * qn, lse.begin() + h * c.T + q0);
    }
    EXPECT_TRUE(close("merged out", out.data(), out_ref, 2e-5, 1e-4));
    EXPECT_TRUE(close("merged lse", lse.data(), lse_ref, 2e-5, 1e-4));
    for (int n : {1, 16}) {
      SCOPED_TRACE(n == 1 ? "one pass" : "two passes");
      omp_set_num_threads(n);
      std::fill(dq.begin(), dq.end(), 0.0f);
      std::fill(dk.begin(), dk.end(), 0.0f);
      std::fill(dv.begin(), dv.end(), 0.0f);
      for (int64_t j = 0; j < U; ++j)
        for (int64_t i = 0; i < U; ++i) {
          const AttentionShape a = block_shape(i, j);
          const int64_t qn = a.Tq, kn = a.Tk;
          const Vec qi = rows_of(q, a.q_begin, qn, QD), oi = rows_of(out, a.q_begin, qn, QD),
                    di = rows_of(dout, a.q_begin, qn, QD);
          const Vec kj = rows_of(k, a.k_begin, kn, KVD), vj = rows_of(v, a.k_begin, kn, KVD);
          Vec li(c.H * qn);
          for (int64_t h = 0; h < c.H; ++h)
            for (int64_t r = 0; r < qn; ++r) li[h * qn + r] = lse[h * c.T + a.q_begin + r];
          Vec bq(qn * QD, 55.0f), bk(kn * KVD, 55.0f), bv(kn * KVD, 55.0f);
          attention_backward(bq.data(), bk.data(), bv.data(), di.data(), oi.data(), li.data(),
                             qi.data(), kj.data(), vj.data(), a);
          for (int64_t e = 0; e < qn * QD; ++e) dq[a.q_begin * QD + e] += bq[e];
          for (int64_t e = 0; e < kn * KVD; ++e) {
            dk[a.k_begin * KVD + e] += bk[e];
            dv[a.k_begin * KVD + e] += bv[e];
          }
        }
      omp_set_num_threads(threads);
      EXPECT_TRUE(close("summed dq", dq.data(), dq_ref, 5e-5, 2e-4));
      EXPECT_TRUE(close("summed dk", dk.data(), dk_ref, 5e-5, 2e-4));
      EXPECT_TRUE(close("summed dv", dv.data(), dv_ref, 5e-5, 2e-4));
    }
  }
}

// A merge keeps NaN in its row and treats a partial with lse -inf as absent.
TEST(Attention, MergeNanAndEmptyPartials) {
  const float inf = std::numeric_limits<float>::infinity();
  Vec out = {1, 2, 3, 4}, lse = {0.5f, -inf};  // rows 2, H 1, HD 2
  const Vec ob = {10, 20, 30, 40}, lb = {-inf, 0.25f};
  attention_merge(out.data(), lse.data(), ob.data(), lb.data(), 2, 1, 2);
  EXPECT_EQ(out[0], 1.0f);
  EXPECT_EQ(out[1], 2.0f);
  EXPECT_EQ(lse[0], 0.5f);
  EXPECT_FLOAT_EQ(out[2], 30.0f);  // the first partial saw nothing: the second one alone
  EXPECT_FLOAT_EQ(lse[1], 0.25f);
  const Vec on = {std::nanf(""), 1, 1, 1}, ln = {std::nanf(""), 0};
  attention_merge(out.data(), lse.data(), on.data(), ln.data(), 2, 1, 2);
  EXPECT_TRUE(std::isnan(out[0]) && std::isnan(out[1]) && std::isnan(lse[0]));
  EXPECT_FALSE(std::isnan(out[2]) || std::isnan(lse[1]));
}

// ---------------------------------------------------------------------------------------------

TEST(Attention, FlashBackwardMatchesFiniteDifferences) {
  Shape s{1, 9, 4, 2, 4, 4, {}};
  s.docs = {0, 0, 0, 0, 0, 1, 1, 1, 1};
  std::mt19937 rng(7);
  const Vec q = random_vec(s.nq(), -1.5, 1.5, rng), k = random_vec(s.nkv(), -1.5, 1.5, rng),
            v = random_vec(s.nkv(), -1, 1, rng), r = random_vec(s.nq(), -1, 1, rng);
  const AttentionShape as = s.lt();
  Vec out(s.nq()), lse(s.H * s.T), dq(s.nq()), dk(s.nkv()), dv(s.nkv());
  attention_forward(out.data(), lse.data(), q.data(), k.data(), v.data(), as);
  attention_backward(dq.data(), dk.data(), dv.data(), r.data(), out.data(), lse.data(), q.data(),
                     k.data(), v.data(), as);
  // L = sum(out * r) in double; central differences with step eps.
  const DVec rd = to_double(r);
  auto loss = [&](const DVec& qd, const DVec& kd, const DVec& vd) {
    DVec o, l;
    ref_forward(s, qd, kd, vd, o, l);
    double acc = 0;
    for (size_t i = 0; i < o.size(); ++i) acc += o[i] * rd[i];
    return acc;
  };
  const double eps = 1e-5;
  DVec qd = to_double(q), kd = to_double(k), vd = to_double(v);
  auto fd = [&](DVec& x) {
    DVec g(x.size());
    for (size_t i = 0; i < x.size(); ++i) {
      const double x0 = x[i];
      x[i] = x0 + eps;
      const double lp = loss(qd, kd, vd);
      x[i] = x0 - eps;
      const double lm = loss(qd, kd, vd);
      x[i] = x0;
      g[i] = (lp - lm) / (2 * eps);
    }
    return g;
  };
  EXPECT_TRUE(close("dq vs finite differences", dq.data(), fd(qd), 2e-5, 1e-4));
  EXPECT_TRUE(close("dk vs finite differences", dk.data(), fd(kd), 2e-5, 1e-4));
  EXPECT_TRUE(close("dv vs finite differences", dv.data(), fd(vd), 2e-5, 1e-4));
}

// Outputs sit between sentinel margins that neither forward nor backward may touch.
TEST(Attention, GuardBytesUntouched) {
  Shape s{2, 70, 4, 2, 64, 0, {}};
  std::mt19937 rng(3);
  const Vec q = random_vec(s.nq(), -1, 1, rng), k = random_vec(s.nkv(), -1, 1, rng),
            v = random_vec(s.nkv(), -1, 1, rng), dout = random_vec(s.nq(), -1, 1, rng);
  const AttentionShape as = s.lt();
  const int64_t margin = 97;
  const float sentinel = -12345.5f;
  auto guarded = [&](int64_t n) { return Vec(n + 2 * margin, sentinel); };
  auto intact = [&](const Vec& x, const char* name) {
    for (int64_t i = 0; i < margin; ++i) {
      EXPECT_EQ(x[i], sentinel) << name << " front margin " << i;
      EXPECT_EQ(x[x.size() - 1 - i], sentinel) << name << " back margin " << i;
    }
  };
  for (int impl = 0; impl < 2; ++impl) {
    Vec out = guarded(s.nq()), lse = guarded(s.B * s.H * s.T), dq = guarded(s.nq()),
        dk = guarded(s.nkv()), dv = guarded(s.nkv());
    auto fwd = impl == 0 ? attention_forward : attention_forward_naive;
    auto bwd = impl == 0 ? attention_backward : attention_backward_naive;
    fwd(out.data() + margin, lse.data() + margin, q.data(), k.data(), v.data(), as);
    bwd(dq.data() + margin, dk.data() + margin, dv.data() + margin, dout.data(),
        out.data() + margin, lse.data() + margin, q.data(), k.data(), v.data(), as);
    for (const Vec* x : {&out, &lse, &dq, &dk, &dv}) intact(*x, impl == 0 ? "flash" : "naive");
    // Every output element was written (no sentinel left inside).
    for (const Vec* x : {&out, &lse, &dq, &dk, &dv})
      for (size_t i = margin; i < x->size() - margin; ++i)
        ASSERT_NE((*x)[i], sentinel) << "element " << i - margin << " not written";
  }
}

TEST(Attention, NanInOneQueryRowStaysInThatRow) {
  Shape s{2, 80, 4, 2, 64, 0, {}};
  std::mt19937 rng(5);
  Vec q = random_vec(s.nq(), -1, 1, rng);
  const Vec k = random_vec(s.nkv(), -1, 1, rng), v = random_vec(s.nkv(), -1, 1, rng),
            dout = random_vec(s.nq(), -1, 1, rng);
  const int64_t bad_t = 70, bad_h = 1;
  for (int64_t d = 0; d < s.HD; ++d) q[qi(s, 0, bad_t, bad_h) + d] = NAN;
  const AttentionShape as = s.lt();
  for (int impl = 0; impl < 2; ++impl) {
    SCOPED_TRACE(impl == 0 ? "flash" : "naive");
    Vec out(s.nq()), lse(s.B * s.H * s.T), dq(s.nq()), dk(s.nkv()), dv(s.nkv());
    (impl == 0 ? attention_forward : attention_forward_naive)(out.data(), lse.data(), q.data(),
                                                              k.data(), v.data(), as);
    for (int64_t b = 0; b < s.B; ++b)
      for (int64_t t = 0; t < s.T; ++t)
        for (int64_t h = 0; h < s.H; ++h) {
          const bool bad = b == 0 && t == bad_t && h == bad_h;
          for (int64_t d = 0; d < s.HD; ++d)
            ASSERT_EQ(std::isnan(out[qi(s, b, t, h) + d]), bad) << b << " " << t << " " << h;
        }
    (impl == 0 ? attention_backward : attention_backward_naive)(dq.data(), dk.data(), dv.data(),
                                                                dout.data(), out.data(), lse.data(),
                                                                q.data(), k.data(), v.data(), as);
    // The other batch row's gradients stay finite.
    for (int64_t i = s.nq() / 2; i < s.nq(); ++i) ASSERT_TRUE(std::isfinite(dq[i])) << i;
    for (int64_t i = s.nkv() / 2; i < s.nkv(); ++i)
      ASSERT_TRUE(std::isfinite(dk[i]) && std::isfinite(dv[i])) << i;
  }
}

// A row that sees no key at all (only possible through the contract, not with self-attention
// masks, so this checks T = 0 and B = 0 are no-ops instead) must not touch memory.
TEST(Attention, EmptyShapesAreNoOps) {
  float sentinel = 1.0f;
  AttentionShape s;
  s.B = 1, s.T = 0, s.H = 2, s.KVH = 1, s.HD = 8, s.scale = 1;
  attention_forward(&sentinel, &sentinel, nullptr, nullptr, nullptr, s);
  attention_backward(&sentinel, &sentinel, &sentinel, nullptr, nullptr, nullptr, nullptr, nullptr,
                     nullptr, s);
  EXPECT_EQ(sentinel, 1.0f);
}

// Flash attention never holds a T x T matrix: peak RSS growth during forward + backward at
// T = 8192 stays far below T*T*4 = 256 MiB. Also checks a few rows against the reference.
TEST(Attention, FlashMemoryIsLinearInT) {
  Shape s{1, 8192, 2, 1, 64, 0, {}};
  std::mt19937 rng(11);
  const Vec q = random_vec(s.nq(), -1, 1, rng), k = random_vec(s.nkv(), -1, 1, rng),
            v = random_vec(s.nkv(), -1, 1, rng), dout = random_vec(s.nq(), -1, 1, rng);
  Vec out(s.nq(), 0.0f), lse(s.H * s.T, 0.0f), dq(s.nq(), 0.0f), dk(s.nkv(), 0.0f),
      dv(s.nkv(), 0.0f);
  // Reset the peak (VmHWM) to the current RSS so that the growth is measured from here.
  FILE* f = std::fopen("/proc/self/clear_refs", "w");
  if (!f || std::fputs("5", f) < 0 || std::fclose(f) != 0)
    GTEST_SKIP() << "cannot reset the peak RSS through /proc/self/clear_refs";
  const size_t before = current_rss();
  ASSERT_LE(measured_peak_rss(), before + (1 << 20)) << "peak was not reset";
  const AttentionShape as = s.lt();
  attention_forward(out.data(), lse.data(), q.data(), k.data(), v.data(), as);
  attention_backward(dq.data(), dk.data(), dv.data(), dout.data(), out.data(), lse.data(), q.data(),
                     k.data(), v.data(), as);
  const size_t growth = measured_peak_rss() - before;
  std::printf("T=%lld: peak RSS growth %s during flash forward+backward (inputs %s)\n",
              static_cast<long long>(s.T), format_bytes(growth).c_str(),
              format_bytes(4 * (4 * s.nq() + 4 * s.nkv())).c_str());
  EXPECT_LT(growth, size_t(32) << 20);
  // Spot-check rows at the start, middle and end of the sequence.
  const DVec qd = to_double(q), kd = to_double(k), vd = to_double(v);
  DVec p;
  for (int64_t t : {int64_t(0), int64_t(4097), s.T - 1})
    for (int64_t h = 0; h < s.H; ++h) {
      const double l = ref_probs(s, qd, kd, 0, h, t, p);
      EXPECT_NEAR(lse[h * s.T + t], l, 1e-4) << "t=" << t << " h=" << h;
      for (int64_t d = 0; d < s.HD; ++d) {
        double o = 0;
        for (int64_t j = 0; j < s.T; ++j) o += p[j] * vd[kvi(s, 0, j, h) + d];
        ASSERT_NEAR(out[qi(s, 0, t, h) + d], o, 2e-5) << "t=" << t << " h=" << h << " d=" << d;
      }
    }
}

}  // namespace
}  // namespace lt
