// Checkpoints: save, list, rotate, resolve, load (see checkpoint.h).
#include "train/checkpoint.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <functional>

#include "core/check.h"
#include "core/error.h"
#include "io/atomic_file.h"
#include "io/safetensors.h"
#include "model/adapter_io.h"
#include "model/model_io.h"

namespace lt {

namespace fs = std::filesystem;

namespace {

constexpr const char* kOptimizerFile = "optimizer.safetensors";
constexpr const char* kSchedulerFile = "scheduler.json";
constexpr const char* kRngFile = "rng_state.json";
constexpr const char* kStateFile = "trainer_state.json";
constexpr const char* kArgsFile = "training_args.json";

// Step of a folder named checkpoint-<digits>; -1 for anything else (checkpoint-5.tmp, ...).
int64_t checkpoint_step(const fs::path& p) {
  const std::string name = p.filename().string();
  constexpr std::string_view kPrefix = "checkpoint-";
  if (name.rfind(kPrefix, 0) != 0 || name.size() == kPrefix.size()) return -1;
  for (size_t i = kPrefix.size(); i < name.size(); ++i)
    if (name[i] < '0' || name[i] > '9') return -1;
  return std::stoll(name.substr(kPrefix.size()));
}

bool has_model_file(const fs::path& dir) {
  return fs::exists(dir / "model.safetensors") ||
         fs::exists(dir / "model.safetensors.index.json") ||
         fs::exists(dir / "adapter_model.safetensors");
}

bool is_complete(const fs::path& dir) {
  for (const auto& f : checkpoint_files())
    if (!fs::exists(dir / f)) return false;
  return has_model_file(dir);
}

nlohmann::json read_json(const fs::path& path) {
  const auto j = nlohmann::json::parse(read_file(path), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) fail("'{}' is not valid JSON", path.string());
  return j;
}

}  // namespace

const std::vector<std::string>& checkpoint_files() {
  static const std::vector<std::string> files = {"config.json", kOptimizerFile, kSchedulerFile,
                                                 kRngFile,      kStateFile,     kArgsFile};
  return files;
}

namespace {

// Writes checkpoint-<step>: write_weights(folder) puts the model (or adapter) files there; the
// moments are exp_avg then exp_avg_sq (total each).
fs::path write_checkpoint(const fs::path& output_dir, const CheckpointState& st,
                          const std::function<void(const fs::path&)>& write_weights, const float* m,
                          int64_t total, int64_t optimizer_step,
                          const nlohmann::json& training_args) {
  const fs::path final_dir = output_dir / fmt::format("checkpoint-{}", st.step);
  const fs::path tmp = output_dir / fmt::format("checkpoint-{}.tmp", st.step);
  std::error_code ec;
  try {
    fs::remove_all(tmp, ec);  // left by an earlier crash
    fs::create_directories(tmp);
    write_weights(tmp);
    write_safetensors(tmp / kOptimizerFile,
                      {{"exp_avg", {total}, m}, {"exp_avg_sq", {total}, m + total}}, DType::kF32,
                      {{"step", std::to_string(optimizer_step)}, {"optimizer", "AdamW"}});
    write_file_atomic(tmp / kSchedulerFile,
                      nlohmann::json{{"lr_scheduler_type", schedule_name(st.schedule.type)},
                                     {"warmup_steps", st.schedule.warmup_steps},
                                     {"total_steps", st.schedule.total_steps},
                                     {"last_step", st.step}}
                              .dump(2) +
                          "\n");
    write_file_atomic(tmp / kRngFile,
                      nlohmann::json{{"shuffle_seed", st.position.shuffle_seed},
                                     {"epoch", st.position.epoch},
                                     {"micro_batch_index", st.position.micro_batch_index},
                                     {"num_rows", st.position.num_rows},
                                     {"generator",
                                      "std::mt19937_64(seed * 1000003 + epoch) shuffles each "
                                      "epoch's row order; training draws no other random numbers"}}
                              .dump(2) +
                          "\n");
    st.trainer_state.save(tmp / kStateFile);
    write_file_atomic(tmp / kArgsFile, training_args.dump(2) + "\n");
    fsync_dir(tmp);
    // Swap the finished folder in: an older one of the same step is moved away first.
    const fs::path old = output_dir / fmt::format("checkpoint-{}.old", st.step);
    fs::remove_all(old, ec);
    if (fs::exists(final_dir)) fs::rename(final_dir, old);
    fs::rename(tmp, final_dir);
    fs::remove_all(old, ec);
    fsync_dir(output_dir);
  } catch (const std::exception& e) {
    fs::remove_all(tmp, ec);
    const auto kept = list_checkpoints(output_dir);
    fail("saving checkpoint-{} failed: {}. Nothing was left in its place; {}", st.step, e.what(),
         kept.empty()
             ? std::string("there is no earlier checkpoint")
             : fmt::format("the latest complete checkpoint is still '{}'", kept.back().string()));
  }
  return final_dir;
}

}  // namespace

fs::path save_checkpoint(const fs::path& output_dir, const CheckpointState& st,
                         const ModelConfig& config, LlamaModel& model, AdamW& optimizer,
                         const nlohmann::json& training_args, const fs::path& source_dir) {
  // f32 master weights, whatever --save_dtype says: resuming must be exact. With LoRA the
  // adapter is what trains (the base is read again from --model_name_or_path).
  auto write_weights = [&](const fs::path& tmp) {
    if (model.settings().lora.enabled) {
      save_adapter(tmp, model, source_dir.string());
      write_file_atomic(tmp / "config.json", model_config_to_json(config).dump(2) + "\n");
    } else {
      const std::vector<float> params =
          model.backend().download(model.params(), size_t(model.table().total_numel()));
      save_model(tmp, config, model.table(), params.data(), DType::kF32, source_dir);
    }
  };
  const std::vector<float> moments =
      model.backend().download(optimizer.moments(), size_t(optimizer.moments_count()));
  return write_checkpoint(output_dir, st, write_weights, moments.data(),
                          optimizer.moments_count() / 2, optimizer.steps_done(), training_args);
}

fs::path save_checkpoint(const fs::path& output_dir, const CheckpointState& st,
                         const ModelConfig& config, const CheckpointTensors& t,
                         const nlohmann::json& training_args, const fs::path& source_dir) {
  LT_CHECK(t.moments && (t.lora ? t.adapter && t.moments_size : t.table && t.params));
  auto write_weights = [&](const fs::path& tmp) {
    if (t.lora) {
      save_adapter_tensors(tmp, config, *t.lora, *t.adapter, source_dir.string());
      write_file_atomic(tmp / "config.json", model_config_to_json(config).dump(2) + "\n");
    } else {
      save_model(tmp, config, *t.table, t.params, DType::kF32, source_dir);
    }
  };
  return write_checkpoint(output_dir, st, write_weights, t.moments, t.size(), t.optimizer_step,
                          training_args);
}

std::vector<fs::path> list_checkpoints(const fs::path& output_dir) {
  std::vector<std::pair<int64_t, fs::path>> found;
  std::error_code ec;
  if (!fs::is_directory(output_dir, ec)) return {};
  for (const auto& e : fs::directory_iterator(output_dir, ec)) {
    const int64_t step = checkpoint_step(e.path());
    if (step >= 0 && e.is_directory() && is_complete(e.path())) found.emplace_back(step, e.path());
  }
  std::sort(found.begin(), found.end());
  std::vector<fs::path> out;
  for (auto& [s, p] : found) out.push_back(p);
  return out;
}

std::vector<fs::path> rotate_checkpoints(const fs::path& output_dir, int64_t limit) {
  std::vector<fs::path> removed;
  if (limit <= 0) return removed;
  auto all = list_checkpoints(output_dir);
  for (size_t i = 0; i + limit < all.size(); ++i) {
    std::error_code ec;
    fs::remove_all(all[i], ec);
    if (ec) fail("cannot delete old checkpoint '{}': {}", all[i].string(), ec.message());
    removed.push_back(all[i]);
  }
  return removed;
}

fs::path resolve_checkpoint(const std::string& spec, const fs::path& output_dir) {
  if (spec == "latest") {
    const auto all = list_checkpoints(output_dir);
    if (all.empty())
      fail("--resume_from_checkpoint latest: no complete checkpoint-N folder in '{}'",
           output_dir.string());
    return all.back();
  }
  if (!fs::is_directory(spec))
    fail("--resume_from_checkpoint '{}' is not a folder (give a checkpoint-N folder or latest)",
         spec);
  return spec;
}

namespace {

// Checks dir, loads the weights through load_weights_from(dir) and the moments into m (exp_avg
// then exp_avg_sq, total each), and reads the step state.
CheckpointState read_checkpoint(const fs::path& dir, const ModelConfig& config,
                                const std::function<void(const fs::path&)>& load_weights_from,
                                float* m, int64_t total, int64_t* optimizer_step) {
  for (const auto& f : checkpoint_files())
    if (!fs::exists(dir / f))
      fail("--resume_from_checkpoint '{}': {} is missing; this is not a complete checkpoint",
           dir.string(), f);
  if (!has_model_file(dir))
    fail(
        "--resume_from_checkpoint '{}': model.safetensors is missing; this is not a complete "
        "checkpoint",
        dir.string());
  // Same model shape, field by field, before touching any tensor.
  const ModelConfig saved = load_model_config(dir / "config.json");
  const std::pair<const char*, std::pair<int64_t, int64_t>> fields[] = {
      {"hidden_size", {saved.hidden_size, config.hidden_size}},
      {"intermediate_size", {saved.intermediate_size, config.intermediate_size}},
      {"num_hidden_layers", {saved.num_hidden_layers, config.num_hidden_layers}},
      {"num_attention_heads", {saved.num_attention_heads, config.num_attention_heads}},
      {"num_key_value_heads", {saved.num_key_value_heads, config.num_key_value_heads}},
      {"vocab_size", {saved.vocab_size, config.vocab_size}}};
  for (const auto& [name, v] : fields)
    if (v.first != v.second)
      fail(
          "--resume_from_checkpoint '{}' was made for another model: {} is {} there and {} in "
          "--model_name_or_path",
          dir.string(), name, v.first, v.second);
  load_weights_from(dir);

  const auto opt = SafetensorsFile::open(dir / kOptimizerFile);
  const char* names[2] = {"exp_avg", "exp_avg_sq"};
  for (int k = 0; k < 2; ++k) {
    const TensorInfo* t = opt->find(names[k]);
    if (!t || t->dtype != DType::kF32 || t->numel() != total)
      fail("--resume_from_checkpoint '{}': {} needs an f32 tensor '{}' of {} values", dir.string(),
           kOptimizerFile, names[k], total);
    std::memcpy(m + k * total, t->data, sizeof(float) * total);
  }
  CheckpointState st;
  try {
    *optimizer_step = std::stoll(opt->metadata().at("step"));
    const auto sched = read_json(dir / kSchedulerFile);
    st.schedule.type = parse_schedule(sched.at("lr_scheduler_type").get<std::string>());
    st.schedule.warmup_steps = sched.at("warmup_steps").get<int64_t>();
    st.schedule.total_steps = sched.at("total_steps").get<int64_t>();
    st.step = sched.at("last_step").get<int64_t>();
    const auto rng = read_json(dir / kRngFile);
    st.position.shuffle_seed = rng.at("shuffle_seed").get<uint64_t>();
    st.position.epoch = rng.at("epoch").get<int64_t>();
    st.position.micro_batch_index = rng.at("micro_batch_index").get<int64_t>();
    st.position.num_rows = rng.at("num_rows").get<int64_t>();
  } catch (const std::exception& e) {
    fail("--resume_from_checkpoint '{}': bad optimizer/scheduler/rng state: {}", dir.string(),
         e.what());
  }
  st.trainer_state =
      TrainerState::from_json(read_json(dir / kStateFile), (dir / kStateFile).string());
  if (st.trainer_state.global_step != st.step)
    fail("--resume_from_checkpoint '{}': trainer_state.json says step {} but scheduler.json {}",
         dir.string(), st.trainer_state.global_step, st.step);
  return st;
}

}  // namespace

CheckpointState load_checkpoint(const fs::path& dir, const ModelConfig& config, LlamaModel& model,
                                AdamW& optimizer) {
  auto load_weights_from = [&](const fs::path& d) {
    if (model.settings().lora.enabled)
      load_adapter(d, model);
    else
      load_weights(CheckpointReader(d), model.table(), model.params(), model.backend());
  };
  int64_t optimizer_step = 0;
  std::vector<float> moments(size_t(optimizer.moments_count()));
  CheckpointState st = read_checkpoint(dir, config, load_weights_from, moments.data(),
                                       optimizer.moments_count() / 2, &optimizer_step);
  model.backend().copy_to_device(optimizer.moments(), moments.data(), moments.size() * 4);
  optimizer.set_steps_done(optimizer_step);
  return st;
}

CheckpointState load_checkpoint(const fs::path& dir, const ModelConfig& config,
                                CheckpointTensors* t) {
  LT_CHECK(t && t->moments && (t->lora ? t->adapter && t->moments_size : t->table && t->params));
  auto load_weights_from = [&](const fs::path& d) {
    if (t->lora)
      *t->adapter = read_adapter_tensors(d, config, *t->lora);
    else
      load_weights(CheckpointReader(d), *t->table, t->params);
  };
  return read_checkpoint(dir, config, load_weights_from, t->moments, t->size(), &t->optimizer_step);
}

}  // namespace lt
