// Benchmark (not a test) of the BLAS-backed CPU ops: raw cblas_sgemm rate, linear_forward and
// linear_backward GFLOP/s as a fraction of it, and the fused LM head + CE in tokens/s.
// Every result is validated on sampled elements against a double dot product before timing.
// Usage: bench_ops [reps]   (threads: OMP_NUM_THREADS / OPENBLAS_NUM_THREADS)
#include <cblas.h>
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <random>
#include <vector>

#include "ops/cross_entropy.h"
#include "ops/linear.h"

namespace {

using Clock = std::chrono::steady_clock;

std::vector<float> random_vec(int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> d(-1, 1);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = d(rng);
  return v;
}

// Median of reps timings of f, in seconds (after one warm-up call).
template <typename F>
double time_it(int reps, F&& f) {
  f();
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    auto t0 = Clock::now();
    f();
    t.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// Checks 64 sampled entries of C (M,N) = A (M,K) @ B^T, B (N,K) (+ c0) against double sums.
bool check_abt(const float* C, const float* A, const float* B, int64_t M, int64_t N, int64_t K,
               const char* what) {
  std::mt19937_64 rng(7);
  double worst = 0;
  for (int s = 0; s < 64; ++s) {
    const int64_t i = int64_t(rng() % uint64_t(M)), j = int64_t(rng() % uint64_t(N));
    double want = 0, mag = 0;
    for (int64_t k = 0; k < K; ++k) {
      want += double(A[i * K + k]) * B[j * K + k];
      mag += std::fabs(double(A[i * K + k]) * B[j * K + k]);
    }
    worst = std::max(worst, std::fabs(C[i * N + j] - want) / (mag + 1e-30));
  }
  if (worst > 1e-5) {
    fmt::print(stderr, "{}: validation FAILED, worst relative error {:.3g}\n", what, worst);
    return false;
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  const int reps = argc > 1 ? std::atoi(argv[1]) : 5;
  bool ok = true;
  fmt::print("threads: OMP_NUM_THREADS={} OPENBLAS_NUM_THREADS={} (openblas reports {})\n",
             std::getenv("OMP_NUM_THREADS") ? std::getenv("OMP_NUM_THREADS") : "unset",
             std::getenv("OPENBLAS_NUM_THREADS") ? std::getenv("OPENBLAS_NUM_THREADS") : "unset",
             openblas_get_num_threads());

  // Machine sgemm rate: square NT product, the best case for the library.
  double peak = 0;
  for (int64_t n : {1024, 2048}) {
    auto A = random_vec(n * n, 1), B = random_vec(n * n, 2);
    std::vector<float> C(static_cast<size_t>(n * n));
    const double t = time_it(reps, [&] {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, n, 1.0f, A.data(), n, B.data(), n,
                  0.0f, C.data(), n);
    });
    ok &= check_abt(C.data(), A.data(), B.data(), n, n, n, "sgemm");
    const double gflops = 2.0 * n * n * n / t / 1e9;
    peak = std::max(peak, gflops);
    fmt::print("cblas_sgemm {}^3 (NT): {:8.3f} ms  {:7.1f} GFLOP/s\n", n, t * 1e3, gflops);
  }

  // Linear layers at model-like shapes: (N tokens, IN, OUT).
  struct Shape {
    int64_t N, IN, OUT;
  };
  for (Shape s : {Shape{512, 2048, 2048}, Shape{1024, 2048, 5632}, Shape{2048, 5632, 2048}}) {
    auto x = random_vec(s.N * s.IN, 3), W = random_vec(s.OUT * s.IN, 4),
         dy = random_vec(s.N * s.OUT, 5);
    std::vector<float> y(static_cast<size_t>(s.N * s.OUT)), dx(static_cast<size_t>(s.N * s.IN)),
        dW(static_cast<size_t>(s.OUT * s.IN), 0.0f);
    const double flops = 2.0 * s.N * s.IN * s.OUT;
    const double tf = time_it(
        reps, [&] { lt::linear_forward(y.data(), x.data(), W.data(), nullptr, s.N, s.IN, s.OUT); });
    ok &= check_abt(y.data(), x.data(), W.data(), s.N, s.OUT, s.IN, "linear_forward");
    // dx = dy @ W: validate against W^T stored as (IN,OUT).
    lt::linear_backward(dx.data(), nullptr, nullptr, dy.data(), x.data(), W.data(), s.N, s.IN,
                        s.OUT, lt::Accumulate::kNo);
    std::vector<float> Wt(W.size());
    for (int64_t o = 0; o < s.OUT; ++o)
      for (int64_t i = 0; i < s.IN; ++i) Wt[i * s.OUT + o] = W[o * s.IN + i];
    ok &= check_abt(dx.data(), dy.data(), Wt.data(), s.N, s.IN, s.OUT, "linear_backward dx");
    const double tb = time_it(reps, [&] {
      lt::linear_backward(dx.data(), dW.data(), nullptr, dy.data(), x.data(), W.data(), s.N, s.IN,
                          s.OUT, lt::Accumulate::kNo);
    });
    fmt::print(
        "linear N={} IN={} OUT={}: forward {:8.3f} ms {:7.1f} GFLOP/s ({:.0f}% of sgemm peak); "
        "backward dx+dW {:8.3f} ms {:7.1f} GFLOP/s ({:.0f}%)\n",
        s.N, s.IN, s.OUT, tf * 1e3, flops / tf / 1e9, 100 * flops / tf / 1e9 / peak, tb * 1e3,
        2 * flops / tb / 1e9, 100 * 2 * flops / tb / 1e9 / peak);
  }

  // Fused LM head + CE with gradients: 3 GEMMs of N*D*V each plus the softmax.
  {
    const int64_t N = 1024, D = 1024, V = 32000, chunk = 256;
    auto h = random_vec(N * D, 6), W = random_vec(V * D, 7);
    for (auto& w : W) w *= 0.05f;
    std::vector<int32_t> y(static_cast<size_t>(N));
    for (int64_t n = 0; n < N; ++n) y[n] = int32_t((n * 7919) % V);
    std::vector<float> dh(static_cast<size_t>(N * D)), dW(static_cast<size_t>(V * D), 0.0f),
        scratch(static_cast<size_t>(chunk * V));
    double loss = 0;
    const double t = time_it(std::max(1, reps / 2), [&] {
      loss = lt::lm_head_cross_entropy(dh.data(), dW.data(), h.data(), W.data(), y.data(), N, D, V,
                                       chunk, 1.0f / N, scratch.data());
    });
    if (!std::isfinite(loss) || loss / N < 5 || loss / N > 20) {
      fmt::print(stderr, "lm_head_cross_entropy: implausible mean loss {}\n", loss / N);
      ok = false;
    }
    const double flops = 3 * 2.0 * N * D * V;
    fmt::print(
        "lm_head_cross_entropy N={} D={} V={} chunk={}: {:8.2f} ms, {:.0f} tokens/s, "
        "{:7.1f} GFLOP/s ({:.0f}% of sgemm peak), mean loss {:.4f}\n",
        N, D, V, chunk, t * 1e3, N / t, flops / t / 1e9, 100 * flops / t / 1e9 / peak, loss / N);
  }
  if (!ok) {
    fmt::print(stderr, "VALIDATION FAILED\n");
    return 1;
  }
  return 0;
}
