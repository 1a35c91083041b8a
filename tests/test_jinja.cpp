// Jinja subset interpreter and built-in chat templates against jinja2 / transformers renders
// (tests/fixtures/data/jinja_*.json, written by tools/make_dataset_fixtures.py).
#include <gtest/gtest.h>

#include <fstream>
#include <sstream>

#include "core/error.h"
#include "data/chat_template.h"
#include "data/jinja.h"

namespace lt {
namespace {

jinja::Value load_fixture(const std::string& name) {
  std::ifstream in(std::string(LT_SOURCE_DIR) + "/tests/fixtures/data/" + name);
  EXPECT_TRUE(in.good()) << "missing fixture " << name;
  std::stringstream ss;
  ss << in.rdbuf();
  return jinja::Value::parse(ss.str());
}

// Index of the first differing byte, for readable failures.
size_t first_difference(const std::string& a, const std::string& b) {
  size_t i = 0;
  while (i < a.size() && i < b.size() && a[i] == b[i]) ++i;
  return i;
}

TEST(Jinja, FeaturesMatchJinja2) {
  jinja::Value fixture = load_fixture("jinja_features.json");
  ASSERT_GT(fixture["cases"].size(), 20u);
  for (const auto& c : fixture["cases"]) {
    const std::string tmpl = c["template"];
    SCOPED_TRACE("template: " + tmpl);
    if (c.contains("error")) {
      try {
        jinja::Template(tmpl).render(c["context"]);
        ADD_FAILURE() << "expected an error like: " << c["error"].get<std::string>();
      } catch (const UserError& e) {
        std::string what = e.what();
        EXPECT_EQ(what.rfind("template error", 0), 0u) << what;
        if (tmpl.find("raise_exception") != std::string::npos) {
          EXPECT_EQ(what, "template error: " + c["error"].get<std::string>());
        }
      }
      continue;
    }
    std::string got;
    try {
      got = jinja::Template(tmpl).render(c["context"]);
    } catch (const UserError& e) {
      ADD_FAILURE() << "threw: " << e.what();
      continue;
    }
    const std::string expected = c["expected"];
    EXPECT_EQ(got, expected) << "first difference at byte " << first_difference(got, expected);
  }
}

TEST(Jinja, BuiltinTemplatesAreTheRecordedStrings) {
  jinja::Value fixture = load_fixture("jinja_renders.json");
  std::vector<std::string> names = builtin_chat_template_names();
  EXPECT_EQ(names.size(), fixture["templates"].size());
  for (const std::string& name : names) {
    ASSERT_TRUE(fixture["templates"].contains(name)) << name;
    const std::string* src = builtin_chat_template(name);
    ASSERT_NE(src, nullptr);
    EXPECT_EQ(*src, fixture["templates"][name].get<std::string>()) << name;
  }
  EXPECT_EQ(builtin_chat_template("nope"), nullptr);
}

TEST(Jinja, BuiltinTemplatesRenderAsTransformers) {
  jinja::Value fixture = load_fixture("jinja_renders.json");
  int compared = 0, errors = 0;
  for (const auto& c : fixture["cases"]) {
    const std::string name = c["template"];
    jinja::Template tmpl(*builtin_chat_template(name));
    ChatRenderInput in;
    in.messages = &c["messages"];
    in.add_generation_prompt = c["add_generation_prompt"];
    in.bos_token = fixture["bos_token"];
    in.eos_token = fixture["eos_token"];
    SCOPED_TRACE(name + " messages=" + c["messages"].dump() +
                 " add_generation_prompt=" + c["add_generation_prompt"].dump());
    if (c.contains("error")) {
      ++errors;
      try {
        render_chat(tmpl, in);
        ADD_FAILURE() << "expected: " << c["error"].get<std::string>();
      } catch (const UserError& e) {
        std::string what = e.what();
        // raise_exception messages must match; other jinja2 errors (undefined access) only
        // need to be errors.
        if (what.find("must alternate") != std::string::npos ||
            what.find("Only user") != std::string::npos) {
          EXPECT_EQ(what, "template error: " + c["error"].get<std::string>());
        }
      }
      continue;
    }
    std::string got = render_chat(tmpl, in);
    const std::string expected = c["expected"];
    EXPECT_EQ(got, expected) << "first difference at byte " << first_difference(got, expected);
    ++compared;
  }
  EXPECT_GT(compared, 80);
  EXPECT_GT(errors, 0);
}

TEST(Jinja, SyntaxErrorsAreUserErrors) {
  EXPECT_THROW(jinja::Template("{% if x %}no end"), UserError);
  EXPECT_THROW(jinja::Template("{{ x + }}"), UserError);
  EXPECT_THROW(jinja::Template("{% macro m() %}{% endmacro %}"), UserError);
  EXPECT_THROW(jinja::Template("{{ 'unterminated }}"), UserError);
  EXPECT_THROW(jinja::Template("{% endfor %}"), UserError);
  EXPECT_THROW(jinja::Template("{{ x"), UserError);
  EXPECT_EQ(jinja::Template("{{ x }}").render(jinja::Value::object()), "");  // undefined
}

TEST(Jinja, PythonJsonDumps) {
  jinja::Value v = jinja::Value::parse(R"({"z": 1, "a": [true, null, 1.5, "é\u0001"]})");
  EXPECT_EQ(jinja::python_json_dumps(v), R"({"z": 1, "a": [true, null, 1.5, "é\u0001"]})");
  EXPECT_EQ(jinja::python_json_dumps(v, 1),
            "{\n \"z\": 1,\n \"a\": [\n  true,\n  null,\n  1.5,\n  \"é\\u0001\"\n ]\n}");
}

}  // namespace
}  // namespace lt
