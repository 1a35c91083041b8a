// Safetensors read/write round trips, a file written by the Python library, sharded model
// folders, every kind of corruption (each a UserError naming the file and the problem), and
// AtomicFile's commit / abandon behaviour.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <random>

#include "core/error.h"
#include "io/atomic_file.h"
#include "io/safetensors.h"

namespace lt {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

const fs::path kFixtures = fs::path(LT_SOURCE_DIR) / "tests/fixtures";

// A fresh temporary folder per test, removed afterwards.
class TempDir {
 public:
  TempDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path_ = fs::temp_directory_path() /
            fmt::format("lt_st_{}_{}_{}", ::getpid(), info->test_suite_name(), info->name());
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() { fs::remove_all(path_); }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

std::vector<float> test_values(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 3.0f);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  // Special values: ties for bf16 rounding, f16 overflow and subnormals, signed zero, inf.
  const float specials[] = {1.0f + 1.0f / 256, 1.0f + 3.0f / 256, 70000.0f, 1e-7f, -0.0f,
                            INFINITY,          -INFINITY,         65504.0f};
  for (size_t i = 0; i < std::size(specials) && i < n; ++i) v[i] = specials[i];
  return v;
}

uint16_t load_u16(const void* p, size_t i) {
  uint16_t v;
  std::memcpy(&v, static_cast<const char*>(p) + 2 * i, 2);
  return v;
}

// ---------------------------------------------------------------------------------------------
// Round trips

TEST(Safetensors, RoundTripF32Bf16F16) {
  TempDir tmp;
  const std::vector<float> a = test_values(3 * 5, 1), b = test_values(7, 2);
  const float scalar = 2.5f;
  const std::vector<TensorToSave> tensors = {{"layer.a", {3, 5}, a.data()},
                                             {"b", {7}, b.data()},
                                             {"scalar", {}, &scalar},
                                             {"empty", {0, 3}, nullptr}};
  for (DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
    SCOPED_TRACE(std::string(dtype_name(dt)));
    const fs::path path = tmp.path() / fmt::format("t_{}.safetensors", dtype_name(dt));
    write_safetensors(path, tensors, dt);
    if (const char* keep = std::getenv("LT_SAFETENSORS_KEEP_DIR")) {
      fs::copy_file(path, fs::path(keep) / path.filename(), fs::copy_options::overwrite_existing);
    }
    const std::string bytes = read_file(path);
    uint64_t header_len = 0;
    std::memcpy(&header_len, bytes.data(), 8);
    EXPECT_EQ(header_len % 8, 0u) << "header padded to a multiple of 8 bytes";
    const json header = json::parse(bytes.substr(8, header_len));
    EXPECT_EQ(header["__metadata__"], json({{"format", "pt"}}));

    auto f = SafetensorsFile::open(path);
    ASSERT_EQ(f->tensors().size(), 4u);
    EXPECT_EQ(f->metadata().at("format"), "pt");
    for (const TensorToSave& t : tensors) {
      const TensorInfo* info = f->find(t.name);
      ASSERT_NE(info, nullptr) << t.name;
      EXPECT_EQ(info->dtype, dt);
      EXPECT_EQ(info->shape, t.shape);
      ASSERT_EQ(info->nbytes, size_t(info->numel()) * dtype_size(dt));
      for (int64_t i = 0; i < info->numel(); ++i) {
        if (dt == DType::kF32) {
          float got;
          std::memcpy(&got, static_cast<const char*>(info->data) + 4 * i, 4);
          ASSERT_EQ(std::memcmp(&got, &t.data[i], 4), 0) << t.name << "[" << i << "]";
        } else {
          const uint16_t want = dt == DType::kBF16 ? f32_to_bf16(t.data[i]) : f32_to_f16(t.data[i]);
          ASSERT_EQ(load_u16(info->data, i), want) << t.name << "[" << i << "] from " << t.data[i];
        }
      }
    }
  }
}

TEST(Safetensors, ReadsFileWrittenByPythonLibrary) {
  const fs::path path = kFixtures / "safetensors/tiny.safetensors";
  const json want = json::parse(read_file(kFixtures / "safetensors/tiny.expected.json"));
  auto f = SafetensorsFile::open(path);
  EXPECT_EQ(f->metadata().at("format"), "pt");
  EXPECT_EQ(f->metadata().at("note"), "made by make_safetensors_fixtures");
  ASSERT_EQ(f->tensors().size(), want.size());
  const std::map<std::string, DType> dtypes = {{"float32", DType::kF32},
                                               {"bfloat16", DType::kBF16},
                                               {"float16", DType::kF16},
                                               {"float64", DType::kF64},
                                               {"int64", DType::kI64}};
  for (auto it = want.begin(); it != want.end(); ++it) {
    SCOPED_TRACE(it.key());
    const TensorInfo* t = f->find(it.key());
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(t->dtype, dtypes.at(it.value()["dtype"]));
    EXPECT_EQ(t->shape, it.value()["shape"].get<std::vector<int64_t>>());
    const std::vector<double> values = it.value()["values"];
    ASSERT_EQ(static_cast<int64_t>(values.size()), t->numel());
    std::vector<double> got(values.size());
    if (t->dtype == DType::kI64) {
      for (size_t i = 0; i < got.size(); ++i) {
        int64_t v;
        std::memcpy(&v, static_cast<const char*>(t->data) + 8 * i, 8);
        got[i] = static_cast<double>(v);
      }
    } else {
      std::vector<float> tmp(values.size());
      convert_to_f32(tmp.data(), t->data, t->dtype, tmp.size());
      got.assign(tmp.begin(), tmp.end());
    }
    for (size_t i = 0; i < got.size(); ++i) {
      // bf16/f16/f32 values are exact in f32; f64 3.25 too.
      ASSERT_EQ(got[i], values[i]) << "element " << i;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Model folders

TEST(Checkpoint, ShardedWriteAndRead) {
  TempDir tmp;
  std::vector<std::vector<float>> data;
  std::vector<TensorToSave> tensors;
  const std::vector<std::vector<int64_t>> shapes = {{16, 8}, {8}, {8, 16}, {4, 4}, {40}, {3, 2}};
  for (size_t i = 0; i < shapes.size(); ++i) {
    int64_t n = 1;
    for (int64_t d : shapes[i]) n *= d;
    data.push_back(test_values(n, 10 + i));
  }
  for (size_t i = 0; i < shapes.size(); ++i)
    tensors.push_back({fmt::format("model.t{}", i), shapes[i], data[i].data()});
  // bf16: 256 + 16 + 256 + 32 + 80 + 12 bytes; a 300-byte limit gives 3 shards.
  write_model_safetensors(tmp.path(), tensors, DType::kBF16, 300);
  const json index = json::parse(read_file(tmp.path() / "model.safetensors.index.json"));
  EXPECT_EQ(index["metadata"]["total_size"], 652);
  EXPECT_EQ(index["metadata"]["total_parameters"], 326);
  const json& wm = index["weight_map"];
  ASSERT_EQ(wm.size(), tensors.size());
  EXPECT_EQ(wm["model.t0"], "model-00001-of-00003.safetensors");
  EXPECT_EQ(wm["model.t2"], "model-00002-of-00003.safetensors");
  EXPECT_EQ(wm["model.t5"], "model-00003-of-00003.safetensors");
  EXPECT_FALSE(fs::exists(tmp.path() / "model.safetensors"));
  for (const auto& e : fs::directory_iterator(tmp.path()))
    EXPECT_EQ(e.path().string().find(".tmp."), std::string::npos) << e.path();

  CheckpointReader reader(tmp.path());
  EXPECT_EQ(reader.names().size(), tensors.size());
  EXPECT_EQ(reader.stored_dtype(), DType::kBF16);
  for (size_t i = 0; i < tensors.size(); ++i) {
    std::vector<float> got(data[i].size());
    reader.read_f32(tensors[i].name, shapes[i], got.data());
    for (size_t k = 0; k < got.size(); ++k) {
      const float want = bf16_to_f32(f32_to_bf16(data[i][k]));
      ASSERT_TRUE(got[k] == want || (std::isnan(got[k]) && std::isnan(want)))
          << tensors[i].name << "[" << k << "]: " << got[k] << " vs " << want;
    }
  }
  // Shape mismatch and missing tensor messages.
  std::vector<float> buf(1024);
  try {
    reader.read_f32("model.t0", {8, 16}, buf.data());
    ADD_FAILURE() << "no error";
  } catch (const UserError& e) {
    EXPECT_EQ(std::string(e.what()),
              (tmp.path() / "model-00001-of-00003.safetensors").string() +
                  ": tensor 'model.t0' has shape [16, 8], expected [8, 16] for this config");
  }
  try {
    reader.read_f32("model.absent", {1}, buf.data());
    ADD_FAILURE() << "no error";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("'model.absent' is missing"), std::string::npos)
        << e.what();
  }
  EXPECT_EQ(reader.find("model.absent"), nullptr);

  // Saving again unsharded replaces the index by model.safetensors.
  write_model_safetensors(tmp.path(), tensors, DType::kF32);
  EXPECT_FALSE(fs::exists(tmp.path() / "model.safetensors.index.json"));
  CheckpointReader single(tmp.path());
  EXPECT_EQ(single.stored_dtype(), DType::kF32);
  std::vector<float> got(data[3].size());
  single.read_f32("model.t3", {4, 4}, got.data());
  EXPECT_EQ(got, data[3]);
}

TEST(Checkpoint, MissingShardAndFolderErrors) {
  TempDir tmp;
  const std::vector<float> x(64, 1.0f);
  write_model_safetensors(tmp.path(), {{"a", {64}, x.data()}, {"b", {64}, x.data()}}, DType::kF32,
                          256);
  fs::remove(tmp.path() / "model-00002-of-00002.safetensors");
  try {
    CheckpointReader r(tmp.path());
    ADD_FAILURE() << "no error";
  } catch (const UserError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("model-00002-of-00002.safetensors"), std::string::npos) << msg;
    EXPECT_NE(msg.find("does not exist"), std::string::npos) << msg;
  }
  EXPECT_THROW(CheckpointReader(tmp.path() / "nope"), UserError);
  fs::remove_all(tmp.path());
  fs::create_directories(tmp.path());
  try {
    CheckpointReader r(tmp.path());
    ADD_FAILURE() << "no error";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("neither model.safetensors nor"), std::string::npos);
  }
  write_file_atomic(tmp.path() / "model.safetensors.index.json", "{\"metadata\": {}}");
  try {
    CheckpointReader r(tmp.path());
    ADD_FAILURE() << "no error";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("weight_map"), std::string::npos) << e.what();
  }
}

// ---------------------------------------------------------------------------------------------
// Corruptions

// A safetensors file from a header text and data bytes; header_len overrides the length field.
std::string make_file(const std::string& header, size_t data_bytes, int64_t header_len = -1) {
  const uint64_t len = header_len >= 0 ? uint64_t(header_len) : header.size();
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((len >> (8 * i)) & 0xff);
  return s + header + std::string(data_bytes, '\x01');
}

struct Corruption {
  const char* what;
  std::string bytes;
  std::vector<std::string> expect;  // substrings of the message besides the path
};

TEST(Safetensors, EveryCorruptionIsAUserErrorNamingFileAndProblem) {
  TempDir tmp;
  const std::string ok_entry = R"("w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  const std::vector<Corruption> cases = {
      {"shorter than 8 bytes", std::string("abc"), {"too short"}},
      {"empty file", std::string(), {"too short"}},
      {"header past end", make_file("{" + ok_entry + "}", 8, 1000), {"past the end"}},
      {"absurd header length", make_file("{}", 0, int64_t(1) << 40), {"absurd"}},
      {"header not JSON", make_file("{\"w\": [1, 2", 0), {"not valid JSON"}},
      {"header not object", make_file("[1,2,3]  ", 0), {"must be a JSON object"}},
      {"entry not object", make_file(R"({"w": 3})", 0), {"'w'", "must be an object"}},
      {"missing dtype",
       make_file(R"({"w":{"shape":[2],"data_offsets":[0,8]}})", 8),
       {"'w'", "missing 'dtype'"}},
      {"missing shape",
       make_file(R"({"w":{"dtype":"F32","data_offsets":[0,8]}})", 8),
       {"'w'", "missing 'shape'"}},
      {"missing offsets",
       make_file(R"({"w":{"dtype":"F32","shape":[2]}})", 8),
       {"'w'", "missing 'data_offsets'"}},
      {"dtype not string",
       make_file(R"({"w":{"dtype":4,"shape":[2],"data_offsets":[0,8]}})", 8),
       {"'w'", "dtype must be a string"}},
      {"unknown dtype",
       make_file(R"({"w":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}})", 8),
       {"'w'", "unsupported dtype 'Q4'"}},
      {"negative shape",
       make_file(R"({"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8),
       {"'w'", "negative"}},
      {"shape not array",
       make_file(R"({"w":{"dtype":"F32","shape":2,"data_offsets":[0,8]}})", 8),
       {"'w'", "shape must be an array"}},
      {"shape float",
       make_file(R"({"w":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", 8),
       {"'w'", "integers"}},
      {"offsets one number",
       make_file(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[8]}})", 8),
       {"'w'", "data_offsets must be [begin, end]"}},
      {"offsets negative",
       make_file(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}})", 8),
       {"'w'", "data_offsets must be [begin, end]"}},
      {"offsets out of range",
       make_file(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 4),
       {"'w'", "out of range"}},
      {"end before begin",
       make_file(R"({"w":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", 8),
       {"'w'", "end before begin"}},
      {"size not numel*dtype",
       make_file(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8),
       {"'w'", "needs 12"}},
      {"overlap",
       make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                 R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                 12),
       {"'b'", "overlaps tensor 'a'"}},
      {"hole",
       make_file(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                 R"("b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
                 12),
       {"'b'", "hole"}},
      {"trailing bytes", make_file("{" + ok_entry + "}", 12), {"trailing"}},
      {"metadata not object", make_file(R"({"__metadata__":[1]})", 0), {"__metadata__"}},
      {"metadata value not string",
       make_file(R"({"__metadata__":{"format":1}})", 0),
       {"__metadata__", "'format'", "must be a string"}},
  };
  for (const Corruption& c : cases) {
    SCOPED_TRACE(c.what);
    const fs::path path = tmp.path() / "bad.safetensors";
    write_file_atomic(path, c.bytes);
    try {
      SafetensorsFile::open(path);
      ADD_FAILURE() << "no error for: " << c.what;
    } catch (const UserError& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(path.string()), std::string::npos) << msg;
      for (const std::string& s : c.expect) EXPECT_NE(msg.find(s), std::string::npos) << msg;
    }
  }
  // The valid file that the corruptions start from opens.
  write_file_atomic(tmp.path() / "good.safetensors", make_file("{" + ok_entry + "}", 8));
  EXPECT_EQ(SafetensorsFile::open(tmp.path() / "good.safetensors")->tensors().size(), 1u);
  EXPECT_THROW(SafetensorsFile::open(tmp.path() / "absent.safetensors"), UserError);
  EXPECT_THROW(SafetensorsFile::open(tmp.path()), UserError);  // a folder
}

// ---------------------------------------------------------------------------------------------
// AtomicFile

std::vector<std::string> list_dir(const fs::path& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

TEST(AtomicFile, CommitReplacesAbandonKeepsOld) {
  TempDir tmp;
  const fs::path target = tmp.path() / "out.txt";
  write_file_atomic(target, "old contents");
  EXPECT_EQ(read_file(target), "old contents");
  {
    AtomicFile f(target);
    f.write("half written");
    // Destroyed without commit (e.g. an exception while saving).
  }
  EXPECT_EQ(read_file(target), "old contents");
  EXPECT_EQ(list_dir(tmp.path()), std::vector<std::string>{"out.txt"});
  {
    AtomicFile f(target);
    f.write("new ");
    f.write("contents");
    EXPECT_EQ(read_file(target), "old contents");  // not visible before commit
    f.commit();
  }
  EXPECT_EQ(read_file(target), "new contents");
  EXPECT_EQ(list_dir(tmp.path()), std::vector<std::string>{"out.txt"});
  EXPECT_THROW(AtomicFile(tmp.path() / "no_such_dir" / "x"), UserError);
  EXPECT_THROW(read_file(tmp.path() / "absent"), UserError);
}

// A full disk is simulated with RLIMIT_FSIZE (writes past it fail with EFBIG).
TEST(AtomicFile, WriteErrorNamesTargetAndLeavesNoTemp) {
  TempDir tmp;
  const fs::path target = tmp.path() / "big.bin";
  write_file_atomic(target, "previous");
  struct rlimit old {};
  ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &old), 0);
  auto old_handler = signal(SIGXFSZ, SIG_IGN);
  struct rlimit lim = old;
  lim.rlim_cur = 4096;
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &lim), 0);
  std::string msg;
  try {
    const std::vector<char> block(1 << 16, 'x');
    AtomicFile f(target);
    for (int i = 0; i < 4; ++i) f.write(block.data(), block.size());
    f.commit();
  } catch (const UserError& e) {
    msg = e.what();
  }
  setrlimit(RLIMIT_FSIZE, &old);
  signal(SIGXFSZ, old_handler);
  EXPECT_NE(msg.find(target.string()), std::string::npos) << "message: " << msg;
  EXPECT_EQ(read_file(target), "previous");
  EXPECT_EQ(list_dir(tmp.path()), std::vector<std::string>{"big.bin"});
}

}  // namespace
}  // namespace lt
