// Dataset loader with the real tokenizers against tests/fixtures/data/dataset_golden.json,
// written by tools/make_dataset_fixtures.py with transformers (Stanford Alpaca prompts,
// apply_chat_template, incremental-prefix assistant masks). Needs lt::Tokenizer::load.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "data/dataset.h"
#include "data/tokenizer.h"
#include "ops/common.h"

namespace lt {
namespace {

TEST(DatasetGolden, MatchesTransformers) {
  std::ifstream in(std::string(LT_SOURCE_DIR) + "/tests/fixtures/data/dataset_golden.json");
  ASSERT_TRUE(in.good());
  std::stringstream ss;
  ss << in.rdbuf();
  nlohmann::json fixture = nlohmann::json::parse(ss.str());
  ASSERT_GE(fixture["cases"].size(), 10u);
  for (const auto& c : fixture["cases"]) {
    SCOPED_TRACE(c["name"].get<std::string>());
    const std::string file = c["file"], tokenizer_dir = c["tokenizer"];
    if (!std::filesystem::exists(file)) FAIL() << "shared data not found (../shared beside the checkout): " << file;
    std::unique_ptr<Tokenizer> tok = Tokenizer::load(tokenizer_dir);
    DatasetOptions opt;
    opt.format = parse_dataset_format(c["format"]);
    opt.chat_template = c["chat_template"];
    opt.max_rows = c["max_rows"];
    opt.model_max_length = c["model_max_length"];
    opt.train_on_inputs = c["train_on_inputs"];
    Dataset ds = load_dataset(file, tok.get(), opt, tok->vocab_size());
    EXPECT_EQ(ds.stats.rows_skipped, c["rows_skipped"].get<int64_t>());
    EXPECT_EQ(ds.stats.rows_truncated, c["rows_truncated"].get<int64_t>());
    ASSERT_EQ(ds.rows.size(), c["rows"].size());
    for (size_t r = 0; r < ds.rows.size(); ++r) {
      const auto& want = c["rows"][r];
      std::vector<int32_t> ids = want["input_ids"].get<std::vector<int32_t>>();
      std::vector<int32_t> labels(ids.size(), kIgnoreIndex);
      for (const auto& span : want["trained_spans"]) {
        for (int64_t i = span[0]; i < span[1].get<int64_t>(); ++i) labels[i] = ids[i];
      }
      const Example& got = ds.rows[r];
      auto first_diff = [](const std::vector<int32_t>& a, const std::vector<int32_t>& b) {
        size_t i = 0;
        while (i < a.size() && i < b.size() && a[i] == b[i]) ++i;
        return i;
      };
      size_t d = first_diff(got.input_ids, ids);
      EXPECT_EQ(got.input_ids, ids) << "row " << r << ": sizes " << got.input_ids.size() << " vs "
                                    << ids.size() << ", first difference at " << d << ": "
                                    << (d < got.input_ids.size() ? got.input_ids[d] : -1) << " vs "
                                    << (d < ids.size() ? ids[d] : -1);
      d = first_diff(got.labels, labels);
      EXPECT_EQ(got.labels, labels) << "row " << r << ": first label difference at " << d << ": "
                                    << (d < got.labels.size() ? got.labels[d] : -1) << " vs "
                                    << (d < labels.size() ? labels[d] : -1);
    }
  }
}

}  // namespace
}  // namespace lt
