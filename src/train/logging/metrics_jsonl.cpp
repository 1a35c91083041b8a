// metrics.jsonl writer (see metrics_jsonl.h).
#include "train/logging/metrics_jsonl.h"

#include <cerrno>
#include <cstring>
#include <sstream>

#include "core/error.h"
#include "io/atomic_file.h"

namespace lt {

nlohmann::json record_flat(const LogRecord& r) {
  nlohmann::json j = r.hf;
  for (const auto& [k, v] : r.extra.items()) j[k] = v;
  j["epoch"] = r.epoch;
  j["step"] = r.step;
  return j;
}

MetricsJsonl::MetricsJsonl(const std::filesystem::path& path, int64_t keep_through_step)
    : path_(path) {
  std::string kept;
  if (keep_through_step >= 0 && std::filesystem::exists(path)) {
    std::istringstream in(read_file(path));
    for (std::string line; std::getline(in, line);) {
      if (line.empty()) continue;
      auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (j.is_discarded() || !j.contains("step")) continue;  // a line cut by a crash
      if (j["step"].get<int64_t>() > keep_through_step) continue;
      kept += j.dump() + "\n";
      history_.push_back(std::move(j));
    }
  }
  write_file_atomic(path, kept);
  f_ = std::fopen(path.c_str(), "ab");
  if (!f_) fail("cannot write '{}': {}", path.string(), std::strerror(errno));
}

MetricsJsonl::~MetricsJsonl() {
  if (f_) std::fclose(f_);
}

void MetricsJsonl::log(const LogRecord& r) {
  nlohmann::json j = record_flat(r);
  const std::string line = j.dump() + "\n";
  if (std::fwrite(line.data(), 1, line.size(), f_) != line.size() || std::fflush(f_) != 0)
    fail("write to '{}' failed: {}", path_.string(), std::strerror(errno));
  history_.push_back(std::move(j));
}

}  // namespace lt
