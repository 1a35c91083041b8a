// Helpers shared by the benchmarks: the machine's measured sgemm rate (the peak that MFU and
// "fraction of peak" figures refer to) and peak-RSS resets.
#pragma once
#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <vector>

namespace lt::bench {

// Best GFLOP/s of an n^3 row-major cblas_sgemm over `reps` runs on the current thread setting.
inline double sgemm_peak_gflops(int n = 1024, int reps = 5) {
  std::vector<float> a(size_t(n) * n, 0.5f), b(size_t(n) * n, 0.25f), c(size_t(n) * n);
  double best = 0;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a.data(), n, b.data(), n,
                0.0f, c.data(), n);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, 2.0 * n * n * n / s / 1e9);
  }
  return best;
}

// Resets the kernel's peak-RSS counter (VmHWM) to the current RSS; false if not permitted.
inline bool reset_peak_rss() {
  std::ofstream f("/proc/self/clear_refs");
  f << "5";
  f.close();
  return static_cast<bool>(f);
}

}  // namespace lt::bench
