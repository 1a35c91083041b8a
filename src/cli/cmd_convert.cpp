// `longtune convert`: turn checkpoints of other formats into Hugging Face model folders.
#include <cstring>

#include "cli/commands.h"
#include "cli/flags.h"
#include "core/error.h"
#include "io/llama2c.h"

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
  if (!parse_flags(app, argc, argv)) return 0;
  if (std::filesystem::is_directory(out) && !std::filesystem::is_empty(out) && !overwrite)
    fail("--output_dir '{}' exists and is not empty; pass --overwrite_output_dir True", out);
  convert_llama2c(checkpoint, tokenizer, out);
  fmt::print("wrote {} (LlamaForCausalLM + tokenizer) from {} and {}\n", out, checkpoint,
             tokenizer);
  return 0;
}

}  // namespace lt
