// Op timing (Backend::set_op_profiling; bench_train's `profile`): how long the ops of a run took,
// summed by name over the calls made while profiling was on. Each backend times where its work
// runs: the CPU backends with the wall clock around each call, the CUDA backend with a pair of
// events on its compute stream around each call and, inside the calls, around each cuBLAS
// product and each bf16 staging of a GEMM input (depth 1: that time is also its caller's).
#pragma once
#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace lt {

struct OpTime {
  std::string name;
  int depth = 0;  // 0: a Backend call; 1: work inside one
  int64_t calls = 0;
  double ms = 0;
};

// Sums by (name, depth).
class OpTimes {
 public:
  void add(std::string_view name, int depth, double ms);
  // The sums, depth 0 before depth 1, each by time (the longest first); then empty.
  std::vector<OpTime> take();

 private:
  std::vector<OpTime> rows_;
};

// The wall clock around one call of a CPU backend; does nothing when times is null.
class WallSpan {
 public:
  WallSpan(OpTimes* times, const char* name);
  ~WallSpan();
  WallSpan(const WallSpan&) = delete;
  WallSpan& operator=(const WallSpan&) = delete;

 private:
  OpTimes* times_;
  const char* name_;
  std::chrono::steady_clock::time_point t0_;
};

// A table for people: one row per op (calls, total ms, ms per call, share of wall_ms), the
// depth-1 rows after the others, then the time outside the ops (wall_ms less the depth-0 sum:
// host work, waits, launch gaps).
std::string format_op_profile(const std::vector<OpTime>& rows, double wall_ms);

}  // namespace lt
