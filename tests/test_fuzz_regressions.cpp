// Replays every file of tests/fuzz_corpus/<target>/ (fuzzer seeds and the inputs that once
// crashed or hung a parser) through the fuzz entry points under the normal build: each must load
// or be refused with a UserError, never crash or throw anything else.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <vector>

#include "fuzz/fuzz_entries.h"

namespace lt {
namespace {

namespace fs = std::filesystem;

std::vector<fs::path> corpus(const std::string& target) {
  const fs::path dir = fs::path(LT_SOURCE_DIR) / "tests" / "fuzz_corpus" / target;
  std::vector<fs::path> files;
  if (fs::is_directory(dir))
    for (const auto& e : fs::directory_iterator(dir))
      if (e.is_regular_file()) files.push_back(e.path());
  std::sort(files.begin(), files.end());
  return files;
}

std::vector<uint8_t> bytes_of(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

template <typename Run>
void replay(const std::string& target, Run run, size_t min_files) {
  const std::vector<fs::path> files = corpus(target);
  ASSERT_GE(files.size(), min_files) << "tests/fuzz_corpus/" << target << " is missing files";
  int accepted = 0, rejected = 0;
  for (const fs::path& f : files) {
    SCOPED_TRACE(f.string());
    const std::vector<uint8_t> data = bytes_of(f);
    try {
      if (run(data.data(), data.size()) == fuzz::Outcome::kAccepted) {
        ++accepted;
      } else {
        ++rejected;
        std::printf("  %s: %.160s\n", f.filename().c_str(), fuzz::last_rejection().c_str());
      }
    } catch (const std::exception& e) {
      ADD_FAILURE() << f << ": escaped with a non-UserError exception: " << e.what();
    }
  }
  std::printf("%s: %zu files, %d accepted, %d rejected with a UserError\n", target.c_str(),
              files.size(), accepted, rejected);
  // The seeds are valid inputs: a corpus where everything is refused means a broken entry point.
  EXPECT_GT(accepted, 0);
}

TEST(FuzzRegressions, Tokenizer) {
  ASSERT_TRUE(fs::exists(fs::path(LT_SOURCE_DIR) / "../shared/data/tokenizers/gpt2"))
      << "shared data not found (../shared beside the checkout)";
  replay("tokenizer", fuzz::tokenizer_one, 10);
}

TEST(FuzzRegressions, Dataset) {
  const fs::path dir = fs::temp_directory_path() / ("lt_fuzz_replay_" + std::to_string(getpid()));
  fs::create_directories(dir);
  replay("dataset", [&](const uint8_t* d, size_t n) { return fuzz::dataset_one(d, n, dir); }, 10);
  fs::remove_all(dir);
}

TEST(FuzzRegressions, Safetensors) { replay("safetensors", fuzz::safetensors_one, 3); }

}  // namespace
}  // namespace lt
