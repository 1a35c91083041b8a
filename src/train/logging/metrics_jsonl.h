// output_dir/metrics.jsonl: one JSON object per logged record (HF keys plus longtune's own
// tokens_per_second, memory_bytes, eval_perplexity), appended and flushed as training goes.
#pragma once
#include <cstdio>
#include <filesystem>
#include <vector>

#include "train/logging/log_sink.h"

namespace lt {

class MetricsJsonl : public LogSink {
 public:
  // keep_through_step >= 0 (a resumed run): lines of later steps are dropped first, so the
  // file reads as one run. < 0: the file starts empty.
  MetricsJsonl(const std::filesystem::path& path, int64_t keep_through_step);
  ~MetricsJsonl() override;
  void log(const LogRecord& r) override;
  // Every record so far (those kept from before a resume included), as flat objects.
  const std::vector<nlohmann::json>& history() const { return history_; }

 private:
  std::filesystem::path path_;
  std::FILE* f_ = nullptr;
  std::vector<nlohmann::json> history_;
};

}  // namespace lt
