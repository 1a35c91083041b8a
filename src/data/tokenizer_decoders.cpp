// tokenizer.json decoders (ByteLevel, Metaspace, ByteFallback, Fuse, Strip, Replace, BPEDecoder,
// Sequence) and post-processors (TemplateProcessing, ByteLevel, Bert, Roberta, Sequence).
#include "core/error.h"
#include "data/tokenizer_parts.h"

namespace lt::tok {
namespace {

// Concatenates the tokens, maps each char back to its byte and repairs invalid UTF-8.
class ByteLevelDecoder : public Decoder {
 public:
  void decode_chain(std::vector<std::string>& tokens) const override {
    std::string bytes;
    for (const auto& t : tokens) {
      size_t mark = bytes.size();
      bool ok = true;
      for (size_t i = 0; i < t.size();) {
        int b = unicode_to_byte(utf8_next(t, i));
        if (b < 0) {
          ok = false;
          break;
        }
        bytes += static_cast<char>(b);
      }
      if (!ok) {  // a token with chars outside the table (an added token) goes in as it is
        bytes.resize(mark);
        bytes += t;
      }
    }
    tokens.assign(1, utf8_lossy(bytes));
  }
};

class MetaspaceDecoder : public Decoder {
 public:
  MetaspaceDecoder(std::string replacement, bool strip_first)
      : replacement_(std::move(replacement)), strip_first_(strip_first) {}
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (size_t k = 0; k < tokens.size(); ++k) {
      std::string out;
      const std::string& t = tokens[k];
      for (size_t i = 0; i < t.size();) {
        if (t.compare(i, replacement_.size(), replacement_) == 0) {
          // HF drops every replacement char of the first token when a prefix was prepended.
          if (!(k == 0 && strip_first_)) out += ' ';
          i += replacement_.size();
        } else {
          out += t[i++];
        }
      }
      tokens[k] = std::move(out);
    }
  }

 private:
  std::string replacement_;
  bool strip_first_;
};

class ByteFallbackDecoder : public Decoder {
 public:
  void decode_chain(std::vector<std::string>& tokens) const override {
    std::vector<std::string> out;
    std::string pending;
    auto flush = [&]() {
      if (pending.empty()) return;
      if (utf8_valid(pending)) {
        out.push_back(pending);
      } else {
        for (size_t k = 0; k < pending.size(); ++k) out.emplace_back("\xEF\xBF\xBD");
      }
      pending.clear();
    };
    for (auto& t : tokens) {
      int byte = -1;
      if (t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>') {
        auto hex = [](char c) {
          return c >= '0' && c <= '9'   ? c - '0'
                 : c >= 'A' && c <= 'F' ? c - 'A' + 10
                 : c >= 'a' && c <= 'f' ? c - 'a' + 10
                                        : -1;
        };
        int hi = hex(t[3]), lo = hex(t[4]);
        if (hi >= 0 && lo >= 0) byte = hi * 16 + lo;
      }
      if (byte >= 0) {
        pending += static_cast<char>(byte);
      } else {
        flush();
        out.push_back(std::move(t));
      }
    }
    flush();
    tokens = std::move(out);
  }
};

class FuseDecoder : public Decoder {
 public:
  void decode_chain(std::vector<std::string>& tokens) const override {
    std::string all;
    for (const auto& t : tokens) all += t;
    tokens.assign(1, std::move(all));
  }
};

class StripDecoder : public Decoder {
 public:
  StripDecoder(char32_t content, size_t start, size_t stop)
      : content_(content), start_(start), stop_(stop) {}
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (auto& t : tokens) {
      std::vector<std::pair<size_t, char32_t>> chars;  // (byte offset, char)
      for (size_t i = 0; i < t.size();) {
        size_t s = i;
        chars.emplace_back(s, utf8_next(t, i));
      }
      size_t start_cut = 0, stop_cut = 0;
      while (start_cut < start_ && start_cut < chars.size() && chars[start_cut].second == content_)
        ++start_cut;
      while (stop_cut < stop_ && stop_cut < chars.size() &&
             chars[chars.size() - 1 - stop_cut].second == content_)
        ++stop_cut;
      // HF keeps (byte_len - start_cut - stop_cut) chars after the start cut.
      size_t keep = t.size() > start_cut + stop_cut ? t.size() - start_cut - stop_cut : 0;
      size_t first = start_cut, last = std::min(chars.size(), start_cut + keep);
      size_t b0 = first < chars.size() ? chars[first].first : t.size();
      size_t b1 = last < chars.size() ? chars[last].first : t.size();
      t = b1 > b0 ? t.substr(b0, b1 - b0) : std::string();
    }
  }

 private:
  char32_t content_;
  size_t start_, stop_;
};

class ReplaceDecoder : public Decoder {
 public:
  ReplaceDecoder(Pattern pattern, std::string content)
      : pattern_(std::move(pattern)), content_(std::move(content)) {}
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (auto& t : tokens) t = replace_all(t, pattern_, content_);
  }

 private:
  Pattern pattern_;
  std::string content_;
};

// BPEDecoder: the end-of-word suffix becomes a space (none after the last token).
class BpeSuffixDecoder : public Decoder {
 public:
  explicit BpeSuffixDecoder(std::string suffix) : suffix_(std::move(suffix)) {}
  void decode_chain(std::vector<std::string>& tokens) const override {
    Pattern p;
    p.literal = suffix_;
    for (size_t k = 0; k < tokens.size(); ++k)
      tokens[k] = replace_all(tokens[k], p, k + 1 == tokens.size() ? "" : " ");
  }

 private:
  std::string suffix_;
};

class SequenceDecoder : public Decoder {
 public:
  explicit SequenceDecoder(std::vector<std::unique_ptr<Decoder>> parts)
      : parts_(std::move(parts)) {}
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (const auto& p : parts_) p->decode_chain(tokens);
  }

 private:
  std::vector<std::unique_ptr<Decoder>> parts_;
};

}  // namespace

std::unique_ptr<Decoder> make_decoder(const json& j, const Origin& where) {
  if (j.is_null()) return nullptr;
  std::string type = component_type(j, where);
  if (type == "Sequence") {
    auto it = j.find("decoders");
    if (it == j.end() || !it->is_array()) fail_at(where, "Sequence needs an array \"decoders\"");
    std::vector<std::unique_ptr<Decoder>> parts;
    for (size_t k = 0; k < it->size(); ++k) {
      auto p = make_decoder((*it)[k], where.at(fmt::format("decoders[{}]", k)));
      if (p) parts.push_back(std::move(p));
    }
    return std::make_unique<SequenceDecoder>(std::move(parts));
  }
  if (type == "ByteLevel") return std::make_unique<ByteLevelDecoder>();
  if (type == "Metaspace") {
    bool strip_first = true;
    if (j.contains("prepend_scheme") && j["prepend_scheme"].is_string()) {
      strip_first = j["prepend_scheme"].get<std::string>() != "never";
    } else if (j.contains("add_prefix_space")) {
      strip_first = j.value("add_prefix_space", true);
    }
    return std::make_unique<MetaspaceDecoder>(j.value("replacement", std::string("\xE2\x96\x81")),
                                              strip_first);
  }
  if (type == "ByteFallback") return std::make_unique<ByteFallbackDecoder>();
  if (type == "Fuse") return std::make_unique<FuseDecoder>();
  if (type == "Strip") {
    std::string content = j.value("content", std::string(" "));
    size_t i = 0;
    char32_t c = content.empty() ? U' ' : utf8_next(content, i);
    // Counts must be integers: value<size_t>() of 1e99 would be an undefined float conversion
    // (found by fuzzing under UBSan).
    auto count = [&](const char* key) -> size_t {
      auto it = j.find(key);
      if (it == j.end() || it->is_null()) return 0;
      if (!it->is_number_integer() || it->get<int64_t>() < 0)
        fail_at(where.at(key), fmt::format("expected a non-negative integer, found {}", it->dump()));
      return static_cast<size_t>(it->get<int64_t>());
    };
    return std::make_unique<StripDecoder>(c, count("start"), count("stop"));
  }
  if (type == "Replace") {
    if (!j.contains("pattern") || !j.contains("content") || !j["content"].is_string())
      fail_at(where, "Replace needs \"pattern\" and a string \"content\"");
    return std::make_unique<ReplaceDecoder>(Pattern::parse(j["pattern"], where.at("pattern")),
                                            j["content"].get<std::string>());
  }
  if (type == "BPEDecoder") {
    return std::make_unique<BpeSuffixDecoder>(j.value("suffix", std::string("</w>")));
  }
  fail_at(where, fmt::format("unsupported decoder type \"{}\" (supported: ByteLevel, Metaspace, "
                             "ByteFallback, Fuse, Strip, Replace, BPEDecoder, Sequence)",
                             type));
}

namespace {
// [token, id] as Bert/Roberta store their special tokens.
int32_t pair_id(const json& j, const Origin& where) {
  if (!j.is_array() || j.size() != 2 || !j[1].is_number_integer())
    fail_at(where, "expected [\"token\", id]");
  return j[1].get<int32_t>();
}
}  // namespace

PostProcessor make_post_processor(const json& j, const Origin& where) {
  PostProcessor pp;
  if (j.is_null()) return pp;
  std::string type = component_type(j, where);
  if (type == "ByteLevel") return pp;  // only adjusts offsets
  if (type == "Sequence") {
    auto it = j.find("processors");
    if (it == j.end() || !it->is_array()) fail_at(where, "Sequence needs an array \"processors\"");
    for (size_t k = 0; k < it->size(); ++k) {
      PostProcessor p = make_post_processor((*it)[k], where.at(fmt::format("processors[{}]", k)));
      // Each processor wraps the result of the previous one.
      pp.prefix.insert(pp.prefix.begin(), p.prefix.begin(), p.prefix.end());
      pp.suffix.insert(pp.suffix.end(), p.suffix.begin(), p.suffix.end());
    }
    return pp;
  }
  if (type == "BertProcessing" || type == "RobertaProcessing") {
    pp.prefix.push_back(pair_id(j.value("cls", json()), where.at("cls")));
    pp.suffix.push_back(pair_id(j.value("sep", json()), where.at("sep")));
    return pp;
  }
  if (type == "TemplateProcessing") {
    auto single = j.find("single");
    if (single == j.end() || !single->is_array())
      fail_at(where, "TemplateProcessing needs an array \"single\"");
    const json specials = j.value("special_tokens", json::object());
    bool seen_sequence = false;
    for (size_t k = 0; k < single->size(); ++k) {
      const json& item = (*single)[k];
      Origin at = where.at(fmt::format("single[{}]", k));
      if (item.contains("Sequence")) {
        seen_sequence = true;
        continue;
      }
      if (!item.contains("SpecialToken") || !item["SpecialToken"].contains("id"))
        fail_at(at, "expected {\"Sequence\": ...} or {\"SpecialToken\": {\"id\": ...}}");
      std::string name = item["SpecialToken"]["id"].get<std::string>();
      if (!specials.contains(name) || !specials[name].contains("ids") ||
          !specials[name]["ids"].is_array())
        fail_at(where.at("special_tokens"), fmt::format("no ids for special token '{}'", name));
      for (const auto& id : specials[name]["ids"]) {
        (seen_sequence ? pp.suffix : pp.prefix).push_back(id.get<int32_t>());
      }
    }
    return pp;
  }
  fail_at(where, fmt::format("unsupported post_processor type \"{}\" (supported: "
                             "TemplateProcessing, ByteLevel, BertProcessing, RobertaProcessing, "
                             "Sequence)",
                             type));
}

}  // namespace lt::tok
