// What the trainer logs (one record per logging step, evaluation or end of training) and the
// interface of the places it goes: metrics.jsonl, TensorBoard, MLflow, trainer_state.json.
#pragma once
#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace lt {

struct LogRecord {
  enum class Kind { kTrain, kEval, kFinal };
  Kind kind = Kind::kTrain;
  int64_t step = 0;
  double epoch = 0;
  double wall_time = 0;  // seconds since the Unix epoch
  // Hugging Face log_history keys (without epoch and step): loss, grad_norm, learning_rate;
  // eval_loss, eval_runtime, ...; train_runtime, train_loss, ... (numbers only).
  nlohmann::json hf = nlohmann::json::object();
  // longtune's own measurements, not in HF's log_history: tokens_per_second, memory_bytes,
  // eval_perplexity.
  nlohmann::json extra = nlohmann::json::object();
};

// All the numbers of a record in one flat object: hf + extra + epoch + step.
nlohmann::json record_flat(const LogRecord& r);

class LogSink {
 public:
  virtual ~LogSink() = default;
  virtual void log(const LogRecord& r) = 0;
  // End of the run: status is FINISHED, KILLED (stopped by a signal) or FAILED.
  virtual void close(const std::string& status) {}
};

}  // namespace lt
