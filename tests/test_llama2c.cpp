// The llama2.c converter on the real pretrained stories260K (../shared/data/models/stories260K):
// greedy generation reproduces the sample text of its model card, the converted tokenizer
// encodes as llama2.c's own encoder, the q/k row permutation turns llama2.c's interleaved
// rotary into Hugging Face's rotate-half, bad files fail clearly, and the model fine-tunes.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <unistd.h>

#include "backend/backend.h"
#include "core/error.h"
#include "data/tokenizer.h"
#include "io/atomic_file.h"
#include "io/llama2c.h"
#include "io/safetensors.h"
#include "model/generate.h"
#include "model/llama.h"
#include "model/model_io.h"
#include "train/batching.h"
#include "train/trainer.h"

namespace lt {
namespace {

namespace fs = std::filesystem;
const fs::path kData = fs::path(LT_SOURCE_DIR) / "../shared/data/models/stories260K";

class Llama2c : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = fs::temp_directory_path() / ("lt_test_llama2c_" + std::to_string(getpid()));
    fs::remove_all(dir_);
    if (fs::exists(kData / "stories260K.bin"))
      convert_llama2c(kData / "stories260K.bin", kData / "tok512.bin", dir_ / "model");
  }
  static void TearDownTestSuite() { fs::remove_all(dir_); }
  void SetUp() override {
    ASSERT_TRUE(fs::exists(kData / "stories260K.bin"))
        << "this test needs the shared data folder beside the checkout: " << kData;
  }
  static fs::path dir_;
};
fs::path Llama2c::dir_;

// The temperature-0 sample in stories260K.md (run.c prints 256 tokens after BOS).
std::string model_card_greedy_sample() {
  const std::string md = read_file(kData / "stories260K.md");
  const std::string cmd = "-z stories260K/tok512.bin -t 0.0\n";
  const size_t a = md.find(cmd);
  EXPECT_NE(a, std::string::npos) << "stories260K.md changed: no greedy sample";
  if (a == std::string::npos) return "";
  const size_t start = a + cmd.size(), end = md.find("\n```", start);
  return md.substr(start, end - start);
}

TEST_F(Llama2c, WritesAHuggingFaceFolder) {
  const ModelConfig c = load_model_config(dir_ / "model/config.json");
  EXPECT_EQ(c.hidden_size, 64);
  EXPECT_EQ(c.intermediate_size, 172);
  EXPECT_EQ(c.num_hidden_layers, 5);
  EXPECT_EQ(c.num_attention_heads, 8);
  EXPECT_EQ(c.num_key_value_heads, 4);
  EXPECT_EQ(c.vocab_size, 512);
  EXPECT_EQ(c.max_position_embeddings, 512);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-5);
  auto tok = Tokenizer::load(dir_ / "model");
  EXPECT_EQ(tok->vocab_size(), 512);
  EXPECT_EQ(tok->bos_id(), 1);
  EXPECT_EQ(tok->eos_id(), 2);
  EXPECT_EQ(tok->token_to_id("<0x0A>"), 3 + 10);
}

TEST_F(Llama2c, GreedyGenerationReproducesTheModelCard) {
  const fs::path model = dir_ / "model";
  const ModelConfig c = load_model_config(model / "config.json");
  const ParamTable table(c);
  std::vector<float> params(table.total_numel());
  load_weights(CheckpointReader(model), table, params.data());
  const ModelWeights w = table.bind(params.data());
  auto tok = Tokenizer::load(model);

  const std::vector<int32_t> prompt = {1};  // BOS, as run.c with an empty prompt
  IncrementalDecoder dec(c, w, 257);
  GenerateOptions o;
  o.max_new_tokens = 256;
  o.sampling.temperature = 0;
  o.stop_ids = {1, 2};  // run.c stops at BOS
  TextStreamer streamer(*tok, prompt);
  std::string streamed;
  const auto ids = generate(dec, prompt, o, [&](int32_t id) { streamed += streamer.put(id); });
  streamed += streamer.flush();
  const std::string want = model_card_greedy_sample();
  ASSERT_GT(want.size(), 500u);
  EXPECT_EQ(tok->decode(ids, true), want);
  EXPECT_EQ(streamed, want);
  EXPECT_EQ(ids.size(), 256u);
}

// run.c's encode (dummy-prefix space, one token per UTF-8 character or its bytes + 3, then
// merge the adjacent pair whose concatenation has the highest score, leftmost on ties): an
// independent reference for the converted tokenizer.json read by the project's Tokenizer.
std::vector<int32_t> llama2c_encode(const std::string& text, const std::vector<Llama2cToken>& v) {
  std::map<std::string, int32_t> lookup;
  for (size_t i = 0; i < v.size(); ++i) lookup.emplace(v[i].piece, static_cast<int32_t>(i));
  std::vector<int32_t> t;
  if (!text.empty()) t.push_back(lookup.at(" "));
  for (size_t i = 0; i < text.size();) {
    size_t j = i + 1;
    while (j < text.size() && (static_cast<unsigned char>(text[j]) & 0xC0) == 0x80 && j - i < 4)
      ++j;
    auto it = lookup.find(text.substr(i, j - i));
    if (it != lookup.end()) t.push_back(it->second);
    else
      for (size_t b = i; b < j; ++b) t.push_back(static_cast<unsigned char>(text[b]) + 3);
    i = j;
  }
  for (;;) {
    float best = -1e10f;
    int64_t best_at = -1;
    int32_t best_id = -1;
    for (size_t k = 0; k + 1 < t.size(); ++k) {
      auto it = lookup.find(v[t[k]].piece + v[t[k + 1]].piece);
      if (it != lookup.end() && v[it->second].score > best)
        best = v[it->second].score, best_at = k, best_id = it->second;
    }
    if (best_at < 0) break;
    t[best_at] = best_id;
    t.erase(t.begin() + best_at + 1);
  }
  return t;
}

TEST_F(Llama2c, TokenizerEncodesAsLlama2c) {
  const auto vocab = read_llama2c_tokenizer(kData / "tok512.bin", 512);
  auto tok = Tokenizer::load(dir_ / "model");
  for (const std::string text :
       {"Once upon a time, there was a little girl named Lily.", "Hello world",
        " leading space and  double  spaces ", "line one\nline two\n\ttabbed",
        "ünïcödé café — “quotes” ™", "日本語 and 中文 😀", "aaaaaaaaaaaaaaaaaaaaaaa",
        "the the the and and to to he she it they", "Timmy's mom said, \"Don't worry.\""}) {
    const auto want = llama2c_encode(text, vocab);
    EXPECT_EQ(tok->encode(text, false), want) << text;
    auto with_bos = want;
    with_bos.insert(with_bos.begin(), 1);
    EXPECT_EQ(tok->encode(text, true), with_bos) << text;
    EXPECT_EQ(tok->decode(want, true), text) << text;
  }
}

// llama2.c's rotary (interleaved pairs, angle pos * 10000^(-2i/HD) for pair i) applied to a
// head's q in its layout, then permuted, must equal Hugging Face's rotate-half rotary of the
// permuted q, computed in double.
TEST(Llama2cPermute, TurnsInterleavedRotaryIntoRotateHalf) {
  const int64_t heads = 3, HD = 8, half = HD / 2, cols = 5, pos = 7;
  std::vector<float> w(heads * HD * cols);
  for (size_t i = 0; i < w.size(); ++i) w[i] = std::sin(0.37 * i + 0.1);
  std::vector<float> p = w;
  llama2c_permute_rope_rows(p.data(), heads, HD, cols);
  const std::vector<double> x = {0.3, -1.2, 0.7, 2.0, -0.4};  // the input (cols)
  auto matvec = [&](const std::vector<float>& m, int64_t row) {
    double s = 0;
    for (int64_t c = 0; c < cols; ++c) s += m[row * cols + c] * x[c];
    return s;
  };
  for (int64_t h = 0; h < heads; ++h) {
    std::vector<double> q(HD), qp(HD), rot_l2c(HD), rot_hf(HD);
    for (int64_t d = 0; d < HD; ++d) q[d] = matvec(w, h * HD + d), qp[d] = matvec(p, h * HD + d);
    for (int64_t i = 0; i < half; ++i) {
      const double a = pos * std::pow(10000.0, -2.0 * i / HD);
      rot_l2c[2 * i] = q[2 * i] * std::cos(a) - q[2 * i + 1] * std::sin(a);
      rot_l2c[2 * i + 1] = q[2 * i] * std::sin(a) + q[2 * i + 1] * std::cos(a);
      rot_hf[i] = qp[i] * std::cos(a) - qp[i + half] * std::sin(a);
      rot_hf[i + half] = qp[i + half] * std::cos(a) + qp[i] * std::sin(a);
    }
    for (int64_t i = 0; i < half; ++i) {
      EXPECT_NEAR(rot_hf[i], rot_l2c[2 * i], 1e-5) << "head " << h << " pair " << i;
      EXPECT_NEAR(rot_hf[i + half], rot_l2c[2 * i + 1], 1e-5) << "head " << h << " pair " << i;
    }
    // Attention scores only see dot products: q.k is the same in both layouts.
  }
}

// Writes bytes to a temporary file and expects UserError naming it, containing `what`.
void expect_bad_checkpoint(const std::string& bytes, const std::string& what) {
  const fs::path f = fs::temp_directory_path() / ("lt_bad_llama2c_" + std::to_string(getpid()));
  write_file_atomic(f, bytes);
  try {
    read_llama2c_checkpoint(f);
    ADD_FAILURE() << "no error for " << what;
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find(f.string()), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
  }
  fs::remove(f);
}

TEST_F(Llama2c, BadFilesFailNamingTheFile) {
  const std::string good = read_file(kData / "stories260K.bin");
  expect_bad_checkpoint(good.substr(0, 20), "truncated");
  expect_bad_checkpoint(good.substr(0, good.size() - 4), "truncated");
  expect_bad_checkpoint(good + "xxxx", "trailing bytes");
  std::string bigger = good;
  const int32_t dim = 128;  // header says dim 128 but weights are for 64
  std::memcpy(bigger.data(), &dim, 4);
  expect_bad_checkpoint(bigger, "implies");
  std::string zero = good;
  const int32_t none = 0;
  std::memcpy(zero.data() + 8, &none, 4);  // n_layers 0
  expect_bad_checkpoint(zero, "non-positive");
  const fs::path t = fs::temp_directory_path() / ("lt_bad_tok_" + std::to_string(getpid()));
  const std::string tok = read_file(kData / "tok512.bin");
  write_file_atomic(t, tok.substr(0, tok.size() - 3));
  EXPECT_THROW(read_llama2c_tokenizer(t, 512), UserError);
  write_file_atomic(t, tok);
  EXPECT_THROW(read_llama2c_tokenizer(t, 1000), UserError);  // vocab size mismatch
  fs::remove(t);
}

TEST_F(Llama2c, FineTunes) {
  const fs::path model = dir_ / "model";
  const ModelConfig c = load_model_config(model / "config.json");
  auto tok = Tokenizer::load(model);
  std::vector<Example> rows;
  for (const char* s : {"The purple robot sang a song about green cheese.",
                        "The purple robot danced on the moon with a cat.",
                        "The purple robot ate green cheese for breakfast."}) {
    Example e;
    e.input_ids = tok->encode(s, true);
    e.labels = e.input_ids;
    rows.push_back(e);
  }
  std::vector<const Example*> ptrs;
  for (const auto& r : rows) ptrs.push_back(&r);
  const std::vector<MicroBatch> micro = {make_micro_batch(ptrs)};
  auto backend = make_cpu_backend();
  RunSettings rs;
  rs.max_tokens = micro[0].num_tokens();
  LlamaModel m(c, *backend, rs);
  load_weights(CheckpointReader(model), m.table(), m.params());
  OptimizerSettings opt;
  opt.learning_rate = 3e-3;
  const ScheduleSettings sched{ScheduleType::kConstant, 0, 20};
  AdamW adamw(m.table(), *backend, opt);
  const double before = m.forward_loss(micro[0]) / micro[0].num_targets();
  EXPECT_LT(before, 6.0) << "a pretrained model starts far below log(512) = 6.24";
  double last = 0;
  for (int64_t s = 0; s < 20; ++s) last = train_step(m, adamw, opt, sched, micro, s).loss;
  const double after = m.forward_loss(micro[0]) / micro[0].num_targets();
  EXPECT_LT(after, 0.5 * before) << "loss " << before << " -> " << after << " (last step " << last
                                 << ")";
}

}  // namespace
}  // namespace lt
