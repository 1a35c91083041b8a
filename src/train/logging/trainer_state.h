// trainer_state.json exactly as transformers' TrainerState.save_to_json writes it (sorted keys,
// indent 2, trailing newline), with log_history; longtune adds its data position under
// "longtune" so that a checkpoint can be resumed.
#pragma once
#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <vector>

#include "train/logging/log_sink.h"

namespace lt {

struct TrainerState {
  double epoch = 0;
  int64_t global_step = 0;
  int64_t max_steps = 0;
  int64_t logging_steps = 500;
  int64_t eval_steps = 500;
  int64_t save_steps = 500;
  int64_t train_batch_size = 1;
  int64_t num_train_epochs = 0;
  int64_t num_input_tokens_seen = 0;
  std::vector<nlohmann::json>
      log_history;  // HF entries: {loss, grad_norm, learning_rate, epoch, step}

  nlohmann::json to_json() const;
  static TrainerState from_json(const nlohmann::json& j, const std::string& where);
  // Writes atomically; extra (if an object) is added under "longtune".
  void save(const std::filesystem::path& path, const nlohmann::json& extra = nullptr) const;
};

// Keeps log_history up to date (a LogSink) for the checkpoints and the final file.
class TrainerStateSink : public LogSink {
 public:
  explicit TrainerStateSink(TrainerState* state) : state_(state) {}
  void log(const LogRecord& r) override;

 private:
  TrainerState* state_;
};

}  // namespace lt
