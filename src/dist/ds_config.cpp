// DeepSpeed config and --fsdp resolution (see ds_config.h). Key names and "auto" rules follow
// transformers' integrations/deepspeed.py (HfTrainerDeepSpeedConfig.trainer_config_process).
#include "dist/ds_config.h"

#include <cmath>
#include <fstream>
#include <set>
#include <sstream>

#include "core/error.h"

namespace lt {

namespace {

class Resolver {
 public:
  Resolver(const std::string& source, std::vector<std::string>* notes)
      : source_(source), notes_(notes) {}

  // A number that is "auto" (filled from the flag) or must equal the flag's value.
  void number(const nlohmann::json& obj, const std::string& key, const std::string& path,
              double flag_value, const std::string& flag) {
    if (!obj.contains(key)) return;
    const auto& v = obj.at(key);
    if (v.is_string() && v.get<std::string>() == "auto") return;
    if (!v.is_number())
      fail("{}: '{}' must be a number or \"auto\" (got {})", source_, path + key, v.dump());
    const double x = v.get<double>();
    if (std::abs(x - flag_value) > 1e-12 * std::max(1.0, std::abs(flag_value)))
      fail("{}: '{}' is {} but {} is {}; make them agree or write \"auto\" in the config", source_,
           path + key, v.dump(), flag, flag_value);
  }
  // A boolean "enabled" flag object such as {"bf16": {"enabled": true}}.
  bool enabled(const nlohmann::json& obj, const std::string& key, bool flag_value) {
    if (!obj.contains(key)) return flag_value;
    const auto& o = obj.at(key);
    if (!o.is_object() || !o.contains("enabled")) return flag_value;
    const auto& v = o.at("enabled");
    if (v.is_string() && v.get<std::string>() == "auto") return flag_value;
    if (!v.is_boolean()) fail("{}: '{}.enabled' must be true, false or \"auto\"", source_, key);
    return v.get<bool>();
  }
  int64_t integer_or(const nlohmann::json& obj, const std::string& key, const std::string& path,
                     int64_t auto_value) {
    if (!obj.contains(key)) return auto_value;
    const auto& v = obj.at(key);
    if (v.is_string() && v.get<std::string>() == "auto") return auto_value;
    if (!v.is_number() || v.get<double>() < 0)
      fail("{}: '{}' must be a non-negative number or \"auto\" (got {})", source_, path + key,
           v.dump());
    return static_cast<int64_t>(v.get<double>());
  }
  void ignored(const std::string& key, const std::string& why) {
    notes_->push_back(fmt::format("{}: '{}' is ignored: {}", source_, key, why));
  }
  const std::string& source() const { return source_; }

 private:
  std::string source_;
  std::vector<std::string>* notes_;
};

std::string offload_device(const nlohmann::json& z, const std::string& key,
                           const std::string& source) {
  if (!z.contains(key)) return "none";
  const auto& o = z.at(key);
  if (!o.is_object() || !o.contains("device")) return "none";
  const std::string d = o.at("device").get<std::string>();
  if (d != "cpu" && d != "none")
    fail("{}: 'zero_optimization.{}.device' is '{}'; use cpu or none (nvme is not supported)",
         source, key, d);
  return d;
}

}  // namespace

std::vector<std::string> apply_deepspeed_config(const nlohmann::json& j, const std::string& source,
                                                int dp_world, int64_t hidden_size,
                                                TrainOptions* o) {
  std::vector<std::string> notes;
  if (!j.is_object()) fail("{}: a DeepSpeed config must be a JSON object", source);
  Resolver r(source, &notes);
  DistOptions& d = o->dist;
  const std::set<std::string> known = {"train_micro_batch_size_per_gpu",
                                       "gradient_accumulation_steps",
                                       "train_batch_size",
                                       "gradient_clipping",
                                       "bf16",
                                       "fp16",
                                       "zero_optimization",
                                       "optimizer",
                                       "scheduler"};
  for (const auto& [key, value] : j.items())
    if (!known.count(key)) r.ignored(key, "not used by longtune");

  r.number(j, "train_micro_batch_size_per_gpu", "", double(o->per_device_train_batch_size),
           "--per_device_train_batch_size");
  r.number(j, "gradient_accumulation_steps", "", double(o->gradient_accumulation_steps),
           "--gradient_accumulation_steps");
  r.number(j, "train_batch_size", "",
           double(o->per_device_train_batch_size * o->gradient_accumulation_steps * dp_world),
           "per_device_train_batch_size x gradient_accumulation_steps x data-parallel ranks");
  r.number(j, "gradient_clipping", "", o->optimizer.max_grad_norm, "--max_grad_norm");
  if (r.enabled(j, "fp16", false))
    fail("{}: 'fp16.enabled' is true; fp16 training is not supported (use bf16)", source);
  if (r.enabled(j, "bf16", o->bf16) != o->bf16)
    fail("{}: 'bf16.enabled' disagrees with --bf16 {}; make them agree or write \"auto\"", source,
         o->bf16 ? "True" : "False");

  if (j.contains("optimizer")) {
    const auto& opt = j.at("optimizer");
    const std::string type = opt.value("type", "AdamW");
    if (type != "AdamW" && type != "Adam")
      fail("{}: 'optimizer.type' is '{}'; only AdamW (or Adam with adam_w_mode) is supported",
           source, type);
    if (opt.contains("params")) {
      const auto& p = opt.at("params");
      r.number(p, "lr", "optimizer.params.", o->optimizer.learning_rate, "--learning_rate");
      r.number(p, "eps", "optimizer.params.", o->optimizer.eps, "--adam_epsilon");
      r.number(p, "weight_decay", "optimizer.params.", o->optimizer.weight_decay, "--weight_decay");
      if (p.contains("betas") && p.at("betas").is_array()) {
        const auto& b = p.at("betas");
        if (b.size() != 2) fail("{}: 'optimizer.params.betas' must hold two numbers", source);
        nlohmann::json b1 = {{"b", b[0]}}, b2 = {{"b", b[1]}};
        r.number(b1, "b", "optimizer.params.betas[0] ", o->optimizer.beta1, "--adam_beta1");
        r.number(b2, "b", "optimizer.params.betas[1] ", o->optimizer.beta2, "--adam_beta2");
      }
      if (p.contains("adam_w_mode") && !p.at("adam_w_mode").get<bool>())
        fail("{}: 'optimizer.params.adam_w_mode' false (L2 Adam) is not supported", source);
      for (const auto& [key, value] : p.items())
        if (key != "lr" && key != "eps" && key != "weight_decay" && key != "betas" &&
            key != "adam_w_mode")
          r.ignored("optimizer.params." + key, "not an AdamW setting here");
    }
  }

  if (j.contains("scheduler")) {
    const auto& s = j.at("scheduler");
    const std::string type = s.value("type", "");
    const nlohmann::json p = s.value("params", nlohmann::json::object());
    if (type != "WarmupLR" && type != "WarmupDecayLR")
      fail("{}: 'scheduler.type' is '{}'; WarmupLR and WarmupDecayLR are supported", source, type);
    r.number(p, "warmup_min_lr", "scheduler.params.", 0.0, "the warmup start (always 0)");
    r.number(p, "warmup_max_lr", "scheduler.params.", o->optimizer.learning_rate,
             "--learning_rate");
    const std::string wt = p.value("warmup_type", "log");
    if (wt != "linear")
      fail(
          "{}: 'scheduler.params.warmup_type' is '{}' (DeepSpeed's default is log); only "
          "\"linear\" is supported: add \"warmup_type\": \"linear\"",
          source, wt);
    const int64_t warmup = r.integer_or(p, "warmup_num_steps", "scheduler.params.", -1);
    if (warmup >= 0) {
      o->warmup_steps = warmup;
      o->warmup_ratio = 0;
    }
    o->lr_scheduler_type = type == "WarmupLR" ? "constant_with_warmup" : "linear";
    if (p.contains("total_num_steps"))
      r.number(p, "total_num_steps", "scheduler.params.", double(o->max_steps), "--max_steps");
  }

  if (j.contains("zero_optimization")) {
    const auto& z = j.at("zero_optimization");
    const std::string zp = "zero_optimization.";
    const int64_t stage = r.integer_or(z, "stage", zp, 0);
    if (stage > 3) fail("{}: 'zero_optimization.stage' is {}; use 0, 1, 2 or 3", source, stage);
    d.zero_stage = static_cast<int>(stage);
    d.offload_optimizer = offload_device(z, "offload_optimizer", source) == "cpu";
    d.offload_params = offload_device(z, "offload_param", source) == "cpu";
    if (d.offload_params && d.zero_stage != 3)
      fail("{}: 'zero_optimization.offload_param' needs stage 3 (stage is {})", source, stage);
    // HF's "auto": reduce_bucket_size = hidden^2, stage3_prefetch_bucket_size = 0.9 hidden^2.
    d.reduce_bucket_size =
        std::max<int64_t>(1, r.integer_or(z, "reduce_bucket_size", zp, hidden_size * hidden_size));
    d.allgather_bucket_size =
        std::max<int64_t>(1, r.integer_or(z, "allgather_bucket_size", zp, 500'000'000));
    d.stage3_prefetch_bucket_size =
        r.integer_or(z, "stage3_prefetch_bucket_size", zp, hidden_size * hidden_size * 9 / 10);
    if (z.contains("stage3_gather_16bit_weights_on_model_save"))
      d.gather_16bit_weights_on_model_save =
          z.at("stage3_gather_16bit_weights_on_model_save").get<bool>();
    for (const auto& [key, value] : z.items()) {
      if (key == "stage" || key == "offload_optimizer" || key == "offload_param" ||
          key == "reduce_bucket_size" || key == "allgather_bucket_size" ||
          key == "stage3_prefetch_bucket_size" ||
          key == "stage3_gather_16bit_weights_on_model_save")
        continue;
      if (key == "contiguous_gradients")
        r.ignored(zp + key, "gradients always live in one contiguous block");
      else if (key == "overlap_comm")
        r.ignored(zp + key, "communication is not overlapped with compute yet (CPU)");
      else if (key == "stage3_param_persistence_threshold")
        r.ignored(zp + key, "only the embedding, final norm and LM head stay gathered for a pass");
      else if (key == "stage3_max_live_parameters" || key == "stage3_max_reuse_distance")
        r.ignored(zp + key, "at most two decoder layers are gathered at a time");
      else
        r.ignored(zp + key, "not used by longtune");
    }
  }
  return notes;
}

std::vector<std::string> apply_deepspeed_config_file(const std::filesystem::path& path,
                                                     int dp_world, int64_t hidden_size,
                                                     TrainOptions* o) {
  std::ifstream in(path);
  if (!in) fail("--deepspeed: cannot read '{}'", path.string());
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    fail("--deepspeed: '{}' is not valid JSON: {}", path.string(), e.what());
  }
  try {
    return apply_deepspeed_config(j, path.string(), dp_world, hidden_size, o);
  } catch (const nlohmann::json::exception& e) {
    fail("--deepspeed: '{}': a value has the wrong type: {}", path.string(), e.what());
  }
}

void apply_fsdp(TrainOptions* o) {
  DistOptions& d = o->dist;
  if (d.fsdp.empty()) {
    if (d.fsdp_offload_params) fail("--fsdp_offload_params needs --fsdp full_shard");
    return;
  }
  if (!d.deepspeed.empty()) fail("--fsdp and --deepspeed cannot be used together");
  std::istringstream words(d.fsdp);
  std::string w;
  bool offload = d.fsdp_offload_params;
  int stage = -1;
  while (words >> w) {
    if (w == "full_shard")
      stage = 3;
    else if (w == "shard_grad_op")
      stage = 2;
    else if (w == "offload")
      offload = true;
    else if (w == "auto_wrap")
      continue;
    else
      fail("--fsdp: '{}' is not allowed; use full_shard or shard_grad_op (with offload)", w);
  }
  if (stage < 0) fail("--fsdp '{}': name full_shard or shard_grad_op", d.fsdp);
  d.zero_stage = stage;
  // FSDP's CPUOffload(offload_params=True) keeps parameters and gradients on the host and runs
  // the optimizer step there.
  d.offload_optimizer = offload;
  d.offload_params = offload && stage == 3;
}

ZeroSettings zero_settings(const DistOptions& d) {
  ZeroSettings z;
  z.stage = d.zero_stage;
  z.offload_optimizer = d.offload_optimizer;
  z.offload_params = d.offload_params;
  z.reduce_bucket_size = d.reduce_bucket_size;
  z.allgather_bucket_size = d.allgather_bucket_size;
  z.prefetch = d.stage3_prefetch_bucket_size > 0;
  return z;
}

}  // namespace lt
