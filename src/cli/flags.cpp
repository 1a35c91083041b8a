// Flag helpers shared by the subcommands.
#include "cli/flags.h"

#include <algorithm>
#include <cctype>

#include "core/error.h"

namespace lt {

CLI::Option* add_bool_flag(CLI::App& app, const std::string& name, bool* target,
                           const std::string& help) {
  auto* opt = app.add_option_function<std::string>(
      name,
      [name, target](const std::string& v) {
        std::string s = v;
        std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
        if (s.empty() || s == "true" || s == "1" || s == "yes" || s == "on") *target = true;
        else if (s == "false" || s == "0" || s == "no" || s == "off") *target = false;
        else fail("{}: '{}' is not a boolean; use True or False", name, v);
      },
      help + (*target ? " (default True)" : " (default False)"));
  // A bare flag (no value) means True. No default_str: CLI11 hands an option's default_str to
  // the callback when the flag comes without a value, which would turn a bare flag into False.
  opt->expected(0, 1);
  return opt;
}

bool parse_flags(CLI::App& app, int argc, char** argv) {
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp&) {
    std::fputs(app.help().c_str(), stdout);
    return false;
  } catch (const CLI::ParseError& e) {
    fail("{}", e.what());
  }
  return true;
}

}  // namespace lt
