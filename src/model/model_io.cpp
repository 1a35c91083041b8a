// Hugging Face model folders: weights in, weights and config out.
#include "model/model_io.h"

#include "core/error.h"
#include "io/atomic_file.h"

namespace lt {

void load_weights(const CheckpointReader& reader, const ParamTable& table, float* params) {
  for (const auto& p : table.params()) reader.read_f32(p.name, p.shape, params + p.offset);
}

void load_weights(const CheckpointReader& reader, const ParamTable& table, float* params,
                  Backend& be) {
  std::vector<float> host;
  for (const auto& p : table.params()) {
    host.resize(size_t(p.numel));
    reader.read_f32(p.name, p.shape, host.data());
    be.copy_to_device(params + p.offset, host.data(), host.size() * 4);
  }
}

void save_model(const std::filesystem::path& dir, const ModelConfig& config,
                const ParamTable& table, const float* params, DType dtype,
                const std::filesystem::path& source_dir, size_t max_shard_bytes) {
  std::filesystem::create_directories(dir);
  std::vector<TensorToSave> tensors;
  for (const auto& p : table.params()) tensors.push_back({p.name, p.shape, params + p.offset});
  write_model_safetensors(dir, tensors, dtype, max_shard_bytes);
  ModelConfig out = config;
  out.torch_dtype = dtype;
  write_file_atomic(dir / "config.json", model_config_to_json(out).dump(2) + "\n");
  const char* extra[] = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                         "generation_config.json", "tokenizer.model"};
  if (source_dir.empty()) return;
  for (const char* f : extra) {
    const auto src = source_dir / f;
    if (std::filesystem::exists(src) &&
        std::filesystem::absolute(src) != std::filesystem::absolute(dir / f))
      write_file_atomic(dir / f, read_file(src));
  }
}

}  // namespace lt
