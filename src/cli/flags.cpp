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
      help);
  // A bare flag (no value) means True: CLI11 2.1 hands a bare option its default_str, so none is
  // set (the callback then sees "") and the default is shown in the help text instead.
  opt->expected(0, 1);
  opt->description(help + (*target ? " (default True)" : " (default False)"));
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
