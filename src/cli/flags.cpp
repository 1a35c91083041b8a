// Flag helpers shared by the subcommands.
#include "cli/flags.h"

#include <algorithm>
#include <cctype>

#include "cli/config_file.h"
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

CLI::Option* add_ignored_flag(CLI::App& app, const std::string& name, const std::string& why) {
  auto* opt = app.add_option_function<std::string>(
      name,
      [name, why](const std::string&) { fmt::print("note: {} is not used: {}\n", name, why); },
      "accepted, not used: " + why);
  opt->expected(0, 1);
  return opt;
}

bool parse_flags_with_config(CLI::App& app, int argc, char** argv) {
  std::set<std::string> known;
  for (const CLI::Option* opt : app.get_options())
    for (const auto& n : opt->get_lnames()) known.insert(n);
  const std::vector<std::string> args =
      expand_config_flag(std::vector<std::string>(argv + 1, argv + argc), known);
  app.allow_extras();
  // A flag given twice: the last one wins (as argparse, which HF's scripts use).
  for (CLI::Option* opt : app.get_options())
    opt->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  try {
    std::vector<std::string> reversed(args.rbegin(), args.rend());  // CLI11 takes them reversed
    app.parse(reversed);
  } catch (const CLI::CallForHelp&) {
    std::fputs(app.help().c_str(), stdout);
    return false;
  } catch (const CLI::ParseError& e) {
    fail("{}", e.what());
  }
  for (const std::string& extra : app.remaining()) {
    if (extra.rfind("--", 0) == 0) {
      const std::string name = extra.substr(2, extra.find('=') - 2);
      fail("unknown flag --{}.{} Run '{} --help' for the list.", name, did_you_mean(name, known),
           app.get_name());
    }
    fail("unexpected argument '{}' (flags are written --name value)", extra);
  }
  return true;
}

}  // namespace lt
