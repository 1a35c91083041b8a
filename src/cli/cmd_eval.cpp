// `longtune eval`: evaluation loss and perplexity of a model (optionally with an adapter) on a
// data set, computed as the Trainer does during training (train/evaluate.h).
#include <fmt/format.h>

#include <filesystem>

#include "backend/backend.h"
#include "cli/commands.h"
#include "cli/flags.h"
#include "core/error.h"
#include "data/dataset.h"
#include "data/tokenizer.h"
#include "io/safetensors.h"
#include "model/adapter_io.h"
#include "model/llama.h"
#include "model/model_io.h"
#include "train/batching.h"
#include "train/evaluate.h"

namespace lt {

int cmd_eval(int argc, char** argv) {
  CLI::App app{"Evaluation loss and perplexity of a model on a data set", "longtune eval"};
  std::string model, adapter, data, tokenizer_path, dataset_format = "auto", chat_template;
  std::string device = "auto";
  int64_t batch_size = 8, model_max_length = 0;
  bool train_on_inputs = false;
  app.add_option("--model_name_or_path", model, "Hugging Face model folder")->required();
  app.add_option("--adapter_name_or_path", adapter, "LoRA adapter folder (PEFT format)");
  app.add_option("--data_path", data, "evaluation data (json, jsonl, txt)")->required();
  app.add_option("--tokenizer", tokenizer_path, "tokenizer.json or folder (default: the model's)");
  app.add_option("--per_device_eval_batch_size", batch_size, "rows per micro-batch");
  app.add_option("--model_max_length", model_max_length, "longest row in tokens");
  app.add_option("--dataset_format", dataset_format,
                 "auto, alpaca, messages, sharegpt, completion, text, tokenized");
  app.add_option("--chat_template", chat_template, "built-in template name or a file");
  add_bool_flag(app, "--train_on_inputs", &train_on_inputs, "score prompt tokens too");
  app.add_option("--device", device, "auto (cuda when a GPU is present), cpu, cuda or cpu-guarded");
  std::string config_file;
  app.add_option("--config", config_file, "YAML or JSON file of these flags");
  if (!parse_flags_with_config(app, argc, argv)) return 0;
  if (batch_size < 1) fail("--per_device_eval_batch_size must be >= 1 (got {})", batch_size);
  if (model_max_length < 0) fail("--model_max_length must be >= 1 (got {})", model_max_length);

  const std::filesystem::path model_dir = model;
  if (!std::filesystem::is_directory(model_dir))
    fail("--model_name_or_path '{}' is not a folder", model);
  const ModelConfig config = load_model_config(model_dir / "config.json");
  std::unique_ptr<Tokenizer> tokenizer;
  if (!tokenizer_path.empty() || std::filesystem::exists(model_dir / "tokenizer.json"))
    tokenizer =
        Tokenizer::load(tokenizer_path.empty() ? model_dir : std::filesystem::path(tokenizer_path));
  DatasetOptions dopt;
  dopt.format = parse_dataset_format(dataset_format);
  dopt.model_max_length = model_max_length > 0 ? model_max_length : config.max_position_embeddings;
  dopt.train_on_inputs = train_on_inputs;
  dopt.chat_template = chat_template;
  const Dataset ds = load_dataset(data, tokenizer.get(), dopt, config.vocab_size);
  if (ds.rows.empty()) fail("--data_path '{}' has no usable rows", data);

  RunSettings rs;
  rs.train = false;
  rs.max_tokens = max_micro_batch_tokens(ds.rows, batch_size);
  auto backend = make_backend(device);
  LlamaModel m(config, *backend, rs);
  {  // Weights on the host; a PEFT adapter is merged into them (W += scale * B A), as
     // merge_and_unload does; then to the device.
    std::vector<float> host(size_t(m.table().total_numel()));
    load_weights(CheckpointReader(model_dir), m.table(), host.data());
    if (!adapter.empty()) merge_adapter(adapter, config, m.table(), host.data());
    backend->copy_to_device(m.params(), host.data(), host.size() * 4);
  }
  const EvalResult r = evaluate_loss(m, ds.rows, batch_size);
  fmt::print("eval_loss {:.6f}  perplexity {:.4f}  ({} rows, {} labelled tokens, {:.2f} s)\n",
             r.loss, r.perplexity, r.num_rows, r.num_targets, r.runtime_s);
  return 0;
}

}  // namespace lt
