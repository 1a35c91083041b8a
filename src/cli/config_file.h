// `--config FILE` for the subcommands: a YAML or JSON mapping of flag names to values, turned
// into command-line flags placed before the real ones (a flag given on the command line wins),
// plus "did you mean" suggestions for unknown flags.
#pragma once
#include <filesystem>
#include <set>
#include <string>
#include <string_view>
#include <vector>

namespace lt {

// Reads FILE (.json with nlohmann-json; anything else with yaml-cpp, which also reads JSON):
// a top-level mapping name -> scalar, or list of scalars (joined with ','); null values are
// skipped. Keys may carry leading dashes. Returns {"--name", "value", ...} in file order.
// UserError names the file and the key for anything else (a nested mapping, a bad document).
std::vector<std::string> read_config_flags(const std::filesystem::path& path);

// Replaces `--config FILE` / `--config=FILE` in args with the file's flags, first, leaving out
// those also given in args. Every key must be in known_flags (long names without dashes); an
// unknown one is a UserError naming the file and the closest known flag.
std::vector<std::string> expand_config_flag(const std::vector<std::string>& args,
                                            const std::set<std::string>& known_flags);

// Levenshtein distance (insertions, deletions, substitutions all cost 1).
size_t edit_distance(std::string_view a, std::string_view b);
// " Did you mean --x?" for the closest known flag within a distance of max(2, |name| / 3), or "".
std::string did_you_mean(std::string_view name, const std::set<std::string>& known_flags);

}  // namespace lt
