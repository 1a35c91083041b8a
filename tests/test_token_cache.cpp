// The token cache and `longtune prepare`: a second prepare is a cache hit, any change of the data
// bytes, tokenizer files or settings is a miss, a corrupt or truncated cache file is rebuilt with
// a note, and --dump writes exactly load_dataset's rows (from a fresh tokenization and a hit).
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli_runner.h"
#include "core/error.h"
#include "data/dataset.h"
#include "data/token_cache.h"
#include "data/tokenizer.h"

namespace lt {
namespace {

namespace fs = std::filesystem;
using lt::testing::run_cli;

const fs::path kLlama2 = "../shared/data/tokenizers/llama2";
const fs::path kAlpaca = "../shared/data/instructions/llamafactory_alpaca_en_demo.json";

class TokenCacheTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(fs::exists(kLlama2 / "tokenizer.json"))
        << "shared data not found (../shared beside the checkout): " << kLlama2;
    dir_ = fs::temp_directory_path() /
           ("lt_token_cache_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_ / "cache");
    data_ = write("data.jsonl",
                  "{\"instruction\": \"Add the numbers.\", \"input\": \"2 and 3\", \"output\": \"5\"}\n"
                  "{\"instruction\": \"Say hello in French.\", \"output\": \"Bonjour\"}\n"
                  "{\"instruction\": \"Nothing to train\", \"output\": \"\"}\n"
                  "{\"instruction\": \"Count to ten.\", \"output\": \"1 2 3 4 5 6 7 8 9 10\"}\n");
  }
  void TearDown() override { fs::remove_all(dir_); }

  fs::path write(const std::string& name, const std::string& content) {
    const fs::path p = dir_ / name;
    std::ofstream(p, std::ios::binary) << content;
    return p;
  }

  // prepare with the llama2 tokenizer and this test's cache folder, plus `extra` flags.
  lt::testing::CliResult prepare(const fs::path& data, std::vector<std::string> extra = {}) {
    std::vector<std::string> args = {"prepare", "--data_path", data.string(), "--tokenizer",
                                     kLlama2.string(), "--cache_dir", (dir_ / "cache").string()};
    args.insert(args.end(), extra.begin(), extra.end());
    return run_cli(args);
  }

  // The single cache file (a test starts with an empty cache folder).
  std::vector<fs::path> cache_files() const {
    std::vector<fs::path> out;
    for (const auto& e : fs::directory_iterator(dir_ / "cache")) out.push_back(e.path());
    return out;
  }

  fs::path dir_, data_;
};

bool has(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

TEST_F(TokenCacheTest, SecondPrepareIsAHit) {
  auto first = prepare(data_);
  ASSERT_EQ(first.rc, 0) << first.err;
  EXPECT_TRUE(has(first.out, "data: wrote cache")) << first.out;
  EXPECT_TRUE(has(first.out, "3 rows")) << first.out;
  EXPECT_TRUE(has(first.out, "skipped 1 rows: empty response")) << first.out;
  auto second = prepare(data_);
  ASSERT_EQ(second.rc, 0) << second.err;
  EXPECT_TRUE(has(second.out, "data: reusing cache")) << second.out;
  // The statistics come back from the cache too.
  EXPECT_TRUE(has(second.out, "skipped 1 rows: empty response")) << second.out;
  EXPECT_EQ(cache_files().size(), 1u);
}

TEST_F(TokenCacheTest, AnyChangeIsAMiss) {
  DatasetOptions base;
  base.model_max_length = 64;
  const TokenCacheKey k0 = token_cache_key(data_, kLlama2, base, 32000);
  EXPECT_EQ(token_cache_key(data_, kLlama2 / "tokenizer.json", base, 32000), k0)
      << "a tokenizer folder and its tokenizer.json are the same tokenizer";
  auto differs = [&](const DatasetOptions& o, const char* what) {
    EXPECT_NE(token_cache_key(data_, kLlama2, o, 32000), k0) << what;
  };
  DatasetOptions o = base;
  o.model_max_length = 65;
  differs(o, "model_max_length");
  o = base;
  o.train_on_inputs = true;
  differs(o, "train_on_inputs");
  o = base;
  o.packing = true;
  differs(o, "packing");
  o = base;
  o.chat_template = "chatml";
  differs(o, "chat_template");
  o = base;
  o.format = DatasetFormat::kAlpaca;
  differs(o, "dataset_format");
  o = base;
  o.max_rows = 2;
  differs(o, "max_rows");
  EXPECT_NE(token_cache_key(data_, kLlama2, base, 32001), k0) << "vocab_size";
  EXPECT_NE(token_cache_key(data_, fs::path(), base, 32000), k0) << "no tokenizer";

  // One byte of the data file.
  std::ifstream in(data_, std::ios::binary);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  text[text.find("hello")] = 'j';
  const fs::path edited = write("edited.jsonl", text);
  EXPECT_NE(token_cache_key(edited, kLlama2, base, 32000), k0) << "data bytes";
  // The same bytes under another name are the same data (a copy reuses the cache).
  fs::copy_file(data_, dir_ / "copy.jsonl");
  EXPECT_EQ(token_cache_key(dir_ / "copy.jsonl", kLlama2, base, 32000), k0);

  // tokenizer_config.json beside tokenizer.json is part of the tokenizer.
  fs::create_directories(dir_ / "tok");
  fs::copy_file(kLlama2 / "tokenizer.json", dir_ / "tok" / "tokenizer.json");
  fs::copy_file(kLlama2 / "tokenizer_config.json", dir_ / "tok" / "tokenizer_config.json");
  EXPECT_EQ(token_cache_key(data_, dir_ / "tok", base, 32000), k0);
  std::ofstream(dir_ / "tok" / "tokenizer_config.json", std::ios::app) << " ";
  EXPECT_NE(token_cache_key(data_, dir_ / "tok", base, 32000), k0) << "tokenizer_config.json";

  // A chat template file is keyed by its contents.
  const fs::path tmpl = write("t.jinja", "{{ messages }}");
  o = base;
  o.chat_template = tmpl.string();
  const TokenCacheKey kt = token_cache_key(data_, kLlama2, o, 32000);
  write("t.jinja", "{{ messages }} ");
  EXPECT_NE(token_cache_key(data_, kLlama2, o, 32000), kt) << "template file contents";

  // Through the command: every changed setting writes a new cache file.
  ASSERT_EQ(prepare(data_).rc, 0);
  for (const auto& extra : std::vector<std::vector<std::string>>{
           {"--model_max_length", "100"},
           {"--train_on_inputs", "True"},
           {"--packing", "True", "--model_max_length", "64"},
           {"--dataset_format", "alpaca"}}) {
    auto r = prepare(data_, extra);
    ASSERT_EQ(r.rc, 0) << r.err;
    EXPECT_TRUE(has(r.out, "data: wrote cache")) << extra[0] << "\n" << r.out;
  }
  auto r = prepare(edited);
  EXPECT_TRUE(has(r.out, "data: wrote cache")) << r.out;
  EXPECT_EQ(cache_files().size(), 6u);
}

TEST_F(TokenCacheTest, CorruptCacheIsRebuiltWithANote) {
  ASSERT_EQ(prepare(data_).rc, 0);
  ASSERT_EQ(cache_files().size(), 1u);
  const fs::path file = cache_files()[0];
  const auto size = fs::file_size(file);
  std::string good;
  {
    std::ifstream in(file, std::ios::binary);
    good.assign((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  }
  struct Damage {
    const char* name;
    std::string bytes;
    const char* why;
  };
  std::string flipped = good;
  flipped[size - 5] ^= 0x40;  // a label in the last row
  std::string bad_magic = good;
  bad_magic[0] = 'X';
  std::string grown = good + std::string(8, '\0');
  const std::vector<Damage> damages = {
      {"flipped byte", flipped, "checksum mismatch"},
      {"truncated", good.substr(0, size / 2), "checksum mismatch"},
      {"shorter than the header", good.substr(0, 20), "shorter than the"},
      {"empty", "", "shorter than the"},
      {"bad magic", bad_magic, "bad magic"},
      {"trailing bytes", grown, "checksum mismatch"},
  };
  for (const Damage& d : damages) {
    SCOPED_TRACE(d.name);
    std::ofstream(file, std::ios::binary | std::ios::trunc) << d.bytes;
    auto r = prepare(data_, {"--dump", (dir_ / "dump.jsonl").string()});
    ASSERT_EQ(r.rc, 0) << r.err;
    EXPECT_TRUE(has(r.out, "is unusable")) << r.out;
    EXPECT_TRUE(has(r.out, d.why)) << r.out;
    EXPECT_TRUE(has(r.out, "rebuilding")) << r.out;
    EXPECT_TRUE(has(r.out, "data: wrote cache")) << r.out;
    // Rebuilt: the next run is a hit again.
    auto again = prepare(data_);
    EXPECT_TRUE(has(again.out, "data: reusing cache")) << again.out;
  }
  // Direct reads report the kind of problem and never touch *ds.
  Dataset ds;
  std::string why;
  const TokenCacheKey key =
      token_cache_key(data_, kLlama2, DatasetOptions{}, Tokenizer::load(kLlama2)->vocab_size());
  EXPECT_EQ(read_token_cache(file, key, &ds, &why), CacheRead::kHit);
  EXPECT_EQ(read_token_cache(dir_ / "none.ltc", key, &ds, &why), CacheRead::kMissing);
  TokenCacheKey other = key;
  other.lo ^= 1;
  EXPECT_EQ(read_token_cache(file, other, &ds, &why), CacheRead::kStale);
  EXPECT_TRUE(has(why, "key differs")) << why;
}

// Reads a --dump file back as rows.
std::vector<Example> read_dump(const fs::path& p) {
  std::vector<Example> rows;
  std::ifstream in(p);
  for (std::string line; std::getline(in, line);) {
    auto j = nlohmann::json::parse(line);
    Example ex;
    ex.input_ids = j.at("input_ids").get<std::vector<int32_t>>();
    ex.labels = j.at("labels").get<std::vector<int32_t>>();
    if (j.contains("doc_ids")) ex.doc_ids = j["doc_ids"].get<std::vector<int32_t>>();
    EXPECT_EQ(j.size(), j.contains("doc_ids") ? 3u : 2u) << line.substr(0, 200);
    rows.push_back(std::move(ex));
  }
  return rows;
}

void expect_same_rows(const std::vector<Example>& got, const std::vector<Example>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t r = 0; r < got.size(); ++r) {
    EXPECT_EQ(got[r].input_ids, want[r].input_ids) << "row " << r;
    EXPECT_EQ(got[r].labels, want[r].labels) << "row " << r;
    EXPECT_EQ(got[r].doc_ids, want[r].doc_ids) << "row " << r;
  }
}

TEST_F(TokenCacheTest, DumpEqualsLoadDataset) {
  ASSERT_TRUE(fs::exists(kAlpaca)) << "shared data not found: " << kAlpaca;
  auto tok = Tokenizer::load(kLlama2);
  for (bool packing : {false, true}) {
    SCOPED_TRACE(packing ? "packed" : "unpacked");
    DatasetOptions opt;
    opt.model_max_length = 200;
    opt.packing = packing;
    opt.max_rows = 24;
    const Dataset want = load_dataset(kAlpaca, tok.get(), opt, tok->vocab_size());
    ASSERT_GT(want.stats.rows_truncated, 0) << "the case should include truncated rows";
    std::vector<std::string> flags = {"--model_max_length", "200", "--max_train_samples", "24",
                                      "--packing", packing ? "True" : "False", "--dump",
                                      (dir_ / "dump.jsonl").string()};
    auto fresh = prepare(kAlpaca, flags);
    ASSERT_EQ(fresh.rc, 0) << fresh.err;
    EXPECT_TRUE(has(fresh.out, "data: wrote cache")) << fresh.out;
    expect_same_rows(read_dump(dir_ / "dump.jsonl"), want.rows);
    fs::remove(dir_ / "dump.jsonl");
    auto hit = prepare(kAlpaca, flags);
    ASSERT_EQ(hit.rc, 0) << hit.err;
    EXPECT_TRUE(has(hit.out, "data: reusing cache")) << hit.out;
    expect_same_rows(read_dump(dir_ / "dump.jsonl"), want.rows);
    if (packing) {
      EXPECT_FALSE(want.rows[0].doc_ids.empty());
    }
  }
}

TEST_F(TokenCacheTest, PrepareFlagErrors) {
  auto r = run_cli({"prepare", "--data_path", data_.string()});
  EXPECT_EQ(r.rc, 1);
  EXPECT_TRUE(has(r.err, "needs --model_name_or_path or --tokenizer")) << r.err;
  r = prepare(data_, {"--dataset_format", "csv"});
  EXPECT_EQ(r.rc, 1);
  EXPECT_TRUE(has(r.err, "--dataset_format 'csv' is unknown")) << r.err;
  // An unwritable cache folder is an error for prepare (its only job is writing the cache).
  write("file_not_dir", "x");
  r = run_cli({"prepare", "--data_path", data_.string(), "--tokenizer", kLlama2.string(),
               "--cache_dir", (dir_ / "file_not_dir" / "sub").string()});
  EXPECT_EQ(r.rc, 1);
  EXPECT_TRUE(has(r.err, "--cache_dir")) << r.err;
}

TEST(TokenCacheDir, DefaultFollowsEnvironment) {
  const char* old = std::getenv("LONGTUNE_CACHE");
  const std::string saved = old ? old : "";
  ::setenv("LONGTUNE_CACHE", "/tmp/lt_cache_env", 1);
  EXPECT_EQ(default_cache_dir(), fs::path("/tmp/lt_cache_env"));
  ::unsetenv("LONGTUNE_CACHE");
  const char* home = std::getenv("HOME");
  const char* xdg = std::getenv("XDG_CACHE_HOME");
  if (home && !xdg) {
    EXPECT_EQ(default_cache_dir(), fs::path(home) / ".cache" / "longtune");
  }
  if (old) ::setenv("LONGTUNE_CACHE", saved.c_str(), 1);
}

}  // namespace
}  // namespace lt
