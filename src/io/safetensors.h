// Safetensors files (https://github.com/huggingface/safetensors): 8-byte little-endian header
// length, JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {...}}, then data.
// Reading is memory-mapped and validated; writing is atomic (temporary file, fsync, rename).
#pragma once
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace lt {

struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  const void* data = nullptr;  // into the mapping
  size_t nbytes = 0;
  int64_t numel() const;
};

// One memory-mapped .safetensors file. Every malformation (header length past end of file,
// bad JSON, unknown dtype, offsets out of range, overlapping or not matching the shape) is a
// UserError naming the file and the tensor.
class SafetensorsFile {
 public:
  static std::unique_ptr<SafetensorsFile> open(const std::filesystem::path& path);
  ~SafetensorsFile();
  const TensorInfo* find(const std::string& name) const;
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::filesystem::path& path() const { return path_; }

 private:
  SafetensorsFile() = default;
  std::filesystem::path path_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

// All tensors of a Hugging Face model folder: model.safetensors, or the shards listed in
// model.safetensors.index.json (weight_map).
class CheckpointReader {
 public:
  explicit CheckpointReader(const std::filesystem::path& dir);
  // Null when absent.
  const TensorInfo* find(const std::string& name) const;
  // Copies tensor `name` into dst (numel floats) converting to f32; UserError (naming the file
  // and tensor) if it is missing or its shape differs from `shape`.
  void read_f32(const std::string& name, const std::vector<int64_t>& shape, float* dst) const;
  std::vector<std::string> names() const;
  // dtype of the first floating tensor (what "same dtype as loaded" means when saving).
  DType stored_dtype() const;

 private:
  std::filesystem::path dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorInfo*> index_;
  std::map<std::string, std::string> owner_;  // tensor -> file name (for messages)
};

// A tensor to save: f32 source converted to `dtype` on write.
struct TensorToSave {
  std::string name;
  std::vector<int64_t> shape;
  const float* data = nullptr;
};

// Writes one safetensors file atomically.
void write_safetensors(const std::filesystem::path& path, const std::vector<TensorToSave>& tensors,
                       DType dtype, const std::map<std::string, std::string>& metadata = {});
// transformers 5's save_pretrained default max_shard_size ("50GB").
inline constexpr size_t kDefaultMaxShardBytes = size_t(50'000'000'000);

// Writes model.safetensors, or when the total exceeds max_shard_bytes, shards named
// model-00001-of-0000N.safetensors plus model.safetensors.index.json, as transformers does.
// Shard files of an earlier save that the new one does not use are removed.
void write_model_safetensors(const std::filesystem::path& dir,
                             const std::vector<TensorToSave>& tensors, DType dtype,
                             size_t max_shard_bytes = kDefaultMaxShardBytes);

// A shard size in transformers' spelling (convert_file_size_to_int): bytes as a plain integer,
// or an integer followed by KB/MB/GB (powers of 1000), KiB/MiB/GiB (powers of 1024); a lower-case
// final "b" (5Gb) means bits. UserError names `flag` and the allowed forms.
size_t parse_max_shard_size(const std::string& text, const std::string& flag = "--max_shard_size");

}  // namespace lt
