// Entry point of the longtune command line and the subcommand table.
#pragma once

namespace lt {

// Parses argv, runs the subcommand, turns UserError into one clear line and exit code 1.
int cli_main(int argc, char** argv, const char* version);

}  // namespace lt
