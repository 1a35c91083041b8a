// tokenizer.json normalizers: Sequence, Prepend, Replace, NFC/NFD/NFKC/NFKD (ICU), Lowercase,
// Strip, StripAccents. Anything else is a UserError naming the file and the type.
#include <unicode/locid.h>
#include <unicode/normalizer2.h>
#include <unicode/uchar.h>
#include <unicode/unistr.h>

#include "core/error.h"
#include "data/tokenizer_parts.h"

namespace lt::tok {
namespace {

class SequenceNormalizer : public Normalizer {
 public:
  explicit SequenceNormalizer(std::vector<std::unique_ptr<Normalizer>> parts)
      : parts_(std::move(parts)) {}
  void normalize(std::string& text) const override {
    for (const auto& p : parts_) p->normalize(text);
  }

 private:
  std::vector<std::unique_ptr<Normalizer>> parts_;
};

class PrependNormalizer : public Normalizer {
 public:
  explicit PrependNormalizer(std::string prepend) : prepend_(std::move(prepend)) {}
  void normalize(std::string& text) const override {
    if (!text.empty()) text.insert(0, prepend_);  // HF prepends only to non-empty text
  }

 private:
  std::string prepend_;
};

class ReplaceNormalizer : public Normalizer {
 public:
  ReplaceNormalizer(Pattern pattern, std::string content)
      : pattern_(std::move(pattern)), content_(std::move(content)) {}
  void normalize(std::string& text) const override { text = replace_all(text, pattern_, content_); }

 private:
  Pattern pattern_;
  std::string content_;
};

enum class UnicodeForm { kNfc, kNfd, kNfkc, kNfkd };

class UnicodeNormalizer : public Normalizer {
 public:
  UnicodeNormalizer(UnicodeForm form, const Origin& where) {
    UErrorCode err = U_ZERO_ERROR;
    switch (form) {
      case UnicodeForm::kNfc:
        norm_ = icu::Normalizer2::getNFCInstance(err);
        break;
      case UnicodeForm::kNfd:
        norm_ = icu::Normalizer2::getNFDInstance(err);
        break;
      case UnicodeForm::kNfkc:
        norm_ = icu::Normalizer2::getNFKCInstance(err);
        break;
      case UnicodeForm::kNfkd:
        norm_ = icu::Normalizer2::getNFKDInstance(err);
        break;
    }
    if (U_FAILURE(err) || !norm_) fail_at(where, "ICU normalizer is not available");
  }
  void normalize(std::string& text) const override {
    UErrorCode err = U_ZERO_ERROR;
    icu::UnicodeString u = icu::UnicodeString::fromUTF8(text);
    if (norm_->isNormalized(u, err) && U_SUCCESS(err)) return;
    err = U_ZERO_ERROR;
    icu::UnicodeString n = norm_->normalize(u, err);
    if (U_FAILURE(err)) return;  // leave the text as it is rather than lose it
    text.clear();
    n.toUTF8String(text);
  }

 private:
  const icu::Normalizer2* norm_ = nullptr;
};

class LowercaseNormalizer : public Normalizer {
 public:
  void normalize(std::string& text) const override {
    bool ascii = true;
    for (char c : text) ascii &= static_cast<unsigned char>(c) < 0x80;
    if (ascii) {
      for (char& c : text)
        if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
      return;
    }
    // Full Unicode lowercase with the root locale (as Rust's str::to_lowercase).
    icu::UnicodeString u = icu::UnicodeString::fromUTF8(text);
    u.toLower(icu::Locale::getRoot());
    text.clear();
    u.toUTF8String(text);
  }
};

class StripNormalizer : public Normalizer {
 public:
  StripNormalizer(bool left, bool right) : left_(left), right_(right) {}
  void normalize(std::string& text) const override {
    size_t begin = 0, end = text.size();
    if (left_) {
      while (begin < end) {
        size_t i = begin;
        if (!is_whitespace(utf8_next(text, i))) break;
        begin = i;
      }
    }
    if (right_) {
      while (end > begin) {
        size_t s = end - 1;
        while (s > begin && (static_cast<unsigned char>(text[s]) & 0xC0) == 0x80) --s;
        size_t i = s;
        if (!is_whitespace(utf8_next(text, i))) break;
        end = s;
      }
    }
    text = text.substr(begin, end - begin);
  }

 private:
  bool left_, right_;
};

// Removes combining marks (general category Mn), as HF StripAccents.
class StripAccentsNormalizer : public Normalizer {
 public:
  void normalize(std::string& text) const override {
    std::string out;
    out.reserve(text.size());
    for (size_t i = 0; i < text.size();) {
      size_t s = i;
      char32_t c = utf8_next(text, i);
      if (u_charType(static_cast<UChar32>(c)) != U_NON_SPACING_MARK) out.append(text, s, i - s);
    }
    text = std::move(out);
  }
};

}  // namespace

std::unique_ptr<Normalizer> make_normalizer(const json& j, const Origin& where) {
  if (j.is_null()) return nullptr;
  std::string type = component_type(j, where);
  auto str_field = [&](const char* name) {
    auto it = j.find(name);
    if (it == j.end() || !it->is_string())
      fail_at(where, fmt::format("{} normalizer needs a string field \"{}\"", type, name));
    return it->get<std::string>();
  };
  if (type == "Sequence") {
    auto it = j.find("normalizers");
    if (it == j.end() || !it->is_array()) fail_at(where, "Sequence needs an array \"normalizers\"");
    std::vector<std::unique_ptr<Normalizer>> parts;
    for (size_t k = 0; k < it->size(); ++k) {
      auto p = make_normalizer((*it)[k], where.at(fmt::format("normalizers[{}]", k)));
      if (p) parts.push_back(std::move(p));
    }
    return std::make_unique<SequenceNormalizer>(std::move(parts));
  }
  if (type == "Prepend") return std::make_unique<PrependNormalizer>(str_field("prepend"));
  if (type == "Replace") {
    if (!j.contains("pattern")) fail_at(where, "Replace needs a \"pattern\"");
    return std::make_unique<ReplaceNormalizer>(Pattern::parse(j["pattern"], where.at("pattern")),
                                               str_field("content"));
  }
  if (type == "NFC") return std::make_unique<UnicodeNormalizer>(UnicodeForm::kNfc, where);
  if (type == "NFD") return std::make_unique<UnicodeNormalizer>(UnicodeForm::kNfd, where);
  if (type == "NFKC") return std::make_unique<UnicodeNormalizer>(UnicodeForm::kNfkc, where);
  if (type == "NFKD") return std::make_unique<UnicodeNormalizer>(UnicodeForm::kNfkd, where);
  if (type == "Lowercase") return std::make_unique<LowercaseNormalizer>();
  if (type == "Strip") {
    return std::make_unique<StripNormalizer>(j.value("strip_left", true),
                                             j.value("strip_right", true));
  }
  if (type == "StripAccents") return std::make_unique<StripAccentsNormalizer>();
  fail_at(where, fmt::format("unsupported normalizer type \"{}\" (supported: Sequence, Prepend, "
                             "Replace, NFC, NFD, NFKC, NFKD, Lowercase, Strip, StripAccents)",
                             type));
}

}  // namespace lt::tok
