// SIGINT / SIGTERM during training: the first one asks the loop to stop after the current step
// (it then saves a checkpoint); a second one ends the process at once (default action).
#pragma once
#include <csignal>

namespace lt {

class StopSignalGuard {
 public:
  StopSignalGuard();   // installs the handlers
  ~StopSignalGuard();  // restores the previous ones
  StopSignalGuard(const StopSignalGuard&) = delete;
  StopSignalGuard& operator=(const StopSignalGuard&) = delete;
  // The signal received (SIGINT or SIGTERM), or 0.
  static int requested();

 private:
  struct sigaction old_int_ {
  }, old_term_{};
};

}  // namespace lt
