// Internal pieces of the Hugging Face tokenizer pipeline (tokenizer.json components):
// UTF-8 helpers, the PCRE2 regex wrapper, normalizers, pre-tokenizers, the BPE model,
// post-processors and decoders. Only src/data/tokenizer*.cpp use this header.
#pragma once
#include <cstdint>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace lt::tok {

// Largest token id + 1 a tokenizer file may use: 4M, far above every real vocabulary (the largest
// are ~256K), so that a corrupt id cannot make the id -> token table allocate gigabytes.
inline constexpr int32_t kMaxTokenId = 1 << 22;

using json = nlohmann::json;

// ---- UTF-8 and Unicode properties (text_util.cpp) ----

// Decodes the code point at s[i] (s must be valid UTF-8) and advances i past it.
char32_t utf8_next(std::string_view s, size_t& i);
// Byte length of the UTF-8 sequence starting with lead byte b (1 for stray bytes).
inline size_t utf8_len(unsigned char b) {
  return b < 0x80 ? 1 : (b >> 5) == 6 ? 2 : (b >> 4) == 14 ? 3 : (b >> 3) == 30 ? 4 : 1;
}
void utf8_append(std::string& out, char32_t c);
bool utf8_valid(std::string_view s);
// As Rust's String::from_utf8_lossy: each maximal invalid subpart becomes one U+FFFD.
std::string utf8_lossy(std::string_view bytes);
// Rust's char::is_whitespace (Unicode White_Space) and char::is_alphanumeric.
bool is_whitespace(char32_t c);
bool is_alphanumeric(char32_t c);
bool is_numeric(char32_t c);

// Where a component sits, for error messages: file and JSON path.
struct Origin {
  std::string file;
  std::string path;
  Origin at(std::string_view sub) const { return {file, path + "." + std::string(sub)}; }
};
[[noreturn]] void fail_at(const Origin& where, std::string_view what);
// The "type" string of a component object (UserError when missing).
std::string component_type(const json& j, const Origin& where);

// ---- Regex (PCRE2, UTF + UCP, JIT) ----
class Regex {
 public:
  // pattern in Oniguruma syntax as tokenizer.json stores it (the subset used by tokenizers is
  // PCRE2-compatible). UserError (naming where) if it does not compile.
  Regex(std::string_view pattern, const Origin& where);
  // Appends the [start, end) byte ranges of all non-overlapping, non-empty matches in text.
  void find_all(std::string_view text, std::vector<std::pair<size_t, size_t>>& out) const;

 private:
  std::shared_ptr<void> code_;  // pcre2_code_8, freed by pcre2_code_free
};

// A pattern field {"String": s} or {"Regex": r}.
struct Pattern {
  std::string literal;           // when !regex
  std::shared_ptr<Regex> regex;  // when set
  static Pattern parse(const json& j, const Origin& where);
  void find_all(std::string_view text, std::vector<std::pair<size_t, size_t>>& out) const;
};
std::string replace_all(std::string_view text, const Pattern& pattern, std::string_view content);

// ---- Normalizers ----
class Normalizer {
 public:
  virtual ~Normalizer() = default;
  virtual void normalize(std::string& text) const = 0;
};
std::unique_ptr<Normalizer> make_normalizer(const json& j, const Origin& where);  // null -> null

// ---- Pre-tokenizers ----
struct Piece {
  std::string text;
  bool at_origin = false;  // starts at offset 0 of the original input (Metaspace "first")
};
class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  // Replaces pieces by their splits; empty pieces are dropped.
  virtual void pre_tokenize(std::vector<Piece>& pieces) const = 0;
};
std::unique_ptr<PreTokenizer> make_pre_tokenizer(const json& j, const Origin& where);

// GPT-2 byte <-> printable-char table used by ByteLevel.
const std::string& byte_to_unicode(unsigned char b);  // UTF-8 of the char standing for b
int unicode_to_byte(char32_t c);                      // -1 when c is not one of those chars

// ---- BPE model ----
// Hash for unordered_map<std::string, ...> that allows lookups by std::string_view.
struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
template <typename V>
using StringMap = std::unordered_map<std::string, V, StringHash, std::equal_to<>>;

class BpeModel {
 public:
  BpeModel(const json& model, const Origin& where);
  // Appends the ids of one pre-tokenized word.
  void tokenize(std::string_view word, std::vector<int32_t>& ids) const;
  std::optional<int32_t> token_to_id(std::string_view token) const;
  const std::string* id_to_token(int32_t id) const;
  size_t vocab_size() const { return id_to_token_.size(); }
  const StringMap<int32_t>& vocab() const { return vocab_; }

 private:
  void merge_word(std::string_view word, std::vector<int32_t>& ids) const;
  uint64_t merge_lookup(int32_t a, int32_t b) const;  // (rank << 32 | new_id), or ~0 if none

  StringMap<int32_t> vocab_;
  std::vector<std::string> id_to_token_;  // dense by id ("" for holes)
  std::vector<uint64_t> merge_keys_;      // open addressing: (a << 32 | b), ~0 = empty
  std::vector<uint64_t> merge_values_;    // (rank << 32 | new_id)
  uint64_t merge_mask_ = 0;
  std::optional<int32_t> unk_id_;
  bool byte_fallback_ = false;
  bool fuse_unk_ = false;
  bool ignore_merges_ = false;
  std::string continuing_subword_prefix_;
  std::string end_of_word_suffix_;
  int32_t byte_ids_[256];  // <0xXX> ids for byte_fallback (-1 when absent)
  // Word cache as in HF (words up to kCacheMaxWord bytes, at most kCacheCapacity entries).
  static constexpr size_t kCacheMaxWord = 256;
  static constexpr size_t kCacheCapacity = 1 << 17;
  mutable std::mutex cache_mutex_;
  mutable StringMap<std::vector<int32_t>> cache_;
};

// ---- Post-processors ----
struct PostProcessor {
  std::vector<int32_t> prefix;  // ids before the sequence (e.g. BOS)
  std::vector<int32_t> suffix;  // ids after it (e.g. EOS)
};
// Null/ByteLevel -> empty; TemplateProcessing/Bert/Roberta/Sequence -> their single template.
PostProcessor make_post_processor(const json& j, const Origin& where);

// ---- Decoders ----
class Decoder {
 public:
  virtual ~Decoder() = default;
  virtual void decode_chain(std::vector<std::string>& tokens) const = 0;
};
std::unique_ptr<Decoder> make_decoder(const json& j, const Origin& where);

}  // namespace lt::tok
