// `longtune tokenize`: stdin JSON array of strings -> stdout JSON array of id lists, or with
// --decode, an array of id lists -> an array of strings.
#include "cli/cmd_tokenize.h"

#include <CLI/CLI.hpp>
#include <iostream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/error.h"
#include "data/tokenizer.h"

namespace lt {

namespace {
// "--add_special_tokens" alone means true; "True"/"False"/"1"/"0" are also accepted.
bool parse_bool_flag(const std::string& flag, const std::string& value) {
  if (value.empty() || value == "true" || value == "True" || value == "1") return true;
  if (value == "false" || value == "False" || value == "0") return false;
  fail("flag {}: '{}' is not True or False", flag, value);
}
}  // namespace

int cmd_tokenize(int argc, char** argv) {
  CLI::App app("Tokenize a JSON array of strings read from stdin (or decode id lists)",
               "longtune tokenize");
  std::string tokenizer_path, add_special, skip_special;
  bool decode = false;
  app.add_option("--tokenizer", tokenizer_path, "tokenizer.json or a model folder")->required();
  app.add_option("--add_special_tokens", add_special,
                 "apply the post-processor (BOS/EOS); bare flag means True")
      ->expected(0, 1);
  app.add_option("--skip_special_tokens", skip_special, "with --decode: drop special tokens")
      ->expected(0, 1);
  app.add_flag("--decode", decode, "read id lists and print decoded strings");
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    fail("tokenize: {}", e.what());
  }
  // A bare flag leaves the option with an empty value when given.
  bool add = app.count("--add_special_tokens")
                 ? parse_bool_flag("--add_special_tokens", add_special)
                 : false;
  bool skip = app.count("--skip_special_tokens")
                  ? parse_bool_flag("--skip_special_tokens", skip_special)
                  : false;

  auto tokenizer = Tokenizer::load(tokenizer_path);
  std::string input((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
  nlohmann::json in;
  try {
    in = nlohmann::json::parse(input);
  } catch (const nlohmann::json::exception& e) {  // parse_error, or a number overflow
    fail("tokenize: stdin is not valid JSON: {}", e.what());
  }
  if (!in.is_array()) fail("tokenize: stdin must be a JSON array");
  nlohmann::json out = nlohmann::json::array();
  for (size_t k = 0; k < in.size(); ++k) {
    const auto& item = in[k];
    if (!decode) {
      if (!item.is_string()) fail("tokenize: stdin element {} is not a string", k);
      out.push_back(tokenizer->encode(item.get_ref<const std::string&>(), add));
      continue;
    }
    if (!item.is_array()) fail("tokenize --decode: stdin element {} is not an array of ids", k);
    std::vector<int32_t> ids;
    for (const auto& id : item) {
      if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > INT32_MAX)
        fail("tokenize --decode: element {} holds a non-id value {}", k, id.dump());
      ids.push_back(id.get<int32_t>());
    }
    out.push_back(tokenizer->decode(ids, skip));
  }
  std::cout << out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
  return 0;
}

}  // namespace lt
