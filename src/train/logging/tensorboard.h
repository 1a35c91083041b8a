// TensorBoard event files: TFRecord framing (length, masked CRC32C of the length, data, masked
// CRC32C of the data) around tensorboard.Event protobufs with scalar summaries.
#pragma once
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "train/logging/log_sink.h"

namespace lt {

// CRC32C (Castagnoli) of data, through crcutil; and TFRecord's mask of it.
uint32_t crc32c(const void* data, size_t bytes);
uint32_t masked_crc32c(const void* data, size_t bytes);

// Appends events to dir/events.out.tfevents.<time>.<host>.<pid>.0 (the name TensorBoard and
// torch's SummaryWriter use); every event is flushed so a live TensorBoard sees it.
class TensorBoardWriter : public LogSink {
 public:
  explicit TensorBoardWriter(const std::filesystem::path& dir);
  ~TensorBoardWriter() override;
  const std::filesystem::path& path() const { return path_; }
  void add_scalar(const std::string& tag, double value, int64_t step, double wall_time);
  // Tags as transformers' TensorBoardCallback names them: train/loss, eval/loss, ...
  void log(const LogRecord& r) override;

 private:
  void write_record(const std::string& bytes);
  std::filesystem::path path_;
  std::FILE* f_ = nullptr;
};

// One scalar read back from an event file.
struct TensorBoardScalar {
  std::string tag;
  int64_t step = 0;
  double wall_time = 0;
  float value = 0;
};

// Reads an event file, checking both CRCs of every record; UserError names the file and the
// record on any corruption. file_version receives the first event's version string.
std::vector<TensorBoardScalar> read_tensorboard_scalars(const std::filesystem::path& path,
                                                        std::string* file_version = nullptr);

}  // namespace lt
