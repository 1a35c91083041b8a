// Invariant checks: a broken invariant is a bug, so it aborts with the condition, file and line.
// User errors (files, configs, flags, data) are lt::UserError exceptions instead (error.h).
#pragma once
#include <cstdio>
#include <cstdlib>

#include <fmt/format.h>

namespace lt::detail {
[[noreturn]] inline void check_failed(const char* cond, const char* file, int line,
                                      const std::string& msg) {
  std::fprintf(stderr, "longtune: internal error: CHECK(%s) failed at %s:%d%s%s\n", cond, file,
               line, msg.empty() ? "" : ": ", msg.c_str());
  std::fflush(stderr);
  std::abort();
}
}  // namespace lt::detail

// LT_CHECK(cond) or LT_CHECK(cond, "fmt {}", values...)
#define LT_CHECK(cond, ...)                                                                 \
  do {                                                                                      \
    if (!(cond)) [[unlikely]]                                                               \
      ::lt::detail::check_failed(#cond, __FILE__, __LINE__, ::fmt::format("" __VA_ARGS__)); \
  } while (0)
