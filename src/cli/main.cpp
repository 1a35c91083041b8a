// The longtune command: subcommands are registered from src/cli/commands.h.
#include <cstdio>
#include <string>

#include "cli/commands.h"

int main(int argc, char** argv) { return lt::cli_main(argc, argv, LONGTUNE_VERSION); }
