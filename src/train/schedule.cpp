// Learning-rate schedules (transformers.optimization: get_constant_schedule,
// get_constant_schedule_with_warmup, get_linear_schedule_with_warmup,
// get_cosine_schedule_with_warmup with num_cycles = 0.5).
#include "train/schedule.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "core/error.h"

namespace lt {

ScheduleType parse_schedule(const std::string& name) {
  if (name == "constant") return ScheduleType::kConstant;
  if (name == "constant_with_warmup") return ScheduleType::kConstantWithWarmup;
  if (name == "linear") return ScheduleType::kLinear;
  if (name == "cosine") return ScheduleType::kCosine;
  fail(
      "--lr_scheduler_type: '{}' is not supported; allowed: constant, constant_with_warmup, "
      "linear, cosine",
      name);
}

std::string schedule_name(ScheduleType t) {
  switch (t) {
    case ScheduleType::kConstant:
      return "constant";
    case ScheduleType::kConstantWithWarmup:
      return "constant_with_warmup";
    case ScheduleType::kLinear:
      return "linear";
    case ScheduleType::kCosine:
      return "cosine";
  }
  return "?";
}

double lr_multiplier(ScheduleType t, int64_t step, int64_t warmup, int64_t total) {
  const double s = static_cast<double>(step);
  if (t == ScheduleType::kConstant) return 1.0;
  if (step < warmup) return s / static_cast<double>(std::max<int64_t>(1, warmup));
  switch (t) {
    case ScheduleType::kConstantWithWarmup:
      return 1.0;
    case ScheduleType::kLinear:
      return std::max(0.0, static_cast<double>(total - step) /
                               static_cast<double>(std::max<int64_t>(1, total - warmup)));
    case ScheduleType::kCosine: {
      const double progress = static_cast<double>(step - warmup) /
                              static_cast<double>(std::max<int64_t>(1, total - warmup));
      return std::max(0.0, 0.5 * (1.0 + std::cos(std::numbers::pi * 0.5 * 2.0 * progress)));
    }
    default:
      return 1.0;
  }
}

int64_t warmup_steps_for(int64_t warmup_steps, double warmup_ratio, int64_t total_steps) {
  if (warmup_steps > 0) return warmup_steps;
  return static_cast<int64_t>(std::ceil(static_cast<double>(total_steps) * warmup_ratio));
}

}  // namespace lt
