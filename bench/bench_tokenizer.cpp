// Single-thread encode throughput (MB/s) of the GPT-2 and Llama-2 tokenizers on the Alpaca
// data (one document per record), after validating ids against the committed corpora.
// Run from the repo root: build/bench_tokenizer   (compare: bench/bench_tokenizer_hf.py)
#include <fmt/format.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "data/tokenizer.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

json read_json(const fs::path& p) {
  std::ifstream in(p);
  if (!in) throw std::runtime_error("cannot read " + p.string());
  return json::parse(in);
}

// instruction \n input \n output of every record of the three Alpaca files, in file order.
std::vector<std::string> alpaca_documents(const fs::path& dir) {
  std::vector<std::string> docs;
  for (const char* name :
       {"fastchat_alpaca_data_cleaned_1000.json", "llamafactory_alpaca_en_demo.json",
        "llamafactory_alpaca_zh_demo.json"}) {
    for (const auto& r : read_json(dir / name)) {
      docs.push_back(r.value("instruction", "") + "\n" + r.value("input", "") + "\n" +
                     r.value("output", ""));
    }
  }
  return docs;
}

// Compares encode(text, true) with the first `n` cases of the corpus; returns mismatches.
int validate(const lt::Tokenizer& tok, const fs::path& corpus, size_t n) {
  json c = read_json(corpus);
  int bad = 0;
  size_t k = 0;
  for (const auto& cs : c["cases"]) {
    if (k++ == n) break;
    auto want = cs.value("ids_special", cs["ids"].get<std::vector<int32_t>>());
    if (tok.encode(cs["text"].get<std::string>(), true) != want) ++bad;
  }
  return bad;
}

}  // namespace

int main() {
  const fs::path shared = "../shared/data";
  auto docs = alpaca_documents(shared / "instructions");
  size_t bytes = 0;
  for (const auto& d : docs) bytes += d.size();
  fmt::print("documents: {}, {:.2f} MB\n", docs.size(), bytes / 1e6);
  int status = 0;
  for (const char* name : {"gpt2", "llama2"}) {
    auto tok = lt::Tokenizer::load(shared / "tokenizers" / name);
    int bad = validate(
        *tok, fs::path("tests/fixtures/tokenizer") / fmt::format("corpus_{}.json", name), 100000);
    if (bad) {
      fmt::print("{}: {} validation mismatches, not timing\n", name, bad);
      status = 1;
      continue;
    }
    // A fresh tokenizer so that pass 1 starts with an empty word cache, as in the HF script.
    tok = lt::Tokenizer::load(shared / "tokenizers" / name);
    size_t n_ids = 0;
    std::vector<double> mbs;
    for (int pass = 0; pass < 3; ++pass) {
      auto t0 = std::chrono::steady_clock::now();
      n_ids = 0;
      for (const auto& d : docs) n_ids += tok->encode(d, false).size();
      double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      mbs.push_back(bytes / 1e6 / s);
    }
    fmt::print("{:7s} longtune: {} ids; MB/s pass1 {:.2f}, pass2 {:.2f}, pass3 {:.2f}\n", name,
               n_ids, mbs[0], mbs[1], mbs[2]);
  }
  return status;
}
