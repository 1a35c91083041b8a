// Atomic file output (temporary file, fsync, rename, fsync the directory) and whole-file reads.
#include "io/atomic_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <system_error>

#include "core/error.h"

namespace lt {

namespace fs = std::filesystem;

namespace {
std::string errno_text(int err) { return std::error_code(err, std::generic_category()).message(); }
}  // namespace

AtomicFile::AtomicFile(fs::path target) : target_(std::move(target)) {
  tmp_ = target_;
  tmp_ += ".tmp." + std::to_string(::getpid());
  f_ = std::fopen(tmp_.c_str(), "wb");
  if (!f_) {
    fail("cannot write '{}': cannot create temporary file '{}': {}", target_.string(),
         tmp_.string(), errno_text(errno));
  }
}

AtomicFile::~AtomicFile() {
  if (f_) std::fclose(f_);
  if (!committed_) {
    std::error_code ec;
    fs::remove(tmp_, ec);  // best effort: the target itself was never touched
  }
}

void AtomicFile::write(const void* data, size_t bytes) {
  if (committed_ || !f_) fail("cannot write '{}': file already committed", target_.string());
  if (bytes == 0) return;
  errno = 0;
  if (std::fwrite(data, 1, bytes, f_) != bytes) {
    const int err = errno;
    fail("cannot write '{}' ({} bytes): {}", target_.string(), bytes,
         err ? errno_text(err) : "write error");
  }
}

void AtomicFile::commit() {
  if (committed_ || !f_) fail("cannot write '{}': file already committed", target_.string());
  // fflush reports buffered write errors (ENOSPC often shows up only here), fsync forces the data
  // to the disk before the rename makes it visible under the target name.
  errno = 0;
  if (std::fflush(f_) != 0) {
    const int err = errno;
    fail("cannot write '{}': {}", target_.string(), err ? errno_text(err) : "flush failed");
  }
  if (::fsync(::fileno(f_)) != 0) {
    fail("cannot write '{}': fsync failed: {}", target_.string(), errno_text(errno));
  }
  std::FILE* f = f_;
  f_ = nullptr;
  if (std::fclose(f) != 0) {
    fail("cannot write '{}': close failed: {}", target_.string(), errno_text(errno));
  }
  if (std::rename(tmp_.c_str(), target_.c_str()) != 0) {
    fail("cannot write '{}': rename from '{}' failed: {}", target_.string(), tmp_.string(),
         errno_text(errno));
  }
  committed_ = true;
  fs::path dir = target_.parent_path();
  fsync_dir(dir.empty() ? fs::path(".") : dir);
}

void write_file_atomic(const fs::path& target, std::string_view contents) {
  AtomicFile f(target);
  f.write(contents);
  f.commit();
}

std::string read_file(const fs::path& path) {
  std::error_code ec;
  if (fs::is_directory(path, ec)) fail("cannot read '{}': it is a directory", path.string());
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("cannot read '{}': {}", path.string(), errno_text(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) fail("cannot read '{}': read error", path.string());
  return std::move(ss).str();
}

void fsync_dir(const fs::path& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) fail("cannot open directory '{}' to sync it: {}", dir.string(), errno_text(errno));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  // Some file systems do not support fsync on directories (EINVAL); the rename is still done.
  if (rc != 0 && err != EINVAL) {
    fail("cannot sync directory '{}': {}", dir.string(), errno_text(err));
  }
}

}  // namespace lt
