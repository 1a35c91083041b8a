// Training datasets: json/jsonl files in the usual formats turned into token ids and labels
// exactly as transformers-based trainers produce them.
#pragma once
#include <cstdint>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "data/tokenizer.h"

namespace lt {

// One training row. labels are aligned with input_ids (kIgnoreIndex = not trained); the model
// shifts them, as transformers does. doc_ids (empty = one document) mark packed documents:
// tokens attend only within their document and position ids restart at each one.
struct Example {
  std::vector<int32_t> input_ids;
  std::vector<int32_t> labels;
  std::vector<int32_t> doc_ids;
};

enum class DatasetFormat { kAuto, kAlpaca, kMessages, kShareGpt, kCompletion, kText, kTokenized };

struct DatasetOptions {
  DatasetFormat format = DatasetFormat::kAuto;
  int64_t model_max_length = 0;  // 0 = no truncation
  bool train_on_inputs = false;
  bool packing = false;
  std::string chat_template;  // "" = the tokenizer's; else a built-in name or a file path
  int64_t max_rows = 0;       // 0 = all; else read only the first max_rows rows of the file
};

// rows_* count rows of the file (a .txt file is one row); Dataset::rows may hold fewer
// (packing) or more (text cut into blocks) examples than rows_kept.
struct DatasetStats {
  int64_t rows_read = 0, rows_kept = 0, rows_truncated = 0, rows_skipped = 0;
  std::vector<std::string> skip_reasons;                     // first few, "file:line: why"
  std::vector<std::pair<std::string, int64_t>> skip_counts;  // (reason, rows) for every reason
};

struct Dataset {
  std::vector<Example> rows;
  DatasetStats stats;
  DatasetFormat format = DatasetFormat::kAuto;  // detected or given
};

// tokenizer may be null only for pre-tokenized data. UserError names the file, line and column
// (malformed JSON) or the row and field (missing or mistyped), and refuses an empty dataset.
// vocab_size > 0: any token id outside [0, vocab_size) is an error naming the row.
Dataset load_dataset(const std::filesystem::path& path, const Tokenizer* tokenizer,
                     const DatasetOptions& options, int64_t vocab_size = 0);

DatasetFormat parse_dataset_format(const std::string& name);  // UserError on unknown names
std::string dataset_format_name(DatasetFormat format);        // inverse of the above

}  // namespace lt
