// Flag helpers shared by the subcommands.
#include "cli/flags.h"

#include <algorithm>
#include <cctype>
#include <set>
#include <vector>

#include "cli/config_file.h"
#include "core/error.h"

namespace lt {

CLI::Option* add_bool_flag(CLI::App& app, const std::string& name, bool* target,
                           const std::string& help) {
  auto* opt = app.add_option_function<std::string>(
      name,
      [name, target](const std::string& v) {
        std::string s = v;
        std::transform(s.begin(), s.end(), s.begin(),
                       [](unsigned char c) { return std::tolower(c); });
        if (s.empty() || s == "true" || s == "1" || s == "yes" || s == "on")
          *target = true;
        else if (s == "false" || s == "0" || s == "no" || s == "off")
          *target = false;
        else
          fail("{}: '{}' is not a boolean; use True or False", name, v);
      },
      help);
  // A bare flag (no value) means True: CLI11 2.1 hands a bare option its default_str, so none is
  // set (the callback then sees "") and the default is shown in the help text instead.
  opt->expected(0, 1);
  opt->description(help + (*target ? " (default True)" : " (default False)"));
  return opt;
}

namespace {

// Long flag names (without dashes) of app and its subcommands.
void collect_flag_names(const CLI::App& app, std::set<std::string>* known) {
  for (const CLI::Option* opt : app.get_options())
    for (const auto& n : opt->get_lnames()) known->insert(n);
  for (const CLI::App* sub : app.get_subcommands([](const CLI::App*) { return true; }))
    collect_flag_names(*sub, known);
}

// The option named `name` ("--x") in app or one of its subcommands; null when none.
const CLI::Option* find_option(const CLI::App& app, const std::string& name) {
  if (const CLI::Option* o = app.get_option_no_throw(name)) return o;
  for (const CLI::App* sub : app.get_subcommands([](const CLI::App*) { return true; }))
    if (const CLI::Option* o = find_option(*sub, name)) return o;
  return nullptr;
}

// CLI11's parse errors in longtune's words: a value that does not convert names the flag and
// the kind of value it takes; an unknown flag gets the closest known one.
[[noreturn]] void fail_parse_error(const CLI::App& app, const CLI::ParseError& e,
                                   const std::vector<std::string>& args) {
  const std::string msg = e.what();
  const std::string kConvert = "Could not convert: ";
  if (dynamic_cast<const CLI::ConversionError*>(&e) && msg.rfind(kConvert, 0) == 0) {
    const size_t eq = msg.find(" = ", kConvert.size());
    if (eq != std::string::npos) {
      const std::string name = msg.substr(kConvert.size(), eq - kConvert.size());
      const std::string value = msg.substr(eq + 3);
      const CLI::Option* opt = find_option(app, name);
      const std::string type = opt ? opt->get_type_name() : "";
      const char* kind = type == "FLOAT"  ? "a number (like 2e-5 or 0.1)"
                         : type == "INT"  ? "an integer"
                         : type == "UINT" ? "a non-negative integer"
                                          : "a value of the right kind";
      fail("{}: '{}' is not {}", name, value, kind);
    }
  }
  if (dynamic_cast<const CLI::ExtrasError*>(&e)) {
    std::set<std::string> known;
    collect_flag_names(app, &known);
    for (const std::string& a : args) {
      if (a.rfind("--", 0) != 0) continue;
      const std::string name =
          a.substr(2, a.find('=') == std::string::npos ? std::string::npos : a.find('=') - 2);
      if (!known.count(name))
        fail("unknown flag --{}.{} Run '{} --help' for the list.", name, did_you_mean(name, known),
             app.get_name());
    }
  }
  fail("{}", msg);
}

}  // namespace

bool parse_flags(CLI::App& app, int argc, char** argv) {
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp&) {
    std::fputs(app.help().c_str(), stdout);
    return false;
  } catch (const CLI::ParseError& e) {
    fail_parse_error(app, e, std::vector<std::string>(argv + 1, argv + argc));
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
    fail_parse_error(app, e, args);
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
