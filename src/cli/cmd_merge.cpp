// `longtune merge`: a base model plus a PEFT LoRA adapter written as one Hugging Face model
// (W += scale * B @ A, as PEFT's merge_and_unload).
#include "cli/commands.h"
#include "cli/flags.h"
#include "core/error.h"
#include "model/adapter_io.h"
#include "model/model_io.h"

namespace lt {

namespace fs = std::filesystem;

int cmd_merge(int argc, char** argv) {
  CLI::App app{"Merge a LoRA adapter into its base model", "longtune merge"};
  std::string model, adapter, out, dtype;
  bool overwrite = false;
  app.add_option("--model_name_or_path", model, "base Hugging Face model folder")->required();
  app.add_option("--adapter_name_or_path", adapter, "PEFT adapter folder")->required();
  app.add_option("--output_dir", out, "where the merged model is written")->required();
  app.add_option("--save_dtype", dtype, "f32, bf16 or f16 (default: as the base is stored)");
  add_bool_flag(app, "--overwrite_output_dir", &overwrite, "reuse a non-empty output_dir");
  std::string max_shard_size = "50GB";
  app.add_option("--max_shard_size", max_shard_size,
                 "largest model.safetensors shard, like 5GB or 500MiB (default 50GB)");
  if (!parse_flags(app, argc, argv)) return 0;
  const size_t max_shard_bytes = parse_max_shard_size(max_shard_size);
  if (fs::is_directory(out) && !fs::is_empty(out) && !overwrite)
    fail("--output_dir '{}' exists and is not empty; pass --overwrite_output_dir True to reuse it",
         out);
  if (!fs::is_directory(model)) fail("--model_name_or_path '{}' is not a folder", model);
  const ModelConfig config = load_model_config(fs::path(model) / "config.json");
  CheckpointReader reader(model);
  const DType save = dtype.empty() ? reader.stored_dtype() : parse_float_dtype(dtype, "--save_dtype");
  const ParamTable table(config);
  std::vector<float> params(table.total_numel());
  load_weights(reader, table, params.data());
  merge_adapter(adapter, config, table, params.data());  // validates before anything is written
  save_model(out, config, table, params.data(), save, model, max_shard_bytes);
  fmt::print("merged {} into {} -> {}\n", adapter, model, out);
  return 0;
}

}  // namespace lt
