#include "backend/op_profile.h"

#include <fmt/format.h>

#include <algorithm>

namespace lt {

void OpTimes::add(std::string_view name, int depth, double ms) {
  for (OpTime& r : rows_)
    if (r.depth == depth && r.name == name) {
      ++r.calls;
      r.ms += ms;
      return;
    }
  rows_.push_back({std::string(name), depth, 1, ms});
}

std::vector<OpTime> OpTimes::take() {
  std::vector<OpTime> out;
  out.swap(rows_);
  std::stable_sort(out.begin(), out.end(), [](const OpTime& a, const OpTime& b) {
    return a.depth != b.depth ? a.depth < b.depth : a.ms > b.ms;
  });
  return out;
}

WallSpan::WallSpan(OpTimes* times, const char* name) : times_(times), name_(name) {
  if (times_) t0_ = std::chrono::steady_clock::now();
}

WallSpan::~WallSpan() {
  if (times_)
    times_->add(
        name_, 0,
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0_).count());
}

std::string format_op_profile(const std::vector<OpTime>& rows, double wall_ms) {
  std::string s = fmt::format("  {:<30} {:>8} {:>12} {:>12} {:>8}\n", "op", "calls", "total ms",
                              "ms/call", "% wall");
  auto row = [&](const std::string& name, int64_t calls, double ms) {
    s += fmt::format("  {:<30} {:>8} {:>12.3f} {:>12.4f} {:>7.1f}%\n", name, calls, ms,
                     calls ? ms / double(calls) : 0.0, wall_ms > 0 ? 100.0 * ms / wall_ms : 0.0);
  };
  double ops_ms = 0;
  bool inner = false;
  for (const OpTime& r : rows) {
    if (r.depth == 0) ops_ms += r.ms;
    if (r.depth > 0 && !inner) {
      inner = true;
      s += "  inside the ops above:\n";
    }
    row((r.depth > 0 ? "  " : "") + r.name, r.calls, r.ms);
  }
  s += fmt::format("  {:<30} {:>8} {:>12.3f} {:>12} {:>7.1f}%\n", "(outside the ops)", "",
                   wall_ms - ops_ms, "", wall_ms > 0 ? 100.0 * (wall_ms - ops_ms) / wall_ms : 0.0);
  return s;
}

}  // namespace lt
