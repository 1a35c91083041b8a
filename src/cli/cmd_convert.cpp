// `longtune convert`: turn checkpoints of other formats into Hugging Face model folders.
#include <cstring>

#include "cli/commands.h"
#include "cli/flags.h"
#include "core/error.h"
#include "io/llama2c.h"
#include "io/safetensors.h"

namespace lt {

int cmd_convert(int argc, char** argv) {
  CLI::App app{"Convert a checkpoint into a Hugging Face model folder", "longtune convert"};
  app.require_subcommand(1);
  auto* l2c = app.add_subcommand("llama2c", "llama2.c checkpoint (.bin) + tokenizer (tok*.bin)");
  std::string checkpoint, tokenizer, out;
  bool overwrite = false;
  l2c->add_option("--checkpoint", checkpoint, "llama2.c model file, e.g. stories260K.bin")
      ->required();
  l2c->add_option("--tokenizer", tokenizer, "llama2.c tokenizer file, e.g. tok512.bin")
      ->required();
  l2c->add_option("--output_dir", out, "folder to write")->required();
  add_bool_flag(*l2c, "--overwrite_output_dir", &overwrite, "reuse a non-empty output_dir");
  std::string max_shard_size = "50GB";
  l2c->add_option("--max_shard_size", max_shard_size,
                  "largest model.safetensors shard, like 5GB or 500MiB (default 50GB)");
  if (!parse_flags(app, argc, argv)) return 0;
  const size_t max_shard_bytes = parse_max_shard_size(max_shard_size);
  if (std::filesystem::is_directory(out) && !std::filesystem::is_empty(out) && !overwrite)
    fail("--output_dir '{}' exists and is not empty; pass --overwrite_output_dir True", out);
  convert_llama2c(checkpoint, tokenizer, out, max_shard_bytes);
  fmt::print("wrote {} (LlamaForCausalLM + tokenizer) from {} and {}\n", out, checkpoint,
             tokenizer);
  return 0;
}

}  // namespace lt
