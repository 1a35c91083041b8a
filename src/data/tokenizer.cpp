// Tokenizer::load and the Hugging Face tokenizer pipeline: added tokens (split first, never
// merged across), normalizer, pre-tokenizer, BPE model, post-processor and decoder, plus the
// special tokens and chat template of tokenizer_config.json.
#include "data/tokenizer.h"

#include <array>
#include <fstream>
#include <sstream>
#include <unordered_map>

#include "core/error.h"
#include "data/tokenizer_parts.h"

namespace lt {
namespace {

using tok::json;
using tok::Origin;

struct AddedToken {
  std::string content;
  int32_t id = 0;
  bool special = false, lstrip = false, rstrip = false, single_word = false, normalized = false;
};

// Leftmost-longest matcher over a set of strings (a byte trie), as HF's aho-corasick with
// MatchKind::LeftmostLongest.
class TokenMatcher {
 public:
  TokenMatcher() : nodes_(1) { first_byte_.fill(false); }
  void add(std::string_view pattern, int32_t token_index) {
    if (pattern.empty()) return;
    first_byte_[static_cast<unsigned char>(pattern[0])] = true;
    int32_t node = 0;
    for (char c : pattern) {
      int32_t child = find_child(node, static_cast<unsigned char>(c));
      if (child < 0) {
        child = static_cast<int32_t>(nodes_.size());
        nodes_[node].children.emplace_back(static_cast<unsigned char>(c), child);
        nodes_.emplace_back();
      }
      node = child;
    }
    if (nodes_[node].token < 0) nodes_[node].token = token_index;
  }
  bool empty() const { return nodes_.size() == 1; }
  struct Match {
    size_t start, end;
    int32_t token_index;
  };
  void find(std::string_view text, std::vector<Match>& out) const {
    if (empty()) return;
    for (size_t i = 0; i < text.size();) {
      if (!first_byte_[static_cast<unsigned char>(text[i])]) {
        ++i;
        continue;
      }
      int32_t node = 0, best = -1;
      size_t best_end = 0;
      for (size_t k = i; k < text.size(); ++k) {
        node = find_child(node, static_cast<unsigned char>(text[k]));
        if (node < 0) break;
        if (nodes_[node].token >= 0) {
          best = nodes_[node].token;
          best_end = k + 1;
        }
      }
      if (best >= 0) {
        out.push_back({i, best_end, best});
        i = best_end;
      } else {
        ++i;
      }
    }
  }

 private:
  struct Node {
    std::vector<std::pair<unsigned char, int32_t>> children;
    int32_t token = -1;
  };
  int32_t find_child(int32_t node, unsigned char c) const {
    for (auto [b, child] : nodes_[node].children)
      if (b == c) return child;
    return -1;
  }
  std::vector<Node> nodes_;
  std::array<bool, 256> first_byte_;
};

// A piece of input: either an added token (token >= 0) or text [start, end).
struct Span {
  size_t start, end;
  int32_t token = -1;  // index into added tokens
};

bool ends_with_word(std::string_view s) {
  if (s.empty()) return false;
  size_t i = s.size() - 1;
  while (i > 0 && (static_cast<unsigned char>(s[i]) & 0xC0) == 0x80) --i;
  char32_t c = tok::utf8_next(s, i);
  return c == U'_' || tok::is_alphanumeric(c);
}
bool starts_with_word(std::string_view s) {
  if (s.empty()) return false;
  size_t i = 0;
  char32_t c = tok::utf8_next(s, i);
  return c == U'_' || tok::is_alphanumeric(c);
}

std::string read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("cannot read tokenizer file {}", path.string());
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

json parse_json_file(const std::filesystem::path& path) {
  std::string text = read_file(path);
  try {
    return json::parse(text);
  } catch (const json::exception& e) {  // parse_error, or out_of_range for a number overflow
    fail("tokenizer file {} is not valid JSON: {}", path.string(), e.what());
  }
}

// A special token field of tokenizer_config.json: "text" or {"content": "text", ...}.
std::string config_token(const json& config, const char* name) {
  auto it = config.find(name);
  if (it == config.end() || it->is_null()) return {};
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object() && it->contains("content") && (*it)["content"].is_string())
    return (*it)["content"].get<std::string>();
  return {};
}

class HfTokenizer : public Tokenizer {
 public:
  explicit HfTokenizer(const std::filesystem::path& file) { load(file); }

  std::vector<int32_t> encode(std::string_view text, bool add_special_tokens) const override;
  std::string decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const override;

  int64_t vocab_size() const override { return vocab_size_; }
  std::optional<int32_t> token_to_id(std::string_view token) const override {
    auto it = added_by_content_.find(token);
    if (it != added_by_content_.end()) return added_[it->second].id;
    return model_->token_to_id(token);
  }
  std::string id_to_token(int32_t id) const override {
    auto it = added_by_id_.find(id);
    if (it != added_by_id_.end()) return added_[it->second].content;
    const std::string* t = model_->id_to_token(id);
    return t ? *t : std::string();
  }
  std::optional<int32_t> bos_id() const override { return id_of(bos_token_); }
  std::optional<int32_t> eos_id() const override { return id_of(eos_token_); }
  std::optional<int32_t> pad_id() const override { return id_of(pad_token_); }
  std::optional<int32_t> unk_id() const override { return id_of(unk_token_); }
  std::string bos_token() const override { return bos_token_; }
  std::string eos_token() const override { return eos_token_; }
  bool adds_bos() const override { return !post_.prefix.empty(); }
  bool adds_eos() const override { return !post_.suffix.empty(); }
  const std::string& chat_template() const override { return chat_template_; }

 private:
  void load(const std::filesystem::path& file);
  void load_config(const std::filesystem::path& file);
  std::optional<int32_t> id_of(const std::string& token) const {
    if (token.empty()) return std::nullopt;
    return token_to_id(token);
  }
  // As AddedVocabulary::find_matches: splits text on the matcher's added tokens, honouring
  // single_word, lstrip and rstrip.
  void split_added(std::string_view text, const TokenMatcher& matcher,
                   std::vector<Span>& out) const;
  void encode_text(std::string_view text, bool at_origin, std::vector<int32_t>& ids) const;

  std::unique_ptr<tok::BpeModel> model_;
  std::unique_ptr<tok::Normalizer> normalizer_;
  std::unique_ptr<tok::PreTokenizer> pre_tokenizer_;
  std::unique_ptr<tok::Decoder> decoder_;
  tok::PostProcessor post_;
  std::vector<AddedToken> added_;
  tok::StringMap<size_t> added_by_content_;
  std::unordered_map<int32_t, size_t> added_by_id_;
  TokenMatcher raw_matcher_;         // added tokens with normalized == false
  TokenMatcher normalized_matcher_;  // normalized == true, matched on normalized text
  int64_t vocab_size_ = 0;
  std::string bos_token_, eos_token_, pad_token_, unk_token_;
  std::string chat_template_;
};

void HfTokenizer::load(const std::filesystem::path& file) {
  json j = parse_json_file(file);
  Origin root{file.string(), "$"};
  if (!j.is_object()) tok::fail_at(root, "expected a JSON object");
  if (!j.contains("model") || !j["model"].is_object())
    tok::fail_at(root, "missing the \"model\" object");
  const json& model = j["model"];
  std::string type = model.contains("type") && model["type"].is_string()
                         ? model["type"].get<std::string>()
                         : (model.contains("merges") ? "BPE" : "");
  if (type != "BPE")
    tok::fail_at(root.at("model"),
                 fmt::format("unsupported model type \"{}\" (supported: BPE)", type));
  model_ = std::make_unique<tok::BpeModel>(model, root.at("model"));
  normalizer_ = tok::make_normalizer(j.value("normalizer", json()), root.at("normalizer"));
  pre_tokenizer_ =
      tok::make_pre_tokenizer(j.value("pre_tokenizer", json()), root.at("pre_tokenizer"));
  decoder_ = tok::make_decoder(j.value("decoder", json()), root.at("decoder"));
  post_ = tok::make_post_processor(j.value("post_processor", json()), root.at("post_processor"));

  const json added = j.value("added_tokens", json::array());
  if (!added.is_array()) tok::fail_at(root.at("added_tokens"), "expected an array");
  vocab_size_ = static_cast<int64_t>(model_->vocab_size());
  for (size_t k = 0; k < added.size(); ++k) {
    const json& a = added[k];
    Origin at = root.at(fmt::format("added_tokens[{}]", k));
    if (!a.is_object() || !a.contains("content") || !a["content"].is_string() ||
        !a.contains("id") || !a["id"].is_number_integer())
      tok::fail_at(at, "expected {\"id\": int, \"content\": string, ...}");
    AddedToken t;
    t.content = a["content"].get<std::string>();
    if (a["id"].get<int64_t>() < 0 || a["id"].get<int64_t>() >= tok::kMaxTokenId)
      tok::fail_at(at.at("id"), fmt::format("id {} is outside [0, {})", a["id"].dump(),
                                            tok::kMaxTokenId));
    t.id = a["id"].get<int32_t>();
    t.special = a.value("special", false);
    t.lstrip = a.value("lstrip", false);
    t.rstrip = a.value("rstrip", false);
    t.single_word = a.value("single_word", false);
    t.normalized = a.value("normalized", !t.special);
    if (!model_->token_to_id(t.content) && !added_by_content_.count(t.content)) ++vocab_size_;
    added_by_content_[t.content] = added_.size();
    added_by_id_[t.id] = added_.size();
    added_.push_back(std::move(t));
  }
  // Every id encode() can emit is below vocab_size(): added tokens may sit past the model's
  // vocabulary, and post-processor ids must name a token.
  for (const AddedToken& t : added_) vocab_size_ = std::max<int64_t>(vocab_size_, t.id + 1);
  for (const std::vector<int32_t>* ids : {&post_.prefix, &post_.suffix})
    for (int32_t id : *ids)
      if (id < 0 || id >= vocab_size_)
        tok::fail_at(root.at("post_processor"),
                     fmt::format("special token id {} is outside the vocabulary [0, {})", id,
                                 vocab_size_));
  for (size_t k = 0; k < added_.size(); ++k) {
    const AddedToken& t = added_[k];
    if (t.normalized) {
      std::string pattern = t.content;
      if (normalizer_) normalizer_->normalize(pattern);
      normalized_matcher_.add(pattern, static_cast<int32_t>(k));
    } else {
      raw_matcher_.add(t.content, static_cast<int32_t>(k));
    }
  }
  load_config(file);
}

void HfTokenizer::load_config(const std::filesystem::path& file) {
  auto dir = file.parent_path();
  auto config_path = dir / "tokenizer_config.json";
  json config = json::object();
  if (std::filesystem::exists(config_path)) {
    config = parse_json_file(config_path);
    if (!config.is_object())
      fail("tokenizer file {}: expected a JSON object", config_path.string());
  }
  bos_token_ = config_token(config, "bos_token");
  eos_token_ = config_token(config, "eos_token");
  pad_token_ = config_token(config, "pad_token");
  unk_token_ = config_token(config, "unk_token");
  // Without the config, BOS/EOS come from the post-processor template.
  if (bos_token_.empty() && !post_.prefix.empty()) bos_token_ = id_to_token(post_.prefix.front());
  if (eos_token_.empty() && !post_.suffix.empty()) eos_token_ = id_to_token(post_.suffix.back());
  // add_bos_token / add_eos_token, when present, decide (as LlamaTokenizerFast rebuilds its
  // template from them).
  auto flag = [&](const char* name) -> std::optional<bool> {
    auto it = config.find(name);
    if (it == config.end() || !it->is_boolean()) return std::nullopt;
    return it->get<bool>();
  };
  if (auto add_bos = flag("add_bos_token")) {
    auto id = bos_id();
    if (*add_bos && post_.prefix.empty() && id) post_.prefix = {*id};
    if (!*add_bos) post_.prefix.clear();
  }
  if (auto add_eos = flag("add_eos_token")) {
    auto id = eos_id();
    if (*add_eos && post_.suffix.empty() && id) post_.suffix = {*id};
    if (!*add_eos) post_.suffix.clear();
  }
  auto tpl = config.find("chat_template");
  if (tpl != config.end() && tpl->is_string()) {
    chat_template_ = tpl->get<std::string>();
  } else if (tpl != config.end() && tpl->is_array()) {
    for (const auto& t : *tpl) {
      if (t.is_object() && t.value("name", std::string()) == "default" && t.contains("template") &&
          t["template"].is_string())
        chat_template_ = t["template"].get<std::string>();
    }
  } else if (std::filesystem::exists(dir / "chat_template.jinja")) {
    chat_template_ = read_file(dir / "chat_template.jinja");
  }
}

void HfTokenizer::split_added(std::string_view text, const TokenMatcher& matcher,
                              std::vector<Span>& out) const {
  thread_local std::vector<TokenMatcher::Match> matches;
  matches.clear();
  matcher.find(text, matches);
  size_t start_offset = 0;
  for (const auto& m : matches) {
    size_t start = m.start, stop = m.end;
    const AddedToken& t = added_[m.token_index];
    if (t.single_word) {
      bool start_space = start == 0 || !ends_with_word(text.substr(0, start));
      bool stop_space = stop == text.size() || !starts_with_word(text.substr(stop));
      if (!start_space || !stop_space) continue;
    }
    if (t.lstrip) {
      size_t s = start;  // leftmost start of the whitespace run ending at start
      while (s > 0) {
        size_t p = s - 1;
        while (p > 0 && (static_cast<unsigned char>(text[p]) & 0xC0) == 0x80) --p;
        size_t i = p;
        if (!tok::is_whitespace(tok::utf8_next(text, i))) break;
        s = p;
      }
      start = std::max(s, start_offset);
    }
    if (t.rstrip) {
      while (stop < text.size()) {
        size_t i = stop;
        if (!tok::is_whitespace(tok::utf8_next(text, i))) break;
        stop = i;
      }
    }
    if (start_offset < start) out.push_back({start_offset, start, -1});
    out.push_back({start, stop, m.token_index});
    start_offset = stop;
  }
  if (start_offset < text.size()) out.push_back({start_offset, text.size(), -1});
}

void HfTokenizer::encode_text(std::string_view text, bool at_origin,
                              std::vector<int32_t>& ids) const {
  std::string normalized(text);
  if (normalizer_) normalizer_->normalize(normalized);
  std::vector<Span> spans;
  split_added(normalized, normalized_matcher_, spans);
  std::vector<tok::Piece> pieces;
  for (const Span& s : spans) {
    if (s.token >= 0) {
      ids.push_back(added_[s.token].id);
      continue;
    }
    if (s.end == s.start) continue;
    pieces.clear();
    pieces.push_back({normalized.substr(s.start, s.end - s.start), at_origin && s.start == 0});
    if (pre_tokenizer_) pre_tokenizer_->pre_tokenize(pieces);
    for (const auto& p : pieces) model_->tokenize(p.text, ids);
  }
}

std::vector<int32_t> HfTokenizer::encode(std::string_view text, bool add_special_tokens) const {
  std::string repaired;
  if (!tok::utf8_valid(text)) {  // Python str cannot hold invalid UTF-8; repair like decode does
    repaired = tok::utf8_lossy(text);
    text = repaired;
  }
  std::vector<int32_t> ids;
  if (add_special_tokens) ids = post_.prefix;
  ids.reserve(text.size() / 3 + 8);
  std::vector<Span> spans;
  split_added(text, raw_matcher_, spans);
  for (const Span& s : spans) {
    if (s.token >= 0) {
      ids.push_back(added_[s.token].id);
    } else if (s.end > s.start) {
      encode_text(text.substr(s.start, s.end - s.start), s.start == 0, ids);
    }
  }
  if (add_special_tokens) ids.insert(ids.end(), post_.suffix.begin(), post_.suffix.end());
  return ids;
}

std::string HfTokenizer::decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const {
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (int32_t id : ids) {
    auto it = added_by_id_.find(id);
    if (it != added_by_id_.end()) {
      const AddedToken& t = added_[it->second];
      if (!(skip_special_tokens && t.special)) tokens.push_back(t.content);
      continue;
    }
    if (const std::string* t = model_->id_to_token(id)) tokens.push_back(*t);  // unknown ids: skip
  }
  std::string text;
  if (decoder_) {
    decoder_->decode_chain(tokens);
    for (const auto& t : tokens) text += t;
  } else {
    for (size_t k = 0; k < tokens.size(); ++k) text += (k ? " " : "") + tokens[k];
  }
  // tokenizer_config.json's clean_up_tokenization_spaces is not applied: transformers ignores it
  // for BPE tokenizers (it would strip spaces before punctuation), and the recorded vectors
  // keep those spaces.
  return text;
}

}  // namespace

std::unique_ptr<Tokenizer> Tokenizer::load(const std::filesystem::path& path) {
  std::filesystem::path file = path;
  if (std::filesystem::is_directory(path)) file = path / "tokenizer.json";
  if (!std::filesystem::exists(file))
    fail("tokenizer file {} does not exist (give a tokenizer.json or a folder holding one)",
         file.string());
  try {
    return std::make_unique<HfTokenizer>(file);
  } catch (const json::exception& e) {
    // Components check their fields; this catches a mistyped one that a check missed (e.g.
    // "special": 1 read with value(..., false)), so a bad file is a message, never a crash.
    fail("tokenizer file {}: a field has an unexpected JSON type: {}", file.string(), e.what());
  }
}

}  // namespace lt
