// PEFT adapter folders: read, validate, write, merge (see adapter_io.h).
#include "model/adapter_io.h"

#include <nlohmann/json.hpp>
#include <set>

#include "core/check.h"
#include "core/error.h"
#include "io/atomic_file.h"
#include "ops/linear.h"

namespace lt {

namespace fs = std::filesystem;

namespace {

const char* kConfigFile = "adapter_config.json";
const char* kWeightsFile = "adapter_model.safetensors";

// The base tensors PEFT's modules_to_save would match: the module path ends with the entry (a
// plain suffix, as peft 0.21 matches: "norm" also selects input_layernorm).
bool module_matches(const std::string& hf_name, const std::string& entry) {
  return hf_name.substr(0, hf_name.rfind('.')).ends_with(entry);
}

// Every tensor an adapter file of this base model and spec holds: its name in the file, its
// name among the trainable tensors (LoRA tensors: the same PEFT name; base tensors that train:
// their Hugging Face name), its shape.
struct Expected {
  std::string file_name, name;
  std::vector<int64_t> shape;
};

std::vector<Expected> expected_tensors(const ModelConfig& c, const LoraSpec& spec) {
  std::vector<Expected> out;
  const LoraTable lora(c, spec);
  for (const auto& t : lora.tensors()) out.push_back({t.name, t.name, t.shape});
  const ParamTable table(c);
  if (spec.train_embed || spec.train_norm)
    for (const auto& p : table.params())
      if (LlamaModel::base_trains(spec, p.name))
        out.push_back({peft_name(p.name), p.name, p.shape});
  return out;
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "(";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + ")";
}

}  // namespace

LoraSpec read_adapter_config(const fs::path& dir, const ModelConfig& config, LoraSpec spec) {
  const fs::path file = dir / kConfigFile;
  if (!fs::is_directory(dir)) fail("--adapter_name_or_path '{}' is not a folder", dir.string());
  if (!fs::exists(file)) fail("adapter folder '{}' has no {}", dir.string(), kConfigFile);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_file(file));
  } catch (const nlohmann::json::exception& e) {
    fail("{}: not valid JSON ({})", file.string(), e.what());
  }
  auto field = [&](const char* k) -> const nlohmann::json* {
    return j.contains(k) && !j[k].is_null() ? &j[k] : nullptr;
  };
  try {
    if (const auto* t = field("peft_type"); t && t->get<std::string>() != "LORA")
      fail("{}: peft_type '{}' is not supported; only LORA", file.string(), t->get<std::string>());
    auto must_be_off = [&](const char* k) {
      if (const auto* v = field(k); v && v->is_boolean() && v->get<bool>())
        fail("{}: '{}' is true; longtune supports plain LoRA only", file.string(), k);
    };
    must_be_off("use_dora");
    must_be_off("fan_in_fan_out");
    must_be_off("lora_bias");
    if (const auto* b = field("bias"); b && b->get<std::string>() != "none")
      fail("{}: bias '{}' is not supported; only \"none\"", file.string(), b->get<std::string>());
    for (const char* k : {"rank_pattern", "alpha_pattern"})
      if (const auto* v = field(k); v && !v->empty())
        fail("{}: '{}' is not supported (every module must share r and lora_alpha)", file.string(),
             k);
    if (field("layers_to_transform"))
      fail("{}: 'layers_to_transform' is not supported (every layer must be adapted)",
           file.string());
    const auto* r = field("r");
    const auto* alpha = field("lora_alpha");
    if (!r || !r->is_number_integer() || r->get<int64_t>() <= 0)
      fail("{}: 'r' must be a positive integer", file.string());
    if (!alpha || !alpha->is_number() || !(alpha->get<double>() > 0))
      fail("{}: 'lora_alpha' must be a positive number", file.string());
    spec.enabled = true;
    spec.r = r->get<int64_t>();
    spec.alpha = alpha->get<double>();
    spec.rslora = field("use_rslora") ? j["use_rslora"].get<bool>() : false;
    const auto* tm = field("target_modules");
    if (!tm) fail("{}: 'target_modules' is missing", file.string());
    std::vector<std::string> names;
    if (tm->is_string()) {
      if (tm->get<std::string>() != "all-linear")
        fail(
            "{}: target_modules '{}' is a regular expression; longtune needs a list of module "
            "names or \"all-linear\"",
            file.string(), tm->get<std::string>());
      names.push_back("all-linear");
    } else {
      names = tm->get<std::vector<std::string>>();
    }
    spec.targets = parse_lora_targets(names, file.string() + ": target_modules");
    spec.train_embed = spec.train_norm = false;
    if (const auto* ms = field("modules_to_save")) {
      const auto entries = ms->get<std::vector<std::string>>();
      const ParamTable table(config);
      std::set<std::string> matched;
      for (const auto& p : table.params())
        for (const auto& e : entries)
          if (module_matches(p.name, e)) matched.insert(p.name);
      std::set<std::string> norms;
      for (const auto& p : table.params())
        if (p.name.ends_with("layernorm.weight") || p.name == "model.norm.weight")
          norms.insert(p.name);
      spec.train_embed = matched.erase("model.embed_tokens.weight") > 0;
      if (!matched.empty()) {
        if (matched != norms)
          fail(
              "{}: modules_to_save {} selects {}; longtune trains the embeddings and/or all "
              "norms only (\"embed_tokens\", \"norm\")",
              file.string(), ms->dump(), *matched.begin());
        spec.train_norm = true;
      }
    }
  } catch (const nlohmann::json::exception& e) {
    fail("{}: a field has the wrong type ({})", file.string(), e.what());
  }
  return spec;
}

NamedTensors read_adapter_tensors(const fs::path& dir, const ModelConfig& config,
                                  const LoraSpec& spec) {
  const fs::path file = dir / kWeightsFile;
  if (!fs::exists(file)) {
    if (fs::exists(dir / "adapter_model.bin"))
      fail("{}: only adapter_model.safetensors is supported (found adapter_model.bin)",
           dir.string());
    fail("adapter folder '{}' has no {}", dir.string(), kWeightsFile);
  }
  auto st = SafetensorsFile::open(file);
  const auto expected = expected_tensors(config, spec);
  std::set<std::string> wanted;
  // Validate everything first, so a bad file changes nothing.
  for (const auto& e : expected) {
    wanted.insert(e.file_name);
    const TensorInfo* t = st->find(e.file_name);
    if (!t)
      fail(
          "{}: tensor '{}' is missing (is this adapter for another base model, or trained with "
          "other target modules?)",
          file.string(), e.file_name);
    if (t->shape != e.shape)
      fail(
          "{}: tensor '{}' has shape {} but this base model needs {} (adapter for another base "
          "model?)",
          file.string(), e.file_name, shape_str(t->shape), shape_str(e.shape));
    if (t->dtype != DType::kF32 && t->dtype != DType::kBF16 && t->dtype != DType::kF16 &&
        t->dtype != DType::kF64)
      fail("{}: tensor '{}' is not a floating-point tensor", file.string(), e.file_name);
  }
  for (const auto& t : st->tensors())
    if (!wanted.count(t.name))
      fail("{}: unexpected tensor '{}' (not an adapter of this base model with these settings)",
           file.string(), t.name);
  NamedTensors out;
  for (const auto& e : expected) {
    const TensorInfo* t = st->find(e.file_name);
    auto& host = out[e.name];
    host.resize(t->numel());
    convert_to_f32(host.data(), t->data, t->dtype, host.size());
  }
  return out;
}

void load_adapter(const fs::path& dir, LlamaModel& model) {
  const NamedTensors t = read_adapter_tensors(dir, model.config(), model.settings().lora);
  // By the model's own tables (a model built without training has no trainable() list).
  Backend& be = model.backend();
  for (const auto& x : model.lora_table().tensors())
    be.copy_to_device(model.lora_params() + x.offset, t.at(x.name).data(), size_t(x.numel) * 4);
  for (const auto& p : model.table().params())
    if (auto it = t.find(p.name); it != t.end())
      be.copy_to_device(model.params() + p.offset, it->second.data(), size_t(p.numel) * 4);
}

void save_adapter(const fs::path& dir, LlamaModel& model, const std::string& base_model) {
  LT_CHECK(model.settings().lora.enabled && model.first_stage() && model.last_stage());
  const LoraSpec& spec = model.settings().lora;
  NamedTensors t;
  auto take = [&](const std::string& name, const float* src, int64_t n) {
    auto& host = t[name];
    host.resize(size_t(n));
    model.backend().copy_to_host(host.data(), src, host.size() * 4);
  };
  for (const auto& x : model.lora_table().tensors())
    take(x.name, model.lora_params() + x.offset, x.numel);
  for (const auto& p : model.table().params())
    if ((spec.train_embed || spec.train_norm) && LlamaModel::base_trains(spec, p.name))
      take(p.name, model.params() + p.offset, p.numel);
  save_adapter_tensors(dir, model.config(), model.settings().lora, t, base_model);
}

void save_adapter_tensors(const fs::path& dir, const ModelConfig& config, const LoraSpec& s,
                          const NamedTensors& t, const std::string& base_model) {
  LT_CHECK(s.enabled);
  std::vector<TensorToSave> tensors;
  for (const auto& e : expected_tensors(config, s)) {
    auto it = t.find(e.name);
    LT_CHECK(it != t.end(), "adapter tensor {} missing", e.name);
    tensors.push_back({e.file_name, e.shape, it->second.data()});
  }
  nlohmann::json j;
  j["peft_type"] = "LORA";
  j["task_type"] = "CAUSAL_LM";
  j["base_model_name_or_path"] = base_model;
  j["r"] = s.r;
  j["lora_alpha"] = s.alpha;
  j["lora_dropout"] = s.dropout;
  j["use_rslora"] = s.rslora;
  std::vector<std::string> targets;
  for (int p = 0; p < kNumProj; ++p)
    if (s.targets[p]) targets.push_back(proj_name(Proj(p)));
  j["target_modules"] = targets;
  std::vector<std::string> to_save;
  if (s.train_embed) to_save.push_back("embed_tokens");
  if (s.train_norm) to_save.push_back("norm");  // matches input_/post_attention_layernorm too
  j["modules_to_save"] = to_save.empty() ? nlohmann::json(nullptr) : nlohmann::json(to_save);
  j["bias"] = "none";
  j["fan_in_fan_out"] = false;
  j["init_lora_weights"] = true;
  j["inference_mode"] = true;
  j["use_dora"] = false;
  j["layers_to_transform"] = nullptr;
  j["layers_pattern"] = nullptr;
  j["rank_pattern"] = nlohmann::json::object();
  j["alpha_pattern"] = nlohmann::json::object();
  fs::create_directories(dir);
  write_safetensors(dir / kWeightsFile, tensors, DType::kF32, {{"format", "pt"}});
  write_file_atomic(dir / kConfigFile, j.dump(2) + "\n");
}

void load_base_weights(const CheckpointReader& reader, LlamaModel& model) {
  std::vector<float> host;
  Backend& be = model.backend();
  for (const auto& p : model.table().params()) {
    host.resize(p.numel);
    reader.read_f32(p.name, p.shape, host.data());
    be.copy_to_device(model.params() + p.offset, host.data(), host.size() * 4);
  }
  const ParamTable full(model.config());
  for (size_t i = 0; i < model.packed_weights().size(); ++i) {
    const ParamInfo* p = full.find(model.packed_weights()[i].name);
    LT_CHECK(p);
    host.resize(p->numel);
    reader.read_f32(p->name, p->shape, host.data());
    model.pack_base_weight(i, host.data());
  }
}

void merge_adapter(const fs::path& adapter_dir, const ModelConfig& config, const ParamTable& table,
                   float* params) {
  LoraSpec spec;
  spec = read_adapter_config(adapter_dir, config, spec);
  const fs::path file = adapter_dir / kWeightsFile;
  if (!fs::exists(file)) fail("adapter folder '{}' has no {}", adapter_dir.string(), kWeightsFile);
  auto st = SafetensorsFile::open(file);
  const LoraTable lt(config, spec);
  auto read = [&](const std::string& name, const std::vector<int64_t>& shape) {
    const TensorInfo* t = st->find(name);
    if (!t)
      fail("{}: tensor '{}' is missing (adapter for another base model?)", file.string(), name);
    if (t->shape != shape)
      fail(
          "{}: tensor '{}' has shape {} but the base model needs {} (adapter for another base "
          "model?)",
          file.string(), name, shape_str(t->shape), shape_str(shape));
    std::vector<float> v(t->numel());
    convert_to_f32(v.data(), t->data, t->dtype, v.size());
    return v;
  };
  // Read and check everything before changing params.
  std::vector<std::vector<float>> lora;
  for (const auto& t : lt.tensors()) lora.push_back(read(t.name, t.shape));
  std::vector<std::pair<const ParamInfo*, std::vector<float>>> saved;
  for (const auto& p : table.params())
    if ((spec.train_embed || spec.train_norm) && LlamaModel::base_trains(spec, p.name))
      saved.emplace_back(&p, read(peft_name(p.name), p.shape));
  const float scale = spec.scale();
  for (size_t i = 0; i < lt.tensors().size(); i += 2) {
    const auto& a = lt.tensors()[i];
    const auto& b = lt.tensors()[i + 1];
    LT_CHECK(!a.is_b && b.is_b && a.layer == b.layer && a.proj == b.proj);
    const std::string name = fmt::format("model.layers.{}.{}.weight", a.layer, proj_module(a.proj));
    const ParamInfo* w = table.find(name);
    LT_CHECK(w, "no base tensor {}", name);
    // W (OUT,IN) += scale * B (OUT,R) @ A (R,IN)
    gemm(params + w->offset, lora[i + 1].data(), lora[i].data(), b.shape[0], a.shape[1], spec.r,
         false, false, scale, 1.0f);
  }
  for (auto& [p, v] : saved) std::copy(v.begin(), v.end(), params + p->offset);
}

}  // namespace lt
