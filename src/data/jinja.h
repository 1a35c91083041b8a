// A Jinja2 subset interpreter for chat templates, rendering exactly as transformers'
// apply_chat_template environment does (trim_blocks, lstrip_blocks, Python value semantics).
#pragma once
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

namespace lt::jinja {

// Values are JSON with insertion-ordered objects (Python dicts keep insertion order, and
// tojson / str() of a dict must print keys in that order).
using Value = nlohmann::ordered_json;

struct Node;

// Supported: {{ }}, {% if/elif/else %}, {% for x in xs %} (tuple targets, loop.*, else, inline
// `if` filter, break/continue), {% set %} (names and namespace attributes), {% generation %},
// comments, whitespace control ({%- -%}, {%+), trim_blocks and lstrip_blocks; expressions
// with literals, lists, dicts, subscripts, slices, attributes, + - * / // % ~, comparisons,
// in / not in, is [not] tests, and/or/not, `a if c else b`, filters (trim, length, count,
// tojson, upper, lower, default/d, first, last, join, list, string, int, float, capitalize,
// title, replace, items, selectattr, rejectattr, map(attribute=)), string and
// dict methods (strip, lstrip, rstrip, startswith, endswith, split, upper, lower, title,
// replace, get, items, keys, values), globals raise_exception, namespace, range.
// Not supported (UserError when met): macros, call blocks, includes, filter blocks.
class Template {
 public:
  // UserError on a syntax error, naming the template line.
  explicit Template(std::string_view source);
  ~Template();
  Template(Template&&) noexcept;
  Template& operator=(Template&&) noexcept;

  // context: an object whose keys are the template's variables. UserError on
  // raise_exception(msg) (message "template error: msg") and on type errors.
  std::string render(const Value& context) const;

 private:
  std::unique_ptr<Node> root_;
};

// Python's json.dumps(value, ensure_ascii=False, indent=indent) (indent < 0: no indent), as
// transformers' tojson filter. Keys in insertion order.
std::string python_json_dumps(const Value& value, int indent = -1);

}  // namespace lt::jinja
