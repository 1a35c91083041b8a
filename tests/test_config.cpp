// config.json parsing against what transformers reads from the same files, rope parameters
// against transformers' rotary embedding (fixtures from tools/make_*_fixtures.py), bad configs.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "io/atomic_file.h"
#include "model/config.h"

namespace lt {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

const fs::path kFixtures = fs::path(LT_SOURCE_DIR) / "tests/fixtures";

json load_json(const fs::path& p) { return json::parse(read_file(p)); }

// ---------------------------------------------------------------------------------------------
// Rope parameters vs transformers

TEST(Rope, MatchesTransformers) {
  const json cases = load_json(kFixtures / "rope/rope_cases.json")["cases"];
  ASSERT_GE(cases.size(), 15u);
  for (const json& cs : cases) {
    const std::string name = cs["name"];
    SCOPED_TRACE(name);
    const ModelConfig c = parse_model_config(cs["config"], name);
    const RopeParams p = compute_rope_params(c, cs["seq_len"].get<int64_t>());
    const std::vector<double> want = cs["inv_freq"].get<std::vector<double>>();
    ASSERT_EQ(p.inv_freq.size(), want.size());
    double worst = 0;
    size_t worst_i = 0;
    for (size_t i = 0; i < want.size(); ++i) {
      const double rel = std::abs(p.inv_freq[i] - want[i]) / std::abs(want[i]);
      if (rel > worst) worst = rel, worst_i = i;
    }
    EXPECT_LE(worst, 1e-6) << "worst inv_freq[" << worst_i << "]: ours " << p.inv_freq[worst_i]
                           << " transformers " << want[worst_i];
    const double att = cs["attention_scaling"];
    EXPECT_NEAR(p.attention_scaling, att, 1e-6 * att) << "attention_scaling";
  }
}

TEST(Rope, DynamicOnlyChangesAboveMax) {
  json j = load_json(kFixtures / "configs/llama_legacy_4x.json");
  j["rope_scaling"] = {{"type", "dynamic"}, {"factor", 2.0}};
  j["max_position_embeddings"] = 128;
  const ModelConfig c = parse_model_config(j, "mem");
  EXPECT_EQ(compute_rope_params(c, 128).inv_freq, compute_rope_params(c, 1).inv_freq);
  EXPECT_LT(compute_rope_params(c, 129).inv_freq.back(),
            compute_rope_params(c, 128).inv_freq.back());
}

// ---------------------------------------------------------------------------------------------
// Real config.json files vs transformers' interpretation

DType dtype_from_torch(const std::string& s) {
  if (s == "bfloat16") return DType::kBF16;
  if (s == "float16") return DType::kF16;
  if (s == "float64") return DType::kF64;
  return DType::kF32;
}

class ConfigFixture : public ::testing::TestWithParam<std::string> {};

TEST_P(ConfigFixture, MatchesTransformers) {
  const fs::path path = kFixtures / "configs" / (GetParam() + ".json");
  const json want = load_json(kFixtures / "configs" / (GetParam() + ".expected.json"));
  const ModelConfig c = load_model_config(path);
  EXPECT_EQ(c.model_type, want["model_type"]);
  EXPECT_EQ(c.hidden_size, want["hidden_size"]);
  EXPECT_EQ(c.intermediate_size, want["intermediate_size"]);
  EXPECT_EQ(c.num_hidden_layers, want["num_hidden_layers"]);
  EXPECT_EQ(c.num_attention_heads, want["num_attention_heads"]);
  EXPECT_EQ(c.num_key_value_heads, want["num_key_value_heads"]);
  EXPECT_EQ(c.head_dim, want["head_dim"]);
  EXPECT_EQ(c.vocab_size, want["vocab_size"]);
  EXPECT_EQ(c.max_position_embeddings, want["max_position_embeddings"]);
  EXPECT_EQ(c.rms_norm_eps, want["rms_norm_eps"].get<double>());
  EXPECT_EQ(c.tie_word_embeddings, want["tie_word_embeddings"]);
  EXPECT_EQ(c.attention_bias, want["attention_bias"]);
  EXPECT_EQ(c.mlp_bias, want["mlp_bias"]);
  EXPECT_EQ(c.qkv_bias, c.arch == Arch::kQwen2);
  EXPECT_EQ(c.torch_dtype, dtype_from_torch(want["dtype"]));
  const json& r = want["rope_parameters"];
  EXPECT_EQ(c.rope_theta, r["rope_theta"].get<double>());
  const std::string type = r["rope_type"];
  const RopeScaling& s = c.rope_scaling;
  const char* names[] = {"default", "linear", "dynamic", "llama3", "yarn"};
  EXPECT_EQ(names[static_cast<int>(s.type)], type);
  if (r.contains("factor")) {
    EXPECT_EQ(s.factor, r["factor"].get<double>());
  }
  if (r.contains("original_max_position_embeddings")) {
    EXPECT_EQ(s.original_max_position_embeddings, r["original_max_position_embeddings"]);
  }
  if (type == "llama3") {
    EXPECT_EQ(s.low_freq_factor, r["low_freq_factor"].get<double>());
    EXPECT_EQ(s.high_freq_factor, r["high_freq_factor"].get<double>());
  }
  const std::vector<int64_t> windows = want["layer_windows"];
  ASSERT_EQ(static_cast<int64_t>(windows.size()), c.num_hidden_layers);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l)
    EXPECT_EQ(c.layer_window(l), windows[l]) << "layer " << l;

  // Writing back an unchanged config gives the file's own JSON, and parses to the same config.
  const json out = model_config_to_json(c);
  EXPECT_EQ(out, c.raw);
  const ModelConfig again = parse_model_config(out, "again");
  EXPECT_EQ(again.rope_scaling, c.rope_scaling);
  EXPECT_EQ(again.torch_dtype, c.torch_dtype);
}

INSTANTIATE_TEST_SUITE_P(All, ConfigFixture,
                         ::testing::Values("llama_v5_llama3_rope", "mistral_v5", "qwen2_v5_sliding",
                                           "llama_legacy_4x", "mistral_legacy_4x",
                                           "qwen2_legacy_4x", "qwen2_legacy_sliding"));

TEST(Config, ModelTypeWithoutArchitectures) {
  json j = load_json(kFixtures / "configs/mistral_v5.json");
  j.erase("architectures");
  const ModelConfig c = parse_model_config(j, "x");
  EXPECT_EQ(c.arch, Arch::kMistral);
  EXPECT_EQ(c.architecture, "MistralForCausalLM");
}

TEST(Config, MistralSlidingWindowDefaultsLikeTransformers) {
  json j = load_json(kFixtures / "configs/mistral_v5.json");
  j.erase("sliding_window");  // MistralConfig default: 4096
  EXPECT_EQ(parse_model_config(j, "x").layer_window(0), 4096);
  j["sliding_window"] = nullptr;
  EXPECT_EQ(parse_model_config(j, "x").layer_window(1), 0);
}

// Writing back changed rope scaling / dtype keeps the spelling family of the file.
TEST(Config, WriteBackKeepsSpelling) {
  for (const char* name : {"mistral_v5", "llama_legacy_4x", "qwen2_legacy_4x"}) {
    SCOPED_TRACE(name);
    ModelConfig c = load_model_config(kFixtures / "configs" / (std::string(name) + ".json"));
    const bool v5 = c.raw.contains("rope_parameters");
    c.rope_scaling = RopeScaling{};
    c.rope_scaling.type = RopeType::kLinear;
    c.rope_scaling.factor = 4.0;
    c.torch_dtype = DType::kF16;
    const json out = model_config_to_json(c);
    if (v5) {
      EXPECT_EQ(out["rope_parameters"]["rope_type"], "linear");
      EXPECT_EQ(out["rope_parameters"]["factor"], 4.0);
      EXPECT_EQ(out["rope_parameters"]["rope_theta"], c.rope_theta);
      EXPECT_FALSE(out.contains("rope_scaling"));
      EXPECT_EQ(out["dtype"], "float16");
    } else {
      EXPECT_EQ(out["rope_scaling"]["rope_type"], "linear");
      EXPECT_EQ(out["rope_scaling"]["type"], "linear");
      EXPECT_EQ(out["rope_scaling"]["factor"], 4.0);
      EXPECT_EQ(out["rope_theta"], c.rope_theta);
      EXPECT_FALSE(out.contains("rope_parameters"));
      EXPECT_EQ(out["torch_dtype"], "float16");
    }
    const ModelConfig again = parse_model_config(out, "again");
    EXPECT_EQ(again.rope_scaling, c.rope_scaling);
    EXPECT_EQ(again.rope_theta, c.rope_theta);
    EXPECT_EQ(again.torch_dtype, DType::kF16);
  }
}

// ---------------------------------------------------------------------------------------------
// Bad configs: each is a UserError naming config.json's path and the field.

struct BadCase {
  const char* what;
  std::function<void(json&)> edit;
  const char* field;  // must appear in the message
};

TEST(Config, BadConfigsNameFileAndField) {
  const fs::path dir = fs::temp_directory_path() / fmt::format("lt_cfg_{}", ::getpid());
  fs::create_directories(dir);
  const fs::path path = dir / "config.json";
  const json base = load_json(kFixtures / "configs/llama_legacy_4x.json");
  const std::vector<BadCase> cases = {
      {"missing hidden_size", [](json& j) { j.erase("hidden_size"); }, "hidden_size"},
      {"string hidden_size", [](json& j) { j["hidden_size"] = "64"; }, "hidden_size"},
      {"float layers", [](json& j) { j["num_hidden_layers"] = 2.5; }, "num_hidden_layers"},
      {"zero vocab", [](json& j) { j["vocab_size"] = 0; }, "vocab_size"},
      {"negative intermediate", [](json& j) { j["intermediate_size"] = -4; }, "intermediate_size"},
      {"unsupported arch", [](json& j) { j["architectures"] = {"GPT2LMHeadModel"}; },
       "GPT2LMHeadModel"},
      {"arch not a list", [](json& j) { j["architectures"] = "LlamaForCausalLM"; },
       "architectures"},
      {"no arch no model_type",
       [](json& j) {
         j.erase("architectures");
         j.erase("model_type");
       },
       "architectures"},
      {"bad model_type",
       [](json& j) {
         j.erase("architectures");
         j["model_type"] = "gpt2";
       },
       "model_type"},
      {"heads not dividing", [](json& j) { j["num_key_value_heads"] = 3; }, "num_key_value_heads"},
      {"hidden not dividing",
       [](json& j) {
         j.erase("head_dim");
         j["hidden_size"] = 66;
       },
       "num_attention_heads"},
      {"odd head_dim", [](json& j) { j["head_dim"] = 15; }, "head_dim"},
      {"zero eps", [](json& j) { j["rms_norm_eps"] = 0.0; }, "rms_norm_eps"},
      {"eps string", [](json& j) { j["rms_norm_eps"] = "1e-5"; }, "rms_norm_eps"},
      {"tie not bool", [](json& j) { j["tie_word_embeddings"] = 1; }, "tie_word_embeddings"},
      {"rope type unknown", [](json& j) { j["rope_scaling"]["rope_type"] = "longrope"; },
       "rope_scaling.rope_type"},
      {"rope factor missing", [](json& j) { j["rope_scaling"].erase("factor"); },
       "rope_scaling.factor"},
      {"rope low freq missing", [](json& j) { j["rope_scaling"].erase("low_freq_factor"); },
       "rope_scaling.low_freq_factor"},
      {"rope scaling not object", [](json& j) { j["rope_scaling"] = 2.0; }, "rope_scaling"},
      {"rope theta negative", [](json& j) { j["rope_theta"] = -1.0; }, "rope_theta"},
      {"rope_parameters factor string",
       [](json& j) {
         j.erase("rope_scaling");
         j["rope_parameters"] = {{"rope_type", "linear"}, {"factor", "2"}};
       },
       "rope_parameters.factor"},
      {"bad dtype", [](json& j) { j["torch_dtype"] = "int8"; }, "torch_dtype"},
      {"qwen2 layer_types wrong length",
       [](json& j) {
         j["architectures"] = {"Qwen2ForCausalLM"};
         j["layer_types"] = {"full_attention"};
       },
       "layer_types"},
  };
  for (const BadCase& bc : cases) {
    SCOPED_TRACE(bc.what);
    json j = base;
    bc.edit(j);
    write_file_atomic(path, j.dump(2));
    try {
      load_model_config(path);
      ADD_FAILURE() << "no error for " << bc.what;
    } catch (const UserError& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(path.string()), std::string::npos) << msg;
      EXPECT_NE(msg.find(bc.field), std::string::npos) << msg;
    }
  }
  write_file_atomic(path, "{\"hidden_size\": 64,");
  EXPECT_THROW(load_model_config(path), UserError);
  EXPECT_THROW(load_model_config(dir / "absent.json"), UserError);
  fs::remove_all(dir);
}

}  // namespace
}  // namespace lt
