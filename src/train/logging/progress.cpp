// Progress bar and plain log lines (see progress.h).
#include "train/logging/progress.h"

#include <fmt/format.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>

#include "core/memory.h"

namespace lt {

Progress::Mode Progress::detect_mode() {
  return isatty(fileno(stdout)) ? Mode::kBar : Mode::kLines;
}

Progress::Progress(Mode mode, int64_t first_step, int64_t total_steps)
    : mode_(mode),
      first_step_(first_step),
      total_steps_(total_steps),
      start_(std::chrono::steady_clock::now()) {}

std::string Progress::format_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  const int64_t t = static_cast<int64_t>(s + 0.5);
  if (t >= 3600) return fmt::format("{}:{:02}:{:02}", t / 3600, t / 60 % 60, t % 60);
  return fmt::format("{}:{:02}", t / 60, t % 60);
}

void Progress::clear_bar() {
  if (bar_shown_) std::fputs("\r\033[2K", stdout);
  bar_shown_ = false;
}

void Progress::update(const StepStatus& s) {
  if (mode_ != Mode::kBar) return;
  const double elapsed =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const int64_t done = s.step - first_step_;
  const double eta = done > 0 ? elapsed / done * (s.total_steps - s.step) : NAN;
  constexpr int kWidth = 24;
  const int filled = static_cast<int>(kWidth * s.step / std::max<int64_t>(1, s.total_steps));
  std::string bar(filled, '#');
  bar.resize(kWidth, '.');
  fmt::print(
      "\r\033[2K{}/{} [{}] loss {:.4f} | lr {:.2e} | grad {:.3f} | {:.0f} tok/s | "
      "mem {} | {} < {}",
      s.step, s.total_steps, bar, s.loss, s.learning_rate, s.grad_norm, s.tokens_per_second,
      format_bytes(s.memory_bytes), format_duration(elapsed), format_duration(eta));
  std::fflush(stdout);
  bar_shown_ = true;
}

void Progress::log(const LogRecord& r) {
  const auto num = [&](const char* k) { return r.hf.value(k, 0.0); };
  if (r.kind == LogRecord::Kind::kTrain) {
    if (mode_ != Mode::kLines) return;
    const double elapsed =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    const int64_t done = r.step - first_step_;
    fmt::print(
        "step {}/{}  epoch {:.2f}  loss {:.4f}  lr {:.3e}  grad_norm {:.4f}  "
        "tokens/s {:.0f}  mem {}  eta {}\n",
        r.step, total_steps_, r.epoch, num("loss"), num("learning_rate"), num("grad_norm"),
        r.extra.value("tokens_per_second", 0.0),
        format_bytes(r.extra.value("memory_bytes", size_t{0})),
        format_duration(done > 0 ? elapsed / done * (total_steps_ - r.step) : NAN));
  } else if (r.kind == LogRecord::Kind::kEval) {
    clear_bar();
    fmt::print("eval at step {}: loss {:.4f}  perplexity {:.3f}  ({} tokens, {:.1f} s)\n", r.step,
               num("eval_loss"), r.extra.value("eval_perplexity", 0.0),
               r.extra.value("eval_tokens", int64_t{0}), num("eval_runtime"));
  } else {
    clear_bar();
    fmt::print("train_runtime {:.1f} s  train_loss {:.4f}  {:.3f} samples/s  {:.3f} steps/s\n",
               num("train_runtime"), num("train_loss"), num("train_samples_per_second"),
               num("train_steps_per_second"));
  }
  std::fflush(stdout);
}

void Progress::note(const std::string& line) {
  clear_bar();
  fmt::print("{}\n", line);
  std::fflush(stdout);
}

void Progress::close(const std::string&) {
  if (bar_shown_) std::fputs("\n", stdout);
  bar_shown_ = false;
  std::fflush(stdout);
}

}  // namespace lt
