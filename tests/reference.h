// Test helpers shared by the op tests (header-only, namespace lt::test): plain double-precision
// reference ops, seeded random fills, tolerance comparisons, guard-byte buffers, finite
// differences. The references are deliberately naive loops written from the formulas, not from
// src/ops.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace lt::test {

using Vec = std::vector<float>;
using DVec = std::vector<double>;

// ---------------------------------------------------------------------------------------------
// Random data
// ---------------------------------------------------------------------------------------------

// n uniform floats in [lo, hi) from seed (std::mt19937_64, reproducible across runs).
inline Vec random_vec(int64_t n, uint64_t seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  Vec v(static_cast<size_t>(n));
  for (auto& x : v) x = dist(rng);
  return v;
}

// n ids uniform in [0, V) from seed.
inline std::vector<int32_t> random_ids(int64_t n, int64_t V, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> dist(0, int32_t(V - 1));
  std::vector<int32_t> v(static_cast<size_t>(n));
  for (auto& x : v) x = dist(rng);
  return v;
}

inline DVec to_double(const Vec& v) { return DVec(v.begin(), v.end()); }
inline DVec to_double(const float* p, int64_t n) { return DVec(p, p + n); }

// ---------------------------------------------------------------------------------------------
// Comparison with explicit tolerances: |got - want| <= atol + rtol * |want| per element.
// NaN must meet NaN, an infinity must meet the same infinity. On failure the message names the
// worst element (largest excess over its tolerance), its index, both values and the error count.
// ---------------------------------------------------------------------------------------------

template <typename G, typename W>
::testing::AssertionResult all_close(const G* got, const W* want, int64_t n, double atol,
                                     double rtol, const std::string& what = "") {
  int64_t bad = 0, worst = -1;
  double worst_excess = -1, max_abs_err = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double g = double(got[i]), w = double(want[i]);
    bool ok;
    double excess;
    if (std::isnan(w) || std::isnan(g) || std::isinf(w) || std::isinf(g)) {
      ok = (std::isnan(w) && std::isnan(g)) || g == w;
      excess = ok ? 0 : INFINITY;
    } else {
      const double err = std::fabs(g - w);
      max_abs_err = std::max(max_abs_err, err);
      excess = err - (atol + rtol * std::fabs(w));
      ok = excess <= 0;
    }
    if (!ok) ++bad;
    if (!ok && excess > worst_excess) worst_excess = excess, worst = i;
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  std::ostringstream os;
  os.precision(9);
  os << what << ": " << bad << " of " << n << " elements outside atol=" << atol << " rtol=" << rtol
     << "; worst at index " << worst << ": got " << double(got[worst]) << ", want "
     << double(want[worst]) << " (|diff| " << std::fabs(double(got[worst]) - double(want[worst]))
     << "); max finite |diff| " << max_abs_err;
  return ::testing::AssertionFailure() << os.str();
}

template <typename G, typename W>
::testing::AssertionResult all_close(const std::vector<G>& got, const std::vector<W>& want,
                                     double atol, double rtol, const std::string& what = "") {
  if (got.size() != want.size()) {
    return ::testing::AssertionFailure()
           << what << ": size " << got.size() << " != " << want.size();
  }
  return all_close(got.data(), want.data(), int64_t(got.size()), atol, rtol, what);
}

// Largest |a - b| / (|b| + floor): a quick figure for messages.
inline double max_rel_diff(const float* a, const double* b, int64_t n, double floor = 1e-30) {
  double m = 0;
  for (int64_t i = 0; i < n; ++i)
    m = std::max(m, std::fabs(a[i] - b[i]) / (std::fabs(b[i]) + floor));
  return m;
}

// ---------------------------------------------------------------------------------------------
// Guard bytes: an output buffer with kGuard sentinel floats before and after it. The sentinel is a
// NaN with a recognisable payload; any write outside [0, n) changes its bit pattern.
// ---------------------------------------------------------------------------------------------

class Guarded {
 public:
  static constexpr int64_t kGuard = 64;
  static constexpr uint32_t kSentinel = 0x7fc0dea1u;  // quiet NaN with payload 0xdea1

  // n floats initialised to fill (NaN by default: an overwrite op must write every element).
  explicit Guarded(int64_t n, float fill = NAN) : n_(n), buf_(static_cast<size_t>(n + 2 * kGuard)) {
    float s;
    std::memcpy(&s, &kSentinel, 4);
    for (auto& x : buf_) x = s;
    for (int64_t i = 0; i < n; ++i) data()[i] = fill;
  }
  explicit Guarded(const Vec& init) : Guarded(int64_t(init.size()), 0.0f) {
    std::memcpy(data(), init.data(), init.size() * sizeof(float));
  }
  float* data() { return buf_.data() + kGuard; }
  const float* data() const { return buf_.data() + kGuard; }
  float& operator[](int64_t i) { return data()[i]; }
  int64_t size() const { return n_; }
  Vec vec() const { return Vec(data(), data() + n_); }

  ::testing::AssertionResult guards_intact(const std::string& what = "") const {
    for (int64_t i = 0; i < int64_t(buf_.size()); ++i) {
      if (i >= kGuard && i < kGuard + n_) continue;
      uint32_t bits;
      std::memcpy(&bits, &buf_[size_t(i)], 4);
      if (bits != kSentinel) {
        return ::testing::AssertionFailure()
               << what << ": guard float " << (i < kGuard ? i - kGuard : i - kGuard - n_)
               << (i < kGuard ? " before" : " after (0 = first past the end)")
               << " the buffer was overwritten with " << buf_[size_t(i)];
      }
    }
    return ::testing::AssertionSuccess();
  }

 private:
  int64_t n_;
  Vec buf_;
};

// ---------------------------------------------------------------------------------------------
// Finite differences: central differences of a double function f at x, one coordinate at a time.
// Use them on the double references with L = sum(out * R) for a random R: the error is O(h^2).
// ---------------------------------------------------------------------------------------------

inline DVec fd_gradient(const std::function<double(const DVec&)>& f, DVec x, double h = 1e-5) {
  DVec g(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const double x0 = x[i];
    x[i] = x0 + h;
    const double fp = f(x);
    x[i] = x0 - h;
    const double fm = f(x);
    x[i] = x0;
    g[i] = (fp - fm) / (2 * h);
  }
  return g;
}

// sum(out * r)
inline double dot(const DVec& out, const DVec& r) {
  double s = 0;
  for (size_t i = 0; i < out.size(); ++i) s += out[i] * r[i];
  return s;
}

// ---------------------------------------------------------------------------------------------
// Double-precision reference ops (contiguous row-major; dimension names as in src/ops/common.h).
// ---------------------------------------------------------------------------------------------

// out (N,D) = weight (V,D) rows at ids.
inline DVec ref_embedding_forward(const std::vector<int32_t>& ids, const DVec& weight, int64_t D) {
  DVec out(ids.size() * size_t(D));
  for (size_t n = 0; n < ids.size(); ++n)
    for (int64_t j = 0; j < D; ++j) out[n * D + j] = weight[size_t(ids[n]) * D + j];
  return out;
}
// dweight (V,D) = scatter-add of dout (N,D) (fresh, not accumulated).
inline DVec ref_embedding_backward(const std::vector<int32_t>& ids, const DVec& dout, int64_t V,
                                   int64_t D) {
  DVec dw(static_cast<size_t>(V * D), 0.0);
  for (size_t n = 0; n < ids.size(); ++n)
    for (int64_t j = 0; j < D; ++j) dw[size_t(ids[n]) * D + j] += dout[n * D + j];
  return dw;
}

// y (N,D) = x / sqrt(mean(x^2) + eps) * w.
inline DVec ref_rmsnorm_forward(const DVec& x, const DVec& w, int64_t N, int64_t D, double eps) {
  DVec y(static_cast<size_t>(N * D));
  for (int64_t n = 0; n < N; ++n) {
    double ms = 0;
    for (int64_t j = 0; j < D; ++j) ms += x[n * D + j] * x[n * D + j];
    ms /= double(D);
    const double r = 1.0 / std::sqrt(ms + eps);
    for (int64_t j = 0; j < D; ++j) y[n * D + j] = x[n * D + j] * r * w[j];
  }
  return y;
}
// dx (N,D) and dw (D) of L = sum(y * dy), from the explicit Jacobian
//   dy_j/dx_k = w_j (delta_jk r - x_j x_k r^3 / D).
inline void ref_rmsnorm_backward(DVec& dx, DVec& dw, const DVec& dy, const DVec& x, const DVec& w,
                                 int64_t N, int64_t D, double eps) {
  dx.assign(static_cast<size_t>(N * D), 0.0);
  dw.assign(static_cast<size_t>(D), 0.0);
  for (int64_t n = 0; n < N; ++n) {
    const double* xr = &x[size_t(n * D)];
    double ms = 0;
    for (int64_t j = 0; j < D; ++j) ms += xr[j] * xr[j];
    const double r = 1.0 / std::sqrt(ms / double(D) + eps);
    for (int64_t k = 0; k < D; ++k) {
      double s = 0;
      for (int64_t j = 0; j < D; ++j) {
        const double jac = w[j] * ((j == k ? r : 0.0) - xr[j] * xr[k] * r * r * r / double(D));
        s += dy[n * D + j] * jac;
      }
      dx[n * D + k] = s;
      dw[k] += dy[n * D + k] * xr[k] * r;
    }
  }
}

// out (N,OUT) = x (N,IN) W (OUT,IN)^T + b (OUT or empty).
inline DVec ref_linear_forward(const DVec& x, const DVec& W, const DVec& b, int64_t N, int64_t IN,
                               int64_t OUT) {
  DVec out(static_cast<size_t>(N * OUT));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t o = 0; o < OUT; ++o) {
      double s = b.empty() ? 0.0 : b[o];
      for (int64_t i = 0; i < IN; ++i) s += x[n * IN + i] * W[o * IN + i];
      out[n * OUT + o] = s;
    }
  return out;
}
// Fresh gradients of L = sum(out * dout): dx (N,IN), dW (OUT,IN), db (OUT).
inline void ref_linear_backward(DVec& dx, DVec& dW, DVec& db, const DVec& dout, const DVec& x,
                                const DVec& W, int64_t N, int64_t IN, int64_t OUT) {
  dx.assign(static_cast<size_t>(N * IN), 0.0);
  dW.assign(static_cast<size_t>(OUT * IN), 0.0);
  db.assign(static_cast<size_t>(OUT), 0.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t o = 0; o < OUT; ++o) {
      const double g = dout[n * OUT + o];
      db[o] += g;
      for (int64_t i = 0; i < IN; ++i) {
        dx[n * IN + i] += g * W[o * IN + i];
        dW[o * IN + i] += g * x[n * IN + i];
      }
    }
}

// cos, sin (N, HD/2): angle = f32(pos) * inv_freq in f32 (as transformers), cos/sin in double.
inline void ref_rope_tables(DVec& cos, DVec& sin, const std::vector<int32_t>& pos,
                            const Vec& inv_freq, double scaling, int64_t HD) {
  const int64_t half = HD / 2, N = int64_t(pos.size());
  cos.assign(static_cast<size_t>(N * half), 0.0);
  sin.assign(static_cast<size_t>(N * half), 0.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = 0; i < half; ++i) {
      const float angle = float(pos[n]) * inv_freq[i];
      cos[n * half + i] = std::cos(double(angle)) * scaling;
      sin[n * half + i] = std::sin(double(angle)) * scaling;
    }
}
// out (N,H,HD) = x * cat(cos,cos) + rotate_half(x) * cat(sin,sin), rotate_half = cat(-x2, x1):
// written literally as transformers' apply_rotary_pos_emb.
inline DVec ref_rope_forward(const DVec& x, const DVec& cos, const DVec& sin, int64_t N, int64_t H,
                             int64_t HD) {
  const int64_t half = HD / 2;
  DVec out(x.size());
  for (int64_t n = 0; n < N; ++n)
    for (int64_t h = 0; h < H; ++h) {
      const double* xr = &x[size_t((n * H + h) * HD)];
      for (int64_t d = 0; d < HD; ++d) {
        const double c = cos[n * half + d % half], s = sin[n * half + d % half];
        const double rot = d < half ? -xr[d + half] : xr[d - half];
        out[(n * H + h) * HD + d] = xr[d] * c + rot * s;
      }
    }
  return out;
}
// Backward: rope is (a scaled) rotation per pair, so its transpose is rope with -sin.
inline DVec ref_rope_backward(const DVec& dout, const DVec& cos, const DVec& sin, int64_t N,
                              int64_t H, int64_t HD) {
  DVec neg_sin(sin.size());
  for (size_t i = 0; i < sin.size(); ++i) neg_sin[i] = -sin[i];
  return ref_rope_forward(dout, cos, neg_sin, N, H, HD);
}

inline double ref_sigmoid(double x) {
  return x >= 0 ? 1.0 / (1.0 + std::exp(-x)) : std::exp(x) / (1.0 + std::exp(x));
}
// out = g * sigmoid(g) * u
inline DVec ref_swiglu_forward(const DVec& g, const DVec& u) {
  DVec out(g.size());
  for (size_t i = 0; i < g.size(); ++i) out[i] = g[i] * ref_sigmoid(g[i]) * u[i];
  return out;
}
// dg = dout * u * silu'(g), silu'(g) = sig + g sig (1 - sig); du = dout * silu(g).
inline void ref_swiglu_backward(DVec& dg, DVec& du, const DVec& dout, const DVec& g,
                                const DVec& u) {
  dg.resize(g.size());
  du.resize(g.size());
  for (size_t i = 0; i < g.size(); ++i) {
    const double s = ref_sigmoid(g[i]);
    dg[i] = dout[i] * u[i] * (s + g[i] * s * (1 - s));
    du[i] = dout[i] * g[i] * s;
  }
}

// Unchunked LM head + CE: returns sum over labelled rows of -log softmax(h W^T)[y]; fills the
// fresh gradients of scale * loss: dh (N,D) and dW (V,D). y == -100 rows are ignored.
inline double ref_cross_entropy(DVec* dh, DVec* dW, const DVec& h, const DVec& W,
                                const std::vector<int32_t>& y, int64_t N, int64_t D, int64_t V,
                                double scale) {
  if (dh) dh->assign(static_cast<size_t>(N * D), 0.0);
  if (dW) dW->assign(static_cast<size_t>(V * D), 0.0);
  double loss = 0;
  DVec z(static_cast<size_t>(V)), p(static_cast<size_t>(V));
  for (int64_t n = 0; n < N; ++n) {
    if (y[n] == -100) continue;
    double m = -INFINITY;
    for (int64_t v = 0; v < V; ++v) {
      double s = 0;
      for (int64_t d = 0; d < D; ++d) s += h[n * D + d] * W[v * D + d];
      z[v] = s;
      m = std::max(m, s);
    }
    double sum = 0;
    for (int64_t v = 0; v < V; ++v) sum += std::exp(z[v] - m);
    loss += m + std::log(sum) - z[y[n]];
    for (int64_t v = 0; v < V; ++v) p[v] = (std::exp(z[v] - m) / sum - (v == y[n])) * scale;
    for (int64_t v = 0; v < V; ++v)
      for (int64_t d = 0; d < D; ++d) {
        if (dh) (*dh)[n * D + d] += p[v] * W[v * D + d];
        if (dW) (*dW)[v * D + d] += p[v] * h[n * D + d];
      }
  }
  return loss;
}

// One torch.optim.AdamW step in double (decoupled decay, bias-corrected moments), step 1-based.
inline void ref_adamw_step(DVec& param, DVec& m, DVec& v, const DVec& grad, double lr, double b1,
                           double b2, double eps, double wd, int64_t step) {
  const double bc1 = 1 - std::pow(b1, double(step)), bc2 = 1 - std::pow(b2, double(step));
  for (size_t i = 0; i < param.size(); ++i) {
    param[i] *= 1 - lr * wd;
    m[i] = b1 * m[i] + (1 - b1) * grad[i];
    v[i] = b2 * v[i] + (1 - b2) * grad[i] * grad[i];
    param[i] -= lr / bc1 * m[i] / (std::sqrt(v[i]) / std::sqrt(bc2) + eps);
  }
}

}  // namespace lt::test
