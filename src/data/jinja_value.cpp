// Python value semantics for the Jinja interpreter (see jinja_value.h).
#include "data/jinja_value.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

namespace lt::jinja::detail {

// ---------------------------------------------------------------- UTF-8 and Python strings

// Decodes one code point at s[i] (advancing i); invalid bytes decode as themselves.
uint32_t next_code_point(std::string_view s, size_t& i) {
  unsigned char c = s[i];
  int n = c < 0x80 ? 0 : (c >> 5) == 6 ? 1 : (c >> 4) == 14 ? 2 : (c >> 3) == 30 ? 3 : -1;
  if (n <= 0 || i + n >= s.size()) {
    ++i;
    return c;
  }
  uint32_t cp = c & (0x3f >> n);
  for (int k = 1; k <= n; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3f);
  i += n + 1;
  return cp;
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xc0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xe0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  } else {
    out += static_cast<char>(0xf0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3f));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  }
}

std::vector<uint32_t> code_points(std::string_view s) {
  std::vector<uint32_t> out;
  for (size_t i = 0; i < s.size();) out.push_back(next_code_point(s, i));
  return out;
}

std::string from_code_points(const std::vector<uint32_t>& cps, size_t begin, size_t end) {
  std::string out;
  for (size_t i = begin; i < end; ++i) append_utf8(out, cps[i]);
  return out;
}

// Python str.isspace() for one code point.
bool py_isspace(uint32_t c) {
  return (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x20) || c == 0x85 || c == 0xa0 ||
         c == 0x1680 || (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 || c == 0x202f ||
         c == 0x205f || c == 0x3000;
}

// Python str.strip / lstrip / rstrip (chars empty = whitespace).
std::string py_strip(std::string_view s, bool left, bool right, const std::string* chars) {
  std::vector<uint32_t> cps = code_points(s);
  std::vector<uint32_t> set;
  if (chars) set = code_points(*chars);
  auto strip_it = [&](uint32_t c) {
    return chars ? std::find(set.begin(), set.end(), c) != set.end() : py_isspace(c);
  };
  size_t b = 0, e = cps.size();
  if (left)
    while (b < e && strip_it(cps[b])) ++b;
  if (right)
    while (e > b && strip_it(cps[e - 1])) --e;
  return from_code_points(cps, b, e);
}

// Python str.upper / str.lower for ASCII, Latin-1, Latin Extended-A, Greek and Cyrillic
// (the scripts chat data meets in practice); other code points are left unchanged.
uint32_t change_case(uint32_t c, bool upper) {
  auto in = [&](uint32_t lo, uint32_t hi) { return c >= lo && c <= hi; };
  if (upper) {
    if (in('a', 'z') || (in(0xe0, 0xfe) && c != 0xf7) || (in(0x3b1, 0x3c9) && c != 0x3c2) ||
        in(0x430, 0x44f))
      return c - 0x20;
    if (in(0x450, 0x45f)) return c - 0x50;
    if (in(0x100, 0x17f) && c % 2 == 1 && c != 0x131 && c != 0x138 && !in(0x139, 0x148) &&
        !in(0x179, 0x17e))
      return c - 1;
    if ((in(0x139, 0x148) || in(0x179, 0x17e)) && c % 2 == 0) return c - 1;
  } else {
    if (in('A', 'Z') || (in(0xc0, 0xde) && c != 0xd7) || (in(0x391, 0x3a9) && c != 0x3a2) ||
        in(0x410, 0x42f))
      return c + 0x20;
    if (in(0x400, 0x40f)) return c + 0x50;
    if (in(0x100, 0x17f) && c % 2 == 0 && c != 0x130 && c != 0x138 && !in(0x139, 0x148) &&
        !in(0x179, 0x17e))
      return c + 1;
    if ((in(0x139, 0x148) || in(0x179, 0x17e)) && c % 2 == 1) return c + 1;
  }
  return c;
}

std::string ascii_case(std::string_view s, bool upper) {
  std::string out;
  for (size_t i = 0; i < s.size();) append_utf8(out, change_case(next_code_point(s, i), upper));
  return out;
}

// Python repr of a string: single quotes unless it holds ' and no ".
std::string py_repr_string(const std::string& s) {
  char q = (s.find('\'') != std::string::npos && s.find('"') == std::string::npos) ? '"' : '\'';
  std::string out(1, q);
  for (char c : s) {
    if (c == q || c == '\\') {
      out += '\\';
      out += c;
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c == '\t') {
      out += "\\t";
    } else if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) {
      out += fmt::format("\\x{:02x}", static_cast<unsigned char>(c));
    } else {
      out += c;
    }
  }
  out += q;
  return out;
}

// Python repr(float).
std::string py_float(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
  std::string s = fmt::format("{}", d);
  if (s.find_first_of(".en") == std::string::npos) s += ".0";
  return s;
}

std::string py_str(const Value& v, bool repr) {
  switch (v.type()) {
    case Value::value_t::string:
      return repr ? py_repr_string(v.get<std::string>()) : v.get<std::string>();
    case Value::value_t::boolean:
      return v.get<bool>() ? "True" : "False";
    case Value::value_t::null:
      return "None";
    case Value::value_t::number_integer:
      return std::to_string(v.get<int64_t>());
    case Value::value_t::number_unsigned:
      return std::to_string(v.get<uint64_t>());
    case Value::value_t::number_float:
      return py_float(v.get<double>());
    case Value::value_t::discarded:
      return "";
    case Value::value_t::array: {
      std::string out = "[";
      for (size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + py_str(v[i], true);
      return out + "]";
    }
    case Value::value_t::object: {
      std::string out = "{";
      bool first = true;
      for (auto it = v.begin(); it != v.end(); ++it) {
        out += (first ? "" : ", ") + py_repr_string(it.key()) + ": " + py_str(it.value(), true);
        first = false;
      }
      return out + "}";
    }
    default:
      return "";
  }
}

void json_string(std::string& out, const std::string& s) {
  out += '"';
  for (char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\f':
        out += "\\f";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          out += fmt::format("\\u{:04x}", static_cast<unsigned char>(c));
        } else {
          out += c;
        }
    }
  }
  out += '"';
}

void dumps(std::string& out, const Value& v, int indent, int depth) {
  auto newline = [&](int d) {
    if (indent >= 0) {
      out += '\n';
      out += std::string(static_cast<size_t>(indent * d), ' ');
    }
  };
  const char* item_sep = indent >= 0 ? "," : ", ";
  switch (v.type()) {
    case Value::value_t::string:
      json_string(out, v.get<std::string>());
      return;
    case Value::value_t::boolean:
      out += v.get<bool>() ? "true" : "false";
      return;
    case Value::value_t::null:
    case Value::value_t::discarded:
      out += "null";
      return;
    case Value::value_t::number_float: {
      double d = v.get<double>();
      out += std::isnan(d)   ? "NaN"
             : std::isinf(d) ? (d > 0 ? "Infinity" : "-Infinity")
                             : py_float(d);
      return;
    }
    case Value::value_t::array:
      if (v.empty()) {
        out += "[]";
        return;
      }
      out += '[';
      for (size_t i = 0; i < v.size(); ++i) {
        if (i) out += item_sep;
        newline(depth + 1);
        dumps(out, v[i], indent, depth + 1);
      }
      newline(depth);
      out += ']';
      return;
    case Value::value_t::object: {
      if (v.empty()) {
        out += "{}";
        return;
      }
      out += '{';
      bool first = true;
      for (auto it = v.begin(); it != v.end(); ++it) {
        if (!first) out += item_sep;
        first = false;
        newline(depth + 1);
        json_string(out, it.key());
        out += ": ";
        dumps(out, it.value(), indent, depth + 1);
      }
      newline(depth);
      out += '}';
      return;
    }
    default:
      out += v.dump();
      return;
  }
}

bool truthy(const Value& v) {
  switch (v.type()) {
    case Value::value_t::null:
    case Value::value_t::discarded:
      return false;
    case Value::value_t::boolean:
      return v.get<bool>();
    case Value::value_t::number_integer:
    case Value::value_t::number_unsigned:
      return v.get<int64_t>() != 0;
    case Value::value_t::number_float:
      return v.get<double>() != 0.0;
    case Value::value_t::string:
      return !v.get_ref<const std::string&>().empty();
    case Value::value_t::array:
    case Value::value_t::object:
      return !v.empty();
    default:
      return true;
  }
}

std::string type_name(const Value& v) {
  switch (v.type()) {
    case Value::value_t::null:
      return "NoneType";
    case Value::value_t::discarded:
      return "Undefined";
    case Value::value_t::boolean:
      return "bool";
    case Value::value_t::number_integer:
    case Value::value_t::number_unsigned:
      return "int";
    case Value::value_t::number_float:
      return "float";
    case Value::value_t::string:
      return "str";
    case Value::value_t::array:
      return "list";
    case Value::value_t::object:
      return "dict";
    default:
      return "object";
  }
}

// Python == (True == 1, 1 == 1.0; Undefined equals only Undefined).
bool py_equal(const Value& a, const Value& b) {
  if (is_undefined(a) || is_undefined(b)) return is_undefined(a) && is_undefined(b);
  if (is_num(a) && is_num(b)) {
    if (is_int(a) && is_int(b)) return as_int(a) == as_int(b);
    return as_double(a) == as_double(b);
  }
  if (a.type() != b.type()) return false;
  if (a.is_array()) {
    if (a.size() != b.size()) return false;
    for (size_t i = 0; i < a.size(); ++i)
      if (!py_equal(a[i], b[i])) return false;
    return true;
  }
  return a == b;
}

}  // namespace lt::jinja::detail

namespace lt::jinja {

std::string python_json_dumps(const Value& value, int indent) {
  std::string out;
  detail::dumps(out, value, indent, 0);
  return out;
}

}  // namespace lt::jinja
