// Bad input through the real `longtune` binary: every broken model folder, data file and flag
// gives exit code 1 (no crash), exactly one "longtune: error:" line naming the file (and tensor
// or field) and the problem, and leaves nothing in output_dir; a failing run with
// --overwrite_output_dir True keeps the user's previous files.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

const std::string kLongtune = std::string(LT_BINARY_DIR) + "/longtune";

struct RunResult {
  int code = -1;  // exit status; 128 + signal when killed by one
  std::string out, err;
};

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void spit(const fs::path& p, const std::string& s) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out << s;
}

// One temporary folder for the whole suite, with a good tiny model, data and LoRA adapter.
class CliErrors : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    char tmpl[] = "/tmp/lt_cli_errors_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    root_ = tmpl;
    good_model_ = root_ / "good_model";
    good_data_ = root_ / "good.jsonl";
    adapter_ = root_ / "adapter";
    std::string rows;
    for (int r = 0; r < 4; ++r) {
      json ids = json::array();
      for (int i = 0; i < 12; ++i) ids.push_back((r * 37 + i * 11) % 500 + 1);
      rows += json{{"input_ids", ids}}.dump() + "\n";
    }
    spit(good_data_, rows);
    RunResult r = run("init --preset tiny --output_dir " + good_model_.string());
    ASSERT_EQ(r.code, 0) << r.err;
    r = run("train --model_name_or_path " + good_model_.string() + " --data_path " +
            good_data_.string() + " --output_dir " + adapter_.string() +
            " --use_peft_lora True --lora_target_modules q_proj,v_proj --max_steps 1"
            " --disable_tqdm True --save_strategy no");
    ASSERT_EQ(r.code, 0) << r.out << r.err;
  }
  static void TearDownTestSuite() {
    std::error_code ec;
    if (!root_.empty()) fs::remove_all(root_, ec);
  }

  static RunResult run(const std::string& args) {
    static int counter = 0;
    const fs::path out = root_ / fmt_name("stdout", ++counter);
    const fs::path err = root_ / fmt_name("stderr", counter);
    const std::string cmd =
        kLongtune + " " + args + " >" + out.string() + " 2>" + err.string() + " </dev/null";
    const int st = std::system(cmd.c_str());
    RunResult r;
    if (st == -1) return r;
    r.code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    r.out = slurp(out);
    r.err = slurp(err);
    fs::remove(out);
    fs::remove(err);
    return r;
  }
  static std::string fmt_name(const char* what, int n) {
    return std::string(what) + "_" + std::to_string(n) + ".txt";
  }

  // A copy of the good model folder, changed by `edit`.
  static fs::path broken_model(const std::string& name, const std::function<void(fs::path)>& edit) {
    const fs::path dir = root_ / ("model_" + name);
    fs::remove_all(dir);
    fs::copy(good_model_, dir, fs::copy_options::recursive);
    edit(dir);
    return dir;
  }

  // Expects the failure contract: exit code 1, one "longtune: error:" line holding every
  // string of `expect`, and output_dir (when given) absent or empty.
  static void expect_clean_failure(const RunResult& r, const std::vector<std::string>& expect,
                                   const fs::path& output_dir, const std::string& what) {
    SCOPED_TRACE(what);
    EXPECT_EQ(r.code, 1) << "stdout:\n" << r.out << "\nstderr:\n" << r.err;
    std::vector<std::string> error_lines;
    std::stringstream ss(r.err);
    for (std::string line; std::getline(ss, line);)
      if (line.rfind("longtune: error:", 0) == 0) error_lines.push_back(line);
    ASSERT_EQ(error_lines.size(), 1u) << "stderr:\n" << r.err;
    if (std::getenv("LT_SHOW_ERRORS"))
      std::printf("%-40s %s\n", what.c_str(), error_lines[0].c_str());
    for (const std::string& e : expect)
      EXPECT_NE(error_lines[0].find(e), std::string::npos)
          << "the error line does not mention '" << e << "':\n"
          << error_lines[0];
    if (!output_dir.empty()) {
      std::error_code ec;
      EXPECT_TRUE(!fs::exists(output_dir) || fs::is_empty(output_dir, ec))
          << output_dir << " was left with files";
    }
  }

  static inline fs::path root_, good_model_, good_data_, adapter_;
};

// ---- Raw safetensors editing (independent of the library's reader) ----------------------------

struct RawTensor {
  std::string name;
  json entry;  // dtype, shape, data_offsets
  std::string bytes;
};

// Reads a safetensors file into its tensors (in offset order) and metadata.
std::vector<RawTensor> read_raw(const fs::path& p, json* metadata) {
  const std::string s = slurp(p);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(s[i]);
  const json h = json::parse(s.substr(8, n));
  std::vector<RawTensor> out;
  for (const auto& [k, v] : h.items()) {
    if (k == "__metadata__") {
      *metadata = v;
      continue;
    }
    const uint64_t b = v["data_offsets"][0], e = v["data_offsets"][1];
    out.push_back({k, v, s.substr(8 + n + b, e - b)});
  }
  std::sort(out.begin(), out.end(), [](const RawTensor& a, const RawTensor& b) {
    return a.entry["data_offsets"][0].get<uint64_t>() < b.entry["data_offsets"][0].get<uint64_t>();
  });
  return out;
}

// Lays the tensors out one after another, lets `edit` change the header, writes the file.
void write_raw(const fs::path& p, std::vector<RawTensor> tensors, const json& metadata,
               const std::function<void(json&)>& edit = {}) {
  json h = json::object();
  if (!metadata.is_null()) h["__metadata__"] = metadata;
  uint64_t off = 0;
  std::string data;
  for (RawTensor& t : tensors) {
    t.entry["data_offsets"] = {off, off + t.bytes.size()};
    off += t.bytes.size();
    data += t.bytes;
    h[t.name] = t.entry;
  }
  if (edit) edit(h);
  std::string hs = h.dump();
  hs.append((8 - hs.size() % 8) % 8, ' ');
  std::string len(8, '\0');
  for (int i = 0; i < 8; ++i) len[i] = static_cast<char>(uint64_t(hs.size()) >> (8 * i));
  spit(p, len + hs + data);
}

void edit_safetensors(const fs::path& p, const std::function<void(std::vector<RawTensor>&)>& t_edit,
                      const std::function<void(json&)>& h_edit = {}) {
  json meta;
  auto tensors = read_raw(p, &meta);
  if (t_edit) t_edit(tensors);
  write_raw(p, tensors, meta, h_edit);
}

void edit_config(const fs::path& dir, const std::function<void(json&)>& edit) {
  json j = json::parse(slurp(dir / "config.json"));
  edit(j);
  spit(dir / "config.json", j.dump(2));
}

// A broken model folder and what its error line must say.
struct ModelCase {
  std::string name;
  std::function<void(fs::path)> edit;
  std::vector<std::string> expect;  // besides the model folder's path
};

std::vector<ModelCase> model_cases() {
  const std::string kDown1 = "model.layers.1.mlp.down_proj.weight";
  return {
      {"no_config", [](fs::path d) { fs::remove(d / "config.json"); }, {"config.json"}},
      {"config_not_json",
       [](fs::path d) { spit(d / "config.json", "{\"hidden_size\": 64,"); },
       {"config.json", "not valid JSON"}},
      {"no_weights",
       [](fs::path d) { fs::remove(d / "model.safetensors"); },
       {"model.safetensors"}},
      {"truncated",
       [](fs::path d) {
         const fs::path p = d / "model.safetensors";
         fs::resize_file(p, fs::file_size(p) / 2);
       },
       {"model.safetensors", "truncated"}},
      {"truncated_to_header",
       [](fs::path d) { fs::resize_file(d / "model.safetensors", 6); },
       {"model.safetensors", "too short"}},
      {"header_past_eof",
       [](fs::path d) {
         const fs::path p = d / "model.safetensors";
         std::string s = slurp(p);
         const uint64_t n = s.size();  // header length = file size: 8 bytes past the end
         for (int i = 0; i < 8; ++i) s[i] = static_cast<char>(n >> (8 * i));
         spit(p, s);
       },
       {"model.safetensors", "header length", "past the end"}},
      {"overlap",
       [](fs::path d) {
         // The last tensor starts 4 bytes early: it overlaps the one before it.
         edit_safetensors(d / "model.safetensors", nullptr, [](json& h) {
           std::string last;
           uint64_t best = 0;
           for (const auto& [k, v] : h.items())
             if (k != "__metadata__" && v["data_offsets"][0].get<uint64_t>() >= best)
               best = v["data_offsets"][0], last = k;
           auto& o = h[last]["data_offsets"];
           o = {o[0].get<uint64_t>() - 4, o[1].get<uint64_t>() - 4};
         });
       },
       {"model.safetensors", "overlaps"}},
      {"offsets_out_of_range",
       [](fs::path d) {
         edit_safetensors(d / "model.safetensors", nullptr, [](json& h) {
           auto& o = h["model.norm.weight"]["data_offsets"];
           o = {o[0].get<uint64_t>() + 1000000, o[1].get<uint64_t>() + 1000000};
         });
       },
       {"model.safetensors", "model.norm.weight", "out of range"}},
      {"unknown_dtype",
       [](fs::path d) {
         edit_safetensors(d / "model.safetensors", nullptr, [](json& h) {
           h["model.layers.0.input_layernorm.weight"]["dtype"] = "Q7";
         });
       },
       {"model.safetensors", "model.layers.0.input_layernorm.weight", "Q7", "dtype"}},
      {"missing_tensor",
       [kDown1](fs::path d) {
         edit_safetensors(d / "model.safetensors", [kDown1](std::vector<RawTensor>& t) {
           t.erase(std::remove_if(t.begin(), t.end(),
                                  [&](const RawTensor& x) { return x.name == kDown1; }),
                   t.end());
         });
       },
       {kDown1, "missing"}},
      {"wrong_shape",
       [](fs::path d) { edit_config(d, [](json& j) { j["intermediate_size"] = 180; }); },
       {"model.safetensors", "mlp", "shape", "180"}},
      {"unsupported_architecture",
       [](fs::path d) {
         edit_config(d, [](json& j) { j["architectures"] = {"GPT2LMHeadModel"}; });
       },
       {"config.json", "architectures", "GPT2LMHeadModel"}},
      {"bad_index",
       [](fs::path d) {
         fs::remove(d / "model.safetensors");
         spit(d / "model.safetensors.index.json",
              R"({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}})");
       },
       {"model.safetensors.index.json", "model-00001-of-00002.safetensors", "does not exist"}},
  };
}

TEST_F(CliErrors, BrokenModelFolders) {
  for (const ModelCase& c : model_cases()) {
    const fs::path dir = broken_model(c.name, c.edit);
    std::vector<std::string> expect = c.expect;
    expect.push_back(dir.string());
    const std::string m = " --model_name_or_path " + dir.string();
    // train: fresh output_dir, and one that exists already empty.
    const fs::path out = root_ / ("out_" + c.name);
    fs::remove_all(out);
    expect_clean_failure(run("train" + m + " --data_path " + good_data_.string() +
                             " --output_dir " + out.string() + " --max_steps 1"),
                         expect, out, "train " + c.name);
    fs::create_directories(out);
    expect_clean_failure(run("train" + m + " --data_path " + good_data_.string() +
                             " --output_dir " + out.string() + " --max_steps 1"),
                         expect, out, "train (empty output_dir) " + c.name);
    expect_clean_failure(run("eval" + m + " --data_path " + good_data_.string()), expect, {},
                         "eval " + c.name);
    expect_clean_failure(
        run("generate" + m + " --prompt_ids 1,2,3 --output_ids True --max_new_tokens 2"), expect,
        {}, "generate " + c.name);
    fs::remove_all(out);
    expect_clean_failure(run("merge" + m + " --adapter_name_or_path " + adapter_.string() +
                             " --output_dir " + out.string()),
                         expect, out, "merge " + c.name);
    fs::remove_all(dir);
  }
}

TEST_F(CliErrors, MissingModelFolder) {
  const fs::path dir = root_ / "no_such_model";
  const fs::path out = root_ / "out_missing_model";
  expect_clean_failure(run("train --model_name_or_path " + dir.string() + " --data_path " +
                           good_data_.string() + " --output_dir " + out.string()),
                       {dir.string(), "--model_name_or_path"}, out, "train");
  expect_clean_failure(
      run("eval --model_name_or_path " + dir.string() + " --data_path " + good_data_.string()),
      {dir.string(), "--model_name_or_path"}, {}, "eval");
  expect_clean_failure(run("generate --model_name_or_path " + dir.string() + " --prompt_ids 1"),
                       {dir.string(), "--model_name_or_path"}, {}, "generate");
  expect_clean_failure(
      run("merge --model_name_or_path " + dir.string() + " --adapter_name_or_path " +
          adapter_.string() + " --output_dir " + out.string()),
      {dir.string(), "--model_name_or_path"}, out, "merge");
}

// Bad data files for train and eval.
TEST_F(CliErrors, BadData) {
  struct DataCase {
    std::string name, content;
    std::vector<std::string> expect;
  };
  const std::vector<DataCase> cases = {
      {"token_past_vocab.jsonl",
       "{\"input_ids\": [1, 2, 3]}\n{\"input_ids\": [4, 512, 6]}\n",
       {"token_past_vocab.jsonl", "512", "vocabulary"}},
      {"negative_token.jsonl", "{\"input_ids\": [1, -3, 3]}\n", {"negative_token.jsonl", "-3"}},
      {"empty.jsonl", "", {"empty.jsonl", "no rows"}},
      {"blank_lines.jsonl", "\n  \n\t\n\n", {"blank_lines.jsonl", "no rows"}},
      {"empty_array.json", "[]", {"empty_array.json", "no rows"}},
      {"not_json.jsonl", "{\"input_ids\": [1, 2\n", {"not_json.jsonl", "malformed JSON"}},
      {"wrong_field.jsonl", "{\"input_ids\": \"1 2 3\"}\n", {"wrong_field.jsonl", "input_ids"}},
  };
  for (const DataCase& c : cases) {
    const fs::path data = root_ / c.name;
    spit(data, c.content);
    const fs::path out = root_ / ("out_data_" + c.name);
    fs::remove_all(out);
    expect_clean_failure(run("train --model_name_or_path " + good_model_.string() +
                             " --data_path " + data.string() + " --output_dir " + out.string()),
                         c.expect, out, "train " + c.name);
    expect_clean_failure(
        run("eval --model_name_or_path " + good_model_.string() + " --data_path " + data.string()),
        c.expect, {}, "eval " + c.name);
    // As evaluation data of a training run.
    expect_clean_failure(run("train --model_name_or_path " + good_model_.string() +
                             " --data_path " + good_data_.string() + " --eval_data_path " +
                             data.string() + " --output_dir " + out.string()),
                         c.expect, out, "train --eval_data_path " + c.name);
  }
  const fs::path missing = root_ / "missing.jsonl";
  const fs::path out = root_ / "out_data_missing";
  expect_clean_failure(run("train --model_name_or_path " + good_model_.string() + " --data_path " +
                           missing.string() + " --output_dir " + out.string()),
                       {missing.string()}, out, "train missing data");
  expect_clean_failure(
      run("eval --model_name_or_path " + good_model_.string() + " --data_path " + missing.string()),
      {missing.string()}, {}, "eval missing data");
  // A prompt id past the vocabulary in generate.
  expect_clean_failure(run("generate --model_name_or_path " + good_model_.string() +
                           " --prompt_ids 1,512 --output_ids True"),
                       {"--prompt_ids", "512", "vocabulary"}, {}, "generate prompt id");
}

// Flags with bad values name the flag and what is allowed; unknown flags get a suggestion.
TEST_F(CliErrors, BadFlags) {
  const fs::path out = root_ / "out_flags";
  const std::string base = "train --model_name_or_path " + good_model_.string() + " --data_path " +
                           good_data_.string() + " --output_dir " + out.string();
  struct FlagCase {
    std::string args;
    std::vector<std::string> expect;
  };
  const std::vector<FlagCase> cases = {
      {base + " --learning_rate abc", {"--learning_rate", "abc", "number"}},
      {base + " --per_device_train_batch_size 0", {"--per_device_train_batch_size", ">= 1", "0"}},
      {base + " --per_device_train_batch_size two",
       {"--per_device_train_batch_size", "two", "integer"}},
      {base + " --lr_scheduler_type foo", {"--lr_scheduler_type", "foo", "cosine", "linear"}},
      {base + " --save_strategy sometimes", {"--save_strategy", "sometimes", "steps", "epoch"}},
      {base + " --bf16 maybe", {"--bf16", "maybe", "True or False"}},
      {base + " --max_shard_size 5XB", {"--max_shard_size", "5XB", "GB"}},
      {base + " --lerning_rate 1e-4", {"--lerning_rate", "Did you mean --learning_rate?"}},
      {base + " --adam_beta1 2", {"--adam_beta1", "2"}},
      {base + " --host_memory_budget lots", {"--host_memory_budget", "lots", "not a size"}},
      {base + " --recompute_granularity some", {"--recompute_granularity", "some", "selective"}},
      {base + " --recompute_granularity selective",
       {"--recompute_granularity", "--gradient_checkpointing True"}},
      // Offloaded checkpoints are pinned host memory on a device backend: refused before
      // anything is allocated when they exceed the host budget.
      {base + " --device cpu-guarded --offload_activations True --host_memory_budget 1KiB",
       {"pins", "of host memory", "--host_memory_budget", "--offload_activations"}},
      {"plan --preset tiny --model_max_length 128 --host_memory_budget 1GiB",
       {"--host_memory_budget", "--device cuda"}},
      {"eval --model_name_or_path " + good_model_.string() + " --data_path " + good_data_.string() +
           " --per_device_eval_batch_sise 2",
       {"--per_device_eval_batch_sise", "Did you mean --per_device_eval_batch_size?"}},
      {"generate --model_name_or_path " + good_model_.string() +
           " --prompt_ids 1 --max_new_token 3",
       {"--max_new_token", "Did you mean --max_new_tokens?"}},
      {"generate --model_name_or_path " + good_model_.string() + " --prompt_ids 1 --top_p 2",
       {"--top_p", "2"}},
      {"merge --model_name_or_path " + good_model_.string() + " --adapter_name_or_path " +
           adapter_.string() + " --output_dir " + out.string() + " --save_dtype f8",
       {"--save_dtype", "f8", "bf16"}},
      {"init --output_dir " + out.string() + " --preset huge", {"--preset", "huge", "tiny"}},
      {"init --output_dir " + out.string() + " --dtyp bf16", {"--dtyp", "Did you mean --dtype?"}},
      {"convert llama2c --checkpoint x.bin --tokenizer t.bin --output_dir " + out.string() +
           " --tokeniser t.bin",
       {"--tokeniser", "Did you mean --tokenizer?"}},
      {"trian --output_dir " + out.string(), {"unknown command 'trian'", "did you mean 'train'?"}},
  };
  for (const FlagCase& c : cases) {
    fs::remove_all(out);
    expect_clean_failure(run(c.args), c.expect, out, c.args);
  }
}

// --overwrite_output_dir True with a run that fails: the previous files stay as they were.
TEST_F(CliErrors, OverwriteKeepsPreviousFilesOnFailure) {
  const fs::path out = root_ / "out_previous";
  fs::remove_all(out);
  fs::create_directories(out / "checkpoint-5");
  spit(out / "model.safetensors", "previous weights");
  spit(out / "notes.txt", "mine");
  spit(out / "checkpoint-5" / "trainer_state.json", "{}");
  const fs::path bad_model = broken_model("overwrite", [](fs::path d) {
    edit_config(d, [](json& j) { j["intermediate_size"] = 180; });
  });
  const fs::path bad_data = root_ / "overwrite_bad.jsonl";
  spit(bad_data, "{\"input_ids\": [1, 9999]}\n");
  const std::vector<std::string> runs = {
      "train --model_name_or_path " + bad_model.string() + " --data_path " + good_data_.string(),
      "train --model_name_or_path " + good_model_.string() + " --data_path " + bad_data.string(),
      "train --model_name_or_path " + good_model_.string() + " --data_path " + good_data_.string() +
          " --lr_scheduler_type foo",
      "train --model_name_or_path " + good_model_.string() + " --data_path " + good_data_.string() +
          " --report_to mlflow",
      "merge --model_name_or_path " + bad_model.string() + " --adapter_name_or_path " +
          adapter_.string(),
  };
  unsetenv("MLFLOW_TRACKING_URI");  // --report_to mlflow must fail on its absence
  for (const std::string& r : runs) {
    SCOPED_TRACE(r);
    const RunResult res = run(r + " --output_dir " + out.string() + " --overwrite_output_dir True");
    EXPECT_EQ(res.code, 1) << res.out << res.err;
    std::vector<std::string> names;
    for (const auto& e : fs::recursive_directory_iterator(out))
      names.push_back(fs::relative(e.path(), out).string());
    std::sort(names.begin(), names.end());
    EXPECT_EQ(names, (std::vector<std::string>{"checkpoint-5", "checkpoint-5/trainer_state.json",
                                               "model.safetensors", "notes.txt"}));
    EXPECT_EQ(slurp(out / "model.safetensors"), "previous weights");
    EXPECT_EQ(slurp(out / "notes.txt"), "mine");
  }
}

}  // namespace
