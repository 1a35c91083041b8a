// Atomic file output: write to a temporary file beside the target, fsync, rename, fsync the
// directory. A crash or a full disk never leaves a target that looks complete but is not.
#pragma once
#include <cstdio>
#include <filesystem>
#include <string_view>

namespace lt {

class AtomicFile {
 public:
  explicit AtomicFile(std::filesystem::path target);
  ~AtomicFile();  // removes the temporary file if commit() was not reached
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  // UserError (naming the target) on any write error, e.g. a full disk.
  void write(const void* data, size_t bytes);
  void write(std::string_view s) { write(s.data(), s.size()); }
  // Flush, fsync, rename over the target, fsync the directory.
  void commit();

 private:
  std::filesystem::path target_, tmp_;
  std::FILE* f_ = nullptr;
  bool committed_ = false;
};

void write_file_atomic(const std::filesystem::path& target, std::string_view contents);
std::string read_file(const std::filesystem::path& path);  // UserError if unreadable
// fsync a directory so that renames inside it are durable.
void fsync_dir(const std::filesystem::path& dir);

}  // namespace lt
