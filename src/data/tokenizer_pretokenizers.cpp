// tokenizer.json pre-tokenizers: ByteLevel (GPT-2 regex + byte-to-char map), Split (PCRE2
// regex or string, all split behaviours, invert), Metaspace, Digits, Whitespace,
// WhitespaceSplit, CharDelimiterSplit and Sequence.
#include <algorithm>
#include <array>

#include "core/error.h"
#include "data/tokenizer_parts.h"

namespace lt::tok {

// ---- GPT-2 byte <-> unicode table ----
namespace {
struct ByteTable {
  std::array<std::string, 256> to_char;
  std::array<int, 324> from_char;  // code points used are < 324
  ByteTable() {
    from_char.fill(-1);
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
      char32_t c = printable ? static_cast<char32_t>(b) : static_cast<char32_t>(256 + n++);
      utf8_append(to_char[b], c);
      from_char[c] = b;
    }
  }
};
const ByteTable& byte_table() {
  static const ByteTable table;
  return table;
}
}  // namespace

const std::string& byte_to_unicode(unsigned char b) { return byte_table().to_char[b]; }
int unicode_to_byte(char32_t c) { return c < 324 ? byte_table().from_char[c] : -1; }

namespace {

enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

SplitBehavior parse_behavior(const json& j, const Origin& where) {
  std::string b = j.is_string() ? j.get<std::string>() : "";
  if (b == "Removed") return SplitBehavior::kRemoved;
  if (b == "Isolated") return SplitBehavior::kIsolated;
  if (b == "MergedWithPrevious") return SplitBehavior::kMergedWithPrevious;
  if (b == "MergedWithNext") return SplitBehavior::kMergedWithNext;
  if (b == "Contiguous") return SplitBehavior::kContiguous;
  fail_at(where, fmt::format("unsupported split behavior '{}' (Removed, Isolated, "
                             "MergedWithPrevious, MergedWithNext, Contiguous)",
                             b));
}

struct Segment {
  size_t start, end;
  bool flag;  // is_match before the behaviour, remove after it
};

// As NormalizedString::split in HF tokenizers: `matches` are the delimiter ranges in p.text.
void split_piece(const Piece& p, const std::vector<std::pair<size_t, size_t>>& matches,
                 SplitBehavior behavior, bool invert, std::vector<Piece>& out) {
  const std::string& t = p.text;
  std::vector<Segment> segs;
  segs.reserve(matches.size() * 2 + 1);
  size_t prev = 0;
  for (auto [s, e] : matches) {
    if (prev != s) segs.push_back({prev, s, false});
    segs.push_back({s, e, true});
    prev = e;
  }
  if (prev != t.size()) segs.push_back({prev, t.size(), false});
  if (invert)
    for (auto& s : segs) s.flag = !s.flag;

  std::vector<Segment> res;
  res.reserve(segs.size());
  switch (behavior) {
    case SplitBehavior::kIsolated:
      for (auto s : segs) res.push_back({s.start, s.end, false});
      break;
    case SplitBehavior::kRemoved:
      res = segs;  // flag = remove
      break;
    case SplitBehavior::kContiguous: {
      bool previous = false;
      for (auto s : segs) {
        if (s.flag == previous && !res.empty()) {
          res.back().end = s.end;
        } else {
          res.push_back({s.start, s.end, false});
        }
        previous = s.flag;
      }
      break;
    }
    case SplitBehavior::kMergedWithPrevious: {
      bool previous = false;
      for (auto s : segs) {
        if (s.flag && !previous && !res.empty()) {
          res.back().end = s.end;
        } else {
          res.push_back({s.start, s.end, false});
        }
        previous = s.flag;
      }
      break;
    }
    case SplitBehavior::kMergedWithNext: {
      bool previous = false;
      for (auto it = segs.rbegin(); it != segs.rend(); ++it) {
        if (it->flag && !previous && !res.empty()) {
          res.back().start = it->start;
        } else {
          res.push_back({it->start, it->end, false});
        }
        previous = it->flag;
      }
      std::reverse(res.begin(), res.end());
      break;
    }
  }
  for (auto s : res) {
    if (s.flag || s.end == s.start) continue;
    out.push_back({t.substr(s.start, s.end - s.start), p.at_origin && s.start == 0});
  }
}

// Applies fn(piece, out) to each piece, replacing the list.
template <typename Fn>
void split_each(std::vector<Piece>& pieces, Fn&& fn) {
  std::vector<Piece> out;
  out.reserve(pieces.size() * 2);
  for (const auto& p : pieces) fn(p, out);
  pieces = std::move(out);
}

// Character-predicate matches: each matching character is its own match (HF `impl Pattern for
// Fn(char) -> bool`).
template <typename Pred>
std::vector<std::pair<size_t, size_t>> char_matches(std::string_view t, Pred&& pred) {
  std::vector<std::pair<size_t, size_t>> m;
  for (size_t i = 0; i < t.size();) {
    size_t s = i;
    if (pred(utf8_next(t, i))) m.emplace_back(s, i);
  }
  return m;
}

constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

class ByteLevelPreTokenizer : public PreTokenizer {
 public:
  ByteLevelPreTokenizer(bool add_prefix_space, bool use_regex, const Origin& where)
      : add_prefix_space_(add_prefix_space) {
    if (use_regex) regex_ = std::make_unique<Regex>(kGpt2Pattern, where);
  }
  void pre_tokenize(std::vector<Piece>& pieces) const override {
    std::vector<std::pair<size_t, size_t>> m;
    split_each(pieces, [&](const Piece& p, std::vector<Piece>& out) {
      Piece q = p;
      if (add_prefix_space_ && (q.text.empty() || q.text[0] != ' ')) q.text.insert(0, " ");
      size_t first = out.size();
      if (regex_) {
        m.clear();
        regex_->find_all(q.text, m);
        split_piece(q, m, SplitBehavior::kIsolated, false, out);
      } else if (!q.text.empty()) {
        out.push_back(std::move(q));
      }
      const auto& table = byte_table().to_char;
      for (size_t k = first; k < out.size(); ++k) {
        std::string mapped;
        mapped.reserve(out[k].text.size() * 2);
        for (char c : out[k].text) mapped += table[static_cast<unsigned char>(c)];
        out[k].text = std::move(mapped);
      }
    });
  }

 private:
  bool add_prefix_space_;
  std::unique_ptr<Regex> regex_;
};

class SplitPreTokenizer : public PreTokenizer {
 public:
  SplitPreTokenizer(Pattern pattern, SplitBehavior behavior, bool invert)
      : pattern_(std::move(pattern)), behavior_(behavior), invert_(invert) {}
  void pre_tokenize(std::vector<Piece>& pieces) const override {
    std::vector<std::pair<size_t, size_t>> m;
    split_each(pieces, [&](const Piece& p, std::vector<Piece>& out) {
      m.clear();
      pattern_.find_all(p.text, m);
      split_piece(p, m, behavior_, invert_, out);
    });
  }

 private:
  Pattern pattern_;
  SplitBehavior behavior_;
  bool invert_;
};

enum class PrependScheme { kAlways, kFirst, kNever };

class MetaspacePreTokenizer : public PreTokenizer {
 public:
  MetaspacePreTokenizer(std::string replacement, PrependScheme scheme, bool split)
      : replacement_(std::move(replacement)), scheme_(scheme), split_(split) {}
  void pre_tokenize(std::vector<Piece>& pieces) const override {
    Pattern space;
    space.literal = " ";
    Pattern rep;
    rep.literal = replacement_;
    std::vector<std::pair<size_t, size_t>> m;
    split_each(pieces, [&](const Piece& p, std::vector<Piece>& out) {
      Piece q{replace_all(p.text, space, replacement_), p.at_origin};
      bool starts = q.text.compare(0, replacement_.size(), replacement_) == 0;
      if (!starts && (scheme_ == PrependScheme::kAlways ||
                      (scheme_ == PrependScheme::kFirst && q.at_origin))) {
        q.text.insert(0, replacement_);
      }
      if (split_) {
        m.clear();
        rep.find_all(q.text, m);
        split_piece(q, m, SplitBehavior::kMergedWithNext, false, out);
      } else if (!q.text.empty()) {
        out.push_back(std::move(q));
      }
    });
  }

 private:
  std::string replacement_;
  PrependScheme scheme_;
  bool split_;
};

class DigitsPreTokenizer : public PreTokenizer {
 public:
  explicit DigitsPreTokenizer(bool individual) : individual_(individual) {}
  void pre_tokenize(std::vector<Piece>& pieces) const override {
    split_each(pieces, [&](const Piece& p, std::vector<Piece>& out) {
      auto m = char_matches(p.text, [](char32_t c) { return c >= '0' && c <= '9'; });
      split_piece(p, m, individual_ ? SplitBehavior::kIsolated : SplitBehavior::kContiguous, false,
                  out);
    });
  }

 private:
  bool individual_;
};

// WhitespaceSplit (delimiter = Unicode whitespace) and CharDelimiterSplit: delimiters removed.
class CharSplitPreTokenizer : public PreTokenizer {
 public:
  explicit CharSplitPreTokenizer(std::optional<char32_t> delimiter) : delimiter_(delimiter) {}
  void pre_tokenize(std::vector<Piece>& pieces) const override {
    split_each(pieces, [&](const Piece& p, std::vector<Piece>& out) {
      auto m = char_matches(
          p.text, [&](char32_t c) { return delimiter_ ? c == *delimiter_ : is_whitespace(c); });
      split_piece(p, m, SplitBehavior::kRemoved, false, out);
    });
  }

 private:
  std::optional<char32_t> delimiter_;
};

class SequencePreTokenizer : public PreTokenizer {
 public:
  explicit SequencePreTokenizer(std::vector<std::unique_ptr<PreTokenizer>> parts)
      : parts_(std::move(parts)) {}
  void pre_tokenize(std::vector<Piece>& pieces) const override {
    for (const auto& p : parts_) p->pre_tokenize(pieces);
  }

 private:
  std::vector<std::unique_ptr<PreTokenizer>> parts_;
};

}  // namespace

std::unique_ptr<PreTokenizer> make_pre_tokenizer(const json& j, const Origin& where) {
  if (j.is_null()) return nullptr;
  std::string type = component_type(j, where);
  if (type == "Sequence") {
    auto it = j.find("pretokenizers");
    if (it == j.end() || !it->is_array())
      fail_at(where, "Sequence needs an array \"pretokenizers\"");
    std::vector<std::unique_ptr<PreTokenizer>> parts;
    for (size_t k = 0; k < it->size(); ++k) {
      auto p = make_pre_tokenizer((*it)[k], where.at(fmt::format("pretokenizers[{}]", k)));
      if (p) parts.push_back(std::move(p));
    }
    return std::make_unique<SequencePreTokenizer>(std::move(parts));
  }
  if (type == "ByteLevel") {
    return std::make_unique<ByteLevelPreTokenizer>(j.value("add_prefix_space", true),
                                                   j.value("use_regex", true), where);
  }
  if (type == "Split") {
    if (!j.contains("pattern")) fail_at(where, "Split needs a \"pattern\"");
    Pattern pattern = Pattern::parse(j["pattern"], where.at("pattern"));
    SplitBehavior behavior =
        parse_behavior(j.value("behavior", json("Isolated")), where.at("behavior"));
    return std::make_unique<SplitPreTokenizer>(std::move(pattern), behavior,
                                               j.value("invert", false));
  }
  if (type == "Metaspace") {
    std::string replacement = j.value("replacement", std::string("\xE2\x96\x81"));
    PrependScheme scheme = PrependScheme::kAlways;
    if (j.contains("prepend_scheme") && j["prepend_scheme"].is_string()) {
      std::string s = j["prepend_scheme"].get<std::string>();
      if (s == "always") {
        scheme = PrependScheme::kAlways;
      } else if (s == "first") {
        scheme = PrependScheme::kFirst;
      } else if (s == "never") {
        scheme = PrependScheme::kNever;
      } else {
        fail_at(where.at("prepend_scheme"), fmt::format("'{}' is not always, first or never", s));
      }
    } else if (j.contains("add_prefix_space")) {
      scheme = j.value("add_prefix_space", true) ? PrependScheme::kAlways : PrependScheme::kNever;
    }
    return std::make_unique<MetaspacePreTokenizer>(replacement, scheme, j.value("split", true));
  }
  if (type == "Digits")
    return std::make_unique<DigitsPreTokenizer>(j.value("individual_digits", false));
  if (type == "WhitespaceSplit") return std::make_unique<CharSplitPreTokenizer>(std::nullopt);
  if (type == "CharDelimiterSplit") {
    std::string d = j.value("delimiter", std::string());
    size_t i = 0;
    if (d.empty()) fail_at(where, "CharDelimiterSplit needs a one-character \"delimiter\"");
    return std::make_unique<CharSplitPreTokenizer>(utf8_next(d, i));
  }
  if (type == "Whitespace") {
    // HF: splits on \w+|[^\w\s]+ keeping only the matches (Oniguruma \w: letters, marks,
    // decimal digits, connector punctuation).
    Pattern p;
    p.regex =
        std::make_shared<Regex>(R"([\p{L}\p{M}\p{Nd}\p{Pc}]+|[^\p{L}\p{M}\p{Nd}\p{Pc}\s]+)", where);
    return std::make_unique<SplitPreTokenizer>(std::move(p), SplitBehavior::kRemoved, true);
  }
  fail_at(where, fmt::format("unsupported pre_tokenizer type \"{}\" (supported: ByteLevel, Split, "
                             "Metaspace, Digits, Whitespace, WhitespaceSplit, CharDelimiterSplit, "
                             "Sequence)",
                             type));
}

}  // namespace lt::tok
