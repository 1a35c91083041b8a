// Incremental (KV-cached) decoding against the full-sequence forward of LlamaModel on the
// transformers fixture models, greedy and seeded sampling, the sampler's warpers, and the
// streaming detokenizer (multi-byte characters, SentencePiece spaces).
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <random>

#include "backend/backend.h"
#include "core/error.h"
#include "data/tokenizer.h"
#include "io/safetensors.h"
#include "model/generate.h"
#include "model/llama.h"
#include "model/model_io.h"
#include "train/batching.h"

namespace lt {
namespace {

namespace fs = std::filesystem;
const fs::path kFixtures = fs::path(LT_SOURCE_DIR) / "tests/fixtures/models";

// A fixture model loaded twice over the same weights: LlamaModel (full forward) and the host
// weights the IncrementalDecoder reads.
struct Loaded {
  ModelConfig config;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<LlamaModel> model;
  std::vector<float> params;
  ModelWeights weights;
};

std::unique_ptr<Loaded> load(const std::string& name, int64_t max_tokens) {
  auto m = std::make_unique<Loaded>();
  const fs::path dir = kFixtures / name;
  m->config = load_model_config(dir / "config.json");
  m->backend = make_cpu_backend();
  RunSettings rs;
  rs.max_tokens = max_tokens;
  rs.train = false;
  m->model = std::make_unique<LlamaModel>(m->config, *m->backend, rs);
  load_weights(CheckpointReader(dir), m->model->table(), m->model->params());
  m->params.assign(m->model->params(), m->model->params() + m->model->table().total_numel());
  m->weights = m->model->table().bind(m->params.data());
  return m;
}

std::vector<float> full_logits(Loaded& m, const std::vector<int32_t>& ids) {
  Example e;
  e.input_ids = ids;
  e.labels = ids;
  const MicroBatch mb = make_micro_batch({&e});
  std::vector<float> logits(ids.size() * m.config.vocab_size);
  m.model->forward_logits(mb, logits.data());
  return logits;
}

std::vector<int32_t> random_ids(int64_t n, int64_t V, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> ids(n);
  for (auto& id : ids) id = static_cast<int32_t>(rng() % V);
  return ids;
}

// Fails with the worst element when |got - want| > atol anywhere.
void expect_close(const std::string& what, const float* got, const float* want, size_t n,
                  double atol) {
  double worst = -1;
  size_t wi = 0;
  for (size_t i = 0; i < n; ++i) {
    const double d = std::fabs(double(got[i]) - double(want[i]));
    if (!(d <= worst) || std::isnan(d)) worst = std::isnan(d) ? INFINITY : d, wi = i;
  }
  EXPECT_LE(worst, atol) << what << ": worst element " << wi << " of " << n << ": got "
                         << got[wi] << ", want " << want[wi];
}

class IncrementalMatchesFull : public ::testing::TestWithParam<std::string> {};

TEST_P(IncrementalMatchesFull, LogitsEveryPosition) {
  // rope_dynamic: transformers rescales once the sequence passes original_max (16); a full
  // forward and a cached decode then legitimately differ, so stay within it.
  const int64_t T = GetParam() == "rope_dynamic" ? 16 : 24;
  auto m = load(GetParam(), T);
  const int64_t V = m->config.vocab_size;
  const auto ids = random_ids(T, V, 7);
  const auto want = full_logits(*m, ids);

  // One token at a time.
  IncrementalDecoder dec(m->config, m->weights, T);
  std::vector<float> row(V);
  for (int64_t t = 0; t < T; ++t) {
    dec.step(&ids[t], 1, row.data(), LogitsFor::kAll);
    expect_close(GetParam() + " one-by-one position " + std::to_string(t), row.data(),
                 want.data() + t * V, V, 1e-5);
  }
  EXPECT_EQ(dec.length(), T);
  // A prefill of 7 tokens (all logits), then chunks of 5 and 1 (last logits only).
  dec.reset();
  std::vector<float> pre(7 * V);
  dec.step(ids.data(), 7, pre.data(), LogitsFor::kAll);
  expect_close(GetParam() + " prefill", pre.data(), want.data(), 7 * V, 1e-5);
  dec.step(ids.data() + 7, 5, row.data(), LogitsFor::kLast);
  expect_close(GetParam() + " chunk last", row.data(), want.data() + 11 * V, V, 1e-5);
  for (int64_t t = 12; t < T; ++t) {
    dec.step(&ids[t], 1, row.data(), LogitsFor::kLast);
    expect_close(GetParam() + " after chunks position " + std::to_string(t), row.data(),
                 want.data() + t * V, V, 1e-5);
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, IncrementalMatchesFull,
                         ::testing::Values("llama_gqa", "llama_tied_mha", "llama_head_dim",
                                           "mistral_swa", "qwen2_bias", "rope_linear",
                                           "rope_dynamic", "rope_llama3", "rope_yarn"),
                         [](const auto& info) { return info.param; });

TEST(Generate, SlidingWindowIsUsed) {
  // Guards the test above: mistral_swa's window must be shorter than the sequence tested.
  auto m = load("mistral_swa", 8);
  EXPECT_GT(m->config.layer_window(0), 0);
  EXPECT_LT(m->config.layer_window(0), 24);
}

TEST(Generate, GreedyEqualsArgmaxOfFullForward) {
  for (const char* name : {"llama_gqa", "mistral_swa", "qwen2_bias"}) {
    const int64_t P = 4, N = 20;
    auto m = load(name, P + N);
    const int64_t V = m->config.vocab_size;
    const auto prompt = random_ids(P, V, 11);
    IncrementalDecoder dec(m->config, m->weights, P + N);
    GenerateOptions o;
    o.max_new_tokens = N;
    o.sampling.temperature = 0;
    std::vector<int32_t> streamed;
    const auto out = generate(dec, prompt, o, [&](int32_t id) { streamed.push_back(id); });
    ASSERT_EQ(static_cast<int64_t>(out.size()), N) << name;
    EXPECT_EQ(streamed, out) << name;
    std::vector<int32_t> seq = prompt;
    seq.insert(seq.end(), out.begin(), out.end() - 1);
    const auto logits = full_logits(*m, seq);
    for (int64_t i = 0; i < N; ++i) {
      const float* row = logits.data() + (P - 1 + i) * V;
      EXPECT_EQ(out[i], std::max_element(row, row + V) - row) << name << " token " << i;
    }
  }
}

TEST(Generate, StopsAtStopId) {
  auto m = load("llama_gqa", 32);
  IncrementalDecoder dec(m->config, m->weights, 32);
  GenerateOptions o;
  o.max_new_tokens = 20;
  o.sampling.temperature = 0;
  const auto prompt = random_ids(4, m->config.vocab_size, 11);
  const auto free_run = generate(dec, prompt, o);
  o.stop_ids = {free_run[5]};
  const auto stopped = generate(dec, prompt, o);
  const auto first = std::find(free_run.begin(), free_run.end(), free_run[5]) - free_run.begin();
  ASSERT_EQ(static_cast<int64_t>(stopped.size()), first + 1);
  EXPECT_TRUE(std::equal(stopped.begin(), stopped.end(), free_run.begin()));
}

TEST(Generate, SamplingIsSeededAndTopK1IsGreedy) {
  auto m = load("llama_gqa", 40);
  IncrementalDecoder dec(m->config, m->weights, 40);
  const auto prompt = random_ids(4, m->config.vocab_size, 3);
  GenerateOptions o;
  o.max_new_tokens = 30;
  o.sampling = {1.5, 0, 1.0, 1234};
  const auto a = generate(dec, prompt, o);
  const auto b = generate(dec, prompt, o);
  EXPECT_EQ(a, b);
  o.sampling.seed = 99;
  const auto c = generate(dec, prompt, o);
  EXPECT_NE(a, c) << "different seeds gave the same 30 tokens";
  o.sampling = {0.0, 0, 1.0, 0};
  const auto greedy = generate(dec, prompt, o);
  o.sampling = {1.5, 1, 1.0, 5};
  EXPECT_EQ(generate(dec, prompt, o), greedy);
  o.sampling = {0.8, 0, 1e-9, 5};  // top_p that keeps only the most likely token
  EXPECT_EQ(generate(dec, prompt, o), greedy);
  EXPECT_NE(a, greedy);
}

TEST(Sampler, FrequenciesFollowTheWarpedSoftmax) {
  const std::vector<float> logits = {2.0f, 1.0f, 0.0f, -1.0f, 0.5f};
  auto freq = [&](SamplingParams p) {
    Sampler s(p);
    std::vector<double> f(logits.size());
    const int n = 40000;
    for (int i = 0; i < n; ++i) f[s.sample(logits.data(), logits.size())] += 1.0 / n;
    return f;
  };
  auto softmax = [&](double temp, std::vector<int> keep) {
    std::vector<double> p(logits.size());
    double z = 0;
    for (int i : keep) z += p[i] = std::exp(logits[i] / temp);
    for (auto& v : p) v /= z;
    return p;
  };
  auto expect_near = [](const std::vector<double>& got, const std::vector<double>& want,
                        const char* what) {
    for (size_t i = 0; i < got.size(); ++i)
      EXPECT_NEAR(got[i], want[i], 0.01) << what << " id " << i;
  };
  expect_near(freq({1.0, 0, 1.0, 1}), softmax(1.0, {0, 1, 2, 3, 4}), "plain");
  expect_near(freq({0.5, 0, 1.0, 2}), softmax(0.5, {0, 1, 2, 3, 4}), "temperature 0.5");
  expect_near(freq({1.0, 2, 1.0, 3}), softmax(1.0, {0, 1}), "top_k 2");
  // Sorted probabilities 0.563, 0.207, 0.126, 0.076, 0.028 (cumulative 0.563, 0.770, 0.896):
  // top_p 0.7 keeps ids {0, 1}, top_p 0.8 keeps {0, 1, 4} (transformers' TopPLogitsWarper).
  expect_near(freq({1.0, 0, 0.7, 4}), softmax(1.0, {0, 1}), "top_p 0.7");
  expect_near(freq({1.0, 0, 0.8, 5}), softmax(1.0, {0, 1, 4}), "top_p 0.8");
  Sampler greedy({0.0, 0, 1.0, 0});
  EXPECT_EQ(greedy.sample(logits.data(), logits.size()), 0);
}

// The streamer's pieces must add up to the full decode, never split a character, and keep
// SentencePiece's word-leading spaces. Uses the Llama-2 tokenizer (byte fallback) from
// ../shared/data/tokenizers/llama2.
TEST(TextStreamer, PiecesAddUpToTheDecodedText) {
  const fs::path dir = fs::path(LT_SOURCE_DIR) / "../shared/data/tokenizers/llama2";
  ASSERT_TRUE(fs::exists(dir / "tokenizer.json")) << "needs the shared data folder: " << dir;
  auto tok = Tokenizer::load(dir);
  const std::string prompt_text = "Translate:";
  const std::string text = " 日本語 😀 café  two  spaces\nnew line ∑ done";
  const auto prompt = tok->encode(prompt_text, true);
  const auto all = tok->encode(prompt_text + text, true);
  ASSERT_TRUE(std::equal(prompt.begin(), prompt.end(), all.begin()));
  TextStreamer s(*tok, prompt);
  std::string streamed;
  int multi_token_chars = 0;
  for (size_t i = prompt.size(); i < all.size(); ++i) {
    const std::string piece = s.put(all[i]);
    EXPECT_EQ(piece.find("\xef\xbf\xbd"), std::string::npos) << "U+FFFD in piece " << piece;
    if (piece.empty()) ++multi_token_chars;
    streamed += piece;
  }
  streamed += s.flush();
  const std::vector<int32_t> gen(all.begin() + prompt.size(), all.end());
  const std::string whole = tok->decode(all, true);
  EXPECT_EQ(prompt_text + streamed, whole);
  EXPECT_EQ(streamed, text);
  EXPECT_GT(multi_token_chars, 0) << "no byte-fallback character was split over tokens";
}

// --chat: one user message in the template with the generation prompt (Llama-2's format).
TEST(ChatPrompt, RendersOneUserTurnWithGenerationPrompt) {
  const fs::path dir = fs::path(LT_SOURCE_DIR) / "../shared/data/tokenizers/llama2";
  ASSERT_TRUE(fs::exists(dir / "tokenizer.json")) << "needs the shared data folder: " << dir;
  auto tok = Tokenizer::load(dir);
  EXPECT_EQ(render_chat_prompt(*tok, "llama2", "Hi there"), "<s>[INST] Hi there [/INST]");
  const auto ids = chat_prompt_ids(*tok, "llama2", "Hi there");
  ASSERT_FALSE(ids.empty());
  EXPECT_EQ(ids[0], 1);  // BOS from the template, not added twice
  EXPECT_NE(ids[1], 1);
  // The built-in chatml template adds Qwen2's default system turn first.
  const std::string chatml = render_chat_prompt(*tok, "chatml", "Hi");
  const std::string tail = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n";
  ASSERT_GE(chatml.size(), tail.size());
  EXPECT_EQ(chatml.substr(chatml.size() - tail.size()), tail);
}

}  // namespace
}  // namespace lt
