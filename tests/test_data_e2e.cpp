// End to end with real data: every shared instruction and conversation file, with the Llama-2 and
// GPT-2 tokenizers, through `longtune init`, `prepare` and `train` (a few rows, two steps), and
// the train run reusing prepare's cache. Also the dataset-side bad-input messages of the CLI.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "cli_runner.h"

namespace lt {
namespace {

namespace fs = std::filesystem;
using lt::testing::run_cli;

const fs::path kShared = "../shared/data";

bool has(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

class DataE2E : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = fs::temp_directory_path() / ("lt_data_e2e_" + std::to_string(::getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  static void TearDownTestSuite() { fs::remove_all(dir_); }

  // A tiny random model folder with the shared tokenizer `name` (gpt2 or llama2) copied in.
  static fs::path model_for(const std::string& name, int64_t vocab) {
    const fs::path model = dir_ / ("model_" + name);
    if (fs::exists(model / "tokenizer.json")) return model;
    auto r = run_cli({"init", "--preset", "tiny", "--vocab_size", std::to_string(vocab),
                      "--num_hidden_layers", "2", "--output_dir", model.string()});
    EXPECT_EQ(r.rc, 0) << r.err;
    for (const char* f : {"tokenizer.json", "tokenizer_config.json"})
      fs::copy_file(kShared / "tokenizers" / name / f, model / f);
    return model;
  }

  static fs::path dir_;
};
fs::path DataE2E::dir_;

struct Case {
  std::string file, tokenizer;
  int64_t vocab;
  std::string chat_template;  // the shared tokenizers carry none
};

TEST_F(DataE2E, PrepareAndTrainEverySharedFile) {
  const std::vector<std::string> files = {
      "instructions/fastchat_alpaca_data_cleaned_1000.json",
      "instructions/llamafactory_alpaca_en_demo.json",
      "instructions/llamafactory_alpaca_zh_demo.json",
      "conversations/fastchat_dummy_conversation.json",
      "conversations/llamafactory_glaive_toolcall_en_demo.json",
      "conversations/llamafactory_v1_sft_demo.jsonl",
  };
  // Templates that accept every role these files use (tool calls and observations included).
  const std::map<std::string, std::map<std::string, std::string>> templates = {
      {"llama2",
       {{"fastchat_dummy", "llama2"}, {"glaive", "llama3"}, {"v1_sft", "zephyr"}}},
      {"gpt2", {{"fastchat_dummy", "chatml"}, {"glaive", "chatml"}, {"v1_sft", "mistral"}}}};
  int cases = 0;
  for (const auto& [tok, vocab] : std::vector<std::pair<std::string, int64_t>>{
           {"llama2", 32000}, {"gpt2", 50257}}) {
    ASSERT_TRUE(fs::exists(kShared / "tokenizers" / tok / "tokenizer.json"))
        << "shared data not found (../shared beside the checkout)";
    const fs::path model = model_for(tok, vocab);
    for (const std::string& f : files) {
      const fs::path data = kShared / f;
      ASSERT_TRUE(fs::exists(data)) << "shared data not found (../shared beside the checkout): "
                                    << data;
      SCOPED_TRACE(f + " with " + tok);
      std::string tmpl;
      for (const auto& [key, name] : templates.at(tok))
        if (has(f, key)) tmpl = name;
      std::vector<std::string> data_flags = {"--data_path",         data.string(),
                                             "--model_max_length",  "96",
                                             "--max_train_samples", "6",
                                             "--cache_dir",         (dir_ / "cache").string()};
      if (!tmpl.empty()) data_flags.insert(data_flags.end(), {"--chat_template", tmpl});
      std::vector<std::string> prep = {"prepare", "--model_name_or_path", model.string(), "--dump",
                                       (dir_ / "dump.jsonl").string()};
      prep.insert(prep.end(), data_flags.begin(), data_flags.end());
      auto p = run_cli(prep);
      ASSERT_EQ(p.rc, 0) << p.err;
      EXPECT_TRUE(has(p.out, "data: wrote cache")) << p.out;
      // Every dumped row is a valid training row: ids in the vocabulary, something trained.
      std::ifstream dump(dir_ / "dump.jsonl");
      int rows = 0;
      for (std::string line; std::getline(dump, line); ++rows) {
        auto j = nlohmann::json::parse(line);
        auto ids = j["input_ids"].get<std::vector<int32_t>>();
        auto labels = j["labels"].get<std::vector<int32_t>>();
        ASSERT_EQ(ids.size(), labels.size());
        ASSERT_LE(ids.size(), 96u);
        for (int32_t id : ids) ASSERT_TRUE(id >= 0 && id < vocab) << id;
        EXPECT_TRUE(std::any_of(labels.begin(), labels.end(), [](int32_t l) { return l >= 0; }));
      }
      EXPECT_GE(rows, 1);

      const fs::path out = dir_ / ("out_" + std::to_string(cases++));
      std::vector<std::string> train = {"train",          "--model_name_or_path", model.string(),
                                        "--output_dir",   out.string(),
                                        "--max_steps",    "2",
                                        "--per_device_train_batch_size", "2",
                                        "--learning_rate", "1e-3",
                                        "--logging_steps", "1",
                                        "--report_to",    "none",
                                        "--save_strategy", "no",
                                        "--disable_tqdm", "True"};
      train.insert(train.end(), data_flags.begin(), data_flags.end());
      auto t = run_cli(train);
      ASSERT_EQ(t.rc, 0) << t.out << t.err;
      EXPECT_TRUE(has(t.out, "data: reusing cache")) << t.out;
      // Two logged steps with a finite loss near ln(V) for a random model.
      std::ifstream metrics(out / "metrics.jsonl");
      int steps = 0;
      for (std::string line; std::getline(metrics, line);) {
        auto j = nlohmann::json::parse(line);
        if (!j.contains("loss")) continue;
        const double loss = j["loss"].get<double>();
        EXPECT_TRUE(std::isfinite(loss) && loss > 0.5 * std::log(vocab) &&
                    loss < 1.5 * std::log(vocab))
            << "loss " << loss << " vs ln(V) " << std::log(vocab);
        ++steps;
      }
      EXPECT_EQ(steps, 2) << "metrics.jsonl of " << out;
    }
  }
  EXPECT_EQ(cases, 12);
}

// The issue's list of bad dataset inputs, through the CLI: one clear line, exit code 1.
TEST_F(DataE2E, BadInputMessages) {
  ASSERT_TRUE(fs::exists(kShared / "tokenizers/llama2/tokenizer.json"))
      << "shared data not found (../shared beside the checkout)";
  const fs::path model = model_for("llama2", 32000);
  auto write = [&](const std::string& name, const std::string& content) {
    std::ofstream(dir_ / name, std::ios::binary) << content;
    return (dir_ / name).string();
  };
  auto prepare = [&](const std::string& data, std::vector<std::string> extra = {}) {
    std::vector<std::string> args = {"prepare", "--model_name_or_path", model.string(),
                                     "--data_path", data, "--cache_dir",
                                     (dir_ / "cache").string()};
    args.insert(args.end(), extra.begin(), extra.end());
    return run_cli(args);
  };
  struct Bad {
    const char* what;
    std::string file;
    std::vector<std::string> extra;
    std::vector<std::string> expect;  // substrings of the one error line
  };
  const std::vector<Bad> bad = {
      {"malformed JSON", write("bad.json", "[\n {\"instruction\": \"a\", \"output\": tru}\n]"), {},
       {"bad.json:2:", "malformed JSON"}},
      {"malformed JSONL", write("bad.jsonl", "{\"text\": \"a\"}\n{\"text\": \"b\",}\n"), {},
       {"bad.jsonl:2:", "malformed JSON"}},
      {"missing field", write("missing.json", R"([{"instruction": "a"}])"),
       {"--dataset_format", "alpaca"}, {"row 1", "missing field 'output'"}},
      {"mistyped field", write("typed.json", R"([{"instruction": "a", "output": 7}])"), {},
       {"row 1", "'output' must be a string", "number"}},
      {"invalid UTF-8", write("utf8.jsonl", "{\"text\": \"ok\"}\n{\"text\": \"a\xc3\x28\"}\n"),
       {}, {"utf8.jsonl:2:", "invalid UTF-8"}},
      {"only empty strings", write("empty.json", R"([{"instruction": "a", "output": ""}])"), {},
       {"no usable rows", "empty response"}},
      {"unknown template",
       write("chat.jsonl", R"({"messages": [{"role": "user", "content": "hi"}]})" "\n"),
       {"--chat_template", "vicuna"}, {"--chat_template 'vicuna'", "chatml"}},
      {"no template in the tokenizer",
       write("chat2.jsonl", R"({"messages": [{"role": "user", "content": "hi"}]})" "\n"), {},
       {"no chat_template", "--chat_template"}},
      {"unknown format", write("fmt.json", R"([{"text": "a"}])"), {"--dataset_format", "csv"},
       {"--dataset_format 'csv' is unknown", "alpaca"}},
      {"unknown extension", write("data.csv", "a,b\n"), {}, {"data.csv", "'.csv'", ".jsonl"}},
      {"missing file", (dir_ / "nope.json").string(), {}, {"nope.json", "cannot open"}},
  };
  for (const Bad& b : bad) {
    SCOPED_TRACE(b.what);
    auto r = prepare(b.file, b.extra);
    EXPECT_EQ(r.rc, 1) << r.out;
    EXPECT_TRUE(has(r.err, "longtune: error: ")) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    for (const std::string& e : b.expect) EXPECT_TRUE(has(r.err, e)) << r.err;
  }

  // Rows longer than model_max_length are truncated and counted, not dropped.
  const std::string long_rows = write(
      "long.json", R"([{"instruction": "Repeat.", "output": ")" + std::string(400, 'x') +
                       R"("}, {"instruction": "Hi", "output": "Hello"}])");
  auto r = prepare(long_rows, {"--model_max_length", "64", "--dump", (dir_ / "long.jsonl").string()});
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_TRUE(has(r.out, "1 truncated to 64 tokens")) << r.out;
  std::ifstream dump(dir_ / "long.jsonl");
  std::string line;
  ASSERT_TRUE(std::getline(dump, line));
  EXPECT_EQ(nlohmann::json::parse(line)["input_ids"].size(), 64u);

  // A tokenizer.json with an unsupported component names it.
  fs::create_directories(dir_ / "unigram");
  std::ofstream(dir_ / "unigram" / "tokenizer.json")
      << R"({"model": {"type": "Unigram", "vocab": [["a", 0.0]]}})";
  r = run_cli({"prepare", "--tokenizer", (dir_ / "unigram").string(), "--data_path", long_rows,
               "--cache_dir", (dir_ / "cache").string()});
  EXPECT_EQ(r.rc, 1);
  EXPECT_TRUE(has(r.err, "Unigram")) << r.err;
  EXPECT_TRUE(has(r.err, "model")) << r.err;
  std::ofstream(dir_ / "unigram" / "tokenizer.json")
      << R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
             "pre_tokenizer": {"type": "BertPreTokenizer"}})";
  r = run_cli({"prepare", "--tokenizer", (dir_ / "unigram").string(), "--data_path", long_rows,
               "--cache_dir", (dir_ / "cache").string()});
  EXPECT_EQ(r.rc, 1);
  EXPECT_TRUE(has(r.err, "pre_tokenizer")) << r.err;
  EXPECT_TRUE(has(r.err, "BertPreTokenizer")) << r.err;
}

}  // namespace
}  // namespace lt
