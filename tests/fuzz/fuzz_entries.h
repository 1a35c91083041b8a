// Entry points shared by the libFuzzer targets (tests/fuzz/fuzz_*.cpp) and the corpus replay
// test (tests/test_fuzz_regressions.cpp): each runs one input through a parser and accepts
// success or a UserError; anything else (a crash, a sanitizer report, another exception) is a bug.
#pragma once
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <string_view>

#include "core/error.h"
#include "data/dataset.h"
#include "data/tokenizer.h"
#include "io/safetensors.h"

namespace lt::fuzz {

enum class Outcome { kAccepted, kRejected };  // kRejected: a UserError, the message checked

// An in-memory file (memfd) reachable by path as /proc/self/fd/N, closed on destruction.
class MemFile {
 public:
  MemFile(const uint8_t* data, size_t size) {
    fd_ = ::memfd_create("lt_fuzz", MFD_CLOEXEC);
    if (fd_ < 0) std::abort();
    size_t done = 0;
    while (done < size) {
      const ssize_t n = ::write(fd_, data + done, size - done);
      if (n <= 0) std::abort();
      done += static_cast<size_t>(n);
    }
  }
  ~MemFile() { ::close(fd_); }
  std::filesystem::path path() const { return "/proc/self/fd/" + std::to_string(fd_); }

 private:
  int fd_ = -1;
};

// The message of the last UserError an entry point caught (for the replay test's log).
inline std::string& last_rejection() {
  static std::string message;
  return message;
}

// A UserError must say something: an empty message would leave the user guessing.
inline Outcome rejected(const UserError& e) {
  if (std::strlen(e.what()) == 0) std::abort();
  last_rejection() = e.what();
  return Outcome::kRejected;
}

// The shared real tokenizers (../shared/data/tokenizers), loaded once; null when absent.
inline const Tokenizer* shared_tokenizer(const std::string& name) {
  static std::unique_ptr<Tokenizer> gpt2, llama2;
  static bool loaded = false;
  if (!loaded) {
    loaded = true;
    const std::filesystem::path root = std::filesystem::path(LT_SOURCE_DIR) / ".." / "shared" /
                                       "data" / "tokenizers";
    if (std::filesystem::exists(root / "gpt2" / "tokenizer.json")) {
      gpt2 = Tokenizer::load(root / "gpt2");
      llama2 = Tokenizer::load(root / "llama2");
    }
  }
  return name == "gpt2" ? gpt2.get() : llama2.get();
}

// Encodes and decodes text with special tokens on and off, as the dataset loader and generate do.
inline void exercise_tokenizer(const Tokenizer& tok, std::string_view text) {
  for (bool special : {false, true}) {
    std::vector<int32_t> ids = tok.encode(text, special);
    for (int32_t id : ids)
      if (id < 0 || id >= tok.vocab_size()) std::abort();  // ids must index the vocabulary
    (void)tok.decode(ids, special);
  }
  // Decoding arbitrary ids (generate may sample any id) must not crash either.
  std::vector<int32_t> arbitrary;
  for (size_t i = 0; i + 1 < text.size() && i < 64; i += 2)
    arbitrary.push_back(static_cast<int32_t>(
        (static_cast<uint8_t>(text[i]) << 8 | static_cast<uint8_t>(text[i + 1])) %
        (tok.vocab_size() + 3)) - 1);
  (void)tok.decode(arbitrary, false);
  (void)tok.decode(arbitrary, true);
}

// Byte 0 picks the mode: 0 = the rest is a tokenizer.json (then, after a NUL byte, text to
// encode); 1 = the rest is text for the GPT-2 tokenizer; 2 = for the Llama-2 tokenizer.
inline Outcome tokenizer_one(const uint8_t* data, size_t size) {
  if (size == 0) return Outcome::kAccepted;
  const std::string_view rest(reinterpret_cast<const char*>(data + 1), size - 1);
  const int mode = data[0] % 3;
  try {
    if (mode == 0) {
      const size_t nul = rest.find('\0');
      const std::string_view json = rest.substr(0, nul);
      const std::string_view text =
          nul == std::string_view::npos ? "Hello world! <s> 123  \n\t caf\xc3\xa9" : rest.substr(nul + 1);
      MemFile f(reinterpret_cast<const uint8_t*>(json.data()), json.size());
      std::unique_ptr<Tokenizer> tok = Tokenizer::load(f.path());
      exercise_tokenizer(*tok, text);
      (void)tok->token_to_id(text);
      for (int64_t id : {int64_t{0}, tok->vocab_size() - 1, tok->vocab_size(), int64_t{-1}})
        (void)tok->id_to_token(static_cast<int32_t>(id));
    } else if (const Tokenizer* tok = shared_tokenizer(mode == 1 ? "gpt2" : "llama2")) {
      exercise_tokenizer(*tok, rest);
    }
  } catch (const UserError& e) {
    return rejected(e);
  }
  return Outcome::kAccepted;
}

// Byte 0: extension (json, jsonl, txt) and format; byte 1: settings; the rest: the file.
inline Outcome dataset_one(const uint8_t* data, size_t size, const std::filesystem::path& dir) {
  if (size < 2) return Outcome::kAccepted;
  static const char* kExt[] = {".json", ".jsonl", ".txt"};
  static const char* kFormats[] = {"auto",       "alpaca", "messages", "sharegpt",
                                   "completion", "text",   "tokenized"};
  static const char* kTemplates[] = {"chatml", "llama2", "llama3", "mistral", "zephyr", ""};
  static const int64_t kLengths[] = {0, 7, 64, 1024};
  DatasetOptions opt;
  opt.format = parse_dataset_format(kFormats[(data[0] / 3) % 7]);
  opt.packing = data[1] & 1;
  opt.train_on_inputs = data[1] & 2;
  opt.model_max_length = kLengths[(data[1] >> 2) & 3];
  opt.chat_template = kTemplates[(data[1] >> 4) % 6];
  const std::filesystem::path file =
      dir / ("fuzz_" + std::to_string(::getpid()) + kExt[data[0] % 3]);
  {
    std::ofstream out(file, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(data + 2), static_cast<std::streamsize>(size - 2));
  }
  // The GPT-2 tokenizer when the shared data is present (real BPE), else none: tokenized data
  // still parses, other formats are then rejected with a message.
  const Tokenizer* tok = shared_tokenizer("gpt2");
  Outcome outcome = Outcome::kAccepted;
  try {
    Dataset ds = load_dataset(file, tok, opt, tok ? tok->vocab_size() : 0);
    for (const Example& ex : ds.rows) {
      if (ex.labels.size() != ex.input_ids.size()) std::abort();
      if (!ex.doc_ids.empty() && ex.doc_ids.size() != ex.input_ids.size()) std::abort();
      if (opt.model_max_length > 0 &&
          static_cast<int64_t>(ex.input_ids.size()) > opt.model_max_length)
        std::abort();
    }
  } catch (const UserError& e) {
    outcome = rejected(e);
  }
  std::filesystem::remove(file);
  return outcome;
}

// The whole input is a .safetensors file; every tensor's first and last byte is read so that
// an out-of-range offset shows up under AddressSanitizer.
inline Outcome safetensors_one(const uint8_t* data, size_t size) {
  MemFile f(data, size);
  try {
    auto st = SafetensorsFile::open(f.path());
    volatile uint8_t sink = 0;
    for (const TensorInfo& t : st->tensors()) {
      if (t.nbytes == 0) continue;
      const auto* b = static_cast<const uint8_t*>(t.data);
      sink = sink ^ b[0] ^ b[t.nbytes - 1];
      if (t.numel() < 0) std::abort();
    }
    for (const auto& [k, v] : st->metadata()) sink = sink ^ static_cast<uint8_t>(k.size() + v.size());
  } catch (const UserError& e) {
    return rejected(e);
  }
  return Outcome::kAccepted;
}

}  // namespace lt::fuzz
