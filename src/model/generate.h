// Text generation: an incremental (KV-cached) decoder of the Llama-family model on the CPU
// reference ops, token sampling (temperature, top-k, top-p, seeded), and a streaming detokenizer.
#pragma once
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/params.h"

namespace lt {

class Tokenizer;

// Which rows of logits a decoder step writes.
enum class LogitsFor { kAll, kLast };

// Runs the model one chunk of new tokens at a time, keeping every layer's keys and values.
// Weights are host f32 views (ParamTable layout) that must outlive the decoder.
class IncrementalDecoder {
 public:
  // max_len: the most positions the cache holds (prompt + generated tokens).
  IncrementalDecoder(const ModelConfig& config, const ModelWeights& weights, int64_t max_len);

  // Appends T new tokens ids (T) at positions [length(), length() + T): computes their keys
  // and values into the cache and, with causal attention over the cache (sliding window per
  // layer), their logits: (T,V) for kAll, (V) of the last token for kLast.
  void step(const int32_t* ids, int64_t T, float* logits, LogitsFor which);
  int64_t length() const { return len_; }
  int64_t max_len() const { return max_len_; }
  const ModelConfig& config() const { return c_; }
  void reset() { len_ = 0; }

 private:
  float* cache_k(int64_t l, int64_t kvh) { return k_.data() + ((l * KVH_ + kvh) * max_len_) * HD_; }
  float* cache_v(int64_t l, int64_t kvh) { return v_.data() + ((l * KVH_ + kvh) * max_len_) * HD_; }
  void attend(float* out, const float* q, int64_t l, int64_t T, int64_t pos0);

  ModelConfig c_;
  ModelWeights w_;
  int64_t max_len_, len_ = 0, KVH_, HD_;
  std::vector<float> k_, v_;  // (L, KVH, max_len, HD) keys after RoPE, values
  // Per-step scratch, sized for T tokens.
  std::vector<float> x_, norm_, rstd_, q_, kn_, vn_, attn_, gate_, up_, rope_cos_, rope_sin_;
  std::vector<float> scores_;
};

// How the next token is chosen (Hugging Face generate's logits warpers, in its order:
// temperature, then top-k, then top-p).
struct SamplingParams {
  double temperature = 1.0;  // 0 = greedy (argmax; the lowest id on ties)
  int64_t top_k = 0;         // 0 = off
  double top_p = 1.0;        // 1 = off
  uint64_t seed = 42;
};

// Seeded, platform-independent sampler (mt19937_64 and 53-bit uniform doubles).
class Sampler {
 public:
  explicit Sampler(const SamplingParams& p) : p_(p), rng_(p.seed) {}
  // logits (V); returns the chosen id.
  int32_t sample(const float* logits, int64_t V);

 private:
  SamplingParams p_;
  std::mt19937_64 rng_;
  std::vector<std::pair<double, int32_t>> sorted_;
};

struct GenerateOptions {
  int64_t max_new_tokens = 128;
  SamplingParams sampling;
  std::vector<int32_t> stop_ids;  // generation ends after any of these (it is returned)
};

// Prefills the prompt (P >= 1 ids) and generates up to max_new_tokens ids, calling on_token
// with each as it is chosen. Returns the generated ids (without the prompt). The decoder is
// reset first and must hold P + max_new_tokens positions.
std::vector<int32_t> generate(IncrementalDecoder& decoder, const std::vector<int32_t>& prompt,
                              const GenerateOptions& options,
                              const std::function<void(int32_t)>& on_token = {});

// The prompt of a one-message chat: `message` as the user turn, rendered with the chat template
// (template_option as --chat_template: "" = the tokenizer's, a built-in name or a file) with
// add_generation_prompt, as transformers' apply_chat_template. The text, and its ids encoded
// without adding special tokens (the template writes them).
std::string render_chat_prompt(const Tokenizer& tokenizer, const std::string& template_option,
                               const std::string& message);
std::vector<int32_t> chat_prompt_ids(const Tokenizer& tokenizer, const std::string& template_option,
                                     const std::string& message);

// Turns a growing list of ids into text pieces as they become final (as text-generation-
// inference does): decodes a few tokens of left context plus the new ones and emits the new
// suffix once it does not end in an incomplete UTF-8 character (U+FFFD). Keeps SentencePiece
// leading spaces and multi-byte characters split over byte-fallback tokens right.
class TextStreamer {
 public:
  // prompt: the ids already there (their text is not emitted; they give left context).
  TextStreamer(const Tokenizer& tokenizer, const std::vector<int32_t>& prompt);
  // Adds one id; returns the text that became final (may be empty).
  std::string put(int32_t id);
  // Whatever is still held back at the end (e.g. an incomplete character).
  std::string flush();

 private:
  const Tokenizer& tok_;
  std::vector<int32_t> ids_;
  size_t prefix_ = 0, read_ = 0;  // ids_[prefix_, read_) is already-emitted left context
};

}  // namespace lt
