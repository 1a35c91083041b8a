// Subcommand dispatch for the longtune command.
#include "cli/commands.h"

#include <algorithm>
#include <cstdio>
#include <exception>
#include <new>
#include <string>
#include <string_view>

#include <fmt/format.h>

#include "backend/cuda_module.h"
#include "cli/cmd_tokenize.h"
#include "cli/config_file.h"
#include "core/error.h"

namespace lt {

namespace {
void print_usage() {
  std::fputs(
      "usage: longtune <command> [flags]\n"
      "commands:\n"
      "  train       fine-tune a Hugging Face model (longtune train --help)\n"
      "  prepare     tokenize a data set once into the cache train reuses (--dump: as JSONL)\n"
      "  plan        predict peak memory and the longest sequence within a budget\n"
      "  tokenize    JSON array of strings on stdin -> JSON array of id lists (--decode: back)\n"
      "  init        create a randomly initialised model folder of a named shape\n"
      "  merge       merge a LoRA adapter into its base model (longtune merge --help)\n"
      "  eval        evaluation loss and perplexity of a model on a data set\n"
      "  generate    generate text from a model folder (longtune generate --help)\n"
      "  convert     convert a checkpoint to a model folder (longtune convert llama2c --help)\n"
      "  --version   print the version and the backends that were built\n",
      stdout);
}

std::string backends_built() { return cuda_module_built() ? "cpu, cuda" : "cpu"; }
}  // namespace

int cli_main(int argc, char** argv, const char* version) {
  try {
    if (argc < 2) {
      print_usage();
      return 2;
    }
    std::string_view cmd = argv[1];
    if (cmd == "--version" || cmd == "version") {
      fmt::print("longtune {} (backends: {})\n", version, backends_built());
      return 0;
    }
    if (cmd == "--help" || cmd == "-h" || cmd == "help") {
      print_usage();
      return 0;
    }
    struct Command {
      std::string_view name;
      int (*run)(int, char**);
    };
    static constexpr Command kCommands[] = {
        {"train", cmd_train},       {"init", cmd_init},   {"plan", cmd_plan},
        {"tokenize", cmd_tokenize}, {"merge", cmd_merge}, {"eval", cmd_eval},
        {"generate", cmd_generate}, {"convert", cmd_convert}, {"prepare", cmd_prepare}};
    for (const auto& c : kCommands)
      if (c.name == cmd) return c.run(argc - 1, argv + 1);
    std::string closest;
    size_t best = std::max<size_t>(2, cmd.size() / 3) + 1;
    for (const auto& c : kCommands)
      if (const size_t d = edit_distance(cmd, c.name); d < best) best = d, closest = c.name;
    fail("unknown command '{}'{}; run 'longtune --help' for the list", cmd,
         closest.empty() ? "" : fmt::format(" (did you mean '{}'?)", closest));
  } catch (const UserError& e) {
    std::fflush(stdout);  // notes printed before the error stay before it
    fmt::print(stderr, "longtune: error: {}\n", e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    std::fflush(stdout);
    fmt::print(stderr, "longtune: error: out of memory (an allocation failed)\n");
    return 1;
  } catch (const std::exception& e) {
    // Not a UserError (a filesystem or library error): still one line and exit code 1.
    std::fflush(stdout);
    fmt::print(stderr, "longtune: error: {}\n", e.what());
    return 1;
  }
}

}  // namespace lt
