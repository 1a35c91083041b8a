// Sharded write-back: --max_shard_size parsing (transformers' spelling), shard layout and
// read-back through CheckpointReader, stale files of an earlier save removed, and the same
// through `longtune init` / `longtune merge` with a small --max_shard_size.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <sstream>

#include "core/error.h"
#include "io/safetensors.h"

namespace lt {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

const std::string kLongtune = std::string(LT_BINARY_DIR) + "/longtune";

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/lt_shards_XXXXXX";
    EXPECT_NE(mkdtemp(tmpl), nullptr);
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

std::set<std::string> files_in(const fs::path& dir) {
  std::set<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.insert(e.path().filename().string());
  return out;
}

// bf16 of x by round-to-nearest-even, computed independently of the library.
float bf16_round(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u = (u + 0x7fff + ((u >> 16) & 1)) & 0xffff0000u;
  float y;
  std::memcpy(&y, &u, 4);
  return y;
}

TEST(ShardedSave, ParseMaxShardSize) {
  EXPECT_EQ(parse_max_shard_size("5GB"), size_t(5'000'000'000));
  EXPECT_EQ(parse_max_shard_size("50GB"), size_t(50'000'000'000));
  EXPECT_EQ(parse_max_shard_size("500MiB"), size_t(500) << 20);
  EXPECT_EQ(parse_max_shard_size("2gib"), size_t(2) << 30);
  EXPECT_EQ(parse_max_shard_size("10KB"), size_t(10'000));
  EXPECT_EQ(parse_max_shard_size("10kb"), size_t(1'250));  // transformers: lower-case b = bits
  EXPECT_EQ(parse_max_shard_size("5Gb"), size_t(625'000'000));
  EXPECT_EQ(parse_max_shard_size("12345"), size_t(12345));
  EXPECT_EQ(kDefaultMaxShardBytes, parse_max_shard_size("50GB"));
  for (const char* bad : {"", "GB", "5XB", "5 GB", "-5GB", "1.5GB", "0", "0MB"}) {
    try {
      parse_max_shard_size(bad);
      ADD_FAILURE() << "'" << bad << "' was accepted";
    } catch (const UserError& e) {
      EXPECT_NE(std::string(e.what()).find("--max_shard_size"), std::string::npos) << e.what();
    }
  }
}

struct Saved {
  std::vector<std::string> names;
  std::vector<std::vector<int64_t>> shapes;
  std::vector<std::vector<float>> data;
  std::vector<TensorToSave> to_save() const {
    std::vector<TensorToSave> t;
    for (size_t i = 0; i < names.size(); ++i) t.push_back({names[i], shapes[i], data[i].data()});
    return t;
  }
};

Saved random_tensors(int n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd;
  Saved s;
  for (int i = 0; i < n; ++i) {
    const int64_t rows = 1 + static_cast<int64_t>(rng() % 7),
                  cols = 8 + static_cast<int64_t>(rng() % 40);
    s.names.push_back("layers." + std::to_string(i) + ".weight");
    s.shapes.push_back({rows, cols});
    s.data.emplace_back(rows * cols);
    for (float& v : s.data.back()) v = nd(rng);
  }
  return s;
}

// Shards as transformers' greedy split makes them: in order, a new shard when the next tensor
// does not fit, a tensor larger than the limit alone.
std::vector<std::vector<std::string>> expected_shards(const Saved& s, size_t elem, size_t limit) {
  std::vector<std::vector<std::string>> out(1);
  size_t cur = 0;
  for (size_t i = 0; i < s.names.size(); ++i) {
    const size_t b = s.data[i].size() * elem;
    if (cur + b > limit && !out.back().empty()) out.emplace_back(), cur = 0;
    out.back().push_back(s.names[i]);
    cur += b;
  }
  return out;
}

void expect_read_back(const fs::path& dir, const Saved& s, DType dtype) {
  CheckpointReader reader(dir);
  EXPECT_EQ(reader.names().size(), s.names.size());
  EXPECT_EQ(reader.stored_dtype(), dtype);
  for (size_t i = 0; i < s.names.size(); ++i) {
    std::vector<float> got(s.data[i].size());
    reader.read_f32(s.names[i], s.shapes[i], got.data());
    size_t worst = 0;
    float worst_diff = 0;
    for (size_t k = 0; k < got.size(); ++k) {
      const float want = dtype == DType::kBF16 ? bf16_round(s.data[i][k]) : s.data[i][k];
      const float d = std::fabs(got[k] - want);
      if (d > worst_diff) worst_diff = d, worst = k;
    }
    EXPECT_EQ(worst_diff, 0.0f) << s.names[i] << "[" << worst << "]: got " << got[worst]
                                << ", saved " << s.data[i][worst];
  }
}

TEST(ShardedSave, SmallLimitSplitsAndReadsBack) {
  const Saved s = random_tensors(9, 7);
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    SCOPED_TRACE(dtype_name(dtype));
    TempDir tmp;
    const size_t elem = dtype_size(dtype), limit = 150 * elem, limit2 = 500 * elem;
    write_model_safetensors(tmp.path(), s.to_save(), dtype, limit);
    const auto want = expected_shards(s, elem, limit);
    ASSERT_GT(want.size(), 2u) << "the test needs several shards";
    std::set<std::string> files = {"model.safetensors.index.json"};
    const size_t n = want.size();
    const json index = json::parse(std::ifstream(tmp.path() / "model.safetensors.index.json"));
    size_t total = 0;
    for (size_t k = 0; k < n; ++k) {
      char name[64];
      std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", k + 1, n);
      files.insert(name);
      auto f = SafetensorsFile::open(tmp.path() / name);
      std::vector<std::string> held;
      size_t bytes = 0;
      for (const TensorInfo& t : f->tensors()) held.push_back(t.name), bytes += t.nbytes;
      std::sort(held.begin(), held.end());
      std::vector<std::string> expect = want[k];
      std::sort(expect.begin(), expect.end());
      EXPECT_EQ(held, expect) << name;
      EXPECT_TRUE(bytes <= limit || held.size() == 1) << name << " holds " << bytes << " bytes";
      EXPECT_EQ(f->metadata().at("format"), "pt");  // transformers refuses files without it
      for (const std::string& t : held) EXPECT_EQ(index["weight_map"][t], name) << t;
      total += bytes;
    }
    EXPECT_EQ(files_in(tmp.path()), files);
    EXPECT_EQ(index["metadata"]["total_size"].get<size_t>(), total);
    expect_read_back(tmp.path(), s, dtype);

    // Saving again with fewer shards, then as one file: nothing stale is left behind.
    write_model_safetensors(tmp.path(), s.to_save(), dtype, limit2);
    const size_t n2 = expected_shards(s, elem, limit2).size();
    ASSERT_GT(n2, 1u);
    ASSERT_LT(n2, n);
    EXPECT_EQ(files_in(tmp.path()).size(), n2 + 1);
    expect_read_back(tmp.path(), s, dtype);
    write_model_safetensors(tmp.path(), s.to_save(), dtype);
    EXPECT_EQ(files_in(tmp.path()), std::set<std::string>{"model.safetensors"});
    expect_read_back(tmp.path(), s, dtype);
  }
}

int run_cli(const std::string& args, std::string* err) {
  const std::string err_file = "/tmp/lt_shards_err_" + std::to_string(getpid());
  const int st = std::system((kLongtune + " " + args + " >/dev/null 2>" + err_file).c_str());
  std::ifstream in(err_file);
  std::stringstream ss;
  ss << in.rdbuf();
  *err = ss.str();
  fs::remove(err_file);
  return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

// `longtune init --max_shard_size 100KB` writes shards holding the same tensors as one file.
TEST(ShardedSave, InitWithMaxShardSize) {
  TempDir tmp;
  const fs::path one = tmp.path() / "one", sharded = tmp.path() / "sharded";
  std::string err;
  ASSERT_EQ(run_cli("init --preset tiny --seed 3 --output_dir " + one.string(), &err), 0) << err;
  ASSERT_EQ(
      run_cli("init --preset tiny --seed 3 --max_shard_size 100KB --output_dir " + sharded.string(),
              &err),
      0)
      << err;
  EXPECT_TRUE(fs::exists(one / "model.safetensors"));
  EXPECT_FALSE(fs::exists(sharded / "model.safetensors"));
  ASSERT_TRUE(fs::exists(sharded / "model.safetensors.index.json"));
  size_t shards = 0;
  for (const auto& f : files_in(sharded)) {
    if (f.rfind("model-", 0) != 0) continue;
    ++shards;
    auto file = SafetensorsFile::open(sharded / f);
    size_t bytes = 0;
    for (const TensorInfo& t : file->tensors()) bytes += t.nbytes;
    EXPECT_TRUE(bytes <= 100'000 || file->tensors().size() == 1) << f << ": " << bytes;
  }
  EXPECT_GT(shards, 3u);
  CheckpointReader a(one), b(sharded);
  ASSERT_EQ(a.names(), b.names());
  for (const std::string& name : a.names()) {
    const TensorInfo* ta = a.find(name);
    const TensorInfo* tb = b.find(name);
    ASSERT_EQ(ta->shape, tb->shape) << name;
    ASSERT_EQ(ta->nbytes, tb->nbytes) << name;
    EXPECT_EQ(std::memcmp(ta->data, tb->data, ta->nbytes), 0) << name << " differs";
  }
  // And a bad value is one clear error that names the flag.
  const fs::path bad = tmp.path() / "bad";
  EXPECT_EQ(run_cli("init --preset tiny --max_shard_size 5XB --output_dir " + bad.string(), &err),
            1);
  EXPECT_NE(err.find("--max_shard_size: '5XB' is not a size"), std::string::npos) << err;
  EXPECT_FALSE(fs::exists(bad));
}

}  // namespace
}  // namespace lt
