// Hugging Face tokenizers (tokenizer.json + tokenizer_config.json): BPE, byte-level and
// SentencePiece-style, giving exactly the ids the `tokenizers` library gives.
#pragma once
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace lt {

class Tokenizer {
 public:
  // path: a tokenizer.json file or a folder holding tokenizer.json (and optionally
  // tokenizer_config.json beside it). UserError names the file and the unsupported component.
  static std::unique_ptr<Tokenizer> load(const std::filesystem::path& path);
  virtual ~Tokenizer() = default;

  // As tokenizer(text, add_special_tokens=...) in transformers: post-processor (BOS/EOS
  // template) applied only when add_special_tokens.
  virtual std::vector<int32_t> encode(std::string_view text, bool add_special_tokens) const = 0;
  // As tokenizer.decode(ids, skip_special_tokens=...).
  virtual std::string decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const = 0;

  virtual int64_t vocab_size() const = 0;  // including added tokens
  virtual std::optional<int32_t> token_to_id(std::string_view token) const = 0;
  virtual std::string id_to_token(int32_t id) const = 0;

  // From tokenizer_config.json (or the post-processor when absent there).
  virtual std::optional<int32_t> bos_id() const = 0;
  virtual std::optional<int32_t> eos_id() const = 0;
  virtual std::optional<int32_t> pad_id() const = 0;
  virtual std::optional<int32_t> unk_id() const = 0;
  virtual std::string bos_token() const = 0;
  virtual std::string eos_token() const = 0;
  // Whether encode(..., true) prepends BOS / appends EOS.
  virtual bool adds_bos() const = 0;
  virtual bool adds_eos() const = 0;
  // tokenizer_config.json "chat_template" (empty when absent).
  virtual const std::string& chat_template() const = 0;
};

}  // namespace lt
