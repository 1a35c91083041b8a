// Shared flag helpers for the subcommands: Hugging Face style (`--flag value`, `--flag=value`,
// booleans as True/False), with errors that name the flag and the allowed values.
#pragma once
#include <string>

#include <CLI/CLI.hpp>

namespace lt {

// A boolean option that takes True/False (any case), 1/0, yes/no; bare `--flag` means True.
CLI::Option* add_bool_flag(CLI::App& app, const std::string& name, bool* target,
                           const std::string& help);
// Runs app.parse and turns CLI11 errors into UserError (help: prints and returns false).
bool parse_flags(CLI::App& app, int argc, char** argv);

// A Hugging Face flag that longtune accepts but does not use (so that existing command lines run
// unchanged): its value is ignored and one line says why.
CLI::Option* add_ignored_flag(CLI::App& app, const std::string& name, const std::string& why);
// parse_flags plus `--config FILE` (YAML or JSON; flags on the command line override it) and
// unknown flags reported with the closest known name ("did you mean").
bool parse_flags_with_config(CLI::App& app, int argc, char** argv);

}  // namespace lt
