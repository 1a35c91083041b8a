// Dataset loading: json/jsonl/txt reading, format detection, Alpaca / completion / chat /
// text / pre-tokenized rows turned into input_ids and labels, truncation and packing.
#include "data/dataset.h"

#include <fmt/format.h>

#include <algorithm>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>

#include "core/error.h"
#include "data/chat_template.h"
#include "data/jinja.h"
#include "ops/common.h"

namespace lt {
namespace {

using Json = nlohmann::ordered_json;

// tatsu-lab/stanford_alpaca train.py PROMPT_DICT, verbatim.
constexpr const char* kAlpacaPromptInput =
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:";
constexpr const char* kAlpacaPromptNoInput =
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:";

constexpr size_t kMaxSkipReasons = 10;

// Where a row came from, for error messages: "FILE:LINE: row N" (jsonl) or "FILE: row N".
struct RowRef {
  const std::string* file;
  int64_t row;   // 1-based
  int64_t line;  // 1-based; 0 = unknown (rows of a .json array)
  std::string str() const {
    return line > 0 ? fmt::format("{}:{}: row {}", *file, line, row)
                    : fmt::format("{}: row {}", *file, row);
  }
};

struct RawRow {
  Json value;
  RowRef ref;
};

// Byte offset of the first invalid UTF-8 sequence, or nullopt (RFC 3629: no overlongs, no
// surrogates, nothing above U+10FFFF).
std::optional<size_t> utf8_error(const std::string& s) {
  size_t i = 0;
  const size_t n = s.size();
  while (i < n) {
    unsigned char c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    int len;
    uint32_t cp;
    if ((c >> 5) == 0x6) {
      len = 2;
      cp = c & 0x1f;
    } else if ((c >> 4) == 0xe) {
      len = 3;
      cp = c & 0x0f;
    } else if ((c >> 3) == 0x1e) {
      len = 4;
      cp = c & 0x07;
    } else {
      return i;
    }
    if (i + len > n) return i;
    for (int k = 1; k < len; ++k) {
      unsigned char d = s[i + k];
      if ((d >> 6) != 0x2) return i;
      cp = (cp << 6) | (d & 0x3f);
    }
    static constexpr uint32_t kMin[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < kMin[len] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return i;
    i += static_cast<size_t>(len);
  }
  return std::nullopt;
}

std::string read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("{}: cannot open the dataset file", path.string());
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// nlohmann's message without its "[json.exception.KIND.ID] " prefix.
std::string json_message(const nlohmann::json::exception& e) {
  std::string msg = e.what();
  if (msg.rfind("[json.exception.", 0) == 0) {
    const size_t close = msg.find("] ");
    if (close != std::string::npos) msg = msg.substr(close + 2);
  }
  return msg;
}

// nlohmann's parse_error gives the 1-based byte of the last character read; turn it into
// "FILE:LINE:COLUMN: message" counted in `text` (which starts at line first_line).
[[noreturn]] void fail_parse(const std::string& file, const std::string& text, int64_t first_line,
                             const nlohmann::json::parse_error& e) {
  size_t pos = e.byte > 0 ? std::min<size_t>(e.byte - 1, text.size()) : 0;
  int64_t line = first_line + std::count(text.begin(), text.begin() + pos, '\n');
  size_t nl = pos == 0 ? std::string::npos : text.rfind('\n', pos - 1);
  int64_t column = static_cast<int64_t>(nl == std::string::npos ? pos + 1 : pos - nl);
  std::string msg = e.what();
  size_t c = msg.find("column ");
  if (c != std::string::npos && (c = msg.find(": ", c)) != std::string::npos)
    msg = msg.substr(c + 2);
  // nlohmann checks UTF-8 inside strings; say so plainly rather than as a syntax error.
  if (msg.find("ill-formed UTF-8") != std::string::npos)
    fail("{}:{}:{}: invalid UTF-8 in a JSON string (the file must be UTF-8 encoded)", file, line,
         column);
  fail("{}:{}:{}: malformed JSON: {}", file, line, column, msg);
}

std::vector<RawRow> read_rows(const std::filesystem::path& path, const std::string& file,
                              int64_t max_rows) {
  const std::string text = read_file(path);
  const std::string ext = path.extension().string();
  std::vector<RawRow> rows;
  auto add = [&](Json v, int64_t line) {
    int64_t row = static_cast<int64_t>(rows.size()) + 1;
    RowRef ref{&file, row, line};
    if (!v.is_object()) fail("{}: expected a JSON object, found {}", ref.str(), v.type_name());
    rows.push_back({std::move(v), ref});
  };
  if (ext == ".jsonl") {
    size_t b = 0;
    int64_t line = 0;
    while (b <= text.size() && (max_rows <= 0 || static_cast<int64_t>(rows.size()) < max_rows)) {
      size_t e = text.find('\n', b);
      if (e == std::string::npos) e = text.size();
      ++line;
      std::string l = text.substr(b, e - b);
      b = e + 1;
      if (std::all_of(l.begin(), l.end(), [](char c) { return std::isspace((unsigned char)c); }))
        continue;
      Json v;
      try {
        v = Json::parse(l);
      } catch (const nlohmann::json::parse_error& err) {
        fail_parse(file, l, line, err);
      } catch (const nlohmann::json::exception& err) {  // e.g. out_of_range: number overflow
        fail("{}:{}: malformed JSON: {}", file, line, json_message(err));
      }
      add(std::move(v), line);
    }
  } else if (ext == ".json") {
    Json v;
    try {
      v = Json::parse(text);
    } catch (const nlohmann::json::parse_error& err) {
      fail_parse(file, text, 1, err);
    } catch (const nlohmann::json::exception& err) {
      fail("{}: malformed JSON: {}", file, json_message(err));
    }
    if (!v.is_array())
      fail(
          "{}: expected a JSON array of objects (one per row), found a {}; use .jsonl for one "
          "object per line",
          file, v.type_name());
    for (auto& r : v) {
      if (max_rows > 0 && static_cast<int64_t>(rows.size()) >= max_rows) break;
      add(std::move(r), 0);
    }
  } else {
    fail("{}: unsupported dataset file extension '{}' (allowed: .json, .jsonl, .txt)", file, ext);
  }
  return rows;
}

std::string check_utf8(const std::string& s, const RowRef& ref, const std::string& field) {
  if (auto off = utf8_error(s))
    fail("{}: field '{}' holds invalid UTF-8 at byte {}", ref.str(), field, *off);
  return s;
}

// A string field; nullopt when absent or null and !required.
std::optional<std::string> get_string(const Json& row, const char* field, const RowRef& ref,
                                      bool required) {
  auto it = row.find(field);
  if (it == row.end() || it->is_null()) {
    if (required) fail("{}: missing field '{}'", ref.str(), field);
    return std::nullopt;
  }
  if (!it->is_string())
    fail("{}: field '{}' must be a string, found {}", ref.str(), field, it->type_name());
  return check_utf8(it->get<std::string>(), ref, field);
}

std::string format_name(DatasetFormat f) {
  switch (f) {
    case DatasetFormat::kAuto:
      return "auto";
    case DatasetFormat::kAlpaca:
      return "alpaca";
    case DatasetFormat::kMessages:
      return "messages";
    case DatasetFormat::kShareGpt:
      return "sharegpt";
    case DatasetFormat::kCompletion:
      return "completion";
    case DatasetFormat::kText:
      return "text";
    case DatasetFormat::kTokenized:
      return "tokenized";
  }
  return "?";
}

DatasetFormat detect_format(const RawRow& first) {
  const Json& r = first.value;
  if (r.contains("messages")) return DatasetFormat::kMessages;
  if (r.contains("conversations")) return DatasetFormat::kShareGpt;
  if (r.contains("instruction") && r.contains("output")) return DatasetFormat::kAlpaca;
  if (r.contains("prompt") && r.contains("completion")) return DatasetFormat::kCompletion;
  if (r.contains("input_ids")) return DatasetFormat::kTokenized;
  if (r.contains("text")) return DatasetFormat::kText;
  std::string keys;
  for (auto it = r.begin(); it != r.end(); ++it) keys += (keys.empty() ? "" : ", ") + it.key();
  fail(
      "{}: cannot detect the dataset format from the keys of the first row ({}); expected "
      "instruction/output (alpaca), messages, conversations (sharegpt), prompt/completion, "
      "text or input_ids, or pass --dataset_format",
      first.ref.str(), keys.empty() ? "none" : keys);
}

class Loader {
 public:
  Loader(std::string file, const Tokenizer* tok, const DatasetOptions& opt, int64_t vocab_size)
      : file_(std::move(file)), tok_(tok), opt_(opt), vocab_size_(vocab_size) {}

  void skip(const RowRef& ref, const std::string& reason, const std::string& detail = {}) {
    ++stats_.rows_skipped;
    auto it = std::find_if(skip_counts_.begin(), skip_counts_.end(),
                           [&](const auto& p) { return p.first == reason; });
    if (it == skip_counts_.end()) {
      skip_counts_.emplace_back(reason, 1);
    } else {
      ++it->second;
    }
    if (stats_.skip_reasons.size() < kMaxSkipReasons)
      stats_.skip_reasons.push_back(
          fmt::format("{}: skipped: {}{}", ref.str(), reason, detail.empty() ? "" : ": " + detail));
  }

  const Tokenizer& tokenizer(DatasetFormat f) const {
    if (!tok_) fail("{}: the {} format needs a tokenizer", file_, format_name(f));
    return *tok_;
  }

  int32_t eos_id() const {
    auto eos = tok_->eos_id();
    if (!eos) fail("{}: the tokenizer has no EOS token, which ends every trained response", file_);
    return *eos;
  }

  // Alpaca (Stanford train.py) and prompt/completion rows: encode(prompt + response, BOS) +
  // EOS id; the first len(encode(prompt, BOS)) labels masked unless train_on_inputs.
  std::optional<Example> prompt_response(const std::string& prompt, const std::string& response,
                                         const RowRef& ref) {
    if (response.empty()) {
      skip(ref, "empty response (nothing to train)");
      return std::nullopt;
    }
    Example ex;
    ex.input_ids = tok_->encode(prompt + response, true);
    ex.input_ids.push_back(eos_id());
    ex.labels = ex.input_ids;
    if (!opt_.train_on_inputs) {
      size_t n = std::min(tok_->encode(prompt, true).size(), ex.labels.size());
      std::fill(ex.labels.begin(), ex.labels.begin() + static_cast<std::ptrdiff_t>(n),
                kIgnoreIndex);
    }
    return ex;
  }

  std::optional<Example> alpaca(const RawRow& r) {
    std::string instruction = *get_string(r.value, "instruction", r.ref, true);
    std::string input = get_string(r.value, "input", r.ref, false).value_or("");
    std::string output = *get_string(r.value, "output", r.ref, true);
    std::string prompt = input.empty() ? kAlpacaPromptNoInput : kAlpacaPromptInput;
    auto replace = [&](const std::string& key, const std::string& value) {
      size_t p = prompt.find(key);
      if (p != std::string::npos) prompt.replace(p, key.size(), value);
    };
    replace("{instruction}", instruction);
    if (!input.empty()) replace("{input}", input);
    return prompt_response(prompt, output, r.ref);
  }

  std::optional<Example> completion(const RawRow& r) {
    std::string prompt = *get_string(r.value, "prompt", r.ref, true);
    std::string completion = *get_string(r.value, "completion", r.ref, true);
    return prompt_response(prompt, completion, r.ref);
  }

  // A message's text: a string, or a list of parts {"type": "text", "text"|"value": ...}.
  std::string message_content(const Json& content, const RowRef& ref, const std::string& field) {
    if (content.is_string()) return check_utf8(content.get<std::string>(), ref, field);
    if (content.is_null()) return "";
    if (!content.is_array())
      fail("{}: {} must be a string or a list of text parts, found {}", ref.str(), field,
           content.type_name());
    std::string out;
    for (size_t k = 0; k < content.size(); ++k) {
      const Json& part = content[k];
      std::string pf = fmt::format("{}[{}]", field, k);
      if (!part.is_object()) fail("{}: {} must be an object", ref.str(), pf);
      auto type = part.find("type");
      if (type != part.end() && (!type->is_string() || *type != "text"))
        fail("{}: {}.type is {}; only text parts are supported", ref.str(), pf, type->dump());
      auto text = part.find("text");
      if (text == part.end()) text = part.find("value");
      if (text == part.end() || !text->is_string())
        fail("{}: {} needs a string 'text' (or 'value')", ref.str(), pf);
      out += check_utf8(text->get<std::string>(), ref, pf + ".text");
    }
    return out;
  }

  static std::optional<std::string> canonical_role(const std::string& r) {
    if (r == "user" || r == "human") return "user";
    if (r == "assistant" || r == "gpt" || r == "model" || r == "function_call") return "assistant";
    if (r == "system") return "system";
    if (r == "tool" || r == "observation" || r == "function" || r == "ipython") return "tool";
    return std::nullopt;
  }

  std::optional<Example> conversation(const RawRow& r, DatasetFormat f) {
    const char* key = f == DatasetFormat::kMessages ? "messages" : "conversations";
    auto it = r.value.find(key);
    if (it == r.value.end()) fail("{}: missing field '{}'", r.ref.str(), key);
    if (!it->is_array())
      fail("{}: field '{}' must be a list of messages, found {}", r.ref.str(), key,
           it->type_name());
    Json messages = Json::array();
    std::vector<bool> trained;
    if (auto system = get_string(r.value, "system", r.ref, false); system && !system->empty()) {
      messages.push_back({{"role", "system"}, {"content", *system}});
      trained.push_back(false);
    }
    for (size_t k = 0; k < it->size(); ++k) {
      const Json& m = (*it)[k];
      std::string field = fmt::format("{}[{}]", key, k);
      if (!m.is_object()) fail("{}: {} must be an object", r.ref.str(), field);
      auto role_it = m.find("role");
      const char* role_key = "role";
      if (role_it == m.end()) {
        role_it = m.find("from");
        role_key = "from";
      }
      if (role_it == m.end() || !role_it->is_string())
        fail("{}: {} needs a string 'role' (or 'from')", r.ref.str(), field);
      auto role = canonical_role(role_it->get<std::string>());
      if (!role)
        fail(
            "{}: {}.{} is '{}'; allowed: system, user/human, assistant/gpt, function_call, "
            "tool/observation",
            r.ref.str(), field, role_key, role_it->get<std::string>());
      auto content_it = m.find("content");
      const char* content_key = "content";
      if (content_it == m.end()) {
        content_it = m.find("value");
        content_key = "value";
      }
      if (content_it == m.end()) fail("{}: {} needs 'content' (or 'value')", r.ref.str(), field);
      std::string content = message_content(*content_it, r.ref, field + "." + content_key);
      bool train = *role == "assistant";
      if (auto w = m.find("loss_weight"); w != m.end() && !w->is_null()) {
        if (!w->is_number())
          fail("{}: {}.loss_weight must be a number, found {}", r.ref.str(), field, w->type_name());
        train = w->get<double>() > 0;  // weights are 0/1 in practice; any positive = trained
      }
      messages.push_back({{"role", *role}, {"content", content}});
      trained.push_back(train);
    }
    if (std::find(trained.begin(), trained.end(), true) == trained.end()) {
      skip(r.ref, "no assistant message to train");
      return std::nullopt;
    }
    Json tools;
    if (auto t = r.value.find("tools"); t != r.value.end() && !t->is_null()) {
      tools = *t;
      if (t->is_string()) {  // LLaMA-Factory stores the tool list as a JSON string
        tools = Json::parse(t->get<std::string>(), nullptr, false);
        if (tools.is_discarded()) tools = *t;
      }
    }
    const Tokenizer& tok = *tok_;
    ChatRenderInput in;
    in.tools = tools.is_null() ? nullptr : &tools;
    in.bos_token = tok.bos_token();
    in.eos_token = tok.eos_token();
    auto render_prefix = [&](size_t n, bool generation_prompt) {
      Json prefix = Json::array();
      for (size_t k = 0; k < n; ++k) prefix.push_back(messages[k]);
      in.messages = &prefix;
      in.add_generation_prompt = generation_prompt;
      return render_chat(*template_, in);
    };
    Example ex;
    try {
      ex.input_ids = tok.encode(render_prefix(messages.size(), false), false);
      ex.labels.assign(ex.input_ids.size(), kIgnoreIndex);
      if (opt_.train_on_inputs) ex.labels = ex.input_ids;
      for (size_t k = 0; k < messages.size() && !opt_.train_on_inputs; ++k) {
        if (!trained[k]) continue;
        // Span of message k: from the end of the conversation before it (with the generation
        // prompt for assistant turns, so the assistant header stays masked) to the end of the
        // conversation including it (its end-of-turn / EOS tokens are trained).
        size_t start = 0;
        if (k > 0) {
          start = tok.encode(render_prefix(k, messages[k]["role"] == "assistant"), false).size();
        }
        size_t end = tok.encode(render_prefix(k + 1, false), false).size();
        end = std::min(end, ex.input_ids.size());
        for (size_t i = start; i < end; ++i) ex.labels[i] = ex.input_ids[i];
      }
    } catch (const UserError& e) {
      std::string what = e.what();
      if (what.rfind("template error: ", 0) != 0) throw;
      skip(r.ref, "rejected by the chat template", what.substr(16));
      return std::nullopt;
    }
    return ex;
  }

  std::optional<Example> tokenized(const RawRow& r) {
    auto read_ids = [&](const char* field, bool labels) -> std::optional<std::vector<int32_t>> {
      auto it = r.value.find(field);
      if (it == r.value.end() || it->is_null()) {
        if (!labels) fail("{}: missing field '{}'", r.ref.str(), field);
        return std::nullopt;
      }
      if (!it->is_array())
        fail("{}: field '{}' must be a list of integers, found {}", r.ref.str(), field,
             it->type_name());
      std::vector<int32_t> ids;
      ids.reserve(it->size());
      for (size_t k = 0; k < it->size(); ++k) {
        const Json& v = (*it)[k];
        if (!v.is_number_integer())
          fail("{}: {}[{}] must be an integer, found {}", r.ref.str(), field, k, v.dump());
        int64_t x = v.get<int64_t>();
        bool ok = x >= 0 && (vocab_size_ <= 0 || x < vocab_size_) && x <= INT32_MAX;
        if (labels && x == kIgnoreIndex) ok = true;
        if (!ok)
          fail("{}: {}[{}] = {} is outside {}[0, {}){}", r.ref.str(), field, k, x,
               vocab_size_ > 0 ? "the model's vocabulary " : "",
               vocab_size_ > 0 ? std::to_string(vocab_size_) : "2^31",
               labels ? " (or -100 = not trained)" : "");
        ids.push_back(static_cast<int32_t>(x));
      }
      return ids;
    };
    Example ex;
    ex.input_ids = *read_ids("input_ids", false);
    auto labels = read_ids("labels", true);
    if (labels && labels->size() != ex.input_ids.size())
      fail("{}: 'labels' has {} entries but 'input_ids' has {}", r.ref.str(), labels->size(),
           ex.input_ids.size());
    ex.labels = labels ? std::move(*labels) : ex.input_ids;
    if (ex.input_ids.empty()) {
      skip(r.ref, "empty input_ids");
      return std::nullopt;
    }
    return ex;
  }

  // Text documents: encode(text, BOS), EOS id appended when the tokenizer does not add it, all
  // concatenated and cut into model_max_length blocks (the last block may be shorter).
  void text_document(const std::string& text, const RowRef& ref) {
    if (text.empty()) {
      skip(ref, "empty text");
      return;
    }
    std::vector<int32_t> ids = tok_->encode(text, true);
    if (!tok_->adds_eos() && tok_->eos_id()) ids.push_back(*tok_->eos_id());
    stream_.insert(stream_.end(), ids.begin(), ids.end());
    ++stats_.rows_kept;
  }

  void flush_text_stream() {
    const size_t block =
        opt_.model_max_length > 0 ? static_cast<size_t>(opt_.model_max_length) : stream_.size();
    for (size_t b = 0; b < stream_.size(); b += block) {
      Example ex;
      ex.input_ids.assign(
          stream_.begin() + static_cast<std::ptrdiff_t>(b),
          stream_.begin() + static_cast<std::ptrdiff_t>(std::min(b + block, stream_.size())));
      ex.labels = ex.input_ids;
      out_.push_back(std::move(ex));
    }
    stream_.clear();
  }

  // Truncation, the trained-token check and the vocabulary check of one finished row.
  void keep(Example ex, const RowRef& ref) {
    if (opt_.model_max_length > 0 &&
        static_cast<int64_t>(ex.input_ids.size()) > opt_.model_max_length) {
      ex.input_ids.resize(static_cast<size_t>(opt_.model_max_length));
      ex.labels.resize(static_cast<size_t>(opt_.model_max_length));
      ++stats_.rows_truncated;
    }
    if (std::all_of(ex.labels.begin(), ex.labels.end(),
                    [](int32_t l) { return l == kIgnoreIndex; })) {
      skip(ref, "no trained tokens left after truncation to --model_max_length");
      return;
    }
    check_vocab(ex, ref.str());
    ++stats_.rows_kept;
    out_.push_back(std::move(ex));
  }

  void check_vocab(const Example& ex, const std::string& where) const {
    if (vocab_size_ <= 0) return;
    for (size_t i = 0; i < ex.input_ids.size(); ++i) {
      if (ex.input_ids[i] < 0 || ex.input_ids[i] >= vocab_size_)
        fail("{}: token id {} at position {} is outside the model's vocabulary [0, {})", where,
             ex.input_ids[i], i, vocab_size_);
    }
  }

  Dataset run(const std::filesystem::path& path) {
    if (opt_.packing && opt_.model_max_length <= 0)
      fail("--packing needs --model_max_length (the length of the packed sequences)");
    Dataset ds;
    ds.format = opt_.format;
    const bool is_txt = path.extension() == ".txt";
    if (is_txt) {
      if (ds.format != DatasetFormat::kAuto && ds.format != DatasetFormat::kText)
        fail("{}: a .txt file is plain text; --dataset_format {} needs .json or .jsonl", file_,
             format_name(ds.format));
      ds.format = DatasetFormat::kText;
      tokenizer(ds.format);
      std::string text = read_file(path);
      RowRef ref{&file_, 1, 1};
      check_utf8(text, ref, "text");
      stats_.rows_read = 1;
      text_document(text, ref);
      flush_text_stream();
    } else {
      std::vector<RawRow> rows = read_rows(path, file_, opt_.max_rows);
      stats_.rows_read = static_cast<int64_t>(rows.size());
      if (rows.empty()) fail("{}: the dataset has no rows", file_);
      if (ds.format == DatasetFormat::kAuto) ds.format = detect_format(rows[0]);
      if (ds.format != DatasetFormat::kTokenized) tokenizer(ds.format);
      if (ds.format == DatasetFormat::kMessages || ds.format == DatasetFormat::kShareGpt) {
        template_ =
            std::make_unique<jinja::Template>(resolve_chat_template(opt_.chat_template, tok_));
      }
      for (const RawRow& r : rows) {
        std::optional<Example> ex;
        switch (ds.format) {
          case DatasetFormat::kAlpaca:
            ex = alpaca(r);
            break;
          case DatasetFormat::kCompletion:
            ex = completion(r);
            break;
          case DatasetFormat::kMessages:
          case DatasetFormat::kShareGpt:
            ex = conversation(r, ds.format);
            break;
          case DatasetFormat::kTokenized:
            ex = tokenized(r);
            break;
          case DatasetFormat::kText:
            text_document(*get_string(r.value, "text", r.ref, true), r.ref);
            break;
          case DatasetFormat::kAuto:
            break;
        }
        if (ex) keep(std::move(*ex), r.ref);
      }
      if (ds.format == DatasetFormat::kText) flush_text_stream();
    }
    if (ds.format == DatasetFormat::kText) {
      for (const Example& ex : out_) check_vocab(ex, file_);
    }
    if (out_.empty()) {
      std::string why = stats_.skip_reasons.empty() ? "" : "; first: " + stats_.skip_reasons[0];
      fail("{}: no usable rows ({} read, {} skipped{})", file_, stats_.rows_read,
           stats_.rows_skipped, why);
    }
    ds.rows = opt_.packing ? pack(std::move(out_)) : std::move(out_);
    stats_.skip_counts = std::move(skip_counts_);
    ds.stats = std::move(stats_);
    return ds;
  }

  // Greedy sequential packing (rows in order, a new sequence when the next row does not fit);
  // the first label of every document is masked as transformers' DataCollatorWithFlattening
  // does, so no token is trained to predict across a document boundary.
  std::vector<Example> pack(std::vector<Example> rows) const {
    std::vector<Example> packed;
    Example cur;
    int32_t doc = 0;
    for (Example& ex : rows) {
      if (!cur.input_ids.empty() &&
          static_cast<int64_t>(cur.input_ids.size() + ex.input_ids.size()) >
              opt_.model_max_length) {
        packed.push_back(std::move(cur));
        cur = Example{};
        doc = 0;
      }
      if (!ex.labels.empty()) ex.labels[0] = kIgnoreIndex;
      cur.input_ids.insert(cur.input_ids.end(), ex.input_ids.begin(), ex.input_ids.end());
      cur.labels.insert(cur.labels.end(), ex.labels.begin(), ex.labels.end());
      cur.doc_ids.insert(cur.doc_ids.end(), ex.input_ids.size(), doc++);
    }
    if (!cur.input_ids.empty()) packed.push_back(std::move(cur));
    return packed;
  }

 private:
  std::string file_;
  const Tokenizer* tok_;
  const DatasetOptions& opt_;
  int64_t vocab_size_;
  DatasetStats stats_;
  std::vector<std::pair<std::string, int64_t>> skip_counts_;
  std::vector<Example> out_;
  std::vector<int32_t> stream_;
  std::unique_ptr<jinja::Template> template_;
};

}  // namespace

Dataset load_dataset(const std::filesystem::path& path, const Tokenizer* tokenizer,
                     const DatasetOptions& options, int64_t vocab_size) {
  Loader loader(path.string(), tokenizer, options, vocab_size);
  try {
    return loader.run(path);
  } catch (const nlohmann::json::exception& e) {
    // Every field is type-checked before use; this is the net under a check that was missed,
    // so that bad data is still a message and never a crash.
    fail("{}: unexpected JSON value: {}", path.string(), json_message(e));
  }
}

DatasetFormat parse_dataset_format(const std::string& name) {
  static const std::map<std::string, DatasetFormat> kNames = {
      {"auto", DatasetFormat::kAuto},
      {"alpaca", DatasetFormat::kAlpaca},
      {"messages", DatasetFormat::kMessages},
      {"sharegpt", DatasetFormat::kShareGpt},
      {"completion", DatasetFormat::kCompletion},
      {"text", DatasetFormat::kText},
      {"tokenized", DatasetFormat::kTokenized}};
  auto it = kNames.find(name);
  if (it == kNames.end())
    fail(
        "--dataset_format '{}' is unknown; allowed: auto, alpaca, messages, sharegpt, "
        "completion, text, tokenized",
        name);
  return it->second;
}

std::string dataset_format_name(DatasetFormat format) { return format_name(format); }

}  // namespace lt
