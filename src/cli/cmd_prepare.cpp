// `longtune prepare`: tokenize a data set once into the token cache (data/token_cache.h) that
// `longtune train` reuses, and optionally dump the rows exactly as training sees them.
#include <fmt/format.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/flags.h"
#include "core/error.h"
#include "data/dataset.h"
#include "data/token_cache.h"
#include "data/tokenizer.h"
#include "io/atomic_file.h"
#include "model/config.h"
#include "ops/common.h"

namespace lt {

namespace fs = std::filesystem;

namespace {

// One {"input_ids": [...], "labels": [...]} line per row ("doc_ids" too when packed).
void write_dump(const fs::path& file, const Dataset& ds) {
  AtomicFile out(file);
  for (const Example& ex : ds.rows) {
    nlohmann::json row = {{"input_ids", ex.input_ids}, {"labels", ex.labels}};
    if (!ex.doc_ids.empty()) row["doc_ids"] = ex.doc_ids;
    out.write(row.dump());
    out.write("\n");
  }
  out.commit();
}

}  // namespace

int cmd_prepare(int argc, char** argv) {
  CLI::App app{"Tokenize a data set once into the token cache that train reuses",
               "longtune prepare"};
  std::string model, data, tokenizer_path, dump, cache_dir, dataset_format = "auto";
  std::string chat_template;
  int64_t model_max_length = 0;
  bool train_on_inputs = false, packing = false;
  app.add_option("--data_path", data, "training data (json, jsonl, txt)")->required();
  app.add_option("--model_name_or_path", model,
                 "model folder: its tokenizer, vocab_size and max_position_embeddings (the cache "
                 "key train computes)");
  app.add_option("--tokenizer", tokenizer_path, "tokenizer.json or folder (default: the model's)");
  app.add_option("--dump", dump, "write the rows as JSON lines {input_ids, labels[, doc_ids]}");
  app.add_option("--cache_dir", cache_dir,
                 "token cache folder (default: $LONGTUNE_CACHE or ~/.cache/longtune)");
  app.add_option("--dataset_format", dataset_format,
                 "auto, alpaca, messages, sharegpt, completion, text, tokenized");
  app.add_option("--model_max_length", model_max_length,
                 "longest row in tokens (default: the model's max_position_embeddings)");
  add_bool_flag(app, "--train_on_inputs", &train_on_inputs, "train prompt tokens too");
  add_bool_flag(app, "--packing", &packing, "pack rows into model_max_length sequences");
  app.add_option("--chat_template", chat_template, "built-in template name or a file");
  int64_t max_train_samples = 0;
  app.add_option("--max_train_samples", max_train_samples,
                 "read only the first N rows of --data_path (0: all)")
      ->check(CLI::NonNegativeNumber);
  std::string config_file;
  app.add_option("--config", config_file, "YAML or JSON file of these flags");
  if (!parse_flags_with_config(app, argc, argv)) return 0;
  if (model_max_length < 0) fail("--model_max_length must be >= 1 (got {})", model_max_length);
  if (model.empty() && tokenizer_path.empty())
    fail("prepare needs --model_name_or_path or --tokenizer");

  // The same choices Trainer::load_data makes, so that train finds this cache.
  int64_t vocab_size = 0;
  fs::path tok_path = tokenizer_path;
  DatasetOptions dopt;
  dopt.format = parse_dataset_format(dataset_format);
  dopt.model_max_length = model_max_length;
  dopt.train_on_inputs = train_on_inputs;
  dopt.packing = packing;
  dopt.chat_template = chat_template;
  dopt.max_rows = max_train_samples;
  if (!model.empty()) {
    if (!fs::is_directory(model)) fail("--model_name_or_path '{}' is not a folder", model);
    const ModelConfig config = load_model_config(fs::path(model) / "config.json");
    vocab_size = config.vocab_size;
    if (dopt.model_max_length == 0) dopt.model_max_length = config.max_position_embeddings;
    if (tok_path.empty() && fs::exists(fs::path(model) / "tokenizer.json")) tok_path = model;
  }
  std::unique_ptr<Tokenizer> tokenizer;
  if (!tok_path.empty()) tokenizer = Tokenizer::load(tok_path);
  if (vocab_size == 0 && tokenizer) vocab_size = tokenizer->vocab_size();

  const fs::path dir = cache_dir.empty() ? default_cache_dir() : fs::path(cache_dir);
  CachedLoad r = load_dataset_cached(data, tokenizer.get(), tok_path, dopt, vocab_size, dir,
                                     CacheWrite::kRequired);
  if (!r.note.empty()) fmt::print("note: {}\n", r.note);
  const Dataset& ds = r.dataset;
  int64_t tokens = 0, trained = 0;
  for (const Example& ex : ds.rows) {
    tokens += static_cast<int64_t>(ex.input_ids.size());
    for (int32_t l : ex.labels) trained += l != kIgnoreIndex;
  }
  fmt::print("data: {}\n", r.summary());
  const std::string truncation =
      dopt.model_max_length > 0
          ? fmt::format("{} truncated to {} tokens", ds.stats.rows_truncated,
                        dopt.model_max_length)
          : std::string("no truncation");
  fmt::print(
      "data: {} rows ({} format) from {}: {} tokens, {} trained; {} rows read, {} kept, {}, "
      "{} skipped\n",
      ds.rows.size(), dataset_format_name(ds.format), data, tokens, trained, ds.stats.rows_read,
      ds.stats.rows_kept, truncation, ds.stats.rows_skipped);
  for (const auto& [reason, n] : ds.stats.skip_counts)
    fmt::print("data: skipped {} rows: {}\n", n, reason);
  for (const std::string& s : ds.stats.skip_reasons) fmt::print("  e.g. {}\n", s);
  if (!dump.empty()) {
    write_dump(dump, ds);
    fmt::print("data: wrote {} rows to {}\n", ds.rows.size(), dump);
  }
  return 0;
}

}  // namespace lt
