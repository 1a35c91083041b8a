// `longtune init`: a randomly initialised Hugging Face model folder of a named shape.
#include <vector>

#include "cli/commands.h"
#include "cli/flags.h"
#include "core/error.h"
#include "io/atomic_file.h"
#include "model/model_io.h"
#include "model/presets.h"

namespace lt {

int cmd_init(int argc, char** argv) {
  CLI::App app{"Create a randomly initialised model folder", "longtune init"};
  std::string preset = "tiny", out, dtype = "f32";
  uint64_t seed = 42;
  int64_t hidden = 0, inter = 0, layers = 0, heads = 0, kv_heads = 0, vocab = 0, max_pos = 0;
  bool overwrite = false;
  app.add_option("--preset", preset, "tiny, small, llama2-7b, llama3-8b, mistral-7b, qwen2-7b");
  app.add_option("--output_dir", out, "folder to write")->required();
  app.add_option("--seed", seed, "random seed");
  app.add_option("--dtype", dtype, "f32, bf16 or f16");
  app.add_option("--hidden_size", hidden, "override the preset");
  app.add_option("--intermediate_size", inter, "override the preset");
  app.add_option("--num_hidden_layers", layers, "override the preset");
  app.add_option("--num_attention_heads", heads, "override the preset");
  app.add_option("--num_key_value_heads", kv_heads, "override the preset");
  app.add_option("--vocab_size", vocab, "override the preset");
  app.add_option("--max_position_embeddings", max_pos, "override the preset");
  add_bool_flag(app, "--overwrite_output_dir", &overwrite, "reuse a non-empty output_dir");
  std::string max_shard_size = "50GB";
  app.add_option("--max_shard_size", max_shard_size,
                 "largest model.safetensors shard, like 5GB or 500MiB (default 50GB)");
  if (!parse_flags(app, argc, argv)) return 0;
  const size_t max_shard_bytes = parse_max_shard_size(max_shard_size);
  nlohmann::json j = preset_config(preset);
  auto set = [&](const char* key, int64_t v) {
    if (v < 0) fail("--{} must be positive (got {})", key, v);
    if (v > 0) j[key] = v;
  };
  set("hidden_size", hidden);
  set("intermediate_size", inter);
  set("num_hidden_layers", layers);
  set("num_attention_heads", heads);
  set("num_key_value_heads", kv_heads);
  set("vocab_size", vocab);
  set("max_position_embeddings", max_pos);
  const DType dt = parse_float_dtype(dtype, "--dtype");
  if (std::filesystem::is_directory(out) && !std::filesystem::is_empty(out) && !overwrite)
    fail("--output_dir '{}' exists and is not empty; pass --overwrite_output_dir True", out);
  const ModelConfig config = parse_model_config(j, "--preset " + preset);
  const ParamTable table(config);
  std::vector<float> params(table.total_numel());
  init_random_weights(table, params.data(), j.value("initializer_range", 0.02), seed);
  save_model(out, config, table, params.data(), dt, {}, max_shard_bytes);
  fmt::print("wrote {}: {} ({:.2f}M parameters)\n", out, preset,
             static_cast<double>(table.total_numel()) / 1e6);
  return 0;
}

}  // namespace lt
