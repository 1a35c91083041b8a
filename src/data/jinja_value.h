// Python value semantics for the Jinja interpreter: UTF-8 code points, str() / repr(),
// json.dumps, truthiness, equality and the string helpers chat templates call.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "data/jinja.h"

namespace lt::jinja::detail {

uint32_t next_code_point(std::string_view s, size_t& i);  // invalid bytes decode as themselves
void append_utf8(std::string& out, uint32_t cp);
std::vector<uint32_t> code_points(std::string_view s);
std::string from_code_points(const std::vector<uint32_t>& cps, size_t begin, size_t end);

// Python str.strip / lstrip / rstrip (chars null = Unicode whitespace, as str.isspace).
std::string py_strip(std::string_view s, bool left, bool right, const std::string* chars);
std::string ascii_case(std::string_view s, bool upper);  // str.upper / str.lower (see .cpp)

// Undefined (a missing variable, key or index) is a discarded JSON value.
inline bool is_undefined(const Value& v) { return v.is_discarded(); }
inline Value undefined() { return Value(Value::value_t::discarded); }

std::string py_str(const Value& v, bool repr);  // str(v), or repr(v) when repr
void dumps(std::string& out, const Value& v, int indent, int depth);  // json.dumps
bool truthy(const Value& v);
std::string type_name(const Value& v);  // Python's type name, for error messages
inline bool is_int(const Value& v) { return v.is_number_integer() || v.is_boolean(); }
inline int64_t as_int(const Value& v) { return v.is_boolean() ? v.get<bool>() : v.get<int64_t>(); }
inline double as_double(const Value& v) { return v.is_boolean() ? v.get<bool>() : v.get<double>(); }
inline bool is_num(const Value& v) { return v.is_number() || v.is_boolean(); }
bool py_equal(const Value& a, const Value& b);  // Python == (True == 1, 1 == 1.0)

}  // namespace lt::jinja::detail
