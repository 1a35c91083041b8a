// Incremental decoding with a KV cache, sampling and streaming detokenization (see generate.h).
#include "model/generate.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/check.h"
#include "data/chat_template.h"
#include "data/tokenizer.h"
#include "ops/embedding.h"
#include "ops/linear.h"
#include "ops/rmsnorm.h"
#include "ops/rope.h"
#include "ops/swiglu.h"

namespace lt {

IncrementalDecoder::IncrementalDecoder(const ModelConfig& config, const ModelWeights& weights,
                                       int64_t max_len)
    : c_(config),
      w_(weights),
      max_len_(max_len),
      KVH_(config.num_key_value_heads),
      HD_(config.head_dim) {
  LT_CHECK(max_len_ > 0, "max_len {}", max_len_);
  LT_CHECK(static_cast<int64_t>(w_.layers.size()) == c_.num_hidden_layers);
  const size_t cache = size_t(c_.num_hidden_layers) * KVH_ * max_len_ * HD_;
  k_.assign(cache, 0.0f);
  v_.assign(cache, 0.0f);
}

// out (T,H,HD) = softmax(q k^T * scale) v for the T new tokens at positions pos0 + t, over the
// cached keys/values of layer l (which already hold the new tokens). q is (T,H,HD).
// Key j is visible from position p when j <= p and p - j < window (window > 0).
void IncrementalDecoder::attend(float* out, const float* q, int64_t l, int64_t T, int64_t pos0) {
  const int64_t H = c_.num_attention_heads, HD = HD_, group = H / KVH_;
  const int64_t window = c_.layer_window(l);
  const float scale = 1.0f / std::sqrt(static_cast<float>(HD));
  scores_.resize(pos0 + T);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t p = pos0 + t;
    const int64_t j0 = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
    for (int64_t h = 0; h < H; ++h) {
      const float* qh = q + (t * H + h) * HD;
      const float* kc = cache_k(l, h / group);
      const float* vc = cache_v(l, h / group);
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t j = j0; j <= p; ++j) {
        float s = 0;
        for (int64_t d = 0; d < HD; ++d) s += qh[d] * kc[j * HD + d];
        scores_[j] = s * scale;
        mx = std::max(mx, scores_[j]);
      }
      float sum = 0;
      for (int64_t j = j0; j <= p; ++j) sum += scores_[j] = std::exp(scores_[j] - mx);
      float* oh = out + (t * H + h) * HD;
      std::fill(oh, oh + HD, 0.0f);
      for (int64_t j = j0; j <= p; ++j) {
        const float a = scores_[j] / sum;
        for (int64_t d = 0; d < HD; ++d) oh[d] += a * vc[j * HD + d];
      }
    }
  }
}

void IncrementalDecoder::step(const int32_t* ids, int64_t T, float* logits, LogitsFor which) {
  LT_CHECK(T > 0 && len_ + T <= max_len_, "{} + {} tokens exceed the cache of {}", len_, T,
           max_len_);
  const int64_t D = c_.hidden_size, F = c_.intermediate_size, H = c_.num_attention_heads;
  const int64_t V = c_.vocab_size, HD = HD_, QD = H * HD, KVD = KVH_ * HD, half = HD / 2;
  const int64_t pos0 = len_;
  for (int64_t t = 0; t < T; ++t)
    LT_CHECK(ids[t] >= 0 && ids[t] < V, "token id {} outside the vocabulary of {}", ids[t], V);
  x_.resize(T * D), norm_.resize(T * D), rstd_.resize(T), q_.resize(T * QD);
  kn_.resize(T * KVD), vn_.resize(T * KVD), attn_.resize(T * QD);
  gate_.resize(T * F), up_.resize(T * F), rope_cos_.resize(T * half), rope_sin_.resize(T * half);

  // RoPE tables for positions pos0..pos0+T-1. "dynamic" scaling follows the longest position
  // of this call, as transformers' dynamic_rope_update does during generation.
  std::vector<int32_t> pos(T);
  for (int64_t t = 0; t < T; ++t) pos[t] = static_cast<int32_t>(pos0 + t);
  const RopeParams rp = compute_rope_params(c_, pos0 + T);
  rope_tables(rope_cos_.data(), rope_sin_.data(), pos.data(), rp.inv_freq.data(),
              rp.attention_scaling, T, HD);

  embedding_forward(x_.data(), ids, w_.embed, T, D);
  for (int64_t l = 0; l < c_.num_hidden_layers; ++l) {
    const LayerWeights& w = w_.layers[l];
    // Attention block: x += o_proj(attention(rope(q), rope(k), v)).
    rmsnorm_forward(norm_.data(), rstd_.data(), x_.data(), w.attn_norm, T, D, c_.rms_norm_eps);
    linear_forward(q_.data(), norm_.data(), w.attn_q, w.attn_q_bias, T, D, QD);
    linear_forward(kn_.data(), norm_.data(), w.attn_k, w.attn_k_bias, T, D, KVD);
    linear_forward(vn_.data(), norm_.data(), w.attn_v, w.attn_v_bias, T, D, KVD);
    rope_forward(q_.data(), q_.data(), rope_cos_.data(), rope_sin_.data(), T, H, HD);
    rope_forward(kn_.data(), kn_.data(), rope_cos_.data(), rope_sin_.data(), T, KVH_, HD);
    // (T,KVH,HD) -> cache (KVH, max_len, HD) at rows pos0..pos0+T-1.
    for (int64_t t = 0; t < T; ++t)
      for (int64_t kvh = 0; kvh < KVH_; ++kvh) {
        std::copy_n(kn_.data() + (t * KVH_ + kvh) * HD, HD, cache_k(l, kvh) + (pos0 + t) * HD);
        std::copy_n(vn_.data() + (t * KVH_ + kvh) * HD, HD, cache_v(l, kvh) + (pos0 + t) * HD);
      }
    attend(attn_.data(), q_.data(), l, T, pos0);
    linear_forward(norm_.data(), attn_.data(), w.attn_o, w.attn_o_bias, T, QD, D);
    for (int64_t i = 0; i < T * D; ++i) x_[i] += norm_[i];
    // MLP block: x += down(silu(gate(n)) * up(n)).
    rmsnorm_forward(norm_.data(), rstd_.data(), x_.data(), w.ffn_norm, T, D, c_.rms_norm_eps);
    linear_forward(gate_.data(), norm_.data(), w.ffn_gate, w.ffn_gate_bias, T, D, F);
    linear_forward(up_.data(), norm_.data(), w.ffn_up, w.ffn_up_bias, T, D, F);
    swiglu_forward(gate_.data(), gate_.data(), up_.data(), T * F);
    linear_forward(norm_.data(), gate_.data(), w.ffn_down, w.ffn_down_bias, T, F, D);
    for (int64_t i = 0; i < T * D; ++i) x_[i] += norm_[i];
  }
  len_ += T;
  const int64_t first = which == LogitsFor::kLast ? T - 1 : 0, rows = T - first;
  rmsnorm_forward(norm_.data(), rstd_.data(), x_.data() + first * D, w_.final_norm, rows, D,
                  c_.rms_norm_eps);
  linear_forward(logits, norm_.data(), w_.lm_head, nullptr, rows, D, V);
}

int32_t Sampler::sample(const float* logits, int64_t V) {
  LT_CHECK(V > 0);
  if (p_.temperature <= 0 || p_.top_k == 1) {
    return static_cast<int32_t>(std::max_element(logits, logits + V) - logits);
  }
  // Temperature, then top-k, then top-p (nucleus) over the softmax, as transformers' warpers.
  sorted_.resize(V);
  for (int64_t i = 0; i < V; ++i) sorted_[i] = {logits[i] / p_.temperature, int32_t(i)};
  std::stable_sort(sorted_.begin(), sorted_.end(),
                   [](const auto& a, const auto& b) { return a.first > b.first; });
  int64_t keep = V;
  if (p_.top_k > 0) keep = std::min<int64_t>(keep, p_.top_k);
  const double mx = sorted_[0].first;
  double total = 0;
  for (int64_t i = 0; i < keep; ++i) total += sorted_[i].first = std::exp(sorted_[i].first - mx);
  if (p_.top_p < 1.0) {  // smallest prefix whose probability reaches top_p (at least one token)
    double cum = 0;
    int64_t n = 0;
    while (n < keep && cum < p_.top_p * total) cum += sorted_[n++].first;
    keep = std::max<int64_t>(n, 1);
    total = 0;
    for (int64_t i = 0; i < keep; ++i) total += sorted_[i].first;
  }
  const double u = static_cast<double>(rng_() >> 11) * 0x1.0p-53 * total;
  double cum = 0;
  for (int64_t i = 0; i < keep; ++i) {
    cum += sorted_[i].first;
    if (u < cum) return sorted_[i].second;
  }
  return sorted_[keep - 1].second;
}

std::vector<int32_t> generate(IncrementalDecoder& decoder, const std::vector<int32_t>& prompt,
                              const GenerateOptions& options,
                              const std::function<void(int32_t)>& on_token) {
  LT_CHECK(!prompt.empty(), "generation needs at least one prompt token");
  LT_CHECK(static_cast<int64_t>(prompt.size()) + options.max_new_tokens <= decoder.max_len(),
           "prompt {} + {} new tokens exceed the cache of {}", prompt.size(),
           options.max_new_tokens, decoder.max_len());
  decoder.reset();
  Sampler sampler(options.sampling);
  const int64_t V = decoder.config().vocab_size;
  std::vector<float> logits(V);  // (V) of the last position
  std::vector<int32_t> out;
  decoder.step(prompt.data(), static_cast<int64_t>(prompt.size()), logits.data(), LogitsFor::kLast);
  for (int64_t i = 0; i < options.max_new_tokens; ++i) {
    const int32_t id = sampler.sample(logits.data(), V);
    out.push_back(id);
    if (on_token) on_token(id);
    if (std::find(options.stop_ids.begin(), options.stop_ids.end(), id) != options.stop_ids.end())
      break;
    if (i + 1 < options.max_new_tokens) decoder.step(&id, 1, logits.data(), LogitsFor::kLast);
  }
  return out;
}

std::string render_chat_prompt(const Tokenizer& tokenizer, const std::string& template_option,
                               const std::string& message) {
  const jinja::Template tmpl(resolve_chat_template(template_option, &tokenizer));
  const jinja::Value messages = jinja::Value::array({{{"role", "user"}, {"content", message}}});
  ChatRenderInput in;
  in.messages = &messages;
  in.add_generation_prompt = true;
  in.bos_token = tokenizer.bos_token();
  in.eos_token = tokenizer.eos_token();
  return render_chat(tmpl, in);
}

std::vector<int32_t> chat_prompt_ids(const Tokenizer& tokenizer, const std::string& template_option,
                                     const std::string& message) {
  return tokenizer.encode(render_chat_prompt(tokenizer, template_option, message), false);
}

TextStreamer::TextStreamer(const Tokenizer& tokenizer, const std::vector<int32_t>& prompt)
    : tok_(tokenizer), ids_(prompt) {
  read_ = ids_.size();
  prefix_ = read_ > 5 ? read_ - 5 : 0;
}

namespace {
bool ends_with_replacement(const std::string& s) {
  return s.size() >= 3 && s.compare(s.size() - 3, 3, "\xef\xbf\xbd") == 0;
}
}  // namespace

std::string TextStreamer::put(int32_t id) {
  ids_.push_back(id);
  const std::vector<int32_t> prefix(ids_.begin() + prefix_, ids_.begin() + read_);
  const std::vector<int32_t> all(ids_.begin() + prefix_, ids_.end());
  const std::string prefix_text = tok_.decode(prefix, true);
  const std::string text = tok_.decode(all, true);
  if (text.size() <= prefix_text.size() || ends_with_replacement(text)) return "";
  prefix_ = read_;
  read_ = ids_.size();
  return text.substr(prefix_text.size());
}

std::string TextStreamer::flush() {
  if (read_ == ids_.size()) return "";
  const std::vector<int32_t> prefix(ids_.begin() + prefix_, ids_.begin() + read_);
  const std::vector<int32_t> all(ids_.begin() + prefix_, ids_.end());
  const std::string prefix_text = tok_.decode(prefix, true);
  const std::string text = tok_.decode(all, true);
  prefix_ = read_ = ids_.size();
  return text.size() > prefix_text.size() ? text.substr(prefix_text.size()) : "";
}

}  // namespace lt
