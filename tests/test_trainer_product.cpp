// The trainer as a product, end to end through the real `longtune` binary on a tiny model:
// config files and flag suggestions, checkpoints (bit-identical resume, rotation, atomicity,
// SIGTERM, a full disk), TensorBoard files read back, trainer_state.json's format, evaluation.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <sstream>
#include <thread>

#include "backend/backend.h"
#include "cli/config_file.h"
#include "core/error.h"
#include "data/dataset.h"
#include "io/atomic_file.h"
#include "io/safetensors.h"
#include "model/llama.h"
#include "model/model_io.h"
#include "train/batching.h"
#include "train/checkpoint.h"
#include "train/evaluate.h"
#include "train/logging/plot_svg.h"
#include "train/logging/tensorboard.h"

namespace lt {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

const std::string kLongtune = std::string(LT_BINARY_DIR) + "/longtune";

struct RunResult {
  int rc = -1;
  std::string output;
};

// Runs a shell command, stdout and stderr captured together.
RunResult run(const std::string& cmd, const fs::path& log) {
  const int st = std::system((cmd + " > '" + log.string() + "' 2>&1").c_str());
  RunResult r;
  r.rc = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  r.output = read_file(log);
  return r;
}

std::vector<json> read_jsonl(const fs::path& p) {
  std::vector<json> out;
  std::ifstream in(p);
  for (std::string line; std::getline(in, line);)
    if (!line.empty()) out.push_back(json::parse(line));
  return out;
}

json read_json(const fs::path& p) { return json::parse(read_file(p)); }

void write_tokenized(const fs::path& p, int rows, int min_len, int max_len, uint32_t seed) {
  std::mt19937 rng(seed);
  std::ofstream f(p);
  for (int i = 0; i < rows; ++i) {
    const int n = min_len + static_cast<int>(rng() % (max_len - min_len + 1));
    json ids = json::array();
    for (int t = 0; t < n; ++t) ids.push_back(static_cast<int>(rng() % 512));
    f << json{{"input_ids", ids}, {"labels", ids}}.dump() << "\n";
  }
}

// One tiny model, data and a straight 10-step run shared by the tests.
class TrainerProduct : public ::testing::Test {
 protected:
  static fs::path dir_, model_, train_, eval_, straight_;
  static std::string common_;

  static void SetUpTestSuite() {
    dir_ = fs::temp_directory_path() / ("lt_trainer_product_" + std::to_string(getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    model_ = dir_ / "model";
    train_ = dir_ / "train.jsonl";
    eval_ = dir_ / "eval.jsonl";
    ASSERT_EQ(
        run(kLongtune + " init --preset tiny --output_dir " + model_.string(), dir_ / "init.log")
            .rc,
        0);
    write_tokenized(train_, 12, 6, 20, 1);  // 6 steps per epoch: 10 steps cross an epoch
    write_tokenized(eval_, 3, 10, 14, 2);
    // constant_with_warmup: the schedule does not depend on max_steps, so 5 + 5 == 10.
    common_ = " --model_name_or_path " + model_.string() + " --data_path " + train_.string() +
              " --per_device_train_batch_size 1 --gradient_accumulation_steps 2"
              " --learning_rate 2e-3 --warmup_steps 2 --lr_scheduler_type constant_with_warmup"
              " --logging_steps 1 --eval_data_path " +
              eval_.string() +
              " --evaluation_strategy steps --eval_steps 5 --per_device_eval_batch_size 2";
    straight_ = dir_ / "straight";
    const auto r = run(kLongtune + " train" + common_ +
                           " --max_steps 10 --save_steps 2"
                           " --save_total_limit 2 --output_dir " +
                           straight_.string(),
                       dir_ / "straight.log");
    ASSERT_EQ(r.rc, 0) << r.output;
  }
  static void TearDownTestSuite() { fs::remove_all(dir_); }
};
fs::path TrainerProduct::dir_, TrainerProduct::model_, TrainerProduct::train_,
    TrainerProduct::eval_, TrainerProduct::straight_;
std::string TrainerProduct::common_;

// ---------------------------------------------------------------- config and flags

TEST(TrainerConfig, YamlAndJsonMergeWithFlagsOverriding) {
  const fs::path d = fs::temp_directory_path() / ("lt_cfg_" + std::to_string(getpid()));
  fs::create_directories(d);
  const std::set<std::string> known = {"learning_rate", "max_steps", "report_to", "bf16",
                                       "output_dir"};
  write_file_atomic(d / "a.yaml",
                    "learning_rate: 2e-5\nmax_steps: 7\nreport_to: [tensorboard, mlflow]\n"
                    "bf16: true\n--output_dir: out\n");
  const auto args =
      expand_config_flag({"--config", (d / "a.yaml").string(), "--max_steps", "9"}, known);
  const std::vector<std::string> want = {
      "--learning_rate", "2e-5", "--report_to",  "tensorboard,mlflow",
      "--bf16",          "true", "--output_dir", "out",
      "--max_steps",     "9"};
  EXPECT_EQ(args, want);
  write_file_atomic(d / "b.json",
                    R"({"learning_rate": 0.5, "max_steps": 7, "bf16": false, "report_to": null})");
  const auto j = expand_config_flag({"--config=" + (d / "b.json").string()}, known);
  const std::vector<std::string> want_j = {"--bf16", "False",       "--learning_rate",
                                           "0.5",    "--max_steps", "7"};
  EXPECT_EQ(j, want_j);
  write_file_atomic(d / "bad.yaml", "lerning_rate: 1\n");
  try {
    expand_config_flag({"--config", (d / "bad.yaml").string()}, known);
    ADD_FAILURE() << "unknown key accepted";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("Did you mean --learning_rate?"), std::string::npos)
        << e.what();
  }
  write_file_atomic(d / "nested.yaml", "learning_rate: {a: 1}\n");
  EXPECT_THROW(expand_config_flag({"--config", (d / "nested.yaml").string()}, known), UserError);
  EXPECT_THROW(expand_config_flag({"--config", (d / "missing.yaml").string()}, known), UserError);
  fs::remove_all(d);
}

TEST(TrainerConfig, EditDistanceAndSuggestions) {
  EXPECT_EQ(edit_distance("kitten", "sitting"), 3u);
  EXPECT_EQ(edit_distance("", "abc"), 3u);
  EXPECT_EQ(edit_distance("same", "same"), 0u);
  const std::set<std::string> known = {"learning_rate", "logging_steps", "save_steps"};
  EXPECT_EQ(did_you_mean("lerning_rate", known), " Did you mean --learning_rate?");
  EXPECT_EQ(did_you_mean("save_step", known), " Did you mean --save_steps?");
  EXPECT_EQ(did_you_mean("completely_different", known), "");
}

TEST_F(TrainerProduct, CommandLineFlagsAndConfigFile) {
  // An unknown flag: an error with a suggestion, nothing written.
  auto r = run(kLongtune + " train" + common_ + " --output_dir " + (dir_ / "x").string() +
                   " --lerning_rate 1e-3",
               dir_ / "unknown.log");
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("unknown flag --lerning_rate. Did you mean --learning_rate?"),
            std::string::npos)
      << r.output;
  EXPECT_FALSE(fs::exists(dir_ / "x"));
  // Bad values name the flag and the allowed values.
  r = run(kLongtune + " train" + common_ + " --output_dir " + (dir_ / "x").string() +
              " --save_strategy sometimes",
          dir_ / "bad_value.log");
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("--save_strategy: 'sometimes' is not allowed; use no, steps or epoch"),
            std::string::npos)
      << r.output;
  r = run(kLongtune + " train" + common_ + " --output_dir " + (dir_ / "x").string() +
              " --per_device_train_batch_size 0",
          dir_ / "bad_value2.log");
  EXPECT_NE(r.output.find("--per_device_train_batch_size must be >= 1 (got 0)"), std::string::npos)
      << r.output;
  // The seed recipe's LongLoRA-style flags, from a YAML file; the command line overrides it.
  write_file_atomic(dir_ / "recipe.yaml",
                    "model_name_or_path: " + model_.string() +
                        "\nbf16: True\noutput_dir: " + (dir_ / "cfg").string() +
                        "\ncache_dir: " + (dir_ / "token_cache").string() +
                        "\nmodel_max_length: 32768\n"
                        "use_flash_attn: True\nnum_train_epochs: 1\n"
                        "per_device_train_batch_size: 1\nper_device_eval_batch_size: 1\n"
                        "gradient_accumulation_steps: 8\nevaluation_strategy: \"no\"\n"
                        "save_strategy: steps\nsave_steps: 1000\nsave_total_limit: 2\n"
                        "learning_rate: 2e-5\nweight_decay: 0.0\nwarmup_steps: 20\n"
                        "lr_scheduler_type: constant_with_warmup\nlogging_steps: 1\n"
                        "max_steps: 1000\ndata_path: " +
                        train_.string() + "\n");
  r = run(kLongtune + " train --config " + (dir_ / "recipe.yaml").string() +
              " --max_steps 2 --report_to none",
          dir_ / "cfg.log");
  ASSERT_EQ(r.rc, 0) << r.output;
  // --cache_dir is the tokenized-data cache (data/token_cache.h).
  EXPECT_NE(r.output.find("data: wrote cache " + (dir_ / "token_cache").string()),
            std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("training: 2 steps"), std::string::npos) << r.output;
  const json args = read_json(dir_ / "cfg" / "checkpoint-2" / "training_args.json");
  EXPECT_EQ(args.at("gradient_accumulation_steps"), "8");
  EXPECT_EQ(args.at("max_steps"), "2");
  EXPECT_EQ(args.at("learning_rate"), "2e-5");
}

// --profile_step N: step N alone runs with op timing, and the table of where its time went
// follows it: each op's calls and milliseconds, and the time outside the ops.
TEST_F(TrainerProduct, ProfileStepPrintsWhereThatStepWent) {
  const auto r = run(kLongtune + " train" + common_ + " --max_steps 3 --profile_step 2" +
                         " --report_to none --output_dir " + (dir_ / "profiled").string(),
                     dir_ / "profiled.log");
  ASSERT_EQ(r.rc, 0) << r.output;
  const size_t at = r.output.find("op profile of step 2 on cpu: ");
  ASSERT_NE(at, std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("op profile of step", at + 1), std::string::npos) << "one step only";
  const std::string table = r.output.substr(at);
  for (const char* op : {"attention_forward", "attention_backward", "linear_forward",
                         "lm_head_cross_entropy", "adamw_update", "(outside the ops)"})
    EXPECT_NE(table.find(op), std::string::npos) << op << " in\n" << table;
}

// ---------------------------------------------------------------- checkpoints

TEST_F(TrainerProduct, ResumeIsBitIdentical) {
  const fs::path split = dir_ / "split";
  auto r = run(kLongtune + " train" + common_ + " --max_steps 5 --save_steps 2 --output_dir " +
                   split.string(),
               dir_ / "split1.log");
  ASSERT_EQ(r.rc, 0) << r.output;
  ASSERT_TRUE(fs::exists(split / "checkpoint-5" / "optimizer.safetensors"));
  r = run(kLongtune + " train" + common_ + " --max_steps 10 --save_steps 2 --output_dir " +
              split.string() + " --resume_from_checkpoint latest",
          dir_ / "split2.log");
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_NE(r.output.find("resumed from"), std::string::npos) << r.output;
  // The saved models, byte for byte (final model and the step-10 checkpoint).
  for (const char* f : {"model.safetensors", "checkpoint-10/model.safetensors",
                        "checkpoint-10/optimizer.safetensors"}) {
    const std::string a = read_file(straight_ / f), b = read_file(split / f);
    EXPECT_EQ(a.size(), b.size()) << f;
    EXPECT_TRUE(a == b) << f << " differs between the straight and the resumed run";
  }
  // The logged losses, exactly, in trainer_state.json and metrics.jsonl.
  auto losses = [](const std::vector<json>& h, const char* key) {
    std::vector<std::pair<int64_t, double>> out;
    for (const auto& e : h)
      if (e.contains(key)) out.emplace_back(e["step"].get<int64_t>(), e[key].get<double>());
    return out;
  };
  const auto ha =
      read_json(straight_ / "trainer_state.json")["log_history"].get<std::vector<json>>();
  const auto hb = read_json(split / "trainer_state.json")["log_history"].get<std::vector<json>>();
  EXPECT_EQ(losses(ha, "loss").size(), 10u);
  EXPECT_EQ(losses(ha, "loss"), losses(hb, "loss"));
  EXPECT_EQ(losses(ha, "eval_loss"), losses(hb, "eval_loss"));
  EXPECT_EQ(losses(ha, "learning_rate"), losses(hb, "learning_rate"));
  EXPECT_EQ(losses(read_jsonl(straight_ / "metrics.jsonl"), "loss"),
            losses(read_jsonl(split / "metrics.jsonl"), "loss"));
}

TEST_F(TrainerProduct, RotationKeepsTheNewestAndEveryFolderIsComplete) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(straight_))
    if (e.path().filename().string().rfind("checkpoint", 0) == 0)
      names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"checkpoint-10", "checkpoint-8"}));
  for (const auto& n : names)
    for (const auto& f : checkpoint_files()) EXPECT_TRUE(fs::exists(straight_ / n / f)) << n << f;
  const json rng = read_json(straight_ / "checkpoint-8" / "rng_state.json");
  EXPECT_EQ(rng["epoch"], 1);  // 6 steps per epoch: step 8 is 2 steps (4 micro-batches) in
  EXPECT_EQ(rng["micro_batch_index"], 4);
  EXPECT_EQ(rng["shuffle_seed"], 42);
  // Library level: incomplete and .tmp folders never count; HF's oldest-first rule.
  const fs::path d = dir_ / "rot";
  fs::create_directories(d);
  for (int s : {3, 12, 7, 20})
    fs::copy(straight_ / "checkpoint-8", d / ("checkpoint-" + std::to_string(s)),
             fs::copy_options::recursive);
  fs::copy(straight_ / "checkpoint-8", d / "checkpoint-30.tmp", fs::copy_options::recursive);
  fs::remove(d / "checkpoint-20" / "optimizer.safetensors");  // incomplete
  auto listed = list_checkpoints(d);
  ASSERT_EQ(listed.size(), 3u);
  EXPECT_EQ(listed.back().filename(), "checkpoint-12");
  EXPECT_EQ(resolve_checkpoint("latest", d).filename(), "checkpoint-12");
  const auto removed = rotate_checkpoints(d, 2);
  ASSERT_EQ(removed.size(), 1u);
  EXPECT_EQ(removed[0].filename(), "checkpoint-3");
  EXPECT_EQ(list_checkpoints(d).front().filename(), "checkpoint-7");
}

TEST_F(TrainerProduct, SigtermFinishesTheStepSavesAndExitsZero) {
  const fs::path out = dir_ / "sigterm";
  const fs::path log = dir_ / "sigterm.log";
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    const int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    dup2(fd, 1);
    dup2(fd, 2);
    const std::string cmd = "exec " + kLongtune + " train" + common_ +
                            " --max_steps 100000 --save_strategy no --report_to none"
                            " --output_dir " +
                            out.string();
    execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  // Wait until two steps are logged, then ask it to stop.
  bool started = false;
  for (int i = 0; i < 600 && !started; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    started = fs::exists(out / "metrics.jsonl") && read_jsonl(out / "metrics.jsonl").size() >= 2;
  }
  ASSERT_TRUE(started) << read_file(log);
  kill(pid, SIGTERM);
  int st = 0;
  ASSERT_EQ(waitpid(pid, &st, 0), pid);
  const std::string output = read_file(log);
  ASSERT_TRUE(WIFEXITED(st)) << output;
  EXPECT_EQ(WEXITSTATUS(st), 0) << output;
  EXPECT_NE(output.find("stopped by SIGTERM"), std::string::npos) << output;
  EXPECT_NE(output.find("--resume_from_checkpoint"), std::string::npos) << output;
  const auto cps = list_checkpoints(out);
  ASSERT_EQ(cps.size(), 1u) << output;
  const json state = read_json(cps[0] / "trainer_state.json");
  EXPECT_EQ(cps[0].filename(), "checkpoint-" + std::to_string(state["global_step"].get<int>()));
  EXPECT_EQ(read_jsonl(out / "metrics.jsonl").back()["step"], state["global_step"]);
  EXPECT_FALSE(fs::exists(out / "model.safetensors"));  // not a finished model
}

TEST_F(TrainerProduct, FullDiskDuringSaveKeepsThePreviousCheckpoint) {
  const fs::path out = dir_ / "full";
  fs::create_directories(out);
  fs::copy(straight_ / "checkpoint-8", out / "checkpoint-8", fs::copy_options::recursive);
  const std::string before = read_file(out / "checkpoint-8" / "model.safetensors");
  // Files may not grow past 200 KiB (the model is ~1 MiB): the next save hits "disk full".
  const auto r = run("trap '' XFSZ; ulimit -f 200; exec " + kLongtune + " train" + common_ +
                         " --max_steps 10 --save_steps 1 --report_to none --output_dir " +
                         out.string() + " --resume_from_checkpoint latest",
                     dir_ / "full.log");
  EXPECT_EQ(r.rc, 1) << r.output;
  EXPECT_NE(r.output.find("saving checkpoint-9 failed"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("the latest complete checkpoint is still"), std::string::npos)
      << r.output;
  EXPECT_FALSE(fs::exists(out / "checkpoint-9"));
  EXPECT_FALSE(fs::exists(out / "checkpoint-9.tmp"));
  EXPECT_TRUE(read_file(out / "checkpoint-8" / "model.safetensors") == before);
  EXPECT_EQ(list_checkpoints(out).size(), 1u);
}

TEST_F(TrainerProduct, BadOutputDirAndIncompatibleCheckpoints) {
  auto r = run(kLongtune + " train" + common_ + " --max_steps 2 --output_dir " + straight_.string(),
               dir_ / "exists.log");
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("exists already and is not empty"), std::string::npos) << r.output;
  // A checkpoint of another model shape.
  const fs::path other = dir_ / "other_model";
  ASSERT_EQ(run(kLongtune + " init --preset tiny --hidden_size 32 --output_dir " + other.string(),
                dir_ / "init2.log")
                .rc,
            0);
  r = run(kLongtune + " train" + common_ + " --max_steps 12 --model_name_or_path " +
              other.string() + " --output_dir " + (dir_ / "o1").string() +
              " --resume_from_checkpoint " + (straight_ / "checkpoint-10").string(),
          dir_ / "shape.log");
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("was made for another model: hidden_size is 64 there and 32"),
            std::string::npos)
      << r.output;
  // A checkpoint with a file missing.
  const fs::path broken = dir_ / "broken";
  fs::copy(straight_ / "checkpoint-10", broken, fs::copy_options::recursive);
  fs::remove(broken / "optimizer.safetensors");
  r = run(kLongtune + " train" + common_ + " --max_steps 12 --output_dir " +
              (dir_ / "o2").string() + " --resume_from_checkpoint " + broken.string(),
          dir_ / "missing.log");
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("optimizer.safetensors is missing"), std::string::npos) << r.output;
  r = run(kLongtune + " train" + common_ + " --max_steps 12 --output_dir " +
              (dir_ / "o3").string() + " --resume_from_checkpoint latest",
          dir_ / "nolatest.log");
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("no complete checkpoint-N folder"), std::string::npos) << r.output;
}

// ---------------------------------------------------------------- logs

TEST(TrainerLogs, Crc32cKnownValues) {
  // RFC 3720 / iSCSI check value, and the all-zero 32-byte vector of RFC 3720 B.4.
  EXPECT_EQ(crc32c("123456789", 9), 0xE3069283u);
  const std::string zeros(32, '\0');
  EXPECT_EQ(crc32c(zeros.data(), zeros.size()), 0x8A9136AAu);
  const uint32_t c = 0xE3069283u;
  EXPECT_EQ(masked_crc32c("123456789", 9), ((c >> 15) | (c << 17)) + 0xa282ead8u);
}

TEST_F(TrainerProduct, TensorBoardEventsReadBack) {
  std::vector<fs::path> files;
  for (const auto& e : fs::recursive_directory_iterator(straight_ / "runs"))
    if (e.path().filename().string().rfind("events.out.tfevents.", 0) == 0)
      files.push_back(e.path());
  ASSERT_EQ(files.size(), 1u);
  std::string version;
  const auto scalars = read_tensorboard_scalars(files[0], &version);
  EXPECT_EQ(version, "brain.Event:2");
  std::map<int64_t, float> tb_loss, tb_eval;
  for (const auto& s : scalars) {
    if (s.tag == "train/loss") tb_loss[s.step] = s.value;
    if (s.tag == "eval/loss") tb_eval[s.step] = s.value;
  }
  int checked = 0;
  for (const auto& m : read_jsonl(straight_ / "metrics.jsonl")) {
    const int64_t step = m["step"];
    if (m.contains("loss")) {
      ASSERT_TRUE(tb_loss.count(step)) << step;
      EXPECT_EQ(tb_loss[step], static_cast<float>(m["loss"].get<double>())) << step;
      ++checked;
    }
    if (m.contains("eval_loss")) {
      EXPECT_EQ(tb_eval.at(step), static_cast<float>(m["eval_loss"].get<double>())) << step;
      ++checked;
    }
  }
  EXPECT_EQ(checked, 12);  // 10 train steps + 2 evaluations
  // A flipped byte is caught by the CRC.
  std::string bytes = read_file(files[0]);
  bytes[bytes.size() - 10] ^= 0x40;
  write_file_atomic(dir_ / "corrupt.tfevents", bytes);
  EXPECT_THROW(read_tensorboard_scalars(dir_ / "corrupt.tfevents"), UserError);
}

TEST_F(TrainerProduct, TrainerStateHasHuggingFaceFormat) {
  const std::string text = read_file(straight_ / "trainer_state.json");
  const json s = json::parse(text);
  EXPECT_EQ(text, s.dump(2) + "\n");  // sorted keys, indent 2, as json.dumps(sort_keys=True)
  std::set<std::string> keys;
  for (const auto& [k, v] : s.items()) keys.insert(k);
  // transformers.TrainerState's fields (dataclasses.asdict).
  const std::set<std::string> hf = {"best_global_step",
                                    "best_metric",
                                    "best_model_checkpoint",
                                    "epoch",
                                    "eval_steps",
                                    "global_step",
                                    "is_hyper_param_search",
                                    "is_local_process_zero",
                                    "is_world_process_zero",
                                    "log_history",
                                    "logging_steps",
                                    "max_steps",
                                    "num_input_tokens_seen",
                                    "num_train_epochs",
                                    "save_steps",
                                    "stateful_callbacks",
                                    "total_flos",
                                    "train_batch_size",
                                    "trial_name",
                                    "trial_params"};
  EXPECT_EQ(keys, hf);
  EXPECT_EQ(s["global_step"], 10);
  EXPECT_EQ(s["max_steps"], 10);
  const auto& h = s["log_history"];
  ASSERT_EQ(h.size(), 13u);  // 10 train logs, 2 evals, the final summary
  std::set<std::string> train_keys;
  for (const auto& [k, v] : h[0].items()) train_keys.insert(k);
  EXPECT_EQ(train_keys,
            (std::set<std::string>{"epoch", "grad_norm", "learning_rate", "loss", "step"}));
  EXPECT_DOUBLE_EQ(h[0]["epoch"].get<double>(), 1.0 / 6.0);
  EXPECT_EQ(h[0]["learning_rate"], 0.0);  // warmup: the first step's lr is 0, as HF logs it
  EXPECT_EQ(h[1]["learning_rate"], 1e-3);
  for (const char* k : {"eval_loss", "eval_runtime", "eval_samples_per_second",
                        "eval_steps_per_second", "epoch", "step"})
    EXPECT_TRUE(h[5].contains(k)) << k;
  for (const char* k : {"train_runtime", "train_samples_per_second", "train_steps_per_second",
                        "total_flos", "train_loss", "epoch", "step"})
    EXPECT_TRUE(h.back().contains(k)) << k;
  double mean = 0;
  for (int i = 0; i < 13; ++i)
    if (h[i].contains("loss")) mean += h[i]["loss"].get<double>() / 10;
  EXPECT_NEAR(h.back()["train_loss"].get<double>(), mean, 1e-12);
  // The plot exists and draws the three panels.
  const std::string svg = read_file(straight_ / "training_plot.svg");
  EXPECT_EQ(svg.rfind("<svg", 0), 0u);
  for (const char* t : {"Loss", "Learning rate", "Memory", "eval loss", "<polyline"})
    EXPECT_NE(svg.find(t), std::string::npos) << t;
}

// ---------------------------------------------------------------- evaluation

TEST_F(TrainerProduct, EvalLossMatchesADoubleReferenceAndTheEvalCommand) {
  const ModelConfig config = load_model_config(straight_ / "config.json");
  DatasetOptions dopt;
  dopt.format = parse_dataset_format("tokenized");
  dopt.model_max_length = 1024;
  const Dataset ds = load_dataset(eval_, nullptr, dopt, config.vocab_size);
  RunSettings rs;
  rs.train = false;
  rs.max_tokens = max_micro_batch_tokens(ds.rows, 2);
  auto backend = make_backend("cpu");
  LlamaModel m(config, *backend, rs);
  load_weights(CheckpointReader(straight_), m.table(), m.params());
  const EvalResult e = evaluate_loss(m, ds.rows, 2);
  // Reference: logits of every row, log-softmax in double, mean over labelled next tokens.
  double sum = 0;
  int64_t count = 0;
  for (const auto& row : ds.rows) {
    const MicroBatch mb = make_micro_batch({&row});
    std::vector<float> logits(mb.num_tokens() * config.vocab_size);
    m.forward_logits(mb, logits.data());
    for (int64_t t = 0; t < mb.num_tokens(); ++t) {
      if (mb.targets[t] < 0) continue;
      const float* z = &logits[t * config.vocab_size];
      double mx = -1e300, s = 0;
      for (int64_t v = 0; v < config.vocab_size; ++v) mx = std::max(mx, double(z[v]));
      for (int64_t v = 0; v < config.vocab_size; ++v) s += std::exp(double(z[v]) - mx);
      sum += std::log(s) + mx - z[mb.targets[t]];
      ++count;
    }
  }
  EXPECT_EQ(e.num_targets, count);
  EXPECT_NEAR(e.loss, sum / count, 1e-5) << "longtune " << e.loss << " reference " << sum / count;
  EXPECT_DOUBLE_EQ(e.perplexity, std::exp(e.loss));
  // The last eval of training ran on the same weights: the logged eval_loss agrees.
  const auto h = read_json(straight_ / "trainer_state.json")["log_history"];
  EXPECT_NEAR(h[11]["eval_loss"].get<double>(), e.loss, 1e-6);
  // `longtune eval` prints the same numbers.
  auto r = run(kLongtune + " eval --model_name_or_path " + straight_.string() + " --data_path " +
                   eval_.string() + " --per_device_eval_batch_size 2",
               dir_ / "eval.log");
  ASSERT_EQ(r.rc, 0) << r.output;
  double printed = 0;
  ASSERT_EQ(std::sscanf(r.output.c_str(), "eval_loss %lf", &printed), 1) << r.output;
  EXPECT_NEAR(printed, e.loss, 1e-6) << r.output;
  r = run(kLongtune + " eval --model_name_or_path " + straight_.string() + " --data_path " +
              eval_.string() + " --adapter_name_or_path A",
          dir_ / "eval_adapter.log");
  EXPECT_EQ(r.rc, 1);
  // eval merges an adapter since main's d6ed114: a missing adapter folder is named.
  EXPECT_NE(r.output.find("--adapter_name_or_path 'A' is not a folder"), std::string::npos)
      << r.output;
}

TEST(TrainerLogs, PlotHandlesEmptyAndSinglePointSeries) {
  const std::string empty = plot_training_svg({}, "t");
  EXPECT_NE(empty.find("no data"), std::string::npos);
  const std::string one = plot_training_svg({json{{"step", 1}, {"loss", 2.5}}}, "a<b");
  EXPECT_NE(one.find("<circle"), std::string::npos);
  EXPECT_NE(one.find("a&lt;b"), std::string::npos);
}

}  // namespace
}  // namespace lt
