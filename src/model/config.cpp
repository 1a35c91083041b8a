// config.json parsing and validation for Llama, Mistral and Qwen2, writing it back, and the
// rotary-embedding parameters computed exactly as transformers' ROPE_INIT_FUNCTIONS do.
#include "model/config.h"

#include <fmt/ranges.h>

#include <cmath>
#include <numbers>

#include "core/check.h"
#include "core/error.h"
#include "io/atomic_file.h"

namespace lt {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

struct ArchInfo {
  Arch arch;
  const char* architecture;
  const char* model_type;
  // transformers' config class defaults for keys that may be absent from config.json.
  int64_t default_kv_heads;  // 0 = num_attention_heads
  int64_t default_max_position_embeddings;
};

constexpr ArchInfo kArchs[] = {
    {Arch::kLlama, "LlamaForCausalLM", "llama", 0, 2048},
    {Arch::kMistral, "MistralForCausalLM", "mistral", 8, 4096 * 32},
    {Arch::kQwen2, "Qwen2ForCausalLM", "qwen2", 32, 32768},
};

constexpr const char* kAllowedArchs = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM";

// Reads typed fields from one JSON object; every error names the file and the field.
class Fields {
 public:
  Fields(const json& j, std::string source, std::string prefix = "")
      : j_(j), source_(std::move(source)), prefix_(std::move(prefix)) {}

  [[noreturn]] void error(const std::string& key, const std::string& what) const {
    fail("{}: field '{}{}': {}", source_, prefix_, key, what);
  }
  bool has(const std::string& key) const { return j_.contains(key); }
  bool present(const std::string& key) const { return j_.contains(key) && !j_[key].is_null(); }

  int64_t integer(const std::string& key) const {
    if (!j_.contains(key)) error(key, "missing (an integer is required)");
    const json& v = j_[key];
    if (!v.is_number_integer()) error(key, fmt::format("must be an integer, found {}", v.dump()));
    if (v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(INT64_MAX))
      error(key, fmt::format("value {} is too large", v.dump()));
    return v.get<int64_t>();
  }
  int64_t positive(const std::string& key) const {
    const int64_t v = integer(key);
    if (v <= 0) error(key, fmt::format("must be a positive integer, found {}", v));
    return v;
  }
  int64_t positive_or(const std::string& key, int64_t def) const {
    return present(key) ? positive(key) : def;
  }
  double number(const std::string& key) const {
    if (!j_.contains(key)) error(key, "missing (a number is required)");
    const json& v = j_[key];
    if (!v.is_number()) error(key, fmt::format("must be a number, found {}", v.dump()));
    return v.get<double>();
  }
  double number_or(const std::string& key, double def) const {
    return present(key) ? number(key) : def;
  }
  bool boolean_or(const std::string& key, bool def) const {
    if (!present(key)) return def;
    const json& v = j_[key];
    if (!v.is_boolean()) error(key, fmt::format("must be true or false, found {}", v.dump()));
    return v.get<bool>();
  }
  std::string string_or(const std::string& key, const std::string& def) const {
    if (!present(key)) return def;
    const json& v = j_[key];
    if (!v.is_string()) error(key, fmt::format("must be a string, found {}", v.dump()));
    return v.get<std::string>();
  }

 private:
  const json& j_;
  std::string source_, prefix_;
};

const char* rope_type_name(RopeType t) {
  switch (t) {
    case RopeType::kDefault:
      return "default";
    case RopeType::kLinear:
      return "linear";
    case RopeType::kDynamic:
      return "dynamic";
    case RopeType::kLlama3:
      return "llama3";
    case RopeType::kYarn:
      return "yarn";
  }
  return "default";
}

// The rope dict (rope_parameters, or legacy rope_scaling) and theta, as transformers'
// convert_rope_params_to_dict + standardize_rope_params interpret them.
void parse_rope(const json& j, const std::string& source, ModelConfig* c) {
  Fields top(j, source);
  const char* key = nullptr;
  if (j.contains("rope_parameters") && !j["rope_parameters"].is_null())
    key = "rope_parameters";
  else if (j.contains("rope_scaling") && !j["rope_scaling"].is_null())
    key = "rope_scaling";
  const double top_theta = top.number_or("rope_theta", 10000.0);
  c->rope_theta = top_theta;
  c->rope_scaling = RopeScaling{};
  if (!key) {
    if (c->rope_theta <= 0) top.error("rope_theta", "must be > 0");
    return;
  }
  const json& r = j[key];
  if (!r.is_object()) {
    top.error(key, fmt::format("must be an object (or null), found {}", r.type_name()));
  }
  Fields f(r, source, std::string(key) + ".");
  c->rope_theta = f.number_or("rope_theta", top_theta);
  if (c->rope_theta <= 0) f.error("rope_theta", "must be > 0");
  if (f.present("partial_rotary_factor") && f.number("partial_rotary_factor") != 1.0) {
    f.error("partial_rotary_factor", "only 1.0 is supported for Llama, Mistral and Qwen2");
  }
  std::string type =
      f.present("rope_type") ? f.string_or("rope_type", "default") : f.string_or("type", "default");
  const std::string type_key = f.present("rope_type") ? "rope_type" : "type";
  RopeScaling& s = c->rope_scaling;
  if (type == "default")
    s.type = RopeType::kDefault;
  else if (type == "linear")
    s.type = RopeType::kLinear;
  else if (type == "dynamic")
    s.type = RopeType::kDynamic;
  else if (type == "llama3")
    s.type = RopeType::kLlama3;
  else if (type == "yarn")
    s.type = RopeType::kYarn;
  else
    f.error(type_key, fmt::format("unsupported rope type '{}' (supported: default, linear, "
                                  "dynamic, llama3, yarn)",
                                  type));
  if (s.type == RopeType::kDefault) return;

  // original_max_position_embeddings (llama3, yarn): a top-level key overrides, else the dict's,
  // else max_position_embeddings (standardize_rope_params).
  if (s.type == RopeType::kLlama3 || s.type == RopeType::kYarn) {
    s.original_max_position_embeddings =
        top.present("original_max_position_embeddings")
            ? top.positive("original_max_position_embeddings")
            : f.positive_or("original_max_position_embeddings", c->max_position_embeddings);
  }
  if (s.type == RopeType::kYarn && f.has("factor") && !f.present("factor")) {
    // factor null: transformers uses max_position_embeddings / original_max_position_embeddings.
    s.factor = static_cast<double>(c->max_position_embeddings) /
               static_cast<double>(s.original_max_position_embeddings);
  } else {
    s.factor = f.number("factor");
  }
  if (!(s.factor > 0)) f.error("factor", fmt::format("must be > 0, found {}", s.factor));
  if (s.type == RopeType::kLlama3) {
    s.low_freq_factor = f.number("low_freq_factor");
    s.high_freq_factor = f.number("high_freq_factor");
    if (!(s.high_freq_factor > s.low_freq_factor) || !(s.low_freq_factor > 0)) {
      f.error("high_freq_factor", fmt::format("must be greater than low_freq_factor > 0, found "
                                              "high {} and low {}",
                                              s.high_freq_factor, s.low_freq_factor));
    }
  }
  if (s.type == RopeType::kYarn) {
    s.attention_factor = f.present("attention_factor") ? f.number("attention_factor") : -1.0;
    if (f.present("attention_factor") && s.attention_factor < 0)
      f.error("attention_factor", "must be >= 0");
    // transformers: `beta_fast or 32`, `beta_slow or 1` (0 and null mean the default).
    s.beta_fast = f.number_or("beta_fast", 0.0);
    if (s.beta_fast == 0) s.beta_fast = 32.0;
    s.beta_slow = f.number_or("beta_slow", 0.0);
    if (s.beta_slow == 0) s.beta_slow = 1.0;
    if (!(s.beta_fast > 0) || !(s.beta_slow > 0))
      f.error("beta_fast", "beta_fast and beta_slow must be > 0");
    s.mscale = f.number_or("mscale", 0.0);
    s.mscale_all_dim = f.number_or("mscale_all_dim", 0.0);
    s.truncate = f.boolean_or("truncate", true);
  }
}

DType parse_torch_dtype(const json& j, const std::string& source) {
  const char* key = j.contains("dtype") && !j["dtype"].is_null() ? "dtype" : "torch_dtype";
  Fields f(j, source);
  const std::string s = f.string_or(key, "float32");
  if (s == "float32") return DType::kF32;
  if (s == "bfloat16") return DType::kBF16;
  if (s == "float16") return DType::kF16;
  if (s == "float64") return DType::kF64;
  f.error(key, fmt::format("unsupported dtype '{}' (supported: float32, bfloat16, float16, "
                           "float64)",
                           s));
}

const char* torch_dtype_name(DType t) {
  switch (t) {
    case DType::kBF16:
      return "bfloat16";
    case DType::kF16:
      return "float16";
    case DType::kF64:
      return "float64";
    default:
      return "float32";
  }
}

}  // namespace

int64_t ModelConfig::layer_window(int64_t layer) const {
  LT_CHECK(layer >= 0 && layer < num_hidden_layers, "layer {} of {}", layer, num_hidden_layers);
  if (sliding_window <= 0) return 0;
  switch (arch) {
    case Arch::kLlama:
      return 0;
    case Arch::kMistral:
      return sliding_window;  // every layer (MistralAttention)
    case Arch::kQwen2:
      // Qwen2Config: layer_types[i] == "sliding_attention" (default: i >= max_window_layers).
      if (!layer_types.empty())
        return layer_types[layer] == "sliding_attention" ? sliding_window : 0;
      return layer >= max_window_layers ? sliding_window : 0;
  }
  return 0;
}

ModelConfig parse_model_config(const json& j, const std::string& source_name) {
  const std::string& src = source_name;
  if (!j.is_object()) fail("{}: config must be a JSON object, found {}", src, j.type_name());
  Fields f(j, src);
  ModelConfig c;
  c.raw = j;
  const ArchInfo* info = nullptr;
  if (f.present("architectures")) {
    const json& a = j["architectures"];
    if (!a.is_array() || a.empty() || !a[0].is_string()) {
      f.error("architectures",
              fmt::format("must be a non-empty list of strings, found {}", a.dump()));
    }
    c.architecture = a[0].get<std::string>();
    for (const ArchInfo& i : kArchs)
      if (c.architecture == i.architecture) info = &i;
    if (!info) {
      f.error("architectures", fmt::format("unsupported architecture '{}' (supported: {})",
                                           c.architecture, kAllowedArchs));
    }
  } else {
    const std::string mt = f.string_or("model_type", "");
    if (mt.empty()) {
      f.error("architectures",
              fmt::format("missing, and no model_type either (supported: {})", kAllowedArchs));
    }
    for (const ArchInfo& i : kArchs)
      if (mt == i.model_type) info = &i;
    if (!info) {
      f.error("model_type", fmt::format("unsupported model_type '{}' (supported: llama, mistral, "
                                        "qwen2)",
                                        mt));
    }
    c.architecture = info->architecture;
  }
  c.arch = info->arch;
  c.model_type = info->model_type;

  c.hidden_size = f.positive("hidden_size");
  c.intermediate_size = f.positive("intermediate_size");
  c.num_hidden_layers = f.positive("num_hidden_layers");
  c.num_attention_heads = f.positive("num_attention_heads");
  c.vocab_size = f.positive("vocab_size");
  // Absent: the config class default (Mistral 8, Qwen2 32); null: num_attention_heads.
  if (!f.has("num_key_value_heads") && info->default_kv_heads > 0) {
    c.num_key_value_heads = info->default_kv_heads;
  } else {
    c.num_key_value_heads = f.positive_or("num_key_value_heads", c.num_attention_heads);
  }
  if (c.num_attention_heads % c.num_key_value_heads != 0) {
    f.error("num_key_value_heads", fmt::format("num_attention_heads ({}) must be a multiple of "
                                               "num_key_value_heads ({})",
                                               c.num_attention_heads, c.num_key_value_heads));
  }
  if (f.present("head_dim")) {
    c.head_dim = f.positive("head_dim");
  } else {
    if (c.hidden_size % c.num_attention_heads != 0) {
      f.error("num_attention_heads", fmt::format("hidden_size ({}) must be a multiple of "
                                                 "num_attention_heads ({}) when head_dim is not "
                                                 "given",
                                                 c.hidden_size, c.num_attention_heads));
    }
    c.head_dim = c.hidden_size / c.num_attention_heads;
  }
  if (c.head_dim % 2 != 0) {
    f.error("head_dim",
            fmt::format("rotary embeddings need an even head dimension, found {}", c.head_dim));
  }
  c.max_position_embeddings =
      f.positive_or("max_position_embeddings", info->default_max_position_embeddings);
  c.rms_norm_eps = f.number_or("rms_norm_eps", 1e-6);
  if (!(c.rms_norm_eps > 0)) {
    f.error("rms_norm_eps", fmt::format("must be > 0, found {}", c.rms_norm_eps));
  }
  parse_rope(j, src, &c);
  c.tie_word_embeddings = f.boolean_or("tie_word_embeddings", false);

  switch (c.arch) {
    case Arch::kLlama:
      c.attention_bias = f.boolean_or("attention_bias", false);
      c.mlp_bias = f.boolean_or("mlp_bias", false);
      break;
    case Arch::kMistral:
      // MistralConfig: sliding_window defaults to 4096 when absent; null = full attention.
      c.sliding_window = f.has("sliding_window") ? f.positive_or("sliding_window", 0) : 4096;
      break;
    case Arch::kQwen2: {
      c.qkv_bias = true;
      const bool use = f.boolean_or("use_sliding_window", false);
      const int64_t window = f.has("sliding_window") ? f.positive_or("sliding_window", 0) : 4096;
      c.sliding_window = use ? window : 0;
      c.max_window_layers = f.has("max_window_layers") ? f.integer("max_window_layers") : 28;
      if (c.max_window_layers < 0) f.error("max_window_layers", "must be >= 0");
      if (f.present("layer_types")) {
        const json& lt = j["layer_types"];
        if (!lt.is_array() || static_cast<int64_t>(lt.size()) != c.num_hidden_layers) {
          f.error("layer_types",
                  fmt::format("must be a list of {} strings (one per layer)", c.num_hidden_layers));
        }
        for (const json& t : lt) {
          if (!t.is_string() || (t != "full_attention" && t != "sliding_attention")) {
            f.error("layer_types", fmt::format("entries must be \"full_attention\" or "
                                               "\"sliding_attention\", found {}",
                                               t.dump()));
          }
          c.layer_types.push_back(t.get<std::string>());
        }
      }
      break;
    }
  }
  c.torch_dtype = parse_torch_dtype(j, src);
  return c;
}

ModelConfig load_model_config(const fs::path& config_json) {
  const std::string text = read_file(config_json);
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    fail("{}: not valid JSON: {}", config_json.string(), e.what());
  }
  return parse_model_config(j, config_json.string());
}

namespace {

// The rope dict for saving, with the keys transformers expects for the type.
json rope_dict(const ModelConfig& c, bool with_theta, bool legacy) {
  const RopeScaling& s = c.rope_scaling;
  json r = json::object();
  if (with_theta) r["rope_theta"] = c.rope_theta;
  r["rope_type"] = rope_type_name(s.type);
  if (legacy) r["type"] = rope_type_name(s.type);  // transformers < 4.43 reads "type"
  if (s.type == RopeType::kDefault) return r;
  r["factor"] = s.factor;
  const int64_t orig = s.original_max_position_embeddings > 0 ? s.original_max_position_embeddings
                                                              : c.max_position_embeddings;
  if (s.type == RopeType::kLlama3) {
    r["low_freq_factor"] = s.low_freq_factor;
    r["high_freq_factor"] = s.high_freq_factor;
    r["original_max_position_embeddings"] = orig;
  } else if (s.type == RopeType::kYarn) {
    r["original_max_position_embeddings"] = orig;
    r["beta_fast"] = s.beta_fast;
    r["beta_slow"] = s.beta_slow;
    if (s.attention_factor >= 0) r["attention_factor"] = s.attention_factor;
    if (s.mscale != 0) r["mscale"] = s.mscale;
    if (s.mscale_all_dim != 0) r["mscale_all_dim"] = s.mscale_all_dim;
    if (!s.truncate) r["truncate"] = false;
  }
  return r;
}

}  // namespace

json model_config_to_json(const ModelConfig& c) {
  json j = c.raw.is_object() ? c.raw : json::object();
  // What the unchanged file says, to write back only the fields that differ (so an untouched
  // config round-trips byte for byte modulo formatting).
  ModelConfig before;
  bool have_before = false;
  if (c.raw.is_object()) {
    try {
      before = parse_model_config(c.raw, "config");
      have_before = true;
    } catch (const UserError&) {
    }
  }
  if (!j.contains("architectures") || !have_before || before.architecture != c.architecture) {
    j["architectures"] = json::array({c.architecture});
  }
  j["model_type"] = c.model_type;
  auto put_int = [&](const char* key, int64_t v, int64_t old) {
    if (!have_before || v != old || !j.contains(key)) j[key] = v;
  };
  put_int("hidden_size", c.hidden_size, before.hidden_size);
  put_int("intermediate_size", c.intermediate_size, before.intermediate_size);
  put_int("num_hidden_layers", c.num_hidden_layers, before.num_hidden_layers);
  put_int("num_attention_heads", c.num_attention_heads, before.num_attention_heads);
  put_int("num_key_value_heads", c.num_key_value_heads, before.num_key_value_heads);
  put_int("vocab_size", c.vocab_size, before.vocab_size);
  put_int("max_position_embeddings", c.max_position_embeddings, before.max_position_embeddings);
  if (!have_before || c.head_dim != before.head_dim) j["head_dim"] = c.head_dim;
  if (!have_before || c.rms_norm_eps != before.rms_norm_eps) j["rms_norm_eps"] = c.rms_norm_eps;
  if (!have_before || c.tie_word_embeddings != before.tie_word_embeddings) {
    j["tie_word_embeddings"] = c.tie_word_embeddings;
  }
  if (c.arch == Arch::kLlama && (!have_before || c.attention_bias != before.attention_bias ||
                                 c.mlp_bias != before.mlp_bias)) {
    j["attention_bias"] = c.attention_bias;
    j["mlp_bias"] = c.mlp_bias;
  }
  // Spelling family: transformers 5 writes rope_parameters and dtype, 4.x rope_theta,
  // rope_scaling and torch_dtype. Keep the one the file used.
  const bool legacy =
      !j.contains("rope_parameters") &&
      (j.contains("rope_scaling") || j.contains("rope_theta") || j.contains("torch_dtype"));
  if (!have_before || !(c.rope_scaling == before.rope_scaling) ||
      c.rope_theta != before.rope_theta) {
    if (legacy) {
      j["rope_theta"] = c.rope_theta;
      j["rope_scaling"] =
          c.rope_scaling.type == RopeType::kDefault ? json(nullptr) : rope_dict(c, false, true);
    } else {
      j["rope_parameters"] = rope_dict(c, true, false);
      j.erase("rope_scaling");
      j.erase("rope_theta");
    }
  }
  if (!have_before || c.torch_dtype != before.torch_dtype) {
    const bool v5_dtype = j.contains("dtype") || (!legacy && !j.contains("torch_dtype"));
    j[v5_dtype ? "dtype" : "torch_dtype"] = torch_dtype_name(c.torch_dtype);
  }
  if (c.arch == Arch::kMistral && (!have_before || c.sliding_window != before.sliding_window)) {
    j["sliding_window"] = c.sliding_window > 0 ? json(c.sliding_window) : json(nullptr);
  }
  if (c.arch == Arch::kQwen2 && (!have_before || c.sliding_window != before.sliding_window ||
                                 c.max_window_layers != before.max_window_layers)) {
    j["use_sliding_window"] = c.sliding_window > 0;
    if (c.sliding_window > 0) j["sliding_window"] = c.sliding_window;
    j["max_window_layers"] = c.max_window_layers;
  }
  return j;
}

// ---------------------------------------------------------------------------------------------
// Rotary parameters. transformers computes inv_freq with float32 torch ops (int64 arange ->
// float, python scalars cast to float32, `a / t` as reciprocal(t) * a); each step below mirrors
// one torch op so that results agree to an ulp or two. Scalar setup (correction ranges,
// attention factors, the dynamic base at init) is python double arithmetic.

namespace {

// 1 / base^(2i/dim) for i < dim/2, in float32 as torch: base ** (arange(0, dim, 2).float() / dim).
std::vector<float> default_inv_freq(float base, int64_t dim) {
  std::vector<float> inv(dim / 2);
  for (int64_t i = 0; i < dim / 2; ++i) {
    const float e = static_cast<float>(2 * i) / static_cast<float>(dim);
    inv[i] = 1.0f / std::pow(base, e);
  }
  return inv;
}

// transformers' get_mscale (YaRN paper, sqrt(1/t) = 0.1 ln(s) + 1).
double yarn_get_mscale(double scale, double mscale) {
  if (scale <= 1) return 1.0;
  return 0.1 * mscale * std::log(scale) + 1.0;
}

}  // namespace

RopeParams compute_rope_params(const ModelConfig& c, int64_t seq_len) {
  const RopeScaling& s = c.rope_scaling;
  const int64_t dim = c.head_dim;
  LT_CHECK(dim > 0 && dim % 2 == 0, "head_dim {} must be positive and even", dim);
  const int64_t half = dim / 2;
  const int64_t orig = s.original_max_position_embeddings > 0 ? s.original_max_position_embeddings
                                                              : c.max_position_embeddings;
  RopeParams p;
  p.attention_scaling = 1.0f;
  switch (s.type) {
    case RopeType::kDefault:
      p.inv_freq = default_inv_freq(static_cast<float>(c.rope_theta), dim);
      break;
    case RopeType::kLinear: {
      // Position interpolation (Chen et al. 2023): positions / factor == inv_freq / factor.
      p.inv_freq = default_inv_freq(static_cast<float>(c.rope_theta), dim);
      const float factor = static_cast<float>(s.factor);
      for (float& v : p.inv_freq) v /= factor;
      break;
    }
    case RopeType::kDynamic: {
      // Dynamic NTK: base' = base * (factor * L / max - (factor - 1))^(dim / (dim - 2)), with L
      // = max(seq_len, max_position_embeddings). dynamic_rope_update recomputes only when
      // seq_len (longest position + 1) exceeds the cached max_position_embeddings, and then
      // with 0-dim float32 tensors; at init (python floats) the ratio is 1 and base' = base.
      const int64_t max_pos = c.max_position_embeddings;
      if (seq_len > max_pos) {
        float r = static_cast<float>(s.factor) * static_cast<float>(seq_len);
        r = r / static_cast<float>(max_pos);
        r = r - static_cast<float>(s.factor - 1.0);
        const float exponent = static_cast<float>(double(dim) / double(dim - 2));
        const float base = static_cast<float>(c.rope_theta) * std::pow(r, exponent);
        p.inv_freq = default_inv_freq(base, dim);
      } else {
        const double ratio = s.factor * double(max_pos) / double(max_pos) - (s.factor - 1.0);
        const double base = c.rope_theta * std::pow(ratio, double(dim) / double(dim - 2));
        p.inv_freq = default_inv_freq(static_cast<float>(base), dim);
      }
      break;
    }
    case RopeType::kLlama3: {
      // Llama 3.1: keep high frequencies (wavelength < orig / high_freq_factor), divide low ones
      // (wavelength > orig / low_freq_factor) by factor, interpolate smoothly in between.
      p.inv_freq = default_inv_freq(static_cast<float>(c.rope_theta), dim);
      const float factor = static_cast<float>(s.factor);
      const float low = static_cast<float>(s.low_freq_factor);
      const float old_context = static_cast<float>(orig);
      const float low_freq_wavelen = static_cast<float>(double(orig) / s.low_freq_factor);
      const float high_freq_wavelen = static_cast<float>(double(orig) / s.high_freq_factor);
      const float band = static_cast<float>(s.high_freq_factor - s.low_freq_factor);
      const float two_pi = static_cast<float>(2 * std::numbers::pi);
      for (float& inv : p.inv_freq) {
        const float wavelen = (1.0f / inv) * two_pi;
        const float llama = wavelen > low_freq_wavelen ? inv / factor : inv;
        const float smooth = ((1.0f / wavelen) * old_context - low) / band;
        const float smoothed = (1.0f - smooth) * llama / factor + smooth * llama;
        const bool medium = !(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen);
        inv = medium ? smoothed : llama;
      }
      break;
    }
    case RopeType::kYarn: {
      // YaRN (Peng et al. 2023): interpolate low frequencies by factor, keep (extrapolate) high
      // ones, with a linear ramp between the correction dimensions of beta_fast and beta_slow.
      const double base = c.rope_theta;
      const double factor = s.factor;
      double attention = s.attention_factor;
      if (attention < 0) {
        attention =
            (s.mscale != 0 && s.mscale_all_dim != 0)
                ? yarn_get_mscale(factor, s.mscale) / yarn_get_mscale(factor, s.mscale_all_dim)
                : yarn_get_mscale(factor, 1.0);
      }
      auto correction_dim = [&](double rotations) {
        return (double(dim) * std::log(double(orig) / (rotations * 2 * std::numbers::pi))) /
               (2 * std::log(base));
      };
      double low = correction_dim(s.beta_fast), high = correction_dim(s.beta_slow);
      if (s.truncate) {
        low = std::floor(low);
        high = std::ceil(high);
      }
      low = std::max(low, 0.0);
      high = std::min(high, double(dim - 1));
      if (low == high) high += 0.001;  // transformers: prevent singularity
      const float low_f = static_cast<float>(low);
      const float range_f = static_cast<float>(high - low);
      const float factor_f = static_cast<float>(factor);
      const float base_f = static_cast<float>(base);
      p.inv_freq.resize(half);
      for (int64_t i = 0; i < half; ++i) {
        const float pos_freq =
            std::pow(base_f, static_cast<float>(2 * i) / static_cast<float>(dim));
        const float extrapolation = 1.0f / pos_freq;
        const float interpolation = 1.0f / (factor_f * pos_freq);
        const float ramp = std::clamp((static_cast<float>(i) - low_f) / range_f, 0.0f, 1.0f);
        const float extrapolation_factor = 1.0f - ramp;
        p.inv_freq[i] =
            interpolation * (1.0f - extrapolation_factor) + extrapolation * extrapolation_factor;
      }
      p.attention_scaling = static_cast<float>(attention);
      break;
    }
  }
  return p;
}

}  // namespace lt
