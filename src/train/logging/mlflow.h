// MLflow tracking through its REST API (/api/2.0/mlflow/...) with libcurl: one run per
// training job, the training arguments as params, every logged record as metrics, and the run
// marked FINISHED / KILLED / FAILED at the end.
#pragma once
#include <map>
#include <string>
#include <vector>

#include "train/logging/log_sink.h"

namespace lt {

class MlflowClient {
 public:
  // tracking_uri: http(s)://host:port (MLFLOW_TRACKING_URI). UserError if it is not http(s).
  explicit MlflowClient(std::string tracking_uri);
  // POST (or GET when body is null) to /api/2.0/mlflow/<endpoint>; returns the JSON answer.
  // UserError names the endpoint, the HTTP status and MLflow's message.
  nlohmann::json call(const std::string& endpoint, const nlohmann::json& body) const;
  const std::string& uri() const { return uri_; }

 private:
  std::string uri_;
};

class MlflowSink : public LogSink {
 public:
  // Creates the run (experiment MLFLOW_EXPERIMENT_NAME when set, else the default "0") and
  // logs params. UserError when the server cannot be reached: better before training starts.
  MlflowSink(const std::string& tracking_uri, const std::string& run_name,
             const std::map<std::string, std::string>& params);
  void log(const LogRecord& r) override;  // a failure mid-run is a warning, not fatal
  void close(const std::string& status) override;
  const std::string& run_id() const { return run_id_; }

 private:
  MlflowClient client_;
  std::string run_id_;
  bool closed_ = false;
  bool warned_ = false;
};

}  // namespace lt
