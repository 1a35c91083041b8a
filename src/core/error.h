// User-facing errors: thrown by library code, caught and printed at the command boundary.
#pragma once
#include <stdexcept>
#include <string>

#include <fmt/format.h>

namespace lt {

// An error the user can act on: a bad file, field, flag or data row. The message names it.
class UserError : public std::runtime_error {
 public:
  explicit UserError(const std::string& msg) : std::runtime_error(msg) {}
};

template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> f, Args&&... args) {
  throw UserError(fmt::format(f, std::forward<Args>(args)...));
}

}  // namespace lt
