// Dataset loader with a byte-level fake tokenizer: formats, label masks, truncation, packing,
// error messages, and every shipped dataset file loading without a crash.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "data/chat_template.h"
#include "data/dataset.h"
#include "ops/common.h"

namespace lt {
namespace {

// One id per byte; "<s>" = 256 (BOS) and "</s>" = 257 (EOS) when they appear in the text.
class ByteTokenizer : public Tokenizer {
 public:
  explicit ByteTokenizer(bool adds_bos = true) : adds_bos_(adds_bos) {}
  std::vector<int32_t> encode(std::string_view text, bool add_special_tokens) const override {
    std::vector<int32_t> ids;
    if (add_special_tokens && adds_bos_) ids.push_back(kBos);
    for (size_t i = 0; i < text.size();) {
      if (text.substr(i, 3) == "<s>") {
        ids.push_back(kBos);
        i += 3;
      } else if (text.substr(i, 4) == "</s>") {
        ids.push_back(kEos);
        i += 4;
      } else {
        ids.push_back(static_cast<unsigned char>(text[i++]));
      }
    }
    return ids;
  }
  std::string decode(const std::vector<int32_t>& ids, bool skip_special) const override {
    std::string s;
    for (int32_t id : ids) {
      if (id < 256)
        s += static_cast<char>(id);
      else if (!skip_special)
        s += id == kBos ? "<s>" : "</s>";
    }
    return s;
  }
  int64_t vocab_size() const override { return 258; }
  std::optional<int32_t> token_to_id(std::string_view) const override { return std::nullopt; }
  std::string id_to_token(int32_t id) const override { return decode({id}, false); }
  std::optional<int32_t> bos_id() const override { return kBos; }
  std::optional<int32_t> eos_id() const override { return kEos; }
  std::optional<int32_t> pad_id() const override { return std::nullopt; }
  std::optional<int32_t> unk_id() const override { return std::nullopt; }
  std::string bos_token() const override { return "<s>"; }
  std::string eos_token() const override { return "</s>"; }
  bool adds_bos() const override { return adds_bos_; }
  bool adds_eos() const override { return false; }
  const std::string& chat_template() const override { return template_; }

  static constexpr int32_t kBos = 256, kEos = 257;
  std::string template_;

 private:
  bool adds_bos_;
};

std::vector<int32_t> bytes(const std::string& s) {
  std::vector<int32_t> ids;
  for (unsigned char c : s) ids.push_back(c);
  return ids;
}

class DatasetTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("lt_dataset_test_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::filesystem::path write(const std::string& name, const std::string& content) {
    std::filesystem::path p = dir_ / name;
    std::ofstream(p, std::ios::binary) << content;
    return p;
  }

  // The UserError message of loading `path`, or "" when it loads.
  std::string error_of(const std::filesystem::path& path, const DatasetOptions& opt = {},
                       int64_t vocab_size = 0) {
    try {
      load_dataset(path, &tok_, opt, vocab_size);
    } catch (const UserError& e) {
      return e.what();
    }
    return "";
  }

  std::filesystem::path dir_;
  ByteTokenizer tok_;
};

// Prints the first position where two id vectors differ.
::testing::AssertionResult same_ids(const std::vector<int32_t>& got,
                                    const std::vector<int32_t>& want) {
  if (got == want) return ::testing::AssertionSuccess();
  size_t i = 0;
  while (i < got.size() && i < want.size() && got[i] == want[i]) ++i;
  return ::testing::AssertionFailure()
         << "sizes " << got.size() << " vs " << want.size() << ", first difference at " << i << ": "
         << (i < got.size() ? std::to_string(got[i]) : "end") << " vs "
         << (i < want.size() ? std::to_string(want[i]) : "end");
}

TEST(DatasetFormat, Names) {
  EXPECT_EQ(parse_dataset_format("alpaca"), DatasetFormat::kAlpaca);
  EXPECT_EQ(parse_dataset_format("messages"), DatasetFormat::kMessages);
  EXPECT_EQ(parse_dataset_format("sharegpt"), DatasetFormat::kShareGpt);
  EXPECT_EQ(parse_dataset_format("completion"), DatasetFormat::kCompletion);
  EXPECT_EQ(parse_dataset_format("text"), DatasetFormat::kText);
  EXPECT_EQ(parse_dataset_format("tokenized"), DatasetFormat::kTokenized);
  EXPECT_EQ(parse_dataset_format("auto"), DatasetFormat::kAuto);
  for (const char* n : {"alpaca", "messages", "sharegpt", "completion", "text", "tokenized"})
    EXPECT_EQ(dataset_format_name(parse_dataset_format(n)), n);
  EXPECT_THROW(parse_dataset_format("alpacca"), UserError);
}

TEST_F(DatasetTest, AlpacaMatchesStanfordPrompts) {
  auto p = write("a.json", R"([
    {"instruction": "Add.", "input": "2 and 3", "output": "5"},
    {"instruction": "Greet.", "input": "", "output": "Hello"},
    {"instruction": "Greet.", "output": "Hi"}
  ])");
  Dataset ds = load_dataset(p, &tok_, {});
  EXPECT_EQ(ds.format, DatasetFormat::kAlpaca);
  ASSERT_EQ(ds.rows.size(), 3u);
  const std::string with_input =
      "Below is an instruction that describes a task, paired with an input that provides "
      "further context. Write a response that appropriately completes the request.\n\n"
      "### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:";
  const std::string no_input =
      "Below is an instruction that describes a task. Write a response that appropriately "
      "completes the request.\n\n### Instruction:\nGreet.\n\n### Response:";
  struct Want {
    std::string prompt, output;
  } want[] = {{with_input, "5"}, {no_input, "Hello"}, {no_input, "Hi"}};
  for (int r = 0; r < 3; ++r) {
    std::vector<int32_t> ids = {ByteTokenizer::kBos};
    for (int32_t b : bytes(want[r].prompt + want[r].output)) ids.push_back(b);
    ids.push_back(ByteTokenizer::kEos);
    EXPECT_TRUE(same_ids(ds.rows[r].input_ids, ids)) << "row " << r;
    std::vector<int32_t> labels = ids;
    std::fill(labels.begin(), labels.begin() + 1 + want[r].prompt.size(), kIgnoreIndex);
    EXPECT_TRUE(same_ids(ds.rows[r].labels, labels)) << "row " << r;
    EXPECT_TRUE(ds.rows[r].doc_ids.empty());
  }
  EXPECT_EQ(ds.stats.rows_read, 3);
  EXPECT_EQ(ds.stats.rows_kept, 3);

  DatasetOptions all;
  all.train_on_inputs = true;
  Dataset ds2 = load_dataset(p, &tok_, all);
  for (const Example& ex : ds2.rows) EXPECT_TRUE(same_ids(ex.labels, ex.input_ids));
}

TEST_F(DatasetTest, AlpacaEmptyOutputIsACountedSkip) {
  auto p = write("a.jsonl",
                 "{\"instruction\": \"x\", \"output\": \"\"}\n\n"
                 "{\"instruction\": \"y\", \"output\": \"ok\"}\n");
  Dataset ds = load_dataset(p, &tok_, {});
  EXPECT_EQ(ds.rows.size(), 1u);
  EXPECT_EQ(ds.stats.rows_read, 2);
  EXPECT_EQ(ds.stats.rows_skipped, 1);
  ASSERT_EQ(ds.stats.skip_reasons.size(), 1u);
  EXPECT_NE(ds.stats.skip_reasons[0].find(":1: row 1"), std::string::npos)
      << ds.stats.skip_reasons[0];
  ASSERT_EQ(ds.stats.skip_counts.size(), 1u);
  EXPECT_EQ(ds.stats.skip_counts[0].second, 1);
}

TEST_F(DatasetTest, CompletionMasksThePrompt) {
  auto p = write("c.jsonl", R"({"prompt": "Q: 1+1?", "completion": " A: 2"})");
  Dataset ds = load_dataset(p, &tok_, {});
  EXPECT_EQ(ds.format, DatasetFormat::kCompletion);
  std::vector<int32_t> ids = {ByteTokenizer::kBos};
  for (int32_t b : bytes("Q: 1+1? A: 2")) ids.push_back(b);
  ids.push_back(ByteTokenizer::kEos);
  EXPECT_TRUE(same_ids(ds.rows[0].input_ids, ids));
  std::vector<int32_t> labels = ids;
  std::fill(labels.begin(), labels.begin() + 8, kIgnoreIndex);
  EXPECT_TRUE(same_ids(ds.rows[0].labels, labels));
}

// The trained tokens of a byte-tokenized row, as a string.
std::string trained_text(const Example& ex) {
  std::string s;
  for (size_t i = 0; i < ex.labels.size(); ++i) {
    if (ex.labels[i] == kIgnoreIndex) {
      if (!s.empty() && s.back() != '|') s += '|';
      continue;
    }
    EXPECT_EQ(ex.labels[i], ex.input_ids[i]) << "at " << i;
    s += ex.labels[i] == ByteTokenizer::kEos   ? std::string("</s>")
         : ex.labels[i] == ByteTokenizer::kBos ? std::string("<s>")
                                               : std::string(1, static_cast<char>(ex.labels[i]));
  }
  return s;
}

std::string text_of(const Example& ex) {
  std::string s;
  for (int32_t id : ex.input_ids)
    s += id == ByteTokenizer::kEos   ? "</s>"
         : id == ByteTokenizer::kBos ? "<s>"
                                     : std::string(1, char(id));
  return s;
}

TEST_F(DatasetTest, MessagesTrainOnlyAssistantTurnsChatml) {
  auto p = write(
      "m.jsonl",
      R"({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},)"
      R"( {"role": "assistant", "content": "yo"}, {"role": "user", "content": [{"type": "text", "text": "q"}, {"type": "text", "text": "2"}]},)"
      R"( {"role": "assistant", "content": "ok"}]})");
  DatasetOptions opt;
  opt.chat_template = "chatml";
  Dataset ds = load_dataset(p, &tok_, opt);
  EXPECT_EQ(ds.format, DatasetFormat::kMessages);
  ASSERT_EQ(ds.rows.size(), 1u);
  EXPECT_EQ(text_of(ds.rows[0]),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
            "<|im_start|>assistant\nyo<|im_end|>\n<|im_start|>user\nq2<|im_end|>\n"
            "<|im_start|>assistant\nok<|im_end|>\n");
  // Each reply plus the end-of-turn the template writes after it.
  EXPECT_EQ(trained_text(ds.rows[0]), "yo<|im_end|>\n|ok<|im_end|>\n");

  opt.train_on_inputs = true;
  Dataset all = load_dataset(p, &tok_, opt);
  EXPECT_TRUE(same_ids(all.rows[0].labels, all.rows[0].input_ids));
}

TEST_F(DatasetTest, ShareGptLlama2AndLossWeights) {
  auto p = write("s.json", R"([{"conversations": [
      {"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
      {"from": "human", "value": "c"}, {"from": "gpt", "value": "d"}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "value": "u"}], "loss_weight": 1.0},
                  {"role": "assistant", "content": [{"type": "text", "value": "v"}], "loss_weight": 0.0}]}
  ])");
  DatasetOptions opt;
  opt.chat_template = "llama2";
  opt.format = DatasetFormat::kShareGpt;
  // Row 2 has no 'conversations': a named error.
  std::string err = error_of(p, opt);
  EXPECT_NE(err.find("row 2: missing field 'conversations'"), std::string::npos) << err;
  opt.max_rows = 1;
  Dataset ds = load_dataset(p, &tok_, opt);
  EXPECT_EQ(text_of(ds.rows[0]), "<s>[INST] a [/INST] b </s><s>[INST] c [/INST] d </s>");
  EXPECT_EQ(trained_text(ds.rows[0]), " b </s>| d </s>");

  // loss_weight overrides the role: the user turn is trained, the assistant turn is not.
  auto q = write(
      "w.jsonl",
      R"({"messages": [{"role": "user", "content": [{"type": "text", "value": "u"}], "loss_weight": 1.0},)"
      R"( {"role": "assistant", "content": [{"type": "text", "value": "v"}], "loss_weight": 0.0}]})");
  DatasetOptions mopt;
  mopt.chat_template = "llama2";
  Dataset w = load_dataset(q, &tok_, mopt);
  EXPECT_EQ(text_of(w.rows[0]), "<s>[INST] u [/INST] v </s>");
  EXPECT_EQ(trained_text(w.rows[0]), "<s>[INST] u [/INST]|");
}

TEST_F(DatasetTest, ToolCallsAndTemplateRejections) {
  auto p = write("t.json", R"([{"conversations": [
      {"from": "human", "value": "weather?"}, {"from": "function_call", "value": "{\"name\": \"w\"}"},
      {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "It is sunny."}],
      "tools": "[{\"name\": \"w\"}]"},
     {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]}])");
  DatasetOptions opt;
  opt.chat_template = "chatml";
  Dataset ds = load_dataset(p, &tok_, opt);
  ASSERT_EQ(ds.rows.size(), 2u);
  EXPECT_EQ(trained_text(ds.rows[0]), "{\"name\": \"w\"}<|im_end|>\n|It is sunny.<|im_end|>\n");
  EXPECT_NE(text_of(ds.rows[0]).find("<|im_start|>tool\nsunny<|im_end|>"), std::string::npos);

  // Mistral's template raises on the tool role: that row is skipped and counted.
  opt.chat_template = "mistral";
  Dataset m = load_dataset(p, &tok_, opt);
  EXPECT_EQ(m.rows.size(), 1u);
  EXPECT_EQ(m.stats.rows_skipped, 1);
  ASSERT_FALSE(m.stats.skip_reasons.empty());
  EXPECT_NE(m.stats.skip_reasons[0].find("Conversation roles must alternate"), std::string::npos)
      << m.stats.skip_reasons[0];

  // Everything rejected: an empty dataset is an error naming the file.
  opt.max_rows = 1;
  std::string err = error_of(p, opt);
  EXPECT_NE(err.find(p.string() + ": no usable rows"), std::string::npos) << err;
}

TEST_F(DatasetTest, ChatTemplateResolution) {
  auto p = write(
      "m.jsonl",
      R"({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})");
  std::string err = error_of(p);  // the fake tokenizer has no chat template
  EXPECT_NE(err.find("--chat_template"), std::string::npos) << err;
  DatasetOptions opt;
  opt.chat_template = "no_such_template";
  err = error_of(p, opt);
  EXPECT_NE(err.find("no_such_template"), std::string::npos) << err;
  EXPECT_NE(err.find("llama3"), std::string::npos) << err;
  // A template file.
  opt.chat_template = write("t.jinja",
                            "{% for m in messages %}[{{ m.role }}]{{ m.content }}"
                            "{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}"
                            "{% endfor %}{% if add_generation_prompt %}[assistant]"
                            "{% endif %}\n")
                          .string();
  Dataset ds = load_dataset(p, &tok_, opt);
  EXPECT_EQ(text_of(ds.rows[0]), "[user]a[assistant]b</s>");
  EXPECT_EQ(trained_text(ds.rows[0]), "b</s>");
  // The tokenizer's own template.
  tok_.template_ = "{% for m in messages %}<{{ m.content }}>{% endfor %}";
  Dataset own = load_dataset(p, &tok_, {});
  EXPECT_EQ(text_of(own.rows[0]), "<a><b>");
  EXPECT_EQ(trained_text(own.rows[0]), "<b>");
}

TEST_F(DatasetTest, TextBlocksAndTxtFiles) {
  auto p = write("t.jsonl", "{\"text\": \"abcdef\"}\n{\"text\": \"gh\"}\n");
  DatasetOptions opt;
  opt.model_max_length = 4;
  Dataset ds = load_dataset(p, &tok_, opt);
  EXPECT_EQ(ds.format, DatasetFormat::kText);
  // <s>abcdef</s><s>gh</s> = 12 tokens -> 3 blocks of 4.
  ASSERT_EQ(ds.rows.size(), 3u);
  EXPECT_EQ(text_of(ds.rows[0]), "<s>abc");
  EXPECT_EQ(text_of(ds.rows[1]), "def</s>");
  EXPECT_EQ(text_of(ds.rows[2]), "<s>gh</s>");
  for (const Example& ex : ds.rows) EXPECT_TRUE(same_ids(ex.labels, ex.input_ids));

  auto t = write("plain.txt", "line one\nline two\n");
  opt.model_max_length = 0;
  Dataset txt = load_dataset(t, &tok_, opt);
  ASSERT_EQ(txt.rows.size(), 1u);
  EXPECT_EQ(text_of(txt.rows[0]), "<s>line one\nline two\n</s>");
  opt.format = DatasetFormat::kAlpaca;
  EXPECT_NE(error_of(t, opt).find(".txt"), std::string::npos);
}

TEST_F(DatasetTest, PreTokenized) {
  auto p = write("p.jsonl",
                 "{\"input_ids\": [1, 2, 3]}\n"
                 "{\"input_ids\": [4, 5], \"labels\": [-100, 5]}\n");
  Dataset ds = load_dataset(p, nullptr, {}, 10);
  EXPECT_EQ(ds.format, DatasetFormat::kTokenized);
  ASSERT_EQ(ds.rows.size(), 2u);
  EXPECT_TRUE(same_ids(ds.rows[0].labels, {1, 2, 3}));
  EXPECT_TRUE(same_ids(ds.rows[1].labels, {kIgnoreIndex, 5}));
  std::string err =
      error_of(write("bad.jsonl", "{\"input_ids\": [1]}\n{\"input_ids\": [1, 12]}\n"), {}, 10);
  EXPECT_NE(err.find(":2: row 2"), std::string::npos) << err;
  EXPECT_NE(err.find("input_ids[1] = 12"), std::string::npos) << err;
  err = error_of(write("neg.jsonl", "{\"input_ids\": [-1]}\n"));
  EXPECT_NE(err.find("= -1"), std::string::npos) << err;
  err = error_of(write("len.jsonl", "{\"input_ids\": [1, 2], \"labels\": [1]}\n"));
  EXPECT_NE(err.find("'labels' has 1 entries"), std::string::npos) << err;
  err = error_of(write("typ.jsonl", "{\"input_ids\": [1, \"x\"]}\n"));
  EXPECT_NE(err.find("input_ids[1] must be an integer"), std::string::npos) << err;
  // The model's vocabulary also bounds tokenizer output (the fake tokenizer has 258 ids).
  err = error_of(write("v.jsonl", "{\"text\": \"</s>\"}\n"), {}, 257);
  EXPECT_NE(err.find("token id 257"), std::string::npos) << err;
}

TEST_F(DatasetTest, TruncationAndPacking) {
  std::string rows;
  for (int i = 0; i < 5; ++i)
    rows += "{\"prompt\": \"p" + std::to_string(i) + "\", \"completion\": \"" +
            std::string(static_cast<size_t>(i) + 1, 'x') + "\"}\n";
  rows += "{\"prompt\": \"a long prompt that is cut\", \"completion\": \"y\"}\n";
  auto p = write("c.jsonl", rows);
  DatasetOptions opt;
  opt.model_max_length = 8;
  Dataset ds = load_dataset(p, &tok_, opt);
  // Row lengths: 1 + 2 + (i+1) + 1 = i+5 -> 5,6,7,8,9(truncated to 8); the last row's
  // prompt fills all 8 tokens, so nothing is left to train: skipped.
  ASSERT_EQ(ds.rows.size(), 5u);
  EXPECT_EQ(ds.stats.rows_truncated, 2);
  EXPECT_EQ(ds.stats.rows_skipped, 1);
  EXPECT_EQ(ds.rows[4].input_ids.size(), 8u);
  EXPECT_EQ(ds.rows[4].input_ids.back(), 'x');  // EOS cut off, as Stanford's truncation does

  opt.model_max_length = 13;
  opt.packing = true;
  Dataset packed = load_dataset(p, &tok_, opt);
  // Lengths 5,6,7,8,9 (none > 13) greedily: [5,6] [7] [8] [9]; the last row is 28 tokens,
  // truncated to 13 and trained on nothing: skipped.
  ASSERT_EQ(packed.rows.size(), 4u);
  EXPECT_TRUE(same_ids(packed.rows[0].doc_ids, {0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1}));
  EXPECT_TRUE(same_ids(packed.rows[1].doc_ids, std::vector<int32_t>(7, 0)));
  for (const Example& ex : packed.rows) {
    EXPECT_LE(ex.input_ids.size(), 13u);
    ASSERT_EQ(ex.labels.size(), ex.input_ids.size());
    for (size_t i = 0; i < ex.doc_ids.size(); ++i) {
      if (i == 0 || ex.doc_ids[i] != ex.doc_ids[i - 1]) {
        EXPECT_EQ(ex.labels[i], kIgnoreIndex) << "first token of a document at " << i;
      }
    }
  }
  // The second document's tokens keep their own labels: "x" + EOS of row 1 ("p1" + "xx").
  EXPECT_EQ(packed.rows[0].labels.back(), ByteTokenizer::kEos);
  opt.model_max_length = 0;
  EXPECT_NE(error_of(p, opt).find("--packing needs --model_max_length"), std::string::npos);
}

TEST_F(DatasetTest, MalformedJsonNamesLineAndColumn) {
  std::string err =
      error_of(write("bad.json", "[\n  {\"instruction\": \"a\",\n   \"output\": tru}\n]"));
  EXPECT_NE(err.find("bad.json:3:17: malformed JSON"), std::string::npos) << err;
  err = error_of(write("bad.jsonl", "{\"text\": \"a\"}\n\n{\"text\": \"b\",}\n"));
  EXPECT_NE(err.find("bad.jsonl:3:14: malformed JSON"), std::string::npos) << err;
  err = error_of(write("utf.jsonl", "{\"text\": \"ok\"}\n{\"text\": \"a\xff\"}\n"));
  EXPECT_NE(err.find("utf.jsonl:2:"), std::string::npos) << err;
  EXPECT_NE(err.find("UTF-8"), std::string::npos) << err;
  err = error_of(write("utf.txt", "fine\n\xc3\x28"));
  EXPECT_NE(err.find("invalid UTF-8 at byte 5"), std::string::npos) << err;
}

TEST_F(DatasetTest, FieldErrorsNameRowAndField) {
  std::string err = error_of(write("a.json", R"([{"instruction": "a", "output": "b"},
                                                 {"instruction": "a"}])"));
  EXPECT_NE(err.find("a.json: row 2: missing field 'output'"), std::string::npos) << err;
  err = error_of(write("b.json", R"([{"instruction": "a", "output": 3}])"));
  EXPECT_NE(err.find("row 1: field 'output' must be a string"), std::string::npos) << err;
  err = error_of(write("c.json", R"([{"foo": 1}])"));
  EXPECT_NE(err.find("cannot detect the dataset format"), std::string::npos) << err;
  EXPECT_NE(err.find("foo"), std::string::npos) << err;
  err = error_of(write("d.json", R"({"instruction": "a"})"));
  EXPECT_NE(err.find("expected a JSON array"), std::string::npos) << err;
  err = error_of(write("e.csv", "a,b"));
  EXPECT_NE(err.find("unsupported dataset file extension"), std::string::npos) << err;
  err = error_of(write("f.json", "[]"));
  EXPECT_NE(err.find("no rows"), std::string::npos) << err;
  err = error_of(dir_ / "missing.json");
  EXPECT_NE(err.find("cannot open"), std::string::npos) << err;
  DatasetOptions opt;
  opt.chat_template = "chatml";
  err = error_of(write("g.jsonl", R"({"messages": [{"role": "robot", "content": "x"}]})"), opt);
  EXPECT_NE(err.find("messages[0].role is 'robot'"), std::string::npos) << err;
  err = error_of(
      write("h.jsonl", R"({"messages": [{"role": "user", "content": [{"type": "image"}]}]})"), opt);
  EXPECT_NE(err.find("only text parts"), std::string::npos) << err;
}

// Every shipped file loads with the fake tokenizer (auto format) without a crash.
TEST_F(DatasetTest, ShippedFilesLoad) {
  const std::string data = "../shared/data/";
  struct Case {
    std::string file, tmpl;
    DatasetFormat format;
  } cases[] = {
      {"instructions/llamafactory_alpaca_en_demo.json", "", DatasetFormat::kAlpaca},
      {"instructions/llamafactory_alpaca_zh_demo.json", "", DatasetFormat::kAlpaca},
      {"instructions/fastchat_alpaca_data_cleaned_1000.json", "", DatasetFormat::kAlpaca},
      {"conversations/fastchat_dummy_conversation.json", "llama2", DatasetFormat::kShareGpt},
      {"conversations/llamafactory_glaive_toolcall_en_demo.json", "chatml",
       DatasetFormat::kShareGpt},
      {"conversations/llamafactory_glaive_toolcall_en_demo.json", "llama3",
       DatasetFormat::kShareGpt},
      {"conversations/llamafactory_v1_sft_demo.jsonl", "zephyr", DatasetFormat::kMessages},
      {"conversations/llamafactory_v1_sft_demo.jsonl", "mistral", DatasetFormat::kMessages},
  };
  for (const Case& c : cases) {
    std::filesystem::path path = data + c.file;
    if (!std::filesystem::exists(path)) FAIL() << "shared data not found (../shared beside the checkout): " << path;
    DatasetOptions opt;
    opt.chat_template = c.tmpl;
    opt.model_max_length = 1024;
    Dataset ds = load_dataset(path, &tok_, opt, tok_.vocab_size());
    SCOPED_TRACE(c.file + " " + c.tmpl);
    EXPECT_EQ(ds.format, c.format);
    EXPECT_GT(ds.stats.rows_read, 250);
    EXPECT_EQ(ds.stats.rows_kept + ds.stats.rows_skipped, ds.stats.rows_read);
    EXPECT_GT(ds.stats.rows_kept, ds.stats.rows_read / 2);
    for (const Example& ex : ds.rows) {
      ASSERT_EQ(ex.labels.size(), ex.input_ids.size());
      ASSERT_LE(ex.input_ids.size(), 1024u);
      ASSERT_TRUE(std::any_of(ex.labels.begin(), ex.labels.end(),
                              [](int32_t l) { return l != kIgnoreIndex; }));
    }
  }
}

}  // namespace
}  // namespace lt
