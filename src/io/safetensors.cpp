// Safetensors reading (mmap + full validation), model-folder checkpoints (single file or
// index.json shards) and atomic writing in the layout the Python library and transformers use.
#include "io/safetensors.h"

#include <fcntl.h>
#include <fmt/ranges.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>
#include <numeric>
#include <system_error>

#include "core/check.h"
#include "core/error.h"
#include "io/atomic_file.h"

namespace lt {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// The Rust safetensors library refuses headers above 100 MB; so do we.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

std::string errno_text(int err) { return std::error_code(err, std::generic_category()).message(); }

bool is_float_dtype(DType t) {
  return t == DType::kF32 || t == DType::kF64 || t == DType::kBF16 || t == DType::kF16;
}

std::string shape_str(const std::vector<int64_t>& s) {
  return fmt::format("[{}]", fmt::join(s, ", "));
}

// Non-negative integer from a JSON value (numbers only; 3.0 is not accepted as an integer).
bool json_to_u64(const json& v, uint64_t* out) {
  if (v.is_number_unsigned()) {
    *out = v.get<uint64_t>();
    return true;
  }
  if (v.is_number_integer() && v.get<int64_t>() >= 0) {
    *out = static_cast<uint64_t>(v.get<int64_t>());
    return true;
  }
  return false;
}

}  // namespace

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::unique_ptr<SafetensorsFile> SafetensorsFile::open(const fs::path& path) {
  std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  const std::string p = path.string();
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail("cannot open safetensors file '{}': {}", p, errno_text(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    fail("cannot stat safetensors file '{}': {}", p, errno_text(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    fail("safetensors file '{}' is not a regular file", p);
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    fail("safetensors file '{}' is {} bytes long: too short for the 8-byte header length", p, size);
  }
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_err = errno;
  ::close(fd);  // the mapping keeps the file alive
  if (map == MAP_FAILED) fail("cannot mmap safetensors file '{}': {}", p, errno_text(map_err));
  f->map_ = map;
  f->map_size_ = size;  // from here on the destructor unmaps, also when validation throws
  const auto* bytes = static_cast<const uint8_t*>(map);

  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[i];  // little-endian
  if (header_len > kMaxHeaderBytes) {
    fail(
        "safetensors file '{}': header length {} is absurd (limit {} bytes); not a safetensors "
        "file?",
        p, header_len, kMaxHeaderBytes);
  }
  if (header_len > size - 8) {
    fail(
        "safetensors file '{}': header length {} runs past the end of the file ({} bytes); the "
        "file is truncated or not a safetensors file",
        p, header_len, size);
  }
  const char* header_begin = reinterpret_cast<const char*>(bytes + 8);
  json header;
  try {
    header = json::parse(header_begin, header_begin + header_len);
  } catch (const json::exception& e) {
    fail("safetensors file '{}': header is not valid JSON: {}", p, e.what());
  }
  if (!header.is_object()) {
    fail("safetensors file '{}': header must be a JSON object, found {}", p, header.type_name());
  }
  const uint64_t data_begin = 8 + header_len;
  const uint64_t data_size = size - data_begin;

  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const json& e = it.value();
    if (name == "__metadata__") {
      if (!e.is_object()) {
        fail("safetensors file '{}': __metadata__ must be an object of strings, found {}", p,
             e.type_name());
      }
      for (auto m = e.begin(); m != e.end(); ++m) {
        if (!m.value().is_string()) {
          fail("safetensors file '{}': __metadata__ entry '{}' must be a string, found {}", p,
               m.key(), m.value().type_name());
        }
        f->metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    if (!e.is_object()) {
      fail(
          "safetensors file '{}': tensor '{}': entry must be an object with dtype, shape and "
          "data_offsets, found {}",
          p, name, e.type_name());
    }
    for (const char* key : {"dtype", "shape", "data_offsets"}) {
      if (!e.contains(key)) fail("safetensors file '{}': tensor '{}': missing '{}'", p, name, key);
    }
    TensorInfo t;
    t.name = name;
    const json& dt = e["dtype"];
    if (!dt.is_string()) {
      fail("safetensors file '{}': tensor '{}': dtype must be a string, found {}", p, name,
           dt.type_name());
    }
    if (!dtype_from_string(dt.get<std::string>(), &t.dtype)) {
      fail(
          "safetensors file '{}': tensor '{}': unsupported dtype '{}' (supported: F64, F32, "
          "BF16, F16, I64, I32, I16, I8, U8, BOOL)",
          p, name, dt.get<std::string>());
    }
    const json& sh = e["shape"];
    if (!sh.is_array()) {
      fail("safetensors file '{}': tensor '{}': shape must be an array, found {}", p, name,
           sh.type_name());
    }
    // numel in 128 bits so that absurd shapes cannot overflow silently.
    unsigned __int128 numel = 1;
    for (const json& d : sh) {
      if (!d.is_number_integer()) {
        fail("safetensors file '{}': tensor '{}': shape entries must be integers, found {}", p,
             name, d.dump());
      }
      const int64_t v = d.get<int64_t>();
      if (v < 0 || (d.is_number_unsigned() && d.get<uint64_t>() > uint64_t(INT64_MAX))) {
        fail("safetensors file '{}': tensor '{}': negative or huge dimension {} in shape {}", p,
             name, d.dump(), sh.dump());
      }
      t.shape.push_back(v);
      numel *= static_cast<uint64_t>(v);
      if (numel > (unsigned __int128)(UINT64_MAX)) {
        fail("safetensors file '{}': tensor '{}': shape {} is too large", p, name, sh.dump());
      }
    }
    const json& off = e["data_offsets"];
    uint64_t begin = 0, end = 0;
    if (!off.is_array() || off.size() != 2 || !json_to_u64(off[0], &begin) ||
        !json_to_u64(off[1], &end)) {
      fail(
          "safetensors file '{}': tensor '{}': data_offsets must be [begin, end] with "
          "non-negative integers, found {}",
          p, name, off.dump());
    }
    if (end < begin) {
      fail("safetensors file '{}': tensor '{}': data_offsets [{}, {}] end before begin", p, name,
           begin, end);
    }
    if (end > data_size) {
      fail(
          "safetensors file '{}': tensor '{}': data_offsets [{}, {}] out of range of the data "
          "section ({} bytes); the file is truncated or corrupt",
          p, name, begin, end, data_size);
    }
    const unsigned __int128 want = numel * dtype_size(t.dtype);
    if (want != end - begin) {
      fail(
          "safetensors file '{}': tensor '{}': {} bytes in data_offsets [{}, {}] but shape {} of "
          "{} needs {}",
          p, name, end - begin, begin, end, sh.dump(), dtype_name(t.dtype),
          static_cast<uint64_t>(want));
    }
    t.data = bytes + data_begin + begin;
    t.nbytes = end - begin;
    f->tensors_.push_back(std::move(t));
  }

  // Tensors must tile the data section exactly, as the Rust library demands: sorted by offset,
  // each starts where the previous ends (no overlap, no hole) and the last ends at end of file.
  std::vector<size_t> order(f->tensors_.size());
  std::iota(order.begin(), order.end(), size_t{0});
  auto begin_of = [&](size_t i) {
    return static_cast<uint64_t>(static_cast<const uint8_t*>(f->tensors_[i].data) - bytes) -
           data_begin;
  };
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    const uint64_t ba = begin_of(a), bb = begin_of(b);
    return ba != bb ? ba < bb : f->tensors_[a].nbytes < f->tensors_[b].nbytes;
  });
  uint64_t cursor = 0;
  const TensorInfo* prev = nullptr;
  for (size_t i : order) {
    const TensorInfo& t = f->tensors_[i];
    const uint64_t b = begin_of(i);
    if (b < cursor) {
      fail(
          "safetensors file '{}': tensor '{}' (bytes [{}, {})) overlaps tensor '{}' (ending at "
          "{})",
          p, t.name, b, b + t.nbytes, prev ? prev->name : "?", cursor);
    }
    if (b > cursor) {
      fail(
          "safetensors file '{}': tensor '{}' starts at byte {} but the previous tensor ends at "
          "{}: a hole in the data section",
          p, t.name, b, cursor);
    }
    cursor = b + t.nbytes;
    prev = &t;
  }
  if (cursor != data_size) {
    fail(
        "safetensors file '{}': tensors cover {} bytes of the {}-byte data section: trailing "
        "bytes",
        p, cursor, data_size);
  }
  return f;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) ::munmap(map_, map_size_);
}

const TensorInfo* SafetensorsFile::find(const std::string& name) const {
  for (const TensorInfo& t : tensors_)
    if (t.name == name) return &t;
  return nullptr;
}

// ---------------------------------------------------------------------------------------------
// CheckpointReader

CheckpointReader::CheckpointReader(const fs::path& dir) : dir_(dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec))
    fail("model folder '{}' does not exist or is not a folder", dir.string());
  const fs::path single = dir / "model.safetensors";
  const fs::path index = dir / "model.safetensors.index.json";
  std::vector<std::string> files;
  std::map<std::string, std::string> expected_owner;  // tensor -> shard named in the index
  // Like transformers' from_pretrained: model.safetensors first, else the index.
  if (fs::exists(single, ec)) {
    files.push_back("model.safetensors");
  } else if (fs::exists(index, ec)) {
    json j;
    try {
      j = json::parse(read_file(index));
    } catch (const json::exception& e) {
      fail("'{}' is not valid JSON: {}", index.string(), e.what());
    }
    if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object()) {
      fail("'{}': missing 'weight_map' (an object mapping tensor names to shard files)",
           index.string());
    }
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      if (!it.value().is_string()) {
        fail("'{}': weight_map entry '{}' must be a file name string", index.string(), it.key());
      }
      const std::string file = it.value().get<std::string>();
      if (file.empty() || file.find('/') != std::string::npos || file == "." || file == "..") {
        fail("'{}': weight_map entry '{}' names '{}', which is not a file in the folder",
             index.string(), it.key(), file);
      }
      expected_owner[it.key()] = file;
      if (std::find(files.begin(), files.end(), file) == files.end()) files.push_back(file);
    }
    for (const std::string& file : files) {
      if (!fs::exists(dir / file, ec)) {
        fail("'{}' lists shard '{}' but '{}' does not exist", index.string(), file,
             (dir / file).string());
      }
    }
  } else {
    fail("model folder '{}' has neither model.safetensors nor model.safetensors.index.json",
         dir.string());
  }
  for (const std::string& file : files) {
    files_.push_back(SafetensorsFile::open(dir / file));
    for (const TensorInfo& t : files_.back()->tensors()) {
      auto [it, inserted] = index_.emplace(t.name, &t);
      if (!inserted) {
        fail("model folder '{}': tensor '{}' is stored twice, in '{}' and '{}'", dir.string(),
             t.name, owner_[t.name], file);
      }
      owner_[t.name] = file;
    }
  }
  for (const auto& [name, file] : expected_owner) {
    auto it = owner_.find(name);
    if (it == owner_.end() || it->second != file) {
      fail("'{}' maps tensor '{}' to '{}', but that file does not hold it", index.string(), name,
           file);
    }
  }
}

const TensorInfo* CheckpointReader::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : it->second;
}

void CheckpointReader::read_f32(const std::string& name, const std::vector<int64_t>& shape,
                                float* dst) const {
  const TensorInfo* t = find(name);
  if (!t)
    fail("model folder '{}': tensor '{}' is missing from the checkpoint", dir_.string(), name);
  const std::string where = (dir_ / owner_.at(name)).string();
  if (t->shape != shape) {
    fail("{}: tensor '{}' has shape {}, expected {} for this config", where, name,
         shape_str(t->shape), shape_str(shape));
  }
  if (!is_float_dtype(t->dtype)) {
    fail("{}: tensor '{}' has dtype {}, expected a floating type (F32, BF16, F16, F64)", where,
         name, dtype_name(t->dtype));
  }
  convert_to_f32(dst, t->data, t->dtype, static_cast<size_t>(t->numel()));
}

std::vector<std::string> CheckpointReader::names() const {
  std::vector<std::string> out;
  out.reserve(index_.size());
  for (const auto& [name, t] : index_) out.push_back(name);
  return out;
}

DType CheckpointReader::stored_dtype() const {
  for (const auto& f : files_)
    for (const TensorInfo& t : f->tensors())
      if (is_float_dtype(t.dtype)) return t.dtype;
  return DType::kF32;
}

// ---------------------------------------------------------------------------------------------
// Writing

namespace {

int64_t numel_of(const TensorToSave& t) {
  int64_t n = 1;
  for (int64_t d : t.shape) {
    LT_CHECK(d >= 0, "tensor '{}' has a negative dimension {}", t.name, d);
    n *= d;
  }
  return n;
}

// Header JSON padded with spaces to a multiple of 8 bytes (the Python library does the same so
// that the data section is aligned).
std::string make_header(const std::vector<TensorToSave>& tensors, DType dtype,
                        const std::map<std::string, std::string>& metadata) {
  json h = json::object();
  json meta = json::object();
  for (const auto& [k, v] : metadata) meta[k] = v;
  if (!meta.empty()) h["__metadata__"] = meta;
  uint64_t offset = 0;
  for (const TensorToSave& t : tensors) {
    LT_CHECK(t.name != "__metadata__" && !h.contains(t.name), "duplicate tensor name '{}'", t.name);
    const uint64_t bytes = static_cast<uint64_t>(numel_of(t)) * dtype_size(dtype);
    h[t.name] = {{"dtype", dtype_name(dtype)},
                 {"shape", t.shape},
                 {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string s = h.dump();
  s.append((8 - s.size() % 8) % 8, ' ');
  return s;
}

size_t tensor_bytes(const TensorToSave& t, DType dtype) {
  return static_cast<size_t>(numel_of(t)) * dtype_size(dtype);
}

}  // namespace

void write_safetensors(const fs::path& path, const std::vector<TensorToSave>& tensors, DType dtype,
                       const std::map<std::string, std::string>& metadata) {
  LT_CHECK(is_float_dtype(dtype), "write_safetensors: dtype {} is not a float type",
           dtype_name(dtype));
  std::map<std::string, std::string> meta = metadata;
  if (meta.empty()) meta["format"] = "pt";  // transformers refuses files without it
  const std::string header = make_header(tensors, dtype, meta);
  AtomicFile f(path);
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(uint64_t(header.size()) >> (8 * i));
  f.write(len, 8);
  f.write(header);
  std::vector<uint8_t> buf;
  constexpr size_t kChunk = size_t(1) << 20;  // elements converted per write
  for (const TensorToSave& t : tensors) {
    const size_t n = static_cast<size_t>(numel_of(t));
    LT_CHECK(n == 0 || t.data, "tensor '{}' has no data", t.name);
    if (dtype == DType::kF32) {
      f.write(t.data, n * 4);
      continue;
    }
    for (size_t i = 0; i < n; i += kChunk) {
      const size_t m = std::min(kChunk, n - i);
      buf.resize(m * dtype_size(dtype));
      convert_from_f32(buf.data(), t.data + i, dtype, m);
      f.write(buf.data(), buf.size());
    }
  }
  f.commit();
}

void write_model_safetensors(const fs::path& dir, const std::vector<TensorToSave>& tensors,
                             DType dtype, size_t max_shard_bytes) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) fail("cannot create model folder '{}': {}", dir.string(), ec.message());
  // Greedy split in order, as transformers' split_torch_state_dict_into_shards does: a tensor
  // that does not fit in the current shard starts a new one; a tensor larger than the limit
  // gets a shard of its own.
  std::vector<std::vector<TensorToSave>> shards(1);
  size_t current = 0, total = 0;
  int64_t total_parameters = 0;
  for (const TensorToSave& t : tensors) {
    const size_t b = tensor_bytes(t, dtype);
    total += b;
    total_parameters += numel_of(t);
    if (current + b > max_shard_bytes && !shards.back().empty()) {
      shards.emplace_back();
      current = 0;
    }
    shards.back().push_back(t);
    current += b;
  }
  const fs::path index_path = dir / "model.safetensors.index.json";
  const size_t n = shards.size();
  std::vector<std::string> shard_files;
  if (n == 1) {
    write_safetensors(dir / "model.safetensors", tensors, dtype);
    // A stale index from an earlier sharded save would take precedence when loading.
    fs::remove(index_path, ec);
  } else {
    json weight_map = json::object();
    for (size_t s = 0; s < n; ++s) {
      const std::string file = fmt::format("model-{:05d}-of-{:05d}.safetensors", s + 1, n);
      write_safetensors(dir / file, shards[s], dtype);
      shard_files.push_back(file);
      for (const TensorToSave& t : shards[s]) weight_map[t.name] = file;
    }
    // transformers 5 writes both totals in "metadata".
    json index = {{"metadata", {{"total_parameters", total_parameters}, {"total_size", total}}},
                  {"weight_map", weight_map}};
    // A stale single-file save would take precedence over the index when loading; remove it
    // before the index appears. The index is written last: when it exists, all shards do.
    fs::remove(dir / "model.safetensors", ec);
    write_file_atomic(index_path, index.dump(2) + "\n");
  }
  // Shards of an earlier save with another shard count (save_pretrained cleans them too).
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    // model-DDDDD-of-DDDDD.safetensors
    auto digits_at = [&](size_t pos) {
      return std::all_of(name.begin() + pos, name.begin() + pos + 5,
                         [](unsigned char c) { return std::isdigit(c); });
    };
    const bool is_shard = name.size() == 32 && name.compare(0, 6, "model-") == 0 &&
                          digits_at(6) && name.compare(11, 4, "-of-") == 0 && digits_at(15) &&
                          name.compare(20, 12, ".safetensors") == 0;
    if (is_shard &&
        std::find(shard_files.begin(), shard_files.end(), name) == shard_files.end())
      fs::remove(e.path(), ec);
  }
}

size_t parse_max_shard_size(const std::string& text, const std::string& flag) {
  auto bad = [&]() {
    fail(
        "{}: '{}' is not a size; use an integer number of bytes or an integer followed by KB, MB, "
        "GB (powers of 1000) or KiB, MiB, GiB (powers of 1024), like 5GB or 500MiB",
        flag, text);
  };
  size_t digits = 0;
  while (digits < text.size() && std::isdigit(static_cast<unsigned char>(text[digits]))) ++digits;
  if (digits == 0 || digits > 15) bad();
  const uint64_t value = std::stoull(text.substr(0, digits));
  std::string unit = text.substr(digits);
  const bool bits = !unit.empty() && unit.back() == 'b' && unit.size() == 2;  // "Gb": gigabits
  std::transform(unit.begin(), unit.end(), unit.begin(),
                 [](unsigned char c) { return static_cast<char>(std::toupper(c)); });
  uint64_t scale = 0;
  if (unit.empty() || unit == "B") scale = 1;
  else if (unit == "KB") scale = 1000;
  else if (unit == "MB") scale = 1000'000;
  else if (unit == "GB") scale = 1000'000'000;
  else if (unit == "KIB") scale = uint64_t(1) << 10;
  else if (unit == "MIB") scale = uint64_t(1) << 20;
  else if (unit == "GIB") scale = uint64_t(1) << 30;
  else bad();
  const uint64_t bytes = bits ? value * scale / 8 : value * scale;
  if (bytes == 0) fail("{}: '{}' is zero; a shard must hold at least one byte", flag, text);
  return static_cast<size_t>(bytes);
}

}  // namespace lt
