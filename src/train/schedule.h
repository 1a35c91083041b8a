// Learning-rate schedules with Hugging Face's formulas (transformers.optimization).
#pragma once
#include <cstdint>
#include <string>

namespace lt {

enum class ScheduleType { kConstant, kConstantWithWarmup, kLinear, kCosine };

ScheduleType parse_schedule(const std::string& name);  // UserError names the allowed values
std::string schedule_name(ScheduleType t);

// Multiplier of the base learning rate at optimizer step `step` (0-based): the lr_lambda of
// get_scheduler, so the first warmup step has lr 0.
double lr_multiplier(ScheduleType t, int64_t step, int64_t warmup_steps, int64_t total_steps);

// HF TrainingArguments.get_warmup_steps: warmup_steps if > 0 else ceil(ratio * total).
int64_t warmup_steps_for(int64_t warmup_steps, double warmup_ratio, int64_t total_steps);

}  // namespace lt
