// Exactness of the Hugging Face tokenizers against ids and decoded text recorded by the real
// libraries (transformers 4.57.1 vectors; tokenizers 0.23.3 corpus from
// tools/make_tokenizer_fixtures.py), and UserErrors on bad tokenizer files.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <tuple>

#include "cli/cmd_tokenize.h"
#include "core/error.h"
#include "data/tokenizer.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

const fs::path kRoot = LT_SOURCE_DIR;
const fs::path kShared = kRoot / ".." / "shared" / "data" / "tokenizers";
const fs::path kFixtures = kRoot / "tests" / "fixtures" / "tokenizer";

json read_json(const fs::path& p) {
  std::ifstream in(p);
  EXPECT_TRUE(in.good()) << "cannot open " << p;
  return json::parse(in);
}

// JSON-quoted text for messages (invalid UTF-8 from a cut shown as U+FFFD).
std::string quoted(const std::string& s) {
  return json(s).dump(-1, ' ', false, json::error_handler_t::replace);
}

std::string ids_str(const std::vector<int32_t>& ids) { return json(ids).dump(); }

// First index where a and b differ (or the shorter length).
size_t first_diff(const std::vector<int32_t>& a, const std::vector<int32_t>& b) {
  size_t k = 0;
  while (k < a.size() && k < b.size() && a[k] == b[k]) ++k;
  return k;
}

void expect_same_ids(const std::vector<int32_t>& got, const std::vector<int32_t>& want,
                     const std::string& label, int* failures) {
  if (got == want) return;
  ++*failures;
  if (*failures > 10) return;  // enough detail
  size_t k = first_diff(got, want);
  ADD_FAILURE() << label << ": ids differ at index " << k << " (got "
                << (k < got.size() ? std::to_string(got[k]) : "end") << ", want "
                << (k < want.size() ? std::to_string(want[k]) : "end") << ")\n  got  "
                << ids_str(got) << "\n  want " << ids_str(want);
}

// The transformers 4.57.1 vectors: 83 multilingual texts, ids with special tokens added.
void check_vectors(const std::string& tokenizer_dir, const std::string& vector_file) {
  auto tokenizer = lt::Tokenizer::load(kShared / tokenizer_dir);
  json inputs = read_json(kShared / "vectors" / "inputs.json");
  json vectors = read_json(kShared / "vectors" / vector_file);
  std::map<std::string, std::string> text_of;
  for (const auto& e : inputs) text_of[e["id"]] = e["text"];
  int failures = 0, cases = 0;
  for (const auto& e : vectors["entries"]) {
    const std::string id = e["id"];
    ASSERT_TRUE(text_of.count(id)) << id;
    const std::string& text = text_of[id];
    auto want = e["input_ids"].get<std::vector<int32_t>>();
    expect_same_ids(tokenizer->encode(text, true), want, id + " encode", &failures);
    std::string with = tokenizer->decode(want, false), skip = tokenizer->decode(want, true);
    if (with != e["decoded_with_special"].get<std::string>()) {
      ++failures;
      ADD_FAILURE() << id << " decode(with special): got '" << with << "' want '"
                    << e["decoded_with_special"].get<std::string>() << "'";
    }
    if (skip != e["decoded_skip_special"].get<std::string>()) {
      ++failures;
      ADD_FAILURE() << id << " decode(skip special): got '" << skip << "' want '"
                    << e["decoded_skip_special"].get<std::string>() << "'";
    }
    ++cases;
  }
  EXPECT_EQ(cases, 83);
  EXPECT_EQ(failures, 0) << failures << " of " << cases << " cases failed";
}

TEST(TokenizerVectors, Gpt2Multilingual) { check_vectors("gpt2", "gpt2_multilingual.json"); }
TEST(TokenizerVectors, TinyLlamaMultilingual) {
  check_vectors("llama2", "tinyllama_multilingual.json");
}

// Generated corpus: {"tokenizer": dir, "cases": [{"text", "ids", ["ids_special"], ["decoded"],
// ["decoded_skip"]}]}.
void check_corpus(const std::string& name) {
  fs::path file = kFixtures / ("corpus_" + name + ".json");
  ASSERT_TRUE(fs::exists(file)) << file;
  json corpus = read_json(file);
  std::string dir = corpus["tokenizer"];
  fs::path tok_path = dir.rfind("fixtures:", 0) == 0 ? kFixtures / dir.substr(9) : kShared / dir;
  auto tokenizer = lt::Tokenizer::load(tok_path);
  int failures = 0, cases = 0, undecoded = 0;
  for (const auto& c : corpus["cases"]) {
    const std::string text = c["text"];
    std::string label = "case " + std::to_string(cases) + " " + quoted(text.substr(0, 60));
    auto want_ids = c["ids"].get<std::vector<int32_t>>();
    expect_same_ids(tokenizer->encode(text, false), want_ids, label + " (no special)", &failures);
    auto want_special = c.value("ids_special", want_ids);
    expect_same_ids(tokenizer->encode(text, true), want_special, label + " (special)", &failures);
    // Absent fields: decoded = text, decoded_skip = decoded; decode_of: "ids" or "none".
    std::string decode_of = c.value("decode_of", std::string("ids_special"));
    if (decode_of == "none") {
      ++cases;
      ++undecoded;
      continue;
    }
    const auto& decode_ids = decode_of == "ids" ? want_ids : want_special;
    std::string want_decoded = c.value("decoded", text);
    std::string want_skip = c.value("decoded_skip", want_decoded);
    for (auto [key, skip, want] : {std::tuple{"decoded", false, want_decoded},
                                   std::tuple{"decoded_skip", true, want_skip}}) {
      std::string got = tokenizer->decode(decode_ids, skip);
      if (got != want) {
        ++failures;
        if (failures <= 10)
          ADD_FAILURE() << label << " " << key << ": got " << quoted(got) << " want "
                        << quoted(want);
      }
    }
    ++cases;
  }
  EXPECT_GT(cases, 500);
  EXPECT_LT(undecoded, cases / 10) << "too few decodes recorded";
  EXPECT_EQ(failures, 0) << failures << " mismatches over " << cases << " cases of " << file;
}

TEST(TokenizerCorpus, Gpt2) { check_corpus("gpt2"); }
TEST(TokenizerCorpus, Llama2) { check_corpus("llama2"); }
TEST(TokenizerCorpus, Llama3Style) { check_corpus("llama3style"); }
TEST(TokenizerCorpus, Metaspace) { check_corpus("metaspace"); }

TEST(TokenizerConfig, SpecialTokens) {
  auto llama = lt::Tokenizer::load(kShared / "llama2");
  EXPECT_EQ(llama->bos_id(), 1);
  EXPECT_EQ(llama->eos_id(), 2);
  EXPECT_EQ(llama->unk_id(), 0);
  EXPECT_EQ(llama->pad_id(), std::nullopt);
  EXPECT_EQ(llama->bos_token(), "<s>");
  EXPECT_TRUE(llama->adds_bos());
  EXPECT_FALSE(llama->adds_eos());
  EXPECT_EQ(llama->vocab_size(), 32000);
  EXPECT_EQ(llama->token_to_id("<0x0A>"), 13);
  EXPECT_EQ(llama->id_to_token(13), "<0x0A>");
  auto gpt2 = lt::Tokenizer::load(kShared / "gpt2" / "tokenizer.json");
  EXPECT_EQ(gpt2->bos_id(), 50256);
  EXPECT_EQ(gpt2->eos_id(), 50256);
  EXPECT_FALSE(gpt2->adds_bos());
  EXPECT_FALSE(gpt2->adds_eos());
  EXPECT_EQ(gpt2->vocab_size(), 50257);
  EXPECT_EQ(gpt2->token_to_id("<|endoftext|>"), 50256);
  EXPECT_EQ(gpt2->token_to_id("no-such-token"), std::nullopt);
  EXPECT_EQ(gpt2->encode("", true), std::vector<int32_t>{});
  EXPECT_EQ(llama->encode("", true), std::vector<int32_t>{1});
}

// Writes `text` into a fresh folder as tokenizer.json and expects load() to fail with a
// message holding every `needles`.
void expect_load_error(const std::string& case_name, const std::string& text,
                       const std::vector<std::string>& needles) {
  fs::path dir = fs::temp_directory_path() / ("lt_tok_bad_" + case_name);
  fs::create_directories(dir);
  {
    std::ofstream out(dir / "tokenizer.json");
    out << text;
  }
  try {
    lt::Tokenizer::load(dir);
    ADD_FAILURE() << case_name << ": load did not fail";
  } catch (const lt::UserError& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("tokenizer.json"), std::string::npos) << case_name << ": " << msg;
    for (const auto& n : needles)
      EXPECT_NE(msg.find(n), std::string::npos) << case_name << ": '" << n << "' not in " << msg;
  }
  fs::remove_all(dir);
}

TEST(TokenizerErrors, BadFiles) {
  expect_load_error("not_json", "{ this is not json", {"not valid JSON"});
  expect_load_error("no_model", R"({"added_tokens": []})", {"model"});
  expect_load_error("unigram", R"({"model": {"type": "Unigram", "vocab": []}})",
                    {"Unigram", "model"});
  expect_load_error("wordpiece", R"({"model": {"type": "WordPiece", "vocab": {}}})", {"WordPiece"});
  expect_load_error("no_vocab", R"({"model": {"type": "BPE", "merges": []}})", {"vocab"});
  expect_load_error("bad_merge",
                    R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}})",
                    {"merges[0]"});
  const std::string ok_model = R"("model": {"type": "BPE", "vocab": {"a": 0}, "merges": []})";
  expect_load_error("bad_normalizer",
                    "{" + ok_model + R"(, "normalizer": {"type": "Precompiled"}})",
                    {"normalizer", "Precompiled"});
  expect_load_error("bad_pretok",
                    "{" + ok_model + R"(, "pre_tokenizer": {"type": "BertPreTokenizer"}})",
                    {"pre_tokenizer", "BertPreTokenizer"});
  expect_load_error("bad_decoder", "{" + ok_model + R"(, "decoder": {"type": "CTC"}})",
                    {"decoder", "CTC"});
  expect_load_error("bad_regex",
                    "{" + ok_model +
                        R"(, "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "(("},
                         "behavior": "Isolated", "invert": false}})",
                    {"pre_tokenizer", "regex"});
  try {
    lt::Tokenizer::load(kRoot / "no" / "such" / "dir");
    ADD_FAILURE() << "missing path did not fail";
  } catch (const lt::UserError& e) {
    EXPECT_NE(std::string(e.what()).find("does not exist"), std::string::npos) << e.what();
  }
}

}  // namespace

namespace {

// Runs `longtune tokenize` with `input` on stdin; returns stdout.
std::string run_tokenize(std::vector<std::string> args, const std::string& input) {
  args.insert(args.begin(), "tokenize");
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  std::istringstream in(input);
  std::ostringstream out;
  auto* old_in = std::cin.rdbuf(in.rdbuf());
  auto* old_out = std::cout.rdbuf(out.rdbuf());
  struct Restore {
    std::streambuf *i, *o;
    ~Restore() {
      std::cin.rdbuf(i);
      std::cout.rdbuf(o);
    }
  } restore{old_in, old_out};
  int rc = lt::cmd_tokenize(static_cast<int>(argv.size()), argv.data());
  EXPECT_EQ(rc, 0);
  return out.str();
}

TEST(TokenizeCommand, EncodeDecode) {
  std::string llama = (kShared / "llama2").string();
  EXPECT_EQ(json::parse(run_tokenize({"--tokenizer", llama}, R"(["a", ""])")),
            json::parse("[[263], []]"));
  EXPECT_EQ(json::parse(run_tokenize({"--tokenizer", llama, "--add_special_tokens"}, R"(["a"])")),
            json::parse("[[1, 263]]"));
  EXPECT_EQ(json::parse(
                run_tokenize({"--tokenizer", llama, "--add_special_tokens", "False"}, R"(["a"])")),
            json::parse("[[263]]"));
  EXPECT_EQ(
      json::parse(run_tokenize({"--tokenizer", llama, "--add_special_tokens", "True"}, R"(["a"])")),
      json::parse("[[1, 263]]"));
  EXPECT_EQ(json::parse(run_tokenize({"--tokenizer", llama, "--decode"}, "[[1, 263], []]")),
            json::parse(R"(["<s> a", ""])"));
  for (auto [args, input] : std::vector<std::pair<std::vector<std::string>, std::string>>{
           {{"--tokenizer", llama}, "not json"},
           {{"--tokenizer", llama}, R"({"a": 1})"},
           {{"--tokenizer", llama}, R"(["a", 3])"},
           {{"--tokenizer", llama, "--decode"}, R"([["a"]])"},
           {{"--tokenizer", llama, "--decode"}, R"([[-1]])"},
           {{"--tokenizer", llama, "--add_special_tokens", "maybe"}, R"(["a"])"},
           {{"--tokenizer", (kRoot / "nowhere").string()}, R"(["a"])"},
           {{"--no-such-flag"}, R"(["a"])"}}) {
    try {
      run_tokenize(args, input);
      ADD_FAILURE() << "no UserError for input " << input;
    } catch (const lt::UserError& e) {
      SUCCEED() << e.what();
    }
  }
}

}  // namespace
