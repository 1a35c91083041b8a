// What a person watching `longtune train` sees: on a terminal a live one-line progress bar
// (step/total, loss, lr, grad norm, tokens/s, memory, ETA) redrawn every step; otherwise (a file,
// a pipe, CI) one plain line per logging step.
#pragma once
#include <chrono>
#include <cstdint>
#include <string>

#include "train/logging/log_sink.h"

namespace lt {

struct StepStatus {
  int64_t step = 0, total_steps = 0;
  double epoch = 0, loss = 0, learning_rate = 0, grad_norm = 0;
  double tokens_per_second = 0;
  size_t memory_bytes = 0;
};

class Progress : public LogSink {
 public:
  enum class Mode { kBar, kLines };
  // kBar when stdout is a terminal (isatty), kLines otherwise.
  static Mode detect_mode();
  Progress(Mode mode, int64_t first_step, int64_t total_steps);
  void update(const StepStatus& s);       // every step
  void log(const LogRecord& r) override;  // train lines (kLines), eval lines (both modes)
  // A message on its own line (the bar is cleared first and redrawn at the next step).
  void note(const std::string& line);
  void close(const std::string& status) override;

  // "1:02:03" or "4:05"; "?" when unknown.
  static std::string format_duration(double seconds);

 private:
  void clear_bar();
  Mode mode_;
  int64_t first_step_, total_steps_;
  std::chrono::steady_clock::time_point start_;
  bool bar_shown_ = false;
};

}  // namespace lt
