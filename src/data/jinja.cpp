// Jinja2 subset interpreter: template lexing with transformers' whitespace rules, a
// recursive-descent expression parser following jinja2/parser.py precedence, and a renderer.
#include "data/jinja.h"

#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <optional>
#include <vector>

#include "core/error.h"
#include "data/jinja_value.h"

namespace lt::jinja {
using namespace detail;  // NOLINT: the value helpers are this file's vocabulary
namespace {

// ------------------------------------------------------------------------------ lexing

enum class TokKind { kName, kString, kInt, kFloat, kOp, kEnd };

struct Tok {
  TokKind kind;
  std::string text;
};

// Python unicode-escape decoding of a Jinja string literal body.
std::string unescape(std::string_view body) {
  std::string out;
  for (size_t i = 0; i < body.size(); ++i) {
    char c = body[i];
    if (c != '\\' || i + 1 >= body.size()) {
      out += c;
      continue;
    }
    char e = body[++i];
    auto hex = [&](int n) {
      uint32_t cp = 0;
      for (int k = 0; k < n && i + 1 < body.size(); ++k) {
        char h = body[++i];
        cp = cp * 16 + static_cast<uint32_t>(std::isdigit(static_cast<unsigned char>(h))
                                                 ? h - '0'
                                                 : (std::tolower(h) - 'a' + 10));
      }
      append_utf8(out, cp);
    };
    switch (e) {
      case 'n':
        out += '\n';
        break;
      case 't':
        out += '\t';
        break;
      case 'r':
        out += '\r';
        break;
      case 'b':
        out += '\b';
        break;
      case 'f':
        out += '\f';
        break;
      case 'v':
        out += '\v';
        break;
      case 'a':
        out += '\a';
        break;
      case '0':
        out += '\0';
        break;
      case '\\':
        out += '\\';
        break;
      case '\'':
        out += '\'';
        break;
      case '"':
        out += '"';
        break;
      case '\n':
        break;
      case 'x':
        hex(2);
        break;
      case 'u':
        hex(4);
        break;
      case 'U':
        hex(8);
        break;
      default:
        out += '\\';
        out += e;
    }
  }
  return out;
}

std::vector<Tok> lex_expression(std::string_view s, int line) {
  std::vector<Tok> toks;
  size_t i = 0;
  while (i < s.size()) {
    char c = s[i];
    if (std::isspace(static_cast<unsigned char>(c))) {
      ++i;
    } else if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
      size_t b = i;
      while (i < s.size() && (std::isalnum(static_cast<unsigned char>(s[i])) || s[i] == '_')) ++i;
      toks.push_back({TokKind::kName, std::string(s.substr(b, i - b))});
    } else if (std::isdigit(static_cast<unsigned char>(c))) {
      size_t b = i;
      bool is_float = false;
      while (i < s.size() && (std::isdigit(static_cast<unsigned char>(s[i])) || s[i] == '_')) ++i;
      if (i + 1 < s.size() && s[i] == '.' && std::isdigit(static_cast<unsigned char>(s[i + 1]))) {
        is_float = true;
        ++i;
        while (i < s.size() && std::isdigit(static_cast<unsigned char>(s[i]))) ++i;
      }
      std::string num(s.substr(b, i - b));
      std::erase(num, '_');
      toks.push_back({is_float ? TokKind::kFloat : TokKind::kInt, num});
    } else if (c == '\'' || c == '"') {
      size_t b = ++i;
      while (i < s.size() && s[i] != c) i += (s[i] == '\\') ? 2 : 1;
      if (i >= s.size()) fail("chat template line {}: unterminated string literal", line);
      toks.push_back({TokKind::kString, unescape(s.substr(b, i - b))});
      ++i;
    } else {
      static const char* kOps[] = {"//", "**", "==", "!=", "<=", ">=", "+", "-", "*",
                                   "/",  "%",  "~",  "<",  ">",  "(",  ")", "[", "]",
                                   "{",  "}",  ".",  ",",  ":",  "|",  "="};
      bool found = false;
      for (const char* op : kOps) {
        size_t n = std::char_traits<char>::length(op);
        if (s.substr(i, n) == op) {
          toks.push_back({TokKind::kOp, op});
          i += n;
          found = true;
          break;
        }
      }
      if (!found) fail("chat template line {}: unexpected character '{}'", line, c);
    }
  }
  toks.push_back({TokKind::kEnd, ""});
  return toks;
}

// ------------------------------------------------------------------------------ AST

struct Expr;
using ExprPtr = std::unique_ptr<Expr>;

enum class ExprKind {
  kLiteral,
  kName,
  kList,
  kDict,
  kAttr,
  kItem,
  kSlice,
  kCall,
  kFilter,
  kTest,
  kUnary,
  kBinary,
  kTernary
};

struct Expr {
  ExprKind kind;
  Value value;                // literal
  std::string name;           // name, attribute, filter, test, operator
  std::vector<ExprPtr> args;  // operands; call: args[0] = callee
  std::vector<std::pair<std::string, ExprPtr>> kwargs;
  bool negated = false;  // `is not`
};

ExprPtr make(ExprKind kind, std::string name = {}) {
  auto e = std::make_unique<Expr>();
  e->kind = kind;
  e->name = std::move(name);
  return e;
}

}  // namespace

enum class NodeKind { kBody, kText, kOutput, kIf, kFor, kSet, kBreak, kContinue };

struct IfBranch;

struct Node {
  NodeKind kind = NodeKind::kBody;
  std::string text;
  ExprPtr expr;                                    // output; set value; for iterable
  std::vector<IfBranch> branches;                  // if: condition (null for else) and body
  std::vector<std::string> targets;                // for / set: names
  std::string attribute;                           // set ns.attribute
  ExprPtr condition;                               // for ... if condition
  std::vector<Node> children;                      // body
  std::vector<Node> else_children;                 // for-else
  int line = 0;
};

// A named struct rather than std::pair<ExprPtr, Node>: a pair may not hold the incomplete Node
// (libstdc++ under clang rejects it), while std::vector of an incomplete type is allowed.
struct IfBranch {
  ExprPtr condition;
  Node body;
};

namespace {

class ExprParser {
 public:
  ExprParser(std::vector<Tok> toks, int line) : toks_(std::move(toks)), line_(line) {}

  ExprPtr parse_expression() {  // ternary
    ExprPtr e = parse_or();
    while (is_name("if")) {
      ++pos_;
      auto t = make(ExprKind::kTernary);
      ExprPtr cond = parse_or();
      ExprPtr other;
      if (is_name("else")) {
        ++pos_;
        other = parse_expression();
      } else {
        other = make(ExprKind::kLiteral);
        other->value = undefined();
      }
      t->args.push_back(std::move(e));
      t->args.push_back(std::move(cond));
      t->args.push_back(std::move(other));
      e = std::move(t);
    }
    return e;
  }
  ExprPtr parse_or() {
    ExprPtr e = parse_and();
    while (is_name("or")) {
      ++pos_;
      e = binary("or", std::move(e), parse_and());
    }
    return e;
  }
  ExprPtr parse_and() {
    ExprPtr e = parse_not();
    while (is_name("and")) {
      ++pos_;
      e = binary("and", std::move(e), parse_not());
    }
    return e;
  }
  ExprPtr parse_not() {
    if (is_name("not")) {
      ++pos_;
      auto u = make(ExprKind::kUnary, "not");
      u->args.push_back(parse_not());
      return u;
    }
    return parse_compare();
  }
  ExprPtr parse_compare() {
    ExprPtr e = parse_math1();
    while (true) {
      if (is_op("==") || is_op("!=") || is_op("<") || is_op(">") || is_op("<=") || is_op(">=")) {
        std::string op = toks_[pos_++].text;
        e = binary(op, std::move(e), parse_math1());
      } else if (is_name("in")) {
        ++pos_;
        e = binary("in", std::move(e), parse_math1());
      } else if (is_name("not") && pos_ + 1 < toks_.size() &&
                 toks_[pos_ + 1].kind == TokKind::kName && toks_[pos_ + 1].text == "in") {
        pos_ += 2;
        e = binary("not in", std::move(e), parse_math1());
      } else {
        return e;
      }
    }
  }
  ExprPtr parse_math1() {
    ExprPtr e = parse_concat();
    while (is_op("+") || is_op("-")) {
      std::string op = toks_[pos_++].text;
      e = binary(op, std::move(e), parse_concat());
    }
    return e;
  }
  ExprPtr parse_concat() {
    ExprPtr e = parse_math2();
    while (is_op("~")) {
      ++pos_;
      e = binary("~", std::move(e), parse_math2());
    }
    return e;
  }
  ExprPtr parse_math2() {
    ExprPtr e = parse_pow();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      std::string op = toks_[pos_++].text;
      e = binary(op, std::move(e), parse_pow());
    }
    return e;
  }
  ExprPtr parse_pow() {
    ExprPtr e = parse_unary();
    while (is_op("**")) {
      ++pos_;
      e = binary("**", std::move(e), parse_unary());
    }
    return e;
  }
  ExprPtr parse_unary() {
    if (is_op("-") || is_op("+")) {
      std::string op = toks_[pos_++].text;
      auto u = make(ExprKind::kUnary, op);
      u->args.push_back(parse_unary());
      return parse_filters(std::move(u));
    }
    return parse_filters(parse_postfix(parse_primary()));
  }

  ExprPtr parse_primary() {
    const Tok& t = toks_[pos_];
    if (t.kind == TokKind::kName) {
      ++pos_;
      auto e = make(ExprKind::kLiteral);
      if (t.text == "true" || t.text == "True") {
        e->value = true;
      } else if (t.text == "false" || t.text == "False") {
        e->value = false;
      } else if (t.text == "none" || t.text == "None") {
        e->value = nullptr;
      } else {
        e = make(ExprKind::kName, t.text);
      }
      return e;
    }
    if (t.kind == TokKind::kString) {
      ++pos_;
      auto e = make(ExprKind::kLiteral);
      std::string s = t.text;
      while (toks_[pos_].kind == TokKind::kString) s += toks_[pos_++].text;  // adjacent literals
      e->value = s;
      return e;
    }
    if (t.kind == TokKind::kInt || t.kind == TokKind::kFloat) {
      ++pos_;
      auto e = make(ExprKind::kLiteral);
      if (t.kind == TokKind::kInt) {
        e->value = std::stoll(t.text);
      } else {
        e->value = std::stod(t.text);
      }
      return e;
    }
    if (is_op("(")) {
      ++pos_;
      if (is_op(")")) {  // empty tuple
        ++pos_;
        return make(ExprKind::kList);
      }
      ExprPtr e = parse_expression();
      if (is_op(",")) {  // tuple: evaluated as a list
        auto list = make(ExprKind::kList);
        list->args.push_back(std::move(e));
        while (is_op(",")) {
          ++pos_;
          if (is_op(")")) break;
          list->args.push_back(parse_expression());
        }
        e = std::move(list);
      }
      expect(")");
      return e;
    }
    if (is_op("[")) {
      ++pos_;
      auto e = make(ExprKind::kList);
      while (!is_op("]")) {
        e->args.push_back(parse_expression());
        if (!is_op(",")) break;
        ++pos_;
      }
      expect("]");
      return e;
    }
    if (is_op("{")) {
      ++pos_;
      auto e = make(ExprKind::kDict);
      while (!is_op("}")) {
        e->args.push_back(parse_expression());
        expect(":");
        e->args.push_back(parse_expression());
        if (!is_op(",")) break;
        ++pos_;
      }
      expect("}");
      return e;
    }
    fail("chat template line {}: unexpected '{}'", line_, t.text.empty() ? "end" : t.text);
  }

  ExprPtr parse_postfix(ExprPtr e) {
    while (true) {
      if (is_op(".")) {
        ++pos_;
        if (toks_[pos_].kind != TokKind::kName && toks_[pos_].kind != TokKind::kInt)
          fail("chat template line {}: expected an attribute name after '.'", line_);
        auto a = make(ExprKind::kAttr, toks_[pos_++].text);
        a->args.push_back(std::move(e));
        e = std::move(a);
      } else if (is_op("[")) {
        ++pos_;
        ExprPtr parts[3];
        bool slice = false;
        for (int k = 0; k < 3; ++k) {
          if (!is_op(":") && !is_op("]")) parts[k] = parse_expression();
          if (k < 2 && is_op(":")) {
            ++pos_;
            slice = true;
          } else {
            break;
          }
        }
        expect("]");
        auto s = make(slice ? ExprKind::kSlice : ExprKind::kItem);
        s->args.push_back(std::move(e));
        for (int k = 0; k < (slice ? 3 : 1); ++k) s->args.push_back(std::move(parts[k]));
        e = std::move(s);
      } else if (is_op("(")) {
        auto c = make(ExprKind::kCall);
        c->args.push_back(std::move(e));
        parse_call_args(*c);
        e = std::move(c);
      } else {
        return e;
      }
    }
  }

  void parse_call_args(Expr& call) {
    expect("(");
    while (!is_op(")")) {
      if (toks_[pos_].kind == TokKind::kName && toks_[pos_ + 1].kind == TokKind::kOp &&
          toks_[pos_ + 1].text == "=") {
        std::string key = toks_[pos_].text;
        pos_ += 2;
        call.kwargs.emplace_back(key, parse_expression());
      } else {
        call.args.push_back(parse_expression());
      }
      if (!is_op(",")) break;
      ++pos_;
    }
    expect(")");
  }

  ExprPtr parse_filters(ExprPtr e) {
    while (true) {
      if (is_op("|")) {
        ++pos_;
        auto f = make(ExprKind::kFilter, expect_name());
        f->args.push_back(std::move(e));
        if (is_op("(")) parse_call_args(*f);
        e = std::move(f);
      } else if (is_name("is")) {
        ++pos_;
        auto t = make(ExprKind::kTest);
        if (is_name("not")) {
          ++pos_;
          t->negated = true;
        }
        t->name = expect_name();
        t->args.push_back(std::move(e));
        if (is_op("(")) {
          parse_call_args(*t);
        } else if (toks_[pos_].kind == TokKind::kString || toks_[pos_].kind == TokKind::kInt ||
                   (toks_[pos_].kind == TokKind::kName && !is_keyword(toks_[pos_].text))) {
          t->args.push_back(parse_primary());  // `is sameas x`, `is divisibleby 3`
        }
        e = std::move(t);
      } else {
        return e;
      }
    }
  }

  bool at_end() const { return toks_[pos_].kind == TokKind::kEnd; }
  bool is_op(const char* op) const {
    return toks_[pos_].kind == TokKind::kOp && toks_[pos_].text == op;
  }
  bool is_name(const char* name) const {
    return toks_[pos_].kind == TokKind::kName && toks_[pos_].text == name;
  }
  void expect(const char* op) {
    if (!is_op(op))
      fail("chat template line {}: expected '{}' but found '{}'", line_, op,
           toks_[pos_].text.empty() ? "end of tag" : toks_[pos_].text);
    ++pos_;
  }
  std::string expect_name() {
    if (toks_[pos_].kind != TokKind::kName)
      fail("chat template line {}: expected a name but found '{}'", line_, toks_[pos_].text);
    return toks_[pos_++].text;
  }
  void expect_end() {
    if (!at_end())
      fail("chat template line {}: unexpected '{}' at the end of the tag", line_, toks_[pos_].text);
  }

 private:
  static bool is_keyword(const std::string& s) {
    return s == "and" || s == "or" || s == "not" || s == "in" || s == "is" || s == "if" ||
           s == "else";
  }
  static ExprPtr binary(std::string op, ExprPtr a, ExprPtr b) {
    auto e = make(ExprKind::kBinary, std::move(op));
    e->args.push_back(std::move(a));
    e->args.push_back(std::move(b));
    return e;
  }

  std::vector<Tok> toks_;
  size_t pos_ = 0;
  int line_;
};

// ------------------------------------------------------------- template segmentation

enum class SegKind { kText, kVar, kBlock, kComment };

struct Segment {
  SegKind kind;
  std::string content;
  bool strip_before = false;  // `{%-`
  bool keep_before = false;   // `{%+` (disables lstrip_blocks)
  bool strip_after = false;   // `-%}`
  bool keep_after = false;    // `+%}` (disables trim_blocks)
  size_t start = 0;           // byte offset in the normalized source
  int line = 1;
};

std::vector<Segment> segment(const std::string& src) {
  std::vector<Segment> segs;
  size_t i = 0;
  int line = 1;
  auto count_lines = [&](size_t from, size_t to) {
    line += static_cast<int>(std::count(src.begin() + from, src.begin() + to, '\n'));
  };
  while (i < src.size()) {
    size_t open = src.find('{', i);
    while (open != std::string::npos && open + 1 < src.size() && src[open + 1] != '{' &&
           src[open + 1] != '%' && src[open + 1] != '#')
      open = src.find('{', open + 1);
    if (open == std::string::npos || open + 1 >= src.size()) {
      segs.push_back({SegKind::kText, src.substr(i), false, false, false, false, i, line});
      break;
    }
    if (open > i) {
      segs.push_back(
          {SegKind::kText, src.substr(i, open - i), false, false, false, false, i, line});
      count_lines(i, open);
    }
    char type = src[open + 1];
    Segment seg;
    seg.kind = type == '{' ? SegKind::kVar : type == '%' ? SegKind::kBlock : SegKind::kComment;
    seg.start = open;
    seg.line = line;
    size_t body = open + 2;
    if (body < src.size() && src[body] == '-') {
      seg.strip_before = true;
      ++body;
    } else if (body < src.size() && src[body] == '+') {
      seg.keep_before = true;
      ++body;
    }
    const char close = type == '{' ? '}' : type == '%' ? '%' : '#';
    size_t j = body;
    char quote = 0;
    size_t end = std::string::npos;
    for (; j + 1 < src.size(); ++j) {
      char c = src[j];
      if (seg.kind != SegKind::kComment) {
        if (quote) {
          if (c == '\\') {
            ++j;
          } else if (c == quote) {
            quote = 0;
          }
          continue;
        }
        if (c == '\'' || c == '"') {
          quote = c;
          continue;
        }
      }
      if (c == close && src[j + 1] == '}') {
        end = j;
        break;
      }
    }
    if (end == std::string::npos) fail("chat template line {}: unclosed tag", line);
    size_t content_end = end;
    if (content_end > body && src[content_end - 1] == '-') {
      seg.strip_after = true;
      --content_end;
    } else if (content_end > body && src[content_end - 1] == '+') {
      seg.keep_after = true;
      --content_end;
    }
    seg.content = src.substr(body, content_end - body);
    count_lines(open, end + 2);
    i = end + 2;
    segs.push_back(std::move(seg));
  }
  return segs;
}

// Applies -, trim_blocks and lstrip_blocks (jinja2/lexer.py) to the text segments.
void apply_whitespace_control(std::vector<Segment>& segs, const std::string& src) {
  for (size_t k = 0; k < segs.size(); ++k) {
    Segment& s = segs[k];
    if (s.kind != SegKind::kText) continue;
    std::string& t = s.content;
    bool line_starting = s.start == 0 || src[s.start - 1] == '\n';
    if (k > 0) {
      const Segment& prev = segs[k - 1];
      if (prev.strip_after) {
        size_t n = 0;
        while (n < t.size() && std::isspace(static_cast<unsigned char>(t[n]))) ++n;
        if (n > 0) line_starting = t[n - 1] == '\n';
        t.erase(0, n);
      } else if (prev.kind != SegKind::kVar && !prev.keep_after && !t.empty() && t[0] == '\n') {
        t.erase(0, 1);  // trim_blocks
        line_starting = true;
      }
    }
    if (k + 1 < segs.size()) {
      const Segment& next = segs[k + 1];
      if (next.strip_before) {
        size_t n = t.size();
        while (n > 0 && std::isspace(static_cast<unsigned char>(t[n - 1]))) --n;
        t.erase(n);
      } else if (next.kind != SegKind::kVar && !next.keep_before) {  // lstrip_blocks
        size_t nl = t.rfind('\n');
        size_t from = nl == std::string::npos ? 0 : nl + 1;
        if (nl != std::string::npos || line_starting) {
          bool blank = std::all_of(t.begin() + static_cast<std::ptrdiff_t>(from), t.end(),
                                   [](char c) { return c == ' ' || c == '\t'; });
          if (blank) t.erase(from);
        }
      }
    }
  }
}

// ------------------------------------------------------------------ statement parsing

class BodyParser {
 public:
  explicit BodyParser(std::vector<Segment> segs) : segs_(std::move(segs)) {}

  // Parses nodes until a block tag whose first word is in `ends`; returns that word.
  std::string parse_body(std::vector<Node>& out, std::initializer_list<const char*> ends,
                         std::vector<Tok>* end_toks, bool top_level = false) {
    while (pos_ < segs_.size()) {
      Segment& s = segs_[pos_++];
      if (s.kind == SegKind::kText) {
        if (!s.content.empty()) {
          Node n;
          n.kind = NodeKind::kText;
          n.text = std::move(s.content);
          out.push_back(std::move(n));
        }
      } else if (s.kind == SegKind::kVar) {
        ExprParser p(lex_expression(s.content, s.line), s.line);
        Node n;
        n.kind = NodeKind::kOutput;
        n.line = s.line;
        n.expr = p.parse_expression();
        p.expect_end();
        out.push_back(std::move(n));
      } else if (s.kind == SegKind::kBlock) {
        std::vector<Tok> toks = lex_expression(s.content, s.line);
        if (toks[0].kind != TokKind::kName) fail("chat template line {}: empty tag", s.line);
        const std::string word = toks[0].text;
        for (const char* e : ends) {
          if (word == e) {
            if (end_toks) *end_toks = std::move(toks);
            return word;
          }
        }
        parse_statement(word, std::move(toks), s.line, out);
      }
    }
    if (!top_level)
      fail("chat template: missing {{% {} %}} at the end of the template", *ends.begin());
    return "";
  }

 private:
  void parse_statement(const std::string& word, std::vector<Tok> toks, int line,
                       std::vector<Node>& out) {
    Node n;
    n.line = line;
    ExprParser p(std::move(toks), line);
    p.expect_name();
    if (word == "if") {
      n.kind = NodeKind::kIf;
      ExprPtr cond = p.parse_expression();
      p.expect_end();
      while (true) {
        Node body;
        std::vector<Tok> end;
        std::string w = parse_body(body.children, {"endif", "elif", "else"}, &end);
        n.branches.push_back(IfBranch{std::move(cond), std::move(body)});
        if (w == "endif") break;
        ExprParser q(std::move(end), line);
        q.expect_name();
        if (w == "elif") {
          cond = q.parse_expression();
        } else {
          cond = nullptr;
        }
        q.expect_end();
        if (w == "else") {
          Node else_body;
          parse_body(else_body.children, {"endif"}, nullptr);
          n.branches.push_back(IfBranch{nullptr, std::move(else_body)});
          break;
        }
      }
    } else if (word == "for") {
      n.kind = NodeKind::kFor;
      n.targets.push_back(p.expect_name());
      while (p.is_op(",")) {
        p.expect(",");
        n.targets.push_back(p.expect_name());
      }
      if (!p.is_name("in")) fail("chat template line {}: expected 'in' in for loop", line);
      p.expect_name();
      n.expr = p.parse_or();  // not parse_expression: `if` here filters the loop
      if (p.is_name("if")) {
        p.expect_name();
        n.condition = p.parse_or();
      }
      if (p.is_name("recursive")) fail("chat template line {}: recursive loops unsupported", line);
      p.expect_end();
      std::string w = parse_body(n.children, {"endfor", "else"}, nullptr);
      if (w == "else") parse_body(n.else_children, {"endfor"}, nullptr);
    } else if (word == "set") {
      n.kind = NodeKind::kSet;
      n.targets.push_back(p.expect_name());
      if (p.is_op(".")) {
        p.expect(".");
        n.attribute = p.expect_name();
      }
      while (p.is_op(",")) {
        p.expect(",");
        n.targets.push_back(p.expect_name());
      }
      if (!p.is_op("=")) fail("chat template line {}: block {{% set %}} is not supported", line);
      p.expect("=");
      n.expr = p.parse_expression();
      if (p.is_op(",")) {  // set a, b = x, y
        auto list = make(ExprKind::kList);
        list->args.push_back(std::move(n.expr));
        while (p.is_op(",")) {
          p.expect(",");
          list->args.push_back(p.parse_expression());
        }
        n.expr = std::move(list);
      }
      p.expect_end();
    } else if (word == "break" || word == "continue") {
      n.kind = word == "break" ? NodeKind::kBreak : NodeKind::kContinue;
    } else if (word == "generation") {  // transformers' AssistantTracker: renders its body
      n.kind = NodeKind::kBody;
      parse_body(n.children, {"endgeneration"}, nullptr);
    } else {
      fail(
          "chat template line {}: unsupported tag '{}' (supported: if, for, set, break, "
          "continue, generation)",
          line, word);
    }
    out.push_back(std::move(n));
  }

  std::vector<Segment> segs_;
  size_t pos_ = 0;
};

// ------------------------------------------------------------------------ evaluation

enum class Flow { kNormal, kBreak, kContinue };

class Renderer {
 public:
  explicit Renderer(const Value& context) { scopes_.push_back(context); }

  Flow render(const std::vector<Node>& nodes, std::string& out) {
    for (const Node& n : nodes) {
      Flow f = render(n, out);
      if (f != Flow::kNormal) return f;
    }
    return Flow::kNormal;
  }

  Flow render(const Node& n, std::string& out) {
    switch (n.kind) {
      case NodeKind::kBody:
        return render(n.children, out);
      case NodeKind::kText:
        out += n.text;
        return Flow::kNormal;
      case NodeKind::kOutput:
        out += py_str(eval(*n.expr), false);
        return Flow::kNormal;
      case NodeKind::kIf:
        for (const auto& [cond, body] : n.branches) {  // IfBranch{condition, body}
          if (!cond || truthy(eval(*cond))) return render(body.children, out);
        }
        return Flow::kNormal;
      case NodeKind::kFor:
        return render_for(n, out);
      case NodeKind::kSet: {
        Value v = eval(*n.expr);
        if (!n.attribute.empty()) {
          Value* ns = lookup(n.targets[0]);
          if (!ns || !ns->is_object())
            fail("template error: line {}: cannot set attribute '{}' of '{}' (not a namespace)",
                 n.line, n.attribute, n.targets[0]);
          (*ns)[n.attribute] = std::move(v);
        } else if (n.targets.size() == 1) {
          scopes_.back()[n.targets[0]] = std::move(v);
        } else {
          if (!v.is_array() || v.size() != n.targets.size())
            fail("template error: line {}: cannot unpack into {} names", n.line, n.targets.size());
          for (size_t i = 0; i < n.targets.size(); ++i) scopes_.back()[n.targets[i]] = v[i];
        }
        return Flow::kNormal;
      }
      case NodeKind::kBreak:
        return Flow::kBreak;
      case NodeKind::kContinue:
        return Flow::kContinue;
    }
    return Flow::kNormal;
  }

 private:
  Flow render_for(const Node& n, std::string& out) {
    Value seq = eval(*n.expr);
    std::vector<Value> items;
    if (seq.is_array()) {
      for (const auto& v : seq) items.push_back(v);
    } else if (seq.is_object()) {
      for (auto it = seq.begin(); it != seq.end(); ++it) items.push_back(it.key());
    } else if (seq.is_string()) {
      std::vector<uint32_t> cps = code_points(seq.get<std::string>());
      for (size_t i = 0; i < cps.size(); ++i) items.push_back(from_code_points(cps, i, i + 1));
    } else if (!is_undefined(seq) && !seq.is_null()) {
      fail("template error: line {}: '{}' object is not iterable", n.line, type_name(seq));
    }
    auto bind = [&](Value& scope, const Value& item) {
      if (n.targets.size() == 1) {
        scope[n.targets[0]] = item;
      } else {
        if (!item.is_array() || item.size() != n.targets.size())
          fail("template error: line {}: cannot unpack loop item into {} names", n.line,
               n.targets.size());
        for (size_t i = 0; i < n.targets.size(); ++i) scope[n.targets[i]] = item[i];
      }
    };
    if (n.condition) {  // the loop filter runs before loop.* is computed
      std::vector<Value> kept;
      for (const Value& item : items) {
        scopes_.push_back(Value::object());
        bind(scopes_.back(), item);
        bool keep = truthy(eval(*n.condition));
        scopes_.pop_back();
        if (keep) kept.push_back(item);
      }
      items = std::move(kept);
    }
    if (items.empty()) {
      scopes_.push_back(Value::object());
      render(n.else_children, out);
      scopes_.pop_back();
      return Flow::kNormal;
    }
    const int64_t length = static_cast<int64_t>(items.size());
    for (int64_t i = 0; i < length; ++i) {
      scopes_.push_back(Value::object());
      Value& scope = scopes_.back();
      bind(scope, items[i]);
      Value loop = Value::object();
      loop["index0"] = i;
      loop["index"] = i + 1;
      loop["revindex0"] = length - 1 - i;
      loop["revindex"] = length - i;
      loop["first"] = i == 0;
      loop["last"] = i == length - 1;
      loop["length"] = length;
      loop["previtem"] = i > 0 ? items[i - 1] : undefined();
      loop["nextitem"] = i + 1 < length ? items[i + 1] : undefined();
      scope["loop"] = std::move(loop);
      Flow f = render(n.children, out);
      scopes_.pop_back();
      if (f == Flow::kBreak) break;
    }
    return Flow::kNormal;
  }

  Value* lookup(const std::string& name) {
    for (auto it = scopes_.rbegin(); it != scopes_.rend(); ++it) {
      auto found = it->find(name);
      if (found != it->end()) return &*found;
    }
    return nullptr;
  }

  Value eval(const Expr& e) {
    switch (e.kind) {
      case ExprKind::kLiteral:
        return e.value;
      case ExprKind::kName: {
        Value* v = lookup(e.name);
        return v ? *v : undefined();
      }
      case ExprKind::kList: {
        Value list = Value::array();
        for (const auto& a : e.args) list.push_back(eval(*a));
        return list;
      }
      case ExprKind::kDict: {
        Value dict = Value::object();
        for (size_t i = 0; i + 1 < e.args.size(); i += 2) {
          Value k = eval(*e.args[i]);
          dict[k.is_string() ? k.get<std::string>() : py_str(k, false)] = eval(*e.args[i + 1]);
        }
        return dict;
      }
      case ExprKind::kAttr:
        return get_attr(eval(*e.args[0]), e.name, *e.args[0]);
      case ExprKind::kItem:
        return get_item(eval(*e.args[0]), eval(*e.args[1]), *e.args[0]);
      case ExprKind::kSlice:
        return slice(e);
      case ExprKind::kCall:
        return call(e);
      case ExprKind::kFilter:
        return filter(e);
      case ExprKind::kTest: {
        bool r = test(e);
        return e.negated ? !r : r;
      }
      case ExprKind::kUnary: {
        Value v = eval(*e.args[0]);
        if (e.name == "not") return !truthy(v);
        if (!is_num(v))
          fail("template error: bad operand type for unary {}: '{}'", e.name, type_name(v));
        if (e.name == "+") return v;
        if (is_int(v)) return -as_int(v);
        return -as_double(v);
      }
      case ExprKind::kTernary:
        return truthy(eval(*e.args[1])) ? eval(*e.args[0]) : eval(*e.args[2]);
      case ExprKind::kBinary:
        return binary(e);
    }
    return undefined();
  }

  static std::string describe(const Expr& e) {
    if (e.kind == ExprKind::kName) return e.name;
    if (e.kind == ExprKind::kAttr) return describe(*e.args[0]) + "." + e.name;
    if (e.kind == ExprKind::kItem) return describe(*e.args[0]) + "[...]";
    return "value";
  }

  Value get_attr(const Value& obj, const std::string& name, const Expr& obj_expr) {
    if (is_undefined(obj))
      fail("template error: '{}' is undefined (reading attribute '{}')", describe(obj_expr), name);
    if (obj.is_object()) {
      auto it = obj.find(name);
      return it != obj.end() ? *it : undefined();
    }
    if (obj.is_array() && !name.empty() && std::isdigit(static_cast<unsigned char>(name[0]))) {
      return get_item(obj, Value(std::stoll(name)), obj_expr);
    }
    return undefined();
  }

  Value get_item(const Value& obj, const Value& key, const Expr& obj_expr) {
    if (is_undefined(obj))
      fail("template error: '{}' is undefined (subscripted)", describe(obj_expr));
    if (obj.is_object()) {
      if (!key.is_string()) return undefined();
      auto it = obj.find(key.get<std::string>());
      return it != obj.end() ? *it : undefined();
    }
    if ((obj.is_array() || obj.is_string()) && is_int(key)) {
      if (obj.is_string()) {
        std::vector<uint32_t> cps = code_points(obj.get<std::string>());
        int64_t i = as_int(key), n = static_cast<int64_t>(cps.size());
        if (i < 0) i += n;
        if (i < 0 || i >= n) return undefined();
        return from_code_points(cps, static_cast<size_t>(i), static_cast<size_t>(i) + 1);
      }
      int64_t i = as_int(key), n = static_cast<int64_t>(obj.size());
      if (i < 0) i += n;
      if (i < 0 || i >= n) return undefined();
      return obj[static_cast<size_t>(i)];
    }
    if (obj.is_string() || obj.is_array()) {
      if (key.is_string()) return undefined();  // e.g. a method name used without a call
    }
    return undefined();
  }

  Value slice(const Expr& e) {
    Value obj = eval(*e.args[0]);
    auto bound = [&](int k) -> std::optional<int64_t> {
      if (!e.args[k]) return std::nullopt;
      Value v = eval(*e.args[k]);
      if (v.is_null() || is_undefined(v)) return std::nullopt;
      if (!is_int(v)) fail("template error: slice indices must be integers");
      return as_int(v);
    };
    std::optional<int64_t> start = bound(1), stop = bound(2), step_opt = bound(3);
    int64_t step = step_opt.value_or(1);
    if (step == 0) fail("template error: slice step cannot be zero");
    std::vector<uint32_t> cps;
    int64_t n;
    if (obj.is_string()) {
      cps = code_points(obj.get<std::string>());
      n = static_cast<int64_t>(cps.size());
    } else if (obj.is_array()) {
      n = static_cast<int64_t>(obj.size());
    } else {
      fail("template error: '{}' object is not subscriptable", type_name(obj));
    }
    // Python's slice.indices().
    auto norm = [&](std::optional<int64_t> v, int64_t dflt) {
      if (!v) return dflt;
      int64_t x = *v;
      if (x < 0) x += n;
      if (step > 0) return std::clamp<int64_t>(x, 0, n);
      return std::clamp<int64_t>(x, -1, n - 1);
    };
    int64_t b = norm(start, step > 0 ? 0 : n - 1), en = norm(stop, step > 0 ? n : -1);
    std::vector<int64_t> idx;
    for (int64_t i = b; step > 0 ? i < en : i > en; i += step) idx.push_back(i);
    if (obj.is_string()) {
      std::string out;
      for (int64_t i : idx) append_utf8(out, cps[static_cast<size_t>(i)]);
      return out;
    }
    Value out = Value::array();
    for (int64_t i : idx) out.push_back(obj[static_cast<size_t>(i)]);
    return out;
  }

  Value binary(const Expr& e) {
    const std::string& op = e.name;
    if (op == "and") {
      Value a = eval(*e.args[0]);
      return truthy(a) ? eval(*e.args[1]) : a;
    }
    if (op == "or") {
      Value a = eval(*e.args[0]);
      return truthy(a) ? a : eval(*e.args[1]);
    }
    Value a = eval(*e.args[0]);
    Value b = eval(*e.args[1]);
    if (op == "==") return py_equal(a, b);
    if (op == "!=") return !py_equal(a, b);
    if (op == "in" || op == "not in") {
      bool r = contains(b, a);
      return op == "in" ? r : !r;
    }
    if (op == "~") return py_str(a, false) + py_str(b, false);
    if (op == "<" || op == ">" || op == "<=" || op == ">=") {
      int c;
      if (is_num(a) && is_num(b)) {
        double x = as_double(a), y = as_double(b);
        c = x < y ? -1 : x > y ? 1 : 0;
      } else if (a.is_string() && b.is_string()) {
        c = a.get<std::string>().compare(b.get<std::string>());
      } else {
        fail("template error: '{}' not supported between '{}' and '{}'", op, type_name(a),
             type_name(b));
      }
      if (op == "<") return c < 0;
      if (op == ">") return c > 0;
      if (op == "<=") return c <= 0;
      return c >= 0;
    }
    if (op == "+") {
      if (a.is_string() && b.is_string()) return a.get<std::string>() + b.get<std::string>();
      if (a.is_array() && b.is_array()) {
        Value out = a;
        for (const auto& v : b) out.push_back(v);
        return out;
      }
    }
    if (op == "*" && ((a.is_string() && is_int(b)) || (is_int(a) && b.is_string()))) {
      const Value& s = a.is_string() ? a : b;
      int64_t k = a.is_string() ? as_int(b) : as_int(a);
      std::string out;
      for (int64_t i = 0; i < k; ++i) out += s.get<std::string>();
      return out;
    }
    if (op == "%" && a.is_string()) {  // minimal printf-style: each %s / %d takes one value
      std::vector<Value> vals;
      if (b.is_array()) {
        for (const auto& v : b) vals.push_back(v);
      } else {
        vals.push_back(b);
      }
      const std::string& f = a.get_ref<const std::string&>();
      std::string out;
      size_t k = 0;
      for (size_t i = 0; i < f.size(); ++i) {
        if (f[i] == '%' && i + 1 < f.size()) {
          char c = f[++i];
          if (c == '%') {
            out += '%';
          } else if (k < vals.size()) {
            out += py_str(vals[k++], c == 'r');
          }
        } else {
          out += f[i];
        }
      }
      return out;
    }
    if (!is_num(a) || !is_num(b))
      fail("template error: unsupported operand types for {}: '{}' and '{}'", op, type_name(a),
           type_name(b));
    bool ints = is_int(a) && is_int(b);
    if (op == "/") {
      if (as_double(b) == 0) fail("template error: division by zero");
      return as_double(a) / as_double(b);
    }
    if (ints) {
      int64_t x = as_int(a), y = as_int(b);
      if (op == "+") return x + y;
      if (op == "-") return x - y;
      if (op == "*") return x * y;
      if (op == "**") return static_cast<int64_t>(std::llround(std::pow(x, y)));
      if (y == 0) fail("template error: integer division or modulo by zero");
      int64_t q = x / y, r = x % y;
      if (r != 0 && ((r < 0) != (y < 0))) {  // Python floors
        --q;
        r += y;
      }
      return op == "//" ? q : r;
    }
    double x = as_double(a), y = as_double(b);
    if (op == "+") return x + y;
    if (op == "-") return x - y;
    if (op == "*") return x * y;
    if (op == "**") return std::pow(x, y);
    if (y == 0) fail("template error: float division or modulo by zero");
    if (op == "//") return std::floor(x / y);
    double r = std::fmod(x, y);
    if (r != 0 && ((r < 0) != (y < 0))) r += y;
    return r;
  }

  static bool contains(const Value& container, const Value& item) {
    if (container.is_string()) {
      if (!item.is_string()) fail("template error: 'in <string>' requires a string operand");
      return container.get<std::string>().find(item.get<std::string>()) != std::string::npos;
    }
    if (container.is_array()) {
      for (const auto& v : container)
        if (py_equal(v, item)) return true;
      return false;
    }
    if (container.is_object())
      return item.is_string() && container.contains(item.get<std::string>());
    if (is_undefined(container)) fail("template error: 'in' on an undefined value");
    fail("template error: argument of type '{}' is not iterable", type_name(container));
  }

  Value kwarg(const Expr& e, const char* name, size_t pos, Value dflt) {
    for (const auto& [k, v] : e.kwargs)
      if (k == name) return eval(*v);
    if (pos < e.args.size()) return eval(*e.args[pos]);
    return dflt;
  }

  Value call(const Expr& e) {
    const Expr& callee = *e.args[0];
    if (callee.kind == ExprKind::kAttr) return method(e, eval(*callee.args[0]), callee.name);
    if (callee.kind != ExprKind::kName)
      fail("template error: only named functions and methods can be called");
    const std::string& f = callee.name;
    if (f == "raise_exception") {
      Value msg = kwarg(e, "message", 1, "");
      throw UserError("template error: " + py_str(msg, false));
    }
    if (f == "namespace" || f == "dict") {
      Value ns = Value::object();
      if (e.args.size() > 1) {
        Value init = eval(*e.args[1]);
        if (init.is_object()) ns = init;
      }
      for (const auto& [k, v] : e.kwargs) ns[k] = eval(*v);
      return ns;
    }
    if (f == "range") {
      std::vector<int64_t> a;
      for (size_t i = 1; i < e.args.size(); ++i) {
        Value v = eval(*e.args[i]);
        if (!is_int(v)) fail("template error: range() takes integers");
        a.push_back(as_int(v));
      }
      int64_t start = 0, stop = 0, step = 1;
      if (a.size() == 1) {
        stop = a[0];
      } else if (a.size() >= 2) {
        start = a[0];
        stop = a[1];
        if (a.size() == 3) step = a[2];
      }
      if (step == 0) fail("template error: range() step must not be zero");
      Value out = Value::array();
      for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) out.push_back(i);
      return out;
    }
    if (f == "strftime_now")
      fail(
          "template error: strftime_now() is not supported (the "
          "rendering would not be reproducible)");
    Value* v = lookup(f);
    fail("template error: '{}' is {} and cannot be called", f, v ? "not a function" : "undefined");
  }

  Value method(const Expr& e, const Value& obj, const std::string& name) {
    auto arg = [&](size_t i) -> Value {
      return i + 1 < e.args.size() ? eval(*e.args[i + 1]) : undefined();
    };
    if (obj.is_string()) {
      const std::string& s = obj.get_ref<const std::string&>();
      if (name == "strip" || name == "lstrip" || name == "rstrip") {
        Value chars = arg(0);
        std::string cs = chars.is_string() ? chars.get<std::string>() : "";
        return py_strip(s, name != "rstrip", name != "lstrip", chars.is_string() ? &cs : nullptr);
      }
      if (name == "upper" || name == "lower") return ascii_case(s, name == "upper");
      if (name == "title" || name == "capitalize") return title(s, name == "capitalize");
      if (name == "startswith" || name == "endswith") {
        Value p = arg(0);
        std::vector<std::string> prefixes;
        if (p.is_string()) prefixes.push_back(p.get<std::string>());
        if (p.is_array())
          for (const auto& x : p) prefixes.push_back(x.get<std::string>());
        for (const auto& x : prefixes) {
          if (name == "startswith" ? s.starts_with(x) : s.ends_with(x)) return true;
        }
        return false;
      }
      if (name == "split") {
        Value sep = arg(0);
        Value out = Value::array();
        if (!sep.is_string()) {  // whitespace split
          std::string cur;
          for (char c : s) {
            if (std::isspace(static_cast<unsigned char>(c))) {
              if (!cur.empty()) out.push_back(cur);
              cur.clear();
            } else {
              cur += c;
            }
          }
          if (!cur.empty()) out.push_back(cur);
          return out;
        }
        const std::string d = sep.get<std::string>();
        if (d.empty()) fail("template error: empty separator");
        size_t b = 0;
        for (size_t p = s.find(d); p != std::string::npos; p = s.find(d, b)) {
          out.push_back(s.substr(b, p - b));
          b = p + d.size();
        }
        out.push_back(s.substr(b));
        return out;
      }
      if (name == "replace") return replace(s, py_str(arg(0), false), py_str(arg(1), false));
    }
    if (obj.is_object()) {
      if (name == "get") {
        Value k = arg(0);
        if (k.is_string() && obj.contains(k.get<std::string>())) return obj[k.get<std::string>()];
        Value d = arg(1);
        return is_undefined(d) ? Value(nullptr) : d;
      }
      if (name == "items" || name == "keys" || name == "values") {
        Value out = Value::array();
        for (auto it = obj.begin(); it != obj.end(); ++it) {
          if (name == "items") {
            out.push_back(Value::array({it.key(), it.value()}));
          } else if (name == "keys") {
            out.push_back(it.key());
          } else {
            out.push_back(it.value());
          }
        }
        return out;
      }
    }
    fail("template error: '{}' object has no method '{}' supported here", type_name(obj), name);
  }

  static std::string replace(std::string s, const std::string& from, const std::string& to) {
    if (from.empty()) return s;
    std::string out;
    size_t b = 0;
    for (size_t p = s.find(from); p != std::string::npos; p = s.find(from, b)) {
      out += s.substr(b, p - b) + to;
      b = p + from.size();
    }
    return out + s.substr(b);
  }

  static std::string title(const std::string& s, bool capitalize_only) {
    std::string out = capitalize_only ? ascii_case(s, false) : s;
    bool start = true;
    for (char& c : out) {
      bool alpha = std::isalpha(static_cast<unsigned char>(c));
      if (start && alpha)
        c = static_cast<char>(std::toupper(c));
      else if (alpha && !capitalize_only)
        c = static_cast<char>(std::tolower(c));
      if (capitalize_only) {
        start = false;
      } else {
        start = !alpha;
      }
    }
    return out;
  }

  Value filter(const Expr& e) {
    const std::string& f = e.name;
    Value v = eval(*e.args[0]);
    if (f == "default" || f == "d") {
      Value dflt = kwarg(e, "default_value", 1, "");
      bool boolean = truthy(kwarg(e, "boolean", 2, false));
      if (is_undefined(v) || (boolean && !truthy(v))) return dflt;
      return v;
    }
    if (is_undefined(v) && f != "length" && f != "count" && f != "string" && f != "list")
      fail("template error: filter '{}' applied to an undefined value ({})", f,
           describe(*e.args[0]));
    if (f == "trim") {
      Value chars = kwarg(e, "chars", 1, undefined());
      std::string cs = chars.is_string() ? chars.get<std::string>() : "";
      return py_strip(py_str(v, false), true, true, chars.is_string() ? &cs : nullptr);
    }
    if (f == "length" || f == "count") {
      if (v.is_string()) return static_cast<int64_t>(code_points(v.get<std::string>()).size());
      if (v.is_array() || v.is_object()) return static_cast<int64_t>(v.size());
      if (is_undefined(v)) return 0;
      fail("template error: object of type '{}' has no len()", type_name(v));
    }
    if (f == "tojson") {
      Value indent = kwarg(e, "indent", 1, nullptr);
      return python_json_dumps(v, is_int(indent) ? static_cast<int>(as_int(indent)) : -1);
    }
    if (f == "upper" || f == "lower") return ascii_case(py_str(v, false), f == "upper");
    if (f == "capitalize" || f == "title") return title(py_str(v, false), f == "capitalize");
    if (f == "string") return py_str(v, false);
    if (f == "int") {
      if (is_num(v)) return is_int(v) ? as_int(v) : static_cast<int64_t>(as_double(v));
      try {
        return std::stoll(py_str(v, false));
      } catch (...) {
        return 0;
      }
    }
    if (f == "float") return is_num(v) ? as_double(v) : 0.0;
    if (f == "first" || f == "last") {
      if (v.is_array()) return v.empty() ? undefined() : (f == "first" ? v.front() : v.back());
      if (v.is_string()) {
        std::vector<uint32_t> cps = code_points(v.get<std::string>());
        if (cps.empty()) return undefined();
        size_t i = f == "first" ? 0 : cps.size() - 1;
        return from_code_points(cps, i, i + 1);
      }
    }
    if (f == "list") {
      if (v.is_array()) return v;
      Value out = Value::array();
      if (v.is_string()) {
        std::vector<uint32_t> cps = code_points(v.get<std::string>());
        for (size_t i = 0; i < cps.size(); ++i) out.push_back(from_code_points(cps, i, i + 1));
      } else if (v.is_object()) {
        for (auto it = v.begin(); it != v.end(); ++it) out.push_back(it.key());
      }
      return out;
    }
    if (f == "join") {
      std::string sep = py_str(kwarg(e, "d", 1, ""), false);
      Value attr = kwarg(e, "attribute", 2, undefined());
      std::string out;
      bool first = true;
      for (const auto& x : v) {
        if (!first) out += sep;
        first = false;
        out +=
            py_str(attr.is_string() ? get_attr(x, attr.get<std::string>(), *e.args[0]) : x, false);
      }
      return out;
    }
    if (f == "replace")
      return replace(py_str(v, false), py_str(kwarg(e, "old", 1, ""), false),
                     py_str(kwarg(e, "new", 2, ""), false));
    if (f == "items") {
      Value out = Value::array();
      for (auto it = v.begin(); it != v.end(); ++it)
        out.push_back(Value::array({it.key(), it.value()}));
      return out;
    }
    if (f == "selectattr" || f == "rejectattr") {
      if (e.args.size() < 2) fail("template error: {} needs an attribute name", f);
      std::string attr = py_str(eval(*e.args[1]), false);
      Value out = Value::array();
      for (const auto& x : v) {
        Value a = x.is_object() && x.contains(attr) ? x[attr] : undefined();
        bool r;
        if (e.args.size() >= 3) {
          std::string t = py_str(eval(*e.args[2]), false);
          Value arg = e.args.size() >= 4 ? eval(*e.args[3]) : undefined();
          r = apply_test(t, a, arg);
        } else {
          r = truthy(a);
        }
        if (r == (f == "selectattr")) out.push_back(x);
      }
      return out;
    }
    if (f == "map") {
      Value attr = kwarg(e, "attribute", 99, undefined());
      if (!attr.is_string()) fail("template error: only map(attribute=...) is supported");
      Value out = Value::array();
      for (const auto& x : v) {
        out.push_back(x.is_object() && x.contains(attr.get<std::string>())
                          ? x[attr.get<std::string>()]
                          : undefined());
      }
      return out;
    }
    fail("template error: unsupported filter '{}'", f);
  }

  bool apply_test(const std::string& t, const Value& v, const Value& arg) {
    if (t == "defined") return !is_undefined(v);
    if (t == "undefined") return is_undefined(v);
    if (t == "none") return v.is_null();
    if (t == "string") return v.is_string();
    if (t == "number") return v.is_number();
    if (t == "integer") return v.is_number_integer();
    if (t == "float") return v.is_number_float();
    if (t == "boolean") return v.is_boolean();
    if (t == "true") return v.is_boolean() && v.get<bool>();
    if (t == "false") return v.is_boolean() && !v.get<bool>();
    if (t == "mapping") return v.is_object();
    if (t == "sequence") return v.is_array() || v.is_string() || v.is_object();
    if (t == "iterable") return v.is_array() || v.is_string() || v.is_object();
    if (t == "equalto" || t == "eq" || t == "==" || t == "sameas") return py_equal(v, arg);
    if (t == "ne" || t == "!=") return !py_equal(v, arg);
    if (t == "odd" || t == "even") {
      if (!is_int(v)) fail("template error: test '{}' needs an integer", t);
      return (as_int(v) % 2 != 0) == (t == "odd");
    }
    if (t == "divisibleby")
      return is_int(v) && is_int(arg) && as_int(arg) != 0 && as_int(v) % as_int(arg) == 0;
    fail("template error: unsupported test '{}'", t);
  }

  bool test(const Expr& e) {
    Value v = eval(*e.args[0]);
    Value arg = e.args.size() > 1 ? eval(*e.args[1]) : undefined();
    return apply_test(e.name, v, arg);
  }

  std::vector<Value> scopes_;
};

}  // namespace

Template::Template(std::string_view source) {
  // jinja2 normalizes newlines and drops one trailing newline (keep_trailing_newline=False).
  std::string src;
  src.reserve(source.size());
  for (size_t i = 0; i < source.size(); ++i) {
    if (source[i] == '\r') {
      src += '\n';
      if (i + 1 < source.size() && source[i + 1] == '\n') ++i;
    } else {
      src += source[i];
    }
  }
  if (!src.empty() && src.back() == '\n') src.pop_back();
  std::vector<Segment> segs = segment(src);
  apply_whitespace_control(segs, src);
  root_ = std::make_unique<Node>();
  BodyParser parser(std::move(segs));
  std::vector<Tok> end;
  std::string w = parser.parse_body(
      root_->children, {"endif", "endfor", "elif", "else", "endgeneration"}, &end, true);
  if (!w.empty()) fail("chat template: unexpected {{% {} %}}", w);
}

Template::~Template() = default;
Template::Template(Template&&) noexcept = default;
Template& Template::operator=(Template&&) noexcept = default;

std::string Template::render(const Value& context) const {
  Renderer r(context.is_object() ? context : Value::object());
  std::string out;
  r.render(root_->children, out);
  return out;
}

}  // namespace lt::jinja
