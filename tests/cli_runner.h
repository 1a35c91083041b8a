// Runs the longtune command line in-process (lt::cli_main) for tests, capturing what it prints.
#pragma once
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "cli/commands.h"

namespace lt::testing {

struct CliResult {
  int rc = 0;
  std::string out, err;
};

// args without the program name, e.g. {"prepare", "--data_path", "x.json"}.
inline CliResult run_cli(std::vector<std::string> args) {
  args.insert(args.begin(), "longtune");
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  ::testing::internal::CaptureStdout();
  ::testing::internal::CaptureStderr();
  CliResult r;
  r.rc = cli_main(static_cast<int>(argv.size()), argv.data(), "test");
  std::fflush(stdout);
  r.out = ::testing::internal::GetCapturedStdout();
  r.err = ::testing::internal::GetCapturedStderr();
  return r;
}

}  // namespace lt::testing
