// Text helpers of the tokenizer pipeline: UTF-8 decoding and lossy repair, Unicode properties
// (ICU), the PCRE2 regex wrapper and {"String"|"Regex"} patterns.
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <unicode/uchar.h>

#include "core/error.h"
#include "data/tokenizer_parts.h"

namespace lt::tok {

char32_t utf8_next(std::string_view s, size_t& i) {
  auto b = static_cast<unsigned char>(s[i]);
  size_t n = utf8_len(b);
  if (n == 1 || i + n > s.size()) {
    ++i;
    return b;
  }
  char32_t c = b & (0xFF >> (n + 1));
  for (size_t k = 1; k < n; ++k) c = (c << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
  i += n;
  return c;
}

void utf8_append(std::string& out, char32_t c) {
  if (c < 0x80) {
    out += static_cast<char>(c);
  } else if (c < 0x800) {
    out += static_cast<char>(0xC0 | (c >> 6));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    out += static_cast<char>(0xE0 | (c >> 12));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (c >> 18));
    out += static_cast<char>(0x80 | ((c >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  }
}

namespace {
// Length of the valid UTF-8 sequence at s[i], or 0 with *bad set to the length of the maximal
// invalid subpart (Unicode "substitution of maximal subparts", what Rust's lossy decoding does).
size_t utf8_valid_at(std::string_view s, size_t i, size_t* bad) {
  auto at = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  unsigned char b = at(i);
  if (b < 0x80) return 1;
  size_t n;
  unsigned char lo = 0x80, hi = 0xBF;
  if (b >= 0xC2 && b <= 0xDF) {
    n = 2;
  } else if (b >= 0xE0 && b <= 0xEF) {
    n = 3;
    if (b == 0xE0) lo = 0xA0;
    if (b == 0xED) hi = 0x9F;
  } else if (b >= 0xF0 && b <= 0xF4) {
    n = 4;
    if (b == 0xF0) lo = 0x90;
    if (b == 0xF4) hi = 0x8F;
  } else {
    *bad = 1;
    return 0;
  }
  for (size_t k = 1; k < n; ++k) {
    if (i + k >= s.size()) {
      *bad = k;
      return 0;
    }
    unsigned char c = at(i + k);
    unsigned char l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
    if (c < l || c > h) {
      *bad = k;
      return 0;
    }
  }
  return n;
}
}  // namespace

bool utf8_valid(std::string_view s) {
  size_t bad = 0;
  for (size_t i = 0; i < s.size();) {
    size_t n = utf8_valid_at(s, i, &bad);
    if (n == 0) return false;
    i += n;
  }
  return true;
}

std::string utf8_lossy(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    size_t bad = 0;
    size_t n = utf8_valid_at(s, i, &bad);
    if (n) {
      out.append(s.substr(i, n));
      i += n;
    } else {
      out += "\xEF\xBF\xBD";
      i += bad;
    }
  }
  return out;
}

bool is_whitespace(char32_t c) { return u_isUWhiteSpace(static_cast<UChar32>(c)); }

bool is_numeric(char32_t c) {
  int8_t t = u_charType(static_cast<UChar32>(c));
  return t == U_DECIMAL_DIGIT_NUMBER || t == U_LETTER_NUMBER || t == U_OTHER_NUMBER;
}

bool is_alphanumeric(char32_t c) {
  return u_hasBinaryProperty(static_cast<UChar32>(c), UCHAR_ALPHABETIC) || is_numeric(c);
}

void fail_at(const Origin& where, std::string_view what) {
  fail("tokenizer file {}: {}: {}", where.file, where.path, what);
}

std::string component_type(const json& j, const Origin& where) {
  if (!j.is_object()) fail_at(where, "expected an object");
  auto it = j.find("type");
  if (it == j.end() || !it->is_string()) fail_at(where, "missing string field \"type\"");
  return it->get<std::string>();
}

namespace {
pcre2_match_data* thread_match_data() {
  // One ovector pair is enough: only the whole match is read (rc == 0 still fills pair 0).
  thread_local std::unique_ptr<pcre2_match_data, void (*)(pcre2_match_data*)> md(
      pcre2_match_data_create(1, nullptr), pcre2_match_data_free);
  return md.get();
}
}  // namespace

Regex::Regex(std::string_view pattern, const Origin& where) {
  // PCRE2 with UCP gives \s, \p{L}, \p{N} the Unicode meaning Oniguruma gives them (its \s
  // includes U+0085 like Oniguruma's; the corpora hold such cases).
  std::string p(pattern);
  int err = 0;
  PCRE2_SIZE err_off = 0;
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(p.data()), p.size(),
                                   PCRE2_UTF | PCRE2_UCP, &err, &err_off, nullptr);
  if (!code) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(err, msg, sizeof msg);
    fail_at(where, fmt::format("regex '{}' does not compile at offset {}: {}", pattern, err_off,
                               reinterpret_cast<const char*>(msg)));
  }
  pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // falls back to the interpreter if JIT is absent
  code_ =
      std::shared_ptr<void>(code, [](void* c) { pcre2_code_free(static_cast<pcre2_code*>(c)); });
}

void Regex::find_all(std::string_view text, std::vector<std::pair<size_t, size_t>>& out) const {
  auto* code = static_cast<pcre2_code*>(code_.get());
  pcre2_match_data* md = thread_match_data();
  size_t pos = 0;
  while (pos <= text.size()) {
    int rc = pcre2_match(code, reinterpret_cast<PCRE2_SPTR>(text.data()), text.size(), pos,
                         PCRE2_NO_UTF_CHECK, md, nullptr);
    if (rc < 0) break;  // no match (or a matching limit hit): the rest is unmatched text
    PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
    size_t s = ov[0], e = ov[1];
    if (e > s) {
      out.emplace_back(s, e);
      pos = e;
    } else {
      // Empty match: step one character forward.
      if (s >= text.size()) break;
      pos = s + utf8_len(static_cast<unsigned char>(text[s]));
    }
  }
}

Pattern Pattern::parse(const json& j, const Origin& where) {
  Pattern p;
  if (j.is_object() && j.contains("String") && j["String"].is_string()) {
    p.literal = j["String"].get<std::string>();
  } else if (j.is_object() && j.contains("Regex") && j["Regex"].is_string()) {
    p.regex = std::make_shared<Regex>(j["Regex"].get<std::string>(), where);
  } else if (j.is_string()) {
    p.literal = j.get<std::string>();
  } else {
    fail_at(where, "pattern must be {\"String\": ...} or {\"Regex\": ...}");
  }
  return p;
}

void Pattern::find_all(std::string_view text, std::vector<std::pair<size_t, size_t>>& out) const {
  if (regex) {
    regex->find_all(text, out);
    return;
  }
  if (literal.empty()) return;
  for (size_t pos = text.find(literal); pos != std::string_view::npos;
       pos = text.find(literal, pos + literal.size())) {
    out.emplace_back(pos, pos + literal.size());
  }
}

std::string replace_all(std::string_view text, const Pattern& pattern, std::string_view content) {
  std::vector<std::pair<size_t, size_t>> m;
  pattern.find_all(text, m);
  if (m.empty()) return std::string(text);
  std::string out;
  out.reserve(text.size() + m.size() * content.size());
  size_t prev = 0;
  for (auto [s, e] : m) {
    out.append(text.substr(prev, s - prev));
    out.append(content);
    prev = e;
  }
  out.append(text.substr(prev));
  return out;
}

}  // namespace lt::tok
