// The CUDA emulator of emu.h: fibers, the block scheduler, warp collectives, mma.sync, guarded
// memory and the fault handler that names the emulated thread.
#include "emu.h"

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>

// Fibers are Boost.Context's (fcontext: a switch saves a few registers and makes no system call,
// unlike glibc's swapcontext, which also saves the signal mask).
#include <boost/context/fiber.hpp>

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

namespace lt::cuda_emu {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = 256 << 10;
// Shared memory mapping: the largest allowed request, rounded to pages, then a guard page.
constexpr size_t kSharedMapBytes = (kMaxSharedBytes + 4095) / 4096 * 4096;
// Static shared memory (`__shared__` arrays): CUDA's 48 KiB, then a guard page.
constexpr size_t kStaticSharedBytes = 48 << 10;
constexpr uint32_t kCanary = 0x7fc0dea1u;  // a quiet NaN with a recognisable payload

size_t page_bytes() {
  static const size_t page = size_t(sysconf(_SC_PAGESIZE));
  return page;
}
size_t round_up_to_page(size_t bytes) {
  return (bytes + page_bytes() - 1) / page_bytes() * page_bytes();
}

// An anonymous mapping of `bytes` (rounded to pages) with an inaccessible page below it (a
// stack: it grows down) or above it.
class Mapping {
 public:
  enum class Guard { kBelow, kAbove };
  Mapping() = default;
  Mapping(size_t bytes, Guard guard) : bytes_(round_up_to_page(bytes)) {
    const size_t total = bytes_ + page_bytes();
    void* p = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("cuda_emu: mmap failed");
    base_ = static_cast<unsigned char*>(p);
    guard_ = guard == Guard::kBelow ? base_ : base_ + bytes_;
    mprotect(guard_, page_bytes(), PROT_NONE);
  }
  ~Mapping() {
    if (base_) munmap(base_, bytes_ + page_bytes());
  }
  Mapping(Mapping&& o) noexcept { *this = std::move(o); }
  Mapping& operator=(Mapping&& o) noexcept {
    std::swap(base_, o.base_);
    std::swap(bytes_, o.bytes_);
    std::swap(guard_, o.guard_);
    return *this;
  }
  unsigned char* begin() const { return guard_ == base_ ? base_ + page_bytes() : base_; }
  unsigned char* end() const { return begin() + bytes_; }
  bool guard_contains(const void* p) const {
    const auto* b = static_cast<const unsigned char*>(p);
    return guard_ && b >= guard_ && b < guard_ + page_bytes();
  }

 private:
  unsigned char* base_ = nullptr;
  size_t bytes_ = 0;
  unsigned char* guard_ = nullptr;
};

// ---- Fiber contexts ---------------------------------------------------------------------------

namespace bctx = boost::context;

// An emulated thread's two continuations: `thread`, held by the scheduler while the thread is
// suspended (empty once it has returned), and `scheduler`, held by the running thread.
// Destroying a suspended thread (a launch that failed) unwinds its stack.
struct Context {
  bctx::fiber thread;
  bctx::fiber scheduler;
};
// The emulator's stacks (with their guard pages) outlive the fibers that run on them.
struct KeptStack {
  bctx::stack_context allocate() { std::abort(); }
  void deallocate(bctx::stack_context&) noexcept {}
};
template <typename Entry>
void make_context(Context& c, unsigned char* begin, unsigned char* end, Entry entry) {
  bctx::stack_context sc;
  sc.size = size_t(end - begin);
  sc.sp = end;
  c.thread = bctx::fiber(std::allocator_arg, bctx::preallocated(end, sc.size, sc), KeptStack{},
                         std::move(entry));
}

// ---- Emulator state ---------------------------------------------------------------------------

enum class State { kRunnable, kAtWarpBarrier, kAtBlockBarrier, kExited, kFailed };
enum class WarpOp { kSyncwarp, kShuffle, kMma };

const char* warp_op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kSyncwarp:
      return "__syncwarp";
    case WarpOp::kShuffle:
      return "__shfl_xor_sync";
    case WarpOp::kMma:
      return "mma.sync";
  }
  return "?";
}

struct Fiber {
  Context context;
  State state = State::kExited;
  bool or_barrier = false;  // waiting at __syncthreads_or (not __syncthreads)
  bool vote = false;
  int vote_result = 0;
  WarpOp warp_op = WarpOp::kSyncwarp;  // the collective it waits at
  uint64_t warp_ops = 0;               // collectives done; the parity picks the exchange slot
};

// Operands of a warp's collectives, double-buffered by the parity of the collective's index: a
// lane that runs ahead to the next collective does not overwrite what slower lanes still read.
struct WarpExchange {
  uint64_t value[2][kWarp];
  uint64_t shuffle_id[2][kWarp];  // 1 + the index of the collective that wrote value
  uint32_t a[2][kWarp][4];
  uint32_t b[2][kWarp][2];
};

// One launch at a time (CUDA's built-ins are global; so is this state).
struct Emulator {
  Schedule schedule = Schedule::kInOrder;
  std::vector<Fiber> fibers;
  std::vector<Mapping> stacks;  // kept across launches
  std::vector<WarpExchange> warps;
  Mapping shared{kSharedMapBytes, Mapping::Guard::kAbove};
  unsigned char* shared_data = nullptr;  // this launch's dynamic shared memory
  size_t shared_bytes = 0;
  // Static shared arrays, allocated downwards from the guard page at a kernel's first use.
  Mapping static_shared{kStaticSharedBytes, Mapping::Guard::kAbove};
  std::vector<std::pair<std::string, size_t>> static_arrays;  // key, offset below end()
  size_t static_used = 0;
  int current = -1;  // the running fiber
  const std::function<void()>* body = nullptr;
  const char* kernel = nullptr;
  bool in_launch = false;
  std::string failure;
};

// Never destroyed: a failed launch's suspended fibers would unwind on stacks already unmapped.
Emulator& emu() {
  static auto* e = new Emulator;
  return *e;
}
Fiber& self() { return emu().fibers[size_t(emu().current)]; }
// The running thread's linear index in its block (x fastest), which warps are cut from.
int linear_thread() { return emu().current; }

std::string where() {
  char buf[160];
  snprintf(buf, sizeof buf, "%s, block (%u,%u,%u)", emu().kernel, blockIdx.x, blockIdx.y,
           blockIdx.z);
  return buf;
}

// Hands control back to the scheduler in state s; returns when the scheduler resumes it.
void yield_as(State s) {
  Fiber& f = self();
  f.state = s;
  f.context.scheduler = std::move(f.context.scheduler).resume();
}

// Stops the launch from inside a fiber (the scheduler throws EmulationError with message).
[[noreturn]] void fail(const std::string& message) {
  emu().failure = where() + ", thread " + std::to_string(linear_thread()) + ": " + message;
  yield_as(State::kFailed);
  abort();  // a failed fiber is never resumed (destroying it unwinds it from yield_as)
}

bctx::fiber fiber_entry(bctx::fiber&& scheduler) {
  self().context.scheduler = std::move(scheduler);
  (*emu().body)();
  Fiber& f = self();
  f.state = State::kExited;
  return std::move(f.context.scheduler);
}

void warp_barrier(WarpOp op) {
  Fiber& f = self();
  f.warp_op = op;
  yield_as(State::kAtWarpBarrier);
  ++f.warp_ops;
}

void check_member_mask(unsigned mask, const char* what) {
  if (mask != 0xffffffffu) fail(std::string(what) + " with a partial member mask (not emulated)");
}

// ---- Scheduler --------------------------------------------------------------------------------

const char* state_name(const Fiber& f) {
  switch (f.state) {
    case State::kRunnable:
      return "runnable";
    case State::kAtWarpBarrier:
      return warp_op_name(f.warp_op);
    case State::kAtBlockBarrier:
      return f.or_barrier ? "__syncthreads_or" : "__syncthreads";
    case State::kExited:
      return "exited";
    case State::kFailed:
      return "failed";
  }
  return "?";
}

// "threads 0-63 __syncthreads, 64-127 mma.sync": where each thread of the block is.
std::string describe_threads() {
  const auto& fibers = emu().fibers;
  std::string s = "threads";
  for (size_t i = 0; i < fibers.size();) {
    size_t j = i;
    while (j + 1 < fibers.size() && std::string(state_name(fibers[j + 1])) == state_name(fibers[i]))
      ++j;
    s += (i ? ", " : " ") + std::to_string(i) + (j > i ? "-" + std::to_string(j) : "") + " " +
         state_name(fibers[i]);
    i = j + 1;
  }
  return s;
}

[[noreturn]] void throw_error(const std::string& what) {
  throw EmulationError("cuda_emu: " + where() + ": " + what);
}

void resume(int i) {
  Emulator& e = emu();
  e.current = i;
  const unsigned u = unsigned(i);
  threadIdx = {u % blockDim.x, u / blockDim.x % blockDim.y, u / blockDim.x / blockDim.y};
  Context& c = e.fibers[size_t(i)].context;
  c.thread = std::move(c.thread).resume();
  if (e.fibers[size_t(i)].state == State::kFailed) throw EmulationError("cuda_emu: " + e.failure);
}

// Releases warp w's barrier if every lane that has not exited waits at it; false if not.
bool release_warp_barrier(int w) {
  Fiber* lanes = &emu().fibers[size_t(w) * kWarp];
  const Fiber* first = nullptr;
  bool exited = false;
  for (int l = 0; l < kWarp; ++l) {
    if (lanes[l].state == State::kExited) {
      exited = true;
    } else if (lanes[l].state != State::kAtWarpBarrier) {
      return false;
    } else if (!first) {
      first = &lanes[l];
    }
  }
  if (!first) return false;
  for (int l = 0; l < kWarp; ++l) {
    const Fiber& f = lanes[l];
    if (f.state != State::kAtWarpBarrier) continue;
    if (f.warp_op != first->warp_op || f.warp_ops != first->warp_ops) {
      throw_error("divergent warp " + std::to_string(w) +
                  ": lanes meet at different collectives (" + describe_threads() + ")");
    }
  }
  if (first->warp_op == WarpOp::kMma && exited)
    throw_error("mma.sync.aligned in warp " + std::to_string(w) + " without every lane (" +
                describe_threads() + ")");
  for (int l = 0; l < kWarp; ++l)
    if (lanes[l].state == State::kAtWarpBarrier) lanes[l].state = State::kRunnable;
  return true;
}

// Runs warp w's lanes until each waits at a block barrier or has exited (one_turn: until its
// first warp barrier is released). Whether anything ran.
bool run_warp(int w, bool one_turn, bool reversed_lanes, bool rotated_lanes) {
  Emulator& e = emu();
  bool progressed = false;
  for (;;) {
    for (int l = 0; l < kWarp; ++l) {
      int lane = reversed_lanes ? kWarp - 1 - l : l;
      if (rotated_lanes) lane = (lane + kWarp / 2) % kWarp;
      const int i = w * kWarp + lane;
      if (e.fibers[size_t(i)].state == State::kRunnable) {
        resume(i);
        progressed = true;
      }
    }
    if (!release_warp_barrier(w)) return progressed;
    progressed = true;
    if (one_turn) return true;
  }
}

void release_block_barrier() {
  auto& fibers = emu().fibers;
  int vote = 0, plain = 0, with_or = 0;
  for (const Fiber& f : fibers) {
    if (f.state != State::kAtBlockBarrier) continue;
    vote |= f.vote;
    (f.or_barrier ? with_or : plain) += 1;
  }
  if (plain && with_or) {
    throw_error("__syncthreads and __syncthreads_or meet at one barrier (" + describe_threads() +
                ")");
  }
  for (Fiber& f : fibers) {
    if (f.state != State::kAtBlockBarrier) continue;
    f.vote_result = vote;
    f.state = State::kRunnable;
  }
}

void run_block() {
  Emulator& e = emu();
  const int threads = int(e.fibers.size()), warps = threads / kWarp;
  // Shared memory: NaN garbage; its unused tail (alignment) is checked for stray stores.
  std::memset(e.shared_data, 0xff, size_t(e.shared.end() - e.shared_data));
  std::memset(e.static_shared.end() - e.static_used, 0xff, e.static_used);
  for (int i = 0; i < threads; ++i) {
    Fiber& f = e.fibers[size_t(i)];
    f = Fiber{};
    f.state = State::kRunnable;
    make_context(f.context, e.stacks[size_t(i)].begin(), e.stacks[size_t(i)].end(), fiber_entry);
  }
  std::vector<int> order(static_cast<size_t>(warps));
  for (int i = 0; i < warps; ++i) {
    switch (e.schedule) {
      case Schedule::kInOrder:
        order[size_t(i)] = i;
        break;
      case Schedule::kReversed:
        order[size_t(i)] = warps - 1 - i;
        break;
      case Schedule::kInterleaved:
        order[size_t(i)] = (i ^ 1) < warps ? i ^ 1 : i;  // pairs swapped
        break;
    }
  }
  const bool interleaved = e.schedule == Schedule::kInterleaved;
  for (;;) {
    bool progressed = false;
    for (int w : order)
      progressed |= run_warp(w, interleaved, e.schedule == Schedule::kReversed, interleaved);
    bool all_exited = true, all_waiting = true;
    for (const Fiber& f : e.fibers) {
      all_exited &= f.state == State::kExited;
      all_waiting &= f.state == State::kExited || f.state == State::kAtBlockBarrier;
    }
    if (all_exited) break;
    if (all_waiting) {
      release_block_barrier();
      continue;
    }
    if (!progressed) throw_error("deadlock: " + describe_threads());
  }
  for (const unsigned char* p = e.shared_data + e.shared_bytes; p < e.shared.end(); ++p) {
    if (*p != 0xff) {
      throw_error("a store past the end of dynamic shared memory (byte " +
                  std::to_string(p - e.shared_data) + " of " + std::to_string(e.shared_bytes) +
                  ")");
    }
  }
}

// ---- Memory faults ----------------------------------------------------------------------------

void on_fault(int sig, siginfo_t* info, void*) {
  Emulator& e = emu();
  const void* addr = info->si_addr;
  if (e.in_launch) {
    const char* what = "past the end of a DeviceArray (its guard page) or a wild pointer";
    if (e.shared.guard_contains(addr)) what = "past the end of dynamic shared memory";
    if (e.static_shared.guard_contains(addr)) what = "past the end of a static __shared__ array";
    for (const Mapping& s : e.stacks)
      if (s.guard_contains(addr)) what = "a fiber stack overflow";
    char buf[400];
    const int n = snprintf(buf, sizeof buf,
                           "cuda_emu: %s, block (%u,%u,%u), thread %d: invalid access at %p (%s)\n",
                           e.kernel, blockIdx.x, blockIdx.y, blockIdx.z, e.current, addr, what);
    if (n > 0) (void)!write(2, buf, size_t(std::min(n, int(sizeof buf) - 1)));
  } else if (const char* what = detail::host_access_fault(addr)) {
    (void)!write(2, what, std::strlen(what));
  }
  // Returning faults again, now with the default action (the process ends).
  signal(sig, SIG_DFL);
}

}  // namespace

void detail::install_fault_handler() {
  static bool installed = false;
  if (installed) return;
  installed = true;
  // The handler runs on its own stack: a fiber's may be the one that overflowed.
  static std::vector<unsigned char> alt(size_t(64) << 10);
  stack_t ss{};
  ss.ss_sp = alt.data();
  ss.ss_size = alt.size();
  sigaltstack(&ss, nullptr);
  struct sigaction sa {};
  sa.sa_sigaction = on_fault;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, nullptr);
  sigaction(SIGBUS, &sa, nullptr);
}

// ---- Public functions -------------------------------------------------------------------------

const char* schedule_name(Schedule schedule) {
  switch (schedule) {
    case Schedule::kInOrder:
      return "InOrder";
    case Schedule::kReversed:
      return "Reversed";
    case Schedule::kInterleaved:
      return "Interleaved";
  }
  return "?";
}

void set_schedule(Schedule schedule) { emu().schedule = schedule; }

void launch(const char* kernel, dim3 grid, dim3 block, size_t shared_bytes,
            const std::function<void()>& body) {
  Emulator& e = emu();
  e.kernel = kernel;
  blockIdx = {0, 0, 0};
  const uint64_t block_threads = uint64_t(block.x) * block.y * block.z;
  if (block_threads == 0 || block_threads % kWarp || block_threads > kMaxThreads)
    throw_error("block (" + std::to_string(block.x) + "," + std::to_string(block.y) + "," +
                std::to_string(block.z) + ") does not have a multiple of 32 threads <= 1024");
  if (shared_bytes > kMaxSharedBytes)
    throw_error(std::to_string(shared_bytes) + " bytes of shared memory, over the " +
                std::to_string(kMaxSharedBytes) + " of sm_80");
  detail::install_fault_handler();
  const int threads = int(block_threads);
  e.fibers.clear();  // a failed launch's suspended threads unwind here
  e.fibers.resize(size_t(threads));
  while (int(e.stacks.size()) < threads) e.stacks.emplace_back(kStackBytes, Mapping::Guard::kBelow);
  e.warps.assign(size_t(threads / kWarp), WarpExchange{});
  // CUDA aligns dynamic shared memory (16 bytes at least); the rest up to the guard page is
  // checked after each block.
  e.shared_bytes = shared_bytes;
  e.shared_data = reinterpret_cast<unsigned char*>(
      reinterpret_cast<uintptr_t>(e.shared.end() - shared_bytes) & ~uintptr_t(15));
  e.body = &body;
  std::memset(e.static_shared.begin(), 0xff, kStaticSharedBytes);
  e.static_arrays.clear();
  e.static_used = 0;
  blockDim = block;
  gridDim = grid;
  const bool reversed = e.schedule == Schedule::kReversed;
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  e.in_launch = true;
  try {
    for (uint64_t n = 0; n < blocks; ++n) {
      const uint64_t id = reversed ? blocks - 1 - n : n;
      blockIdx = {unsigned(id % grid.x), unsigned(id / grid.x % grid.y),
                  unsigned(id / grid.x / grid.y)};
      run_block();
    }
  } catch (...) {
    e.in_launch = false;
    throw;
  }
  e.in_launch = false;
}

unsigned char* dynamic_shared() { return emu().shared_data; }

void* static_shared(const char* key, size_t bytes, size_t align) {
  Emulator& e = emu();
  for (const auto& [k, offset] : e.static_arrays)
    if (k == key) return e.static_shared.end() - offset;
  const size_t offset = (e.static_used + bytes + align - 1) / align * align;
  if (offset > kStaticSharedBytes)
    fail(std::string("static __shared__ arrays over 48 KiB (at ") + key + ")");
  e.static_arrays.emplace_back(key, offset);
  e.static_used = offset;
  return e.static_shared.end() - offset;
}

void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  Emulator& e = emu();
  Fiber& f = self();
  const int lane = linear_thread() % kWarp;
  WarpExchange& x = e.warps[size_t(linear_thread() / kWarp)];
  const int slot = int(f.warp_ops & 1);
  for (int i = 0; i < 4; ++i) x.a[slot][lane][i] = a[i];
  x.b[slot][lane][0] = b0;
  x.b[slot][lane][1] = b1;
  warp_barrier(WarpOp::kMma);
  // PTX ISA, "Matrix Fragments for mma.m16n8k16" (bf16), with g = lane / 4, t = lane % 4:
  //   A (16x16): register i holds row g + 8 (i & 1), columns 2t + 8 (i >> 1) + {0, 1};
  //   B (16x8):  register i holds rows (k) 2t + 8 i + {0, 1}, column (n) g;
  //   C, D:      element e is row g + 8 (e >> 1), column 2t + (e & 1);
  // the lower-indexed bf16 of a pair in the low 16 bits.
  auto half = [](uint32_t word, int k) {
    return double(__bfloat162float({uint16_t(k & 1 ? word >> 16 : word & 0xffff)}));
  };
  const int g = lane / 4, t = lane % 4;
  float out[4];
  for (int el = 0; el < 4; ++el) {
    const int row = g + 8 * (el >> 1), col = 2 * t + (el & 1);
    double acc = d[el];
    for (int k = 0; k < 16; ++k) {
      const uint32_t aw = x.a[slot][4 * (row % 8) + (k % 8) / 2][row / 8 + 2 * (k / 8)];
      const uint32_t bw = x.b[slot][4 * col + (k % 8) / 2][k / 8];
      acc += half(aw, k) * half(bw, k);
    }
    out[el] = float(acc);
  }
  for (int el = 0; el < 4; ++el) d[el] = out[el];
}

namespace detail {

int block_barrier(bool is_or, int vote) {
  Fiber& f = self();
  f.or_barrier = is_or;
  f.vote = vote != 0;
  yield_as(State::kAtBlockBarrier);
  return f.vote_result;
}

void syncwarp(unsigned member_mask) {
  check_member_mask(member_mask, "__syncwarp");
  warp_barrier(WarpOp::kSyncwarp);
}

void shfl_xor(void* value, size_t bytes, int lane_mask, unsigned member_mask, int width) {
  check_member_mask(member_mask, "__shfl_xor_sync");
  if (width != kWarp || lane_mask < 0 || lane_mask >= kWarp)
    fail("__shfl_xor_sync with width " + std::to_string(width) + ", lane mask " +
         std::to_string(lane_mask) + " (not emulated)");
  Emulator& e = emu();
  Fiber& f = self();
  const int lane = linear_thread() % kWarp, warp = linear_thread() / kWarp;
  WarpExchange& x = e.warps[size_t(warp)];
  const int slot = int(f.warp_ops & 1), source = lane ^ lane_mask;
  const uint64_t id = f.warp_ops + 1;
  std::memcpy(&x.value[slot][lane], value, bytes);
  x.shuffle_id[slot][lane] = id;
  warp_barrier(WarpOp::kShuffle);
  if (x.shuffle_id[slot][source] != id)
    fail("__shfl_xor_sync reads lane " + std::to_string(source) + ", which exited before it");
  std::memcpy(value, &x.value[slot][source], bytes);
}

}  // namespace detail

// ---- Guarded memory ---------------------------------------------------------------------------

GuardedBytes::GuardedBytes(size_t bytes) {
  // [base_, data_) canary (at least kCanaryBytes), [data_, data_ + bytes) data, then the guard.
  const size_t span = round_up_to_page(bytes + kCanaryBytes);
  mapped_ = span + page_bytes();
  void* p = mmap(nullptr, mapped_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::runtime_error("cuda_emu: mmap failed");
  base_ = static_cast<unsigned char*>(p);
  mprotect(base_ + span, page_bytes(), PROT_NONE);
  data_ = base_ + span - bytes;
  for (unsigned char* c = base_; c < data_; ++c)
    *c = static_cast<unsigned char>(kCanary >> (8 * (size_t(c - base_) % 4)));
  detail::note_device_memory(data_, bytes, true);
}

GuardedBytes::~GuardedBytes() {
  detail::note_device_memory(data_, 0, false);
  munmap(base_, mapped_);
}

void GuardedBytes::make_read_only() { mprotect(base_, mapped_ - page_bytes(), PROT_READ); }

void GuardedBytes::set_accessible(bool accessible) {
  mprotect(base_, mapped_ - page_bytes(), accessible ? PROT_READ | PROT_WRITE : PROT_NONE);
}

bool GuardedBytes::contains(const void* p) const {
  const auto* b = static_cast<const unsigned char*>(p);
  return b >= base_ && b < base_ + mapped_;
}

bool GuardedBytes::canary_intact() const {
  for (const unsigned char* c = base_; c < data_; ++c)
    if (*c != static_cast<unsigned char>(kCanary >> (8 * (size_t(c - base_) % 4)))) return false;
  return true;
}

}  // namespace lt::cuda_emu
