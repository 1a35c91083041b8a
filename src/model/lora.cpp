// LoRA settings, target parsing and the adapter tensor table (see lora.h).
#include "model/lora.h"

#include <fmt/format.h>

#include <cmath>
#include <random>
#include <sstream>

#include "core/error.h"
#include "core/memory.h"

namespace lt {

namespace {
constexpr const char* kProjNames[kNumProj] = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                              "gate_proj", "up_proj", "down_proj"};

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    const auto b = item.find_first_not_of(" \t"), e = item.find_last_not_of(" \t");
    if (b != std::string::npos) out.push_back(item.substr(b, e - b + 1));
  }
  return out;
}
}  // namespace

const char* proj_name(Proj p) { return kProjNames[static_cast<int>(p)]; }

std::string proj_module(Proj p) {
  return (static_cast<int>(p) < 4 ? "self_attn." : "mlp.") + std::string(proj_name(p));
}

float LoraSpec::scale() const {
  return static_cast<float>(rslora ? alpha / std::sqrt(double(r)) : alpha / double(r));
}

std::array<bool, kNumProj> parse_lora_targets(const std::vector<std::string>& names,
                                              const std::string& what) {
  std::array<bool, kNumProj> t{};
  if (names.size() == 1 && (names[0] == "all-linear" || names[0] == "all_linear")) {
    t.fill(true);  // PEFT: every linear layer but the output layer (lm_head)
    return t;
  }
  if (names.empty())
    fail("{}: no target modules given; use e.g. q_proj,v_proj or all-linear", what);
  for (const auto& n : names) {
    bool found = false;
    for (int p = 0; p < kNumProj; ++p)
      if (n == kProjNames[p] || n == proj_module(Proj(p))) t[p] = found = true;
    if (!found)
      fail(
          "{}: '{}' is not a target module; allowed: q_proj, k_proj, v_proj, o_proj, gate_proj, "
          "up_proj, down_proj or all-linear",
          what, n);
  }
  return t;
}

LoraSpec resolve_lora(const LoraOptions& o, uint64_t seed) {
  LoraSpec s;
  s.enabled = o.use_peft_lora || o.load_in_4bit || !o.adapter_name_or_path.empty();
  if (!s.enabled) {
    if (!o.trainable_params.empty())
      fail(
          "--trainable_params '{}' needs --use_peft_lora True (a full fine-tune trains everything)",
          o.trainable_params);
    return s;
  }
  if (o.r <= 0) fail("--lora_r must be a positive integer (got {})", o.r);
  if (!(o.alpha > 0)) fail("--lora_alpha must be > 0 (got {})", o.alpha);
  if (!(o.dropout >= 0 && o.dropout < 1))
    fail("--lora_dropout must be in [0, 1) (got {})", o.dropout);
  s.r = o.r;
  s.alpha = o.alpha;
  s.dropout = o.dropout;
  s.rslora = o.use_rslora;
  s.targets = parse_lora_targets(split_list(o.target_modules), "--lora_target_modules");
  for (const auto& t : split_list(o.trainable_params)) {
    if (t == "embed")
      s.train_embed = true;
    else if (t == "norm")
      s.train_norm = true;
    else
      fail("--trainable_params: '{}' is not allowed; use embed, norm or embed,norm", t);
  }
  s.quantize_4bit = o.load_in_4bit;
  s.seed = seed;
  return s;
}

std::pair<int64_t, int64_t> proj_shape(const ModelConfig& c, Proj p) {
  const int64_t D = c.hidden_size, F = c.intermediate_size;
  const int64_t QD = c.num_attention_heads * c.head_dim, KVD = c.num_key_value_heads * c.head_dim;
  switch (p) {
    case Proj::kQ:
      return {D, QD};
    case Proj::kK:
      return {D, KVD};
    case Proj::kV:
      return {D, KVD};
    case Proj::kO:
      return {QD, D};
    case Proj::kGate:
      return {D, F};
    case Proj::kUp:
      return {D, F};
    case Proj::kDown:
      return {F, D};
  }
  return {0, 0};
}

std::string peft_name(const std::string& hf_name) { return "base_model.model." + hf_name; }

LoraTable::LoraTable(const ModelConfig& c, const LoraSpec& s, int64_t layer_begin,
                     int64_t layer_end) {
  if (!s.enabled) return;
  for (int64_t l = layer_begin; l < layer_end; ++l)
    for (int p = 0; p < kNumProj; ++p) {
      if (!s.targets[p]) continue;
      const auto [in, out] = proj_shape(c, Proj(p));
      const std::string base = fmt::format("model.layers.{}.{}.", l, proj_module(Proj(p)));
      for (bool is_b : {false, true}) {
        LoraTensorInfo t;
        t.name = peft_name(base + (is_b ? "lora_B.weight" : "lora_A.weight"));
        t.layer = l;
        t.proj = Proj(p);
        t.is_b = is_b;
        t.shape = is_b ? std::vector<int64_t>{out, s.r} : std::vector<int64_t>{s.r, in};
        t.numel = t.shape[0] * t.shape[1];
        t.offset = total_;
        total_ += static_cast<int64_t>(align_up(size_t(t.numel) * 4) / 4);
        tensors_.push_back(std::move(t));
      }
    }
}

int64_t LoraTable::find(int64_t layer, Proj p, bool is_b) const {
  for (size_t i = 0; i < tensors_.size(); ++i)
    if (tensors_[i].layer == layer && tensors_[i].proj == p && tensors_[i].is_b == is_b)
      return static_cast<int64_t>(i);
  return -1;
}

int64_t LoraTable::index(const std::string& name) const {
  for (size_t i = 0; i < tensors_.size(); ++i)
    if (tensors_[i].name == name) return static_cast<int64_t>(i);
  return -1;
}

void init_lora_weights(const LoraTable& table, uint64_t seed, float* block) {
  std::mt19937_64 rng(seed);
  std::fill(block, block + table.total_numel(), 0.0f);
  for (const auto& t : table.tensors()) {
    if (t.is_b) continue;  // B = 0: the adapter starts as the identity change
    // kaiming_uniform_(a=sqrt(5)): gain = sqrt(2/(1+5)), bound = gain*sqrt(3/fan_in) = 1/sqrt(IN)
    const float bound = 1.0f / std::sqrt(float(t.shape[1]));
    std::uniform_real_distribution<float> u(-bound, bound);
    for (int64_t i = 0; i < t.numel; ++i) block[t.offset + i] = u(rng);
  }
}

}  // namespace lt
