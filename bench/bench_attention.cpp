// Benchmark of causal GQA attention on CPU: flash (tiled) vs naive (T x T scores), forward and
// backward, with GFLOP/s, the fraction of the machine's measured sgemm peak, and peak memory.
// Usage: bench_attention [threads=2] [max_T=8192] [min_T=1024] (naive runs up to T = 4096)
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "core/memory.h"
#include "ops/attention.h"

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Best wall time of `reps` runs of f.
template <typename F>
double best_time(int reps, F&& f) {
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = Clock::now();
    f();
    best = std::min(best, seconds_since(t0));
  }
  return best;
}

std::vector<float> random_vec(size_t n, std::mt19937& rng) {
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> x(n);
  for (auto& e : x) e = u(rng);
  return x;
}

void reset_peak_rss() {
  if (FILE* f = std::fopen("/proc/self/clear_refs", "w")) {
    std::fputs("5", f);
    std::fclose(f);
  }
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = std::fabs(double(a[i]) - double(b[i]));
    if (!(d <= m)) m = d;  // NaN counts as the largest difference
  }
  return m;
}

struct Problem {
  lt::AttentionShape s;
  std::vector<float> q, k, v, dout, out, lse, dq, dk, dv;
  Problem(int64_t T, int64_t H, int64_t KVH, int64_t HD, std::mt19937& rng) {
    s.B = 1, s.T = T, s.H = H, s.KVH = KVH, s.HD = HD;
    s.scale = 1.0f / std::sqrt(float(HD));
    const size_t nq = T * H * HD, nkv = T * KVH * HD;
    q = random_vec(nq, rng), k = random_vec(nkv, rng), v = random_vec(nkv, rng);
    dout = random_vec(nq, rng);
    out.assign(nq, 0), lse.assign(H * T, 0), dq.assign(nq, 0), dk.assign(nkv, 0);
    dv.assign(nkv, 0);
  }
  void forward(bool flash) {
    (flash ? lt::attention_forward : lt::attention_forward_naive)(out.data(), lse.data(), q.data(),
                                                                  k.data(), v.data(), s);
  }
  void backward(bool flash) {
    (flash ? lt::attention_backward : lt::attention_backward_naive)(
        dq.data(), dk.data(), dv.data(), dout.data(), out.data(), lse.data(), q.data(), k.data(),
        v.data(), s);
  }
};

// Flash and naive must agree before anything is timed.
bool validate(std::mt19937& rng) {
  Problem flash(300, 8, 2, 64, rng);
  Problem naive = flash;
  flash.forward(true), flash.backward(true);
  naive.forward(false), naive.backward(false);
  const double d_out = max_abs_diff(flash.out, naive.out),
               d_lse = max_abs_diff(flash.lse, naive.lse), d_dq = max_abs_diff(flash.dq, naive.dq),
               d_dk = max_abs_diff(flash.dk, naive.dk), d_dv = max_abs_diff(flash.dv, naive.dv);
  std::printf(
      "validation T=300 H=8 KVH=2 HD=64: max |flash - naive| out %.2e lse %.2e dq %.2e "
      "dk %.2e dv %.2e\n",
      d_out, d_lse, d_dq, d_dk, d_dv);
  return d_out < 1e-5 && d_lse < 1e-5 && d_dq < 1e-4 && d_dk < 1e-4 && d_dv < 1e-4;
}

// sgemm peak of this machine: 1024^3 cblas_sgemm on the same number of threads.
double sgemm_gflops() {
  const int n = 1024;
  std::mt19937 rng(1);
  auto a = random_vec(n * n, rng), b = random_vec(n * n, rng);
  std::vector<float> c(n * n);
  auto run = [&] {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a.data(), n, b.data(), n,
                0.0f, c.data(), n);
  };
  run();
  return 2.0 * n * n * n / best_time(5, run) / 1e9;
}

// One 64 x 64 x HD tile product (the shape inside the flash kernels), single thread, strided
// operands as in the (B,T,H,HD) layout: cblas_sgemm vs the flash kernels' own tile GEMM.
void tile_gemm_comparison() {
  std::mt19937 rng(2);
  for (int64_t HD : {64, 128}) {
    const int64_t tile = 64, ld = 8 * HD;  // rows of 8 heads
    auto q = random_vec(tile * ld, rng), kt = random_vec(HD * tile, rng);
    auto p = random_vec(tile * tile, rng), v = random_vec(tile * ld, rng);
    std::vector<float> s(tile * tile), o(tile * HD);
    const int reps = 2000;
    const double flops = 2.0 * 2 * tile * tile * HD * reps;  // S = Q K^T and O += P V
    const double t_blas = best_time(3, [&] {
      for (int r = 0; r < reps; ++r) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, tile, tile, HD, 1.0f, q.data(), ld,
                    v.data(), ld, 0.0f, s.data(), tile);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, tile, HD, tile, 1.0f, p.data(), tile,
                    v.data(), ld, 1.0f, o.data(), HD);
      }
    });
    const double t_own = best_time(3, [&] {
      for (int r = 0; r < reps; ++r) {
        lt::detail::attention_tile_gemm(s.data(), tile, q.data(), ld, 1, kt.data(), tile, tile,
                                        tile, HD, false);
        lt::detail::attention_tile_gemm(o.data(), HD, p.data(), tile, 1, v.data(), ld, tile, HD,
                                        tile, true);
      }
    });
    std::printf(
        "tile GEMM 64x64x%lld (S = Q K^T, O += P V), 1 thread: cblas_sgemm %.1f GFLOP/s,"
        " own kernel %.1f GFLOP/s\n",
        static_cast<long long>(HD), flops / t_blas / 1e9, flops / t_own / 1e9);
  }
}

}  // namespace

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 2;
  const int64_t max_T = argc > 2 ? std::atoll(argv[2]) : 8192;
  const int64_t min_T = argc > 3 ? std::atoll(argv[3]) : 1024;
  const int64_t H = 8, KVH = 2, HD = 64;
  std::mt19937 rng(42);

  openblas_set_num_threads(1);
  omp_set_num_threads(1);
  tile_gemm_comparison();
  omp_set_num_threads(threads);
  openblas_set_num_threads(threads);
  if (!validate(rng)) {
    std::printf("FAILED: flash and naive attention disagree\n");
    return 1;
  }
  const double peak = sgemm_gflops();
  std::printf("machine sgemm peak (1024^3 cblas_sgemm, %d threads): %.1f GFLOP/s\n", threads, peak);
  std::printf(
      "causal attention, B=1 H=%lld KVH=%lld HD=%lld, %d threads; GFLOP/s counts the "
      "causal half: forward 4*T*T*HD*H/2, backward 2.5x that\n",
      static_cast<long long>(H), static_cast<long long>(KVH), static_cast<long long>(HD), threads);
  std::printf("%-6s %6s %10s %9s %7s %10s %9s %7s %14s\n", "impl", "T", "fwd ms", "GFLOP/s",
              "%peak", "bwd ms", "GFLOP/s", "%peak", "peak RSS +");
  for (int64_t T = min_T; T <= max_T; T *= 2) {
    for (bool flash : {false, true}) {
      if (!flash && T > 4096) continue;
      Problem p(T, H, KVH, HD, rng);
      const int reps = T >= 8192 ? 2 : T >= 4096 ? 3 : 5;
      p.forward(flash), p.backward(flash);  // warm-up (and the first page touches)
      reset_peak_rss();
      const size_t rss0 = lt::current_rss();
      const double t_fwd = best_time(reps, [&] { p.forward(flash); });
      const double t_bwd = best_time(reps, [&] { p.backward(flash); });
      const size_t growth = lt::measured_peak_rss() - rss0;
      const double f_fwd = 4.0 * T * T * HD * H / 2, f_bwd = 2.5 * f_fwd;
      std::printf("%-6s %6lld %10.1f %9.1f %6.1f%% %10.1f %9.1f %6.1f%% %14s\n",
                  flash ? "flash" : "naive", static_cast<long long>(T), t_fwd * 1e3,
                  f_fwd / t_fwd / 1e9, 100 * f_fwd / t_fwd / 1e9 / peak, t_bwd * 1e3,
                  f_bwd / t_bwd / 1e9, 100 * f_bwd / t_bwd / 1e9 / peak,
                  lt::format_bytes(growth).c_str());
    }
  }
  return 0;
}
