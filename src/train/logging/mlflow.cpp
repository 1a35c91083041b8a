// MLflow REST client (see mlflow.h).
#include "train/logging/mlflow.h"

#include <curl/curl.h>
#include <fmt/format.h>

#include <chrono>
#include <cstdlib>

#include "core/error.h"

namespace lt {

namespace {

int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

size_t append_body(char* data, size_t size, size_t n, void* user) {
  static_cast<std::string*>(user)->append(data, size * n);
  return size * n;
}

// RAII for one curl easy handle and its header list.
struct Curl {
  CURL* h = curl_easy_init();
  curl_slist* headers = nullptr;
  ~Curl() {
    curl_slist_free_all(headers);
    if (h) curl_easy_cleanup(h);
  }
};

}  // namespace

MlflowClient::MlflowClient(std::string tracking_uri) : uri_(std::move(tracking_uri)) {
  while (!uri_.empty() && uri_.back() == '/') uri_.pop_back();
  if (uri_.rfind("http://", 0) != 0 && uri_.rfind("https://", 0) != 0)
    fail(
        "--report_to mlflow: MLFLOW_TRACKING_URI '{}' is not an http(s):// address of an MLflow "
        "tracking server (local file stores are not supported)",
        uri_);
  static const bool inited = curl_global_init(CURL_GLOBAL_DEFAULT) == CURLE_OK;
  if (!inited) fail("--report_to mlflow: libcurl could not be initialised");
}

nlohmann::json MlflowClient::call(const std::string& endpoint, const nlohmann::json& body) const {
  Curl c;
  if (!c.h) fail("MLflow: libcurl could not create a handle");
  const std::string url = uri_ + "/api/2.0/mlflow/" + endpoint;
  std::string answer, payload;
  curl_easy_setopt(c.h, CURLOPT_URL, url.c_str());
  curl_easy_setopt(c.h, CURLOPT_WRITEFUNCTION, append_body);
  curl_easy_setopt(c.h, CURLOPT_WRITEDATA, &answer);
  curl_easy_setopt(c.h, CURLOPT_TIMEOUT, 30L);
  curl_easy_setopt(c.h, CURLOPT_CONNECTTIMEOUT, 10L);
  curl_easy_setopt(c.h, CURLOPT_NOSIGNAL, 1L);
  if (!body.is_null()) {
    payload = body.dump();
    c.headers = curl_slist_append(c.headers, "Content-Type: application/json");
    curl_easy_setopt(c.h, CURLOPT_HTTPHEADER, c.headers);
    curl_easy_setopt(c.h, CURLOPT_POSTFIELDS, payload.c_str());
    curl_easy_setopt(c.h, CURLOPT_POSTFIELDSIZE, static_cast<long>(payload.size()));
  }
  const CURLcode rc = curl_easy_perform(c.h);
  if (rc != CURLE_OK) fail("MLflow at '{}' ({}): {}", uri_, endpoint, curl_easy_strerror(rc));
  long status = 0;
  curl_easy_getinfo(c.h, CURLINFO_RESPONSE_CODE, &status);
  auto j = nlohmann::json::parse(answer, nullptr, /*allow_exceptions=*/false);
  if (status != 200) {
    const std::string msg =
        !j.is_discarded() && j.contains("message") ? j["message"].get<std::string>() : answer;
    fail("MLflow at '{}' ({}): HTTP {}: {}", uri_, endpoint, status, msg.substr(0, 300));
  }
  if (j.is_discarded()) fail("MLflow at '{}' ({}): the answer is not JSON", uri_, endpoint);
  return j;
}

MlflowSink::MlflowSink(const std::string& tracking_uri, const std::string& run_name,
                       const std::map<std::string, std::string>& params)
    : client_(tracking_uri) {
  std::string experiment_id = "0";
  if (const char* name = std::getenv("MLFLOW_EXPERIMENT_NAME"); name && *name) {
    try {
      experiment_id = client_.call("experiments/get-by-name?experiment_name=" + std::string(name),
                                   nullptr)["experiment"]["experiment_id"];
    } catch (const UserError&) {
      experiment_id = client_.call("experiments/create", {{"name", name}})["experiment_id"];
    }
  }
  nlohmann::json create = {
      {"experiment_id", experiment_id},
      {"start_time", now_ms()},
      {"tags",
       nlohmann::json::array({{{"key", "mlflow.source.name"}, {"value", "longtune train"}}})}};
  if (!run_name.empty()) create["run_name"] = run_name;
  run_id_ = client_.call("runs/create", create)["run"]["info"]["run_id"];
  // log-batch takes at most 100 params per request; values at most 6000 characters.
  nlohmann::json batch = nlohmann::json::array();
  auto flush = [&] {
    if (batch.empty()) return;
    client_.call("runs/log-batch", {{"run_id", run_id_}, {"params", batch}});
    batch = nlohmann::json::array();
  };
  for (const auto& [k, v] : params) {
    batch.push_back({{"key", k}, {"value", v.substr(0, 6000)}});
    if (batch.size() == 100) flush();
  }
  flush();
}

void MlflowSink::log(const LogRecord& r) {
  nlohmann::json metrics = nlohmann::json::array();
  const int64_t ts = static_cast<int64_t>(r.wall_time * 1000);
  auto add = [&](const nlohmann::json& obj) {
    for (const auto& [k, v] : obj.items())
      if (v.is_number())
        metrics.push_back(
            {{"key", k}, {"value", v.get<double>()}, {"timestamp", ts}, {"step", r.step}});
  };
  add(r.hf);
  add(r.extra);
  if (r.kind == LogRecord::Kind::kTrain) add({{"epoch", r.epoch}});
  try {
    client_.call("runs/log-batch", {{"run_id", run_id_}, {"metrics", metrics}});
  } catch (const UserError& e) {
    if (!warned_)
      fmt::print(stderr, "warning: MLflow logging failed (training goes on): {}\n", e.what());
    warned_ = true;
  }
}

void MlflowSink::close(const std::string& status) {
  if (closed_) return;
  closed_ = true;
  try {
    client_.call("runs/update", {{"run_id", run_id_}, {"status", status}, {"end_time", now_ms()}});
  } catch (const UserError& e) {
    fmt::print(stderr, "warning: MLflow could not mark the run {}: {}\n", status, e.what());
  }
}

}  // namespace lt
