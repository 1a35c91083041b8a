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

}  // namespace lt
