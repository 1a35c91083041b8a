// Memory plan bookkeeping, arenas and process memory readings.
#include "core/memory.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <set>

#include "core/check.h"
#include "core/error.h"

namespace lt {

std::string_view mem_category_name(MemCategory c) {
  switch (c) {
    case MemCategory::kWeights:
      return "weights";
    case MemCategory::kGradients:
      return "gradients";
    case MemCategory::kOptimizer:
      return "optimizer state";
    case MemCategory::kCheckpoints:
      return "checkpoints";
    case MemCategory::kActivations:
      return "activations";
    case MemCategory::kAttention:
      return "attention";
    case MemCategory::kMlpChunk:
      return "MLP chunks";
    case MemCategory::kLmHeadChunk:
      return "LM-head chunks";
    case MemCategory::kScratch:
      return "scratch";
  }
  return "?";
}

void MemoryPlan::add(std::string name, size_t bytes, MemCategory category, std::string arena) {
  buffers_.push_back({std::move(name), align_up(bytes), category, std::move(arena)});
}

size_t MemoryPlan::arena_bytes(const std::string& arena) const {
  size_t s = 0;
  for (auto& b : buffers_)
    if (b.arena == arena) s += b.bytes;
  return s;
}

size_t MemoryPlan::category_bytes(MemCategory c) const {
  size_t s = 0;
  for (auto& b : buffers_)
    if (b.category == c) s += b.bytes;
  return s;
}

size_t MemoryPlan::total_bytes() const {
  size_t s = 0;
  for (auto& b : buffers_) s += b.bytes;
  return s;
}

std::vector<std::string> MemoryPlan::arena_names() const {
  std::vector<std::string> names;
  for (auto& b : buffers_)
    if (std::find(names.begin(), names.end(), b.arena) == names.end()) names.push_back(b.arena);
  return names;
}

std::string MemoryPlan::describe() const {
  std::string s = "memory plan:\n";
  for (int c = 0; c <= static_cast<int>(MemCategory::kScratch); ++c) {
    size_t bytes = category_bytes(static_cast<MemCategory>(c));
    if (bytes)
      s += fmt::format("  {:<16} {:>12}\n", mem_category_name(static_cast<MemCategory>(c)),
                       format_bytes(bytes));
  }
  s += fmt::format("  {:<16} {:>12}\n", "total", format_bytes(total_bytes()));
  s += "  arenas:";
  for (auto& a : arena_names()) s += fmt::format(" {}={}", a, format_bytes(arena_bytes(a)));
  return s;
}

Arena::Arena(std::string name, size_t bytes) : name_(std::move(name)), capacity_(bytes) {
  if (bytes == 0) return;
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED)
    fail("out of memory: arena '{}' needs {} ({} bytes); see the memory plan above", name_,
         format_bytes(bytes), bytes);
  base_ = static_cast<char*>(p);
}

Arena Arena::file_backed(std::string name, size_t bytes, const std::string& dir) {
  Arena a;
  a.name_ = std::move(name);
  a.capacity_ = bytes;
  if (bytes == 0) return a;
  std::string tmpl = (dir.empty() ? std::string("/tmp") : dir) + "/longtune-offload-XXXXXX";
  a.fd_ = mkstemp(tmpl.data());
  if (a.fd_ < 0)
    fail("activation offload: cannot create a file in '{}': {}", dir, std::strerror(errno));
  unlink(tmpl.c_str());  // the file lives as long as the mapping
  if (ftruncate(a.fd_, static_cast<off_t>(bytes)) != 0)
    fail("activation offload: cannot size the file in '{}' to {}: {}", dir, format_bytes(bytes),
         std::strerror(errno));
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, a.fd_, 0);
  if (p == MAP_FAILED)
    fail("activation offload: cannot map {} in '{}': {}", format_bytes(bytes), dir,
         std::strerror(errno));
  a.base_ = static_cast<char*>(p);
  return a;
}

Arena Arena::external(std::string name, void* base, size_t bytes, std::function<void(void*)> free) {
  Arena a;
  a.name_ = std::move(name);
  a.capacity_ = bytes;
  a.base_ = static_cast<char*>(base);
  a.free_ = std::move(free);
  return a;
}

Arena::~Arena() {
  if (free_) {
    if (base_) free_(base_);
  } else if (base_) {
    munmap(base_, capacity_);
  }
  if (fd_ >= 0) close(fd_);
}

void Arena::release(void* p, size_t bytes) {
  if (free_) return;
  auto start = (reinterpret_cast<uintptr_t>(p) + kPageSize - 1) & ~(kPageSize - 1);
  auto end = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kPageSize - 1);
  if (end > start) madvise(reinterpret_cast<void*>(start), end - start, MADV_DONTNEED);
}

void Arena::prefetch(void* p, size_t bytes) {
  if (free_) return;
  auto start = reinterpret_cast<uintptr_t>(p) & ~(kPageSize - 1);
  auto end = reinterpret_cast<uintptr_t>(p) + bytes;
  if (end > start) madvise(reinterpret_cast<void*>(start), end - start, MADV_WILLNEED);
}

Arena::Arena(Arena&& o) noexcept { *this = std::move(o); }

Arena& Arena::operator=(Arena&& o) noexcept {
  if (this != &o) {
    if (free_) {
      if (base_) free_(base_);
    } else if (base_) {
      munmap(base_, capacity_);
    }
    free_ = std::move(o.free_);
    o.free_ = nullptr;
    name_ = std::move(o.name_);
    if (fd_ >= 0) close(fd_);
    base_ = o.base_;
    fd_ = o.fd_;
    o.fd_ = -1;
    capacity_ = o.capacity_;
    used_ = o.used_;
    high_water_ = o.high_water_;
    o.base_ = nullptr;
    o.capacity_ = o.used_ = o.high_water_ = 0;
  }
  return *this;
}

void* Arena::take_bytes(const std::string& buffer, size_t bytes) {
  bytes = align_up(bytes);
  LT_CHECK(used_ + bytes <= capacity_,
           "arena '{}' has {} of {} bytes used; buffer '{}' needs {} more than was planned", name_,
           used_, capacity_, buffer, used_ + bytes - capacity_);
  void* p = base_ + used_;
  used_ += bytes;
  high_water_ = std::max(high_water_, used_);
  return p;
}

namespace {
size_t read_kb(const char* file, const char* key) {
  std::ifstream f(file);
  std::string line;
  size_t n = std::strlen(key);
  while (std::getline(f, line))
    if (line.compare(0, n, key) == 0) return std::stoull(line.substr(n + 1)) * 1024;
  return 0;
}
}  // namespace

size_t measured_peak_rss() { return read_kb("/proc/self/status", "VmHWM"); }
size_t current_rss() { return read_kb("/proc/self/status", "VmRSS"); }
size_t available_host_memory() { return read_kb("/proc/meminfo", "MemAvailable"); }

std::string format_bytes(size_t b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(b);
  int u = 0;
  while (v >= 1024 && u < 4) v /= 1024, ++u;
  return u == 0 ? fmt::format("{} B", b) : fmt::format("{:.2f} {}", v, units[u]);
}

}  // namespace lt
