// TensorBoard event writer and reader (see tensorboard.h).
#include "train/logging/tensorboard.h"

#include <fmt/format.h>
#include <generic_crc.h>
#include <unistd.h>

#include <chrono>
#include <cstring>

#include "core/error.h"
#include "io/atomic_file.h"
#include "train/logging/event.pb.h"

namespace lt {

namespace {

// CRC-32C, reflected polynomial 0x82F63B78 (RFC 3720), table-driven by crcutil.
const crcutil::GenericCrc<uint64_t, uint64_t, uint64_t, 4>& crc32c_table() {
  static const crcutil::GenericCrc<uint64_t, uint64_t, uint64_t, 4> crc(0x82F63B78u, 32, true);
  return crc;
}

void put_u64(std::string* s, uint64_t v) {
  for (int i = 0; i < 8; ++i) s->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
void put_u32(std::string* s, uint32_t v) {
  for (int i = 0; i < 4; ++i) s->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
uint64_t get_le(const unsigned char* p, int n) {
  uint64_t v = 0;
  for (int i = n - 1; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

std::string host_name() {
  char buf[256] = {};
  if (gethostname(buf, sizeof buf - 1) != 0) return "localhost";
  return buf;
}

}  // namespace

uint32_t crc32c(const void* data, size_t bytes) {
  return static_cast<uint32_t>(crc32c_table().CrcDefault(data, bytes, 0));
}

uint32_t masked_crc32c(const void* data, size_t bytes) {
  // TFRecord: rotate right by 15 bits and add a constant (tensorflow/core/lib/hash/crc32c.h).
  const uint32_t crc = crc32c(data, bytes);
  return ((crc >> 15) | (crc << 17)) + 0xa282ead8u;
}

TensorBoardWriter::TensorBoardWriter(const std::filesystem::path& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) fail("TensorBoard: cannot create '{}': {}", dir.string(), ec.message());
  const double now =
      std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  path_ = dir / fmt::format("events.out.tfevents.{}.{}.{}.0", static_cast<int64_t>(now),
                            host_name(), getpid());
  f_ = std::fopen(path_.c_str(), "ab");
  if (!f_) fail("TensorBoard: cannot write '{}': {}", path_.string(), std::strerror(errno));
  tensorboard::Event ev;
  ev.set_wall_time(now);
  ev.set_file_version("brain.Event:2");
  write_record(ev.SerializeAsString());
}

TensorBoardWriter::~TensorBoardWriter() {
  if (f_) std::fclose(f_);
}

void TensorBoardWriter::write_record(const std::string& bytes) {
  std::string rec;
  put_u64(&rec, bytes.size());
  put_u32(&rec, masked_crc32c(rec.data(), 8));
  rec += bytes;
  put_u32(&rec, masked_crc32c(bytes.data(), bytes.size()));
  if (std::fwrite(rec.data(), 1, rec.size(), f_) != rec.size() || std::fflush(f_) != 0)
    fail("TensorBoard: write to '{}' failed: {}", path_.string(), std::strerror(errno));
}

void TensorBoardWriter::add_scalar(const std::string& tag, double value, int64_t step,
                                   double wall_time) {
  tensorboard::Event ev;
  ev.set_wall_time(wall_time);
  ev.set_step(step);
  auto* v = ev.mutable_summary()->add_value();
  v->set_tag(tag);
  v->set_simple_value(static_cast<float>(value));
  write_record(ev.SerializeAsString());
}

void TensorBoardWriter::log(const LogRecord& r) {
  // transformers' rewrite_logs: eval_x -> eval/x, everything else -> train/x.
  auto emit = [&](const nlohmann::json& obj) {
    for (const auto& [k, v] : obj.items()) {
      if (!v.is_number()) continue;
      const std::string tag = k.rfind("eval_", 0) == 0 ? "eval/" + k.substr(5) : "train/" + k;
      add_scalar(tag, v.get<double>(), r.step, r.wall_time);
    }
  };
  emit(r.hf);
  emit(r.extra);
  if (r.kind == LogRecord::Kind::kTrain) add_scalar("train/epoch", r.epoch, r.step, r.wall_time);
}

std::vector<TensorBoardScalar> read_tensorboard_scalars(const std::filesystem::path& path,
                                                        std::string* file_version) {
  const std::string data = read_file(path);
  const auto* p = reinterpret_cast<const unsigned char*>(data.data());
  std::vector<TensorBoardScalar> out;
  size_t off = 0;
  for (int64_t rec = 0; off < data.size(); ++rec) {
    if (data.size() - off < 12) fail("{}: record {} is truncated (header)", path.string(), rec);
    const uint64_t len = get_le(p + off, 8);
    if (static_cast<uint32_t>(get_le(p + off + 8, 4)) != masked_crc32c(p + off, 8))
      fail("{}: record {}: length CRC mismatch", path.string(), rec);
    if (data.size() - off - 12 < len + 4)
      fail("{}: record {} is truncated (data)", path.string(), rec);
    const unsigned char* body = p + off + 12;
    if (static_cast<uint32_t>(get_le(body + len, 4)) != masked_crc32c(body, len))
      fail("{}: record {}: data CRC mismatch", path.string(), rec);
    tensorboard::Event ev;
    if (!ev.ParseFromArray(body, static_cast<int>(len)))
      fail("{}: record {} is not an Event protobuf", path.string(), rec);
    if (ev.has_file_version() && file_version && file_version->empty())
      *file_version = ev.file_version();
    if (ev.has_summary())
      for (const auto& v : ev.summary().value())
        if (v.has_simple_value())
          out.push_back({v.tag(), ev.step(), ev.wall_time(), v.simple_value()});
    off += 12 + len + 4;
  }
  return out;
}

}  // namespace lt
