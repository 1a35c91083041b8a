// trainer_state.json (see trainer_state.h).
#include "train/logging/trainer_state.h"

#include "core/error.h"
#include "io/atomic_file.h"

namespace lt {

nlohmann::json TrainerState::to_json() const {
  // Field for field transformers.TrainerState (dataclasses.asdict; sorted on dump).
  nlohmann::json j;
  j["best_global_step"] = nullptr;
  j["best_metric"] = nullptr;
  j["best_model_checkpoint"] = nullptr;
  j["epoch"] = epoch;
  j["eval_steps"] = eval_steps;
  j["global_step"] = global_step;
  j["is_hyper_param_search"] = false;
  j["is_local_process_zero"] = true;
  j["is_world_process_zero"] = true;
  j["log_history"] = log_history;
  j["logging_steps"] = logging_steps;
  j["max_steps"] = max_steps;
  j["num_input_tokens_seen"] = num_input_tokens_seen;
  j["num_train_epochs"] = num_train_epochs;
  j["save_steps"] = save_steps;
  j["stateful_callbacks"] = nlohmann::json::object();
  j["total_flos"] = 0.0;
  j["train_batch_size"] = train_batch_size;
  j["trial_name"] = nullptr;
  j["trial_params"] = nullptr;
  return j;
}

TrainerState TrainerState::from_json(const nlohmann::json& j, const std::string& where) {
  TrainerState s;
  try {
    s.epoch = j.at("epoch").get<double>();
    s.global_step = j.at("global_step").get<int64_t>();
    s.max_steps = j.at("max_steps").get<int64_t>();
    s.logging_steps = j.at("logging_steps").get<int64_t>();
    s.eval_steps = j.at("eval_steps").get<int64_t>();
    s.save_steps = j.at("save_steps").get<int64_t>();
    s.train_batch_size = j.at("train_batch_size").get<int64_t>();
    s.num_train_epochs = j.at("num_train_epochs").get<int64_t>();
    s.num_input_tokens_seen = j.value("num_input_tokens_seen", int64_t{0});
    for (const auto& e : j.at("log_history")) s.log_history.push_back(e);
  } catch (const nlohmann::json::exception& e) {
    fail("{}: not a trainer_state.json: {}", where, e.what());
  }
  return s;
}

void TrainerState::save(const std::filesystem::path& path, const nlohmann::json& extra) const {
  nlohmann::json j = to_json();
  if (extra.is_object()) j["longtune"] = extra;
  write_file_atomic(path, j.dump(2) + "\n");
}

void TrainerStateSink::log(const LogRecord& r) {
  nlohmann::json e = r.hf;
  e["epoch"] = r.epoch;
  e["step"] = r.step;
  state_->log_history.push_back(std::move(e));
}

}  // namespace lt
