// The memory plan: named buffers {name, bytes, category, arena} are listed and summed before
// anything is allocated; each arena is then allocated once and buffers are bound by offset.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

namespace lt {

// What a buffer holds; the planner reports peak memory by these categories.
enum class MemCategory {
  kWeights,      // parameters (trainable and frozen)
  kGradients,    // parameter gradients
  kOptimizer,    // AdamW moments (and master weights where kept apart)
  kCheckpoints,  // per-layer inputs kept for backward (activation checkpoints)
  kActivations,  // other activations kept for backward (no checkpointing)
  kAttention,    // attention outputs, log-sum-exp and their gradients
  kMlpChunk,     // mini-sequence MLP intermediates
  kLmHeadChunk,  // mini-sequence LM head logits and their gradient
  kScratch,      // working buffers reused across layers
};
std::string_view mem_category_name(MemCategory c);

struct BufferPlan {
  std::string name;
  size_t bytes;
  MemCategory category;
  std::string arena;
};

// Bytes are rounded up to this alignment for every buffer.
inline constexpr size_t kArenaAlignment = 64;
inline constexpr size_t kPageSize = 4096;
inline size_t align_up(size_t n) { return (n + kArenaAlignment - 1) & ~(kArenaAlignment - 1); }

class MemoryPlan {
 public:
  void add(std::string name, size_t bytes, MemCategory category, std::string arena);
  const std::vector<BufferPlan>& buffers() const { return buffers_; }
  size_t arena_bytes(const std::string& arena) const;
  size_t category_bytes(MemCategory c) const;
  size_t total_bytes() const;
  std::vector<std::string> arena_names() const;
  // A human-readable table by category and arena.
  std::string describe() const;

 private:
  std::vector<BufferPlan> buffers_;
};

// One allocation, sized from the plan; buffers are handed out in order by name.
// Taking more than was planned is a bug (CHECK names the buffer and the arena).
class Arena {
 public:
  Arena() = default;
  Arena(std::string name, size_t bytes);
  // An arena backed by an unlinked temporary file in `dir` (MAP_SHARED): pages released with
  // release() leave the process's resident memory and live on in the file (activation offload
  // on CPU runs); prefetch() asks the kernel to read them back ahead of use.
  static Arena file_backed(std::string name, size_t bytes, const std::string& dir);
  // An arena over memory allocated elsewhere (a backend's device or pinned host memory,
  // backend/arena.h); `free` gives it back when the arena goes. release / prefetch do nothing.
  static Arena external(std::string name, void* base, size_t bytes,
                        std::function<void(void*)> free);
  ~Arena();
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  Arena(Arena&& o) noexcept;
  Arena& operator=(Arena&& o) noexcept;

  template <typename T>
  T* take(const std::string& buffer, size_t count) {
    return static_cast<T*>(take_bytes(buffer, count * sizeof(T)));
  }
  void* take_bytes(const std::string& buffer, size_t bytes);
  // Releases every buffer taken (the allocation stays).
  void reset() { used_ = 0; }
  // Drops [p, p+bytes) from resident memory (whole pages inside the range); file-backed arenas
  // keep the contents, anonymous ones lose them; external ones are left alone.
  void release(void* p, size_t bytes);
  // Starts reading [p, p+bytes) back in (whole pages covering the range).
  void prefetch(void* p, size_t bytes);
  bool is_file_backed() const { return fd_ >= 0; }
  size_t used() const { return used_; }
  size_t capacity() const { return capacity_; }
  size_t high_water() const { return high_water_; }
  const std::string& name() const { return name_; }

 private:
  std::string name_;
  char* base_ = nullptr;
  size_t capacity_ = 0, used_ = 0, high_water_ = 0;
  int fd_ = -1;
  std::function<void(void*)> free_;  // external arenas
};

// Peak resident set size of this process so far (VmHWM), in bytes.
size_t measured_peak_rss();
// Current resident set size (VmRSS), in bytes.
size_t current_rss();
// Memory this machine can give now without swapping (MemAvailable), in bytes; 0 if unknown.
size_t available_host_memory();
std::string format_bytes(size_t bytes);

}  // namespace lt
