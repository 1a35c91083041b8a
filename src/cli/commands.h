// Entry point of the longtune command line and the subcommand table.
#pragma once

namespace lt {

// Parses argv, runs the subcommand, turns UserError into one clear line and exit code 1.
int cli_main(int argc, char** argv, const char* version);

// Subcommands: argv[0] is the subcommand name.
int cmd_train(int argc, char** argv);
int cmd_init(int argc, char** argv);
int cmd_plan(int argc, char** argv);
int cmd_merge(int argc, char** argv);
int cmd_eval(int argc, char** argv);
int cmd_generate(int argc, char** argv);
int cmd_convert(int argc, char** argv);
int cmd_prepare(int argc, char** argv);  // tokenize once into the token cache

}  // namespace lt
