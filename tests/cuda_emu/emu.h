// CPU emulation of the part of CUDA that src/backend/cuda/*.cu use, so that their kernels run
// unchanged where there is no GPU: tools/emulate_cuda_kernel.py rewrites the kernel files,
// launchers included, and cuda_backend.cpp into sources built on emu_runtime.h (the runtime:
// memory, streams, events) and this header (test_attention_emu.cpp and test_kernels_emu.cpp run
// the launchers against double and CPU references; liblongtune_cuda_emu.so is the whole backend).
//
// Emulated:
//  - A thread block: every CUDA thread is a fiber with its own stack (its registers), switched
//    cooperatively; blocks of a grid run one after another. Blocks may be 2-D or 3-D (warps are
//    cut from the linear thread index, x fastest, as on the GPU).
//  - Static `__shared__` arrays (the generator makes them static_shared() calls): one per block,
//    NaN garbage at the start of every block, the first one ending at a guard page.
//  - Barriers: __syncthreads and __syncthreads_or are block barriers (threads that exited count
//    as arrived); __syncwarp, __shfl_xor_sync and mma.sync are warp barriers (exited lanes
//    count as arrived, except for mma.sync.aligned, which needs the whole warp). Lanes at
//    different collectives, a block barrier that can never complete, a shuffle from an exited
//    lane or a partial member mask are errors (EmulationError names kernel, block and threads).
//  - Schedules: the order in which warps, and lanes within a warp, run between barriers. Under
//    kInOrder and kReversed a warp runs to its next block barrier before the next warp starts;
//    under kInterleaved the warps take turns between warp barriers. A missing barrier shows as a
//    wrong result under at least one of them (shared memory starts as NaN garbage).
//  - Memory errors: dynamic shared memory (0xff bytes, NaN as bf16 or f32, before every block)
//    ends at an inaccessible page, as do global buffers (DeviceArray, which also starts after
//    NaN canary bytes, and can be made read-only); a fault names the emulated thread.
//  - mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 from the PTX ISA's fragment tables
//    (not from the kernel's comments), products summed in double; bf16 rounding to nearest even.
//
// Not emulated:
//  - The memory model: a store is visible to every thread at once (no reordering, no caches),
//    so a missing __threadfence or volatile is not found.
//  - Concurrency between blocks: they run in sequence (reversed under kReversed), atomics are
//    plain read-modify-writes, inter-block races cannot happen.
//  - Lockstep: lanes run one at a time between warp barriers, so a race between lanes of one
//    warp shows only where the schedules' lane orders expose it. Collectives are matched by kind
//    and count, not by call site (nor are barriers).
//  - Hardware arithmetic (__expf is expf; cosf, sinf, expf are the host libm's; the tensor
//    core's accumulation order and rounding; nvcc's contraction of a * b + c into an FMA, which
//    the emulated sources, built with -ffp-contract=off, never do), timing, occupancy, bank
//    conflicts, launch bounds. The host API is emu_runtime.h's. An intrinsic not defined here
//    does not compile.
#pragma once

#include <algorithm>
#include <bit>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <ostream>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "core/dtype.h"

// ---------------------------------------------------------------------------------------------
// CUDA keywords and built-ins, in the global namespace as in CUDA.

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__ __restrict

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
// The running thread's coordinates, set by the scheduler before it resumes a thread.
extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;
inline constexpr int warpSize = 32;

// Device code calls min, max and isnan unqualified (CUDA's overloads).
using std::isnan;
using std::max;
using std::min;

struct alignas(8) float2 {
  float x, y;
};

struct __nv_bfloat16 {
  uint16_t bits;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;  // x in the low half when read as 32 bits
};
static_assert(sizeof(__nv_bfloat162) == 4);

// Round to nearest even, NaN stays a quiet NaN: the rounding core/dtype.h defines (the
// conformance suite checks it against arithmetic rounding, and the GPU against it).
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {lt::f32_to_bf16(f)}; }
inline float __bfloat162float(__nv_bfloat16 b) { return lt::bf16_to_f32(b.bits); }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
inline float __expf(float x) { return std::exp(x); }

// Arithmetic rounded after every operation (the _rn intrinsics are never fused by nvcc; the host
// compiler must not fuse either: -ffp-contract=off).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline unsigned __float_as_uint(float f) { return std::bit_cast<unsigned>(f); }
inline float __uint_as_float(unsigned u) { return std::bit_cast<float>(u); }

namespace lt::cuda_emu {

// The order in which the scheduler runs warps and lanes between barriers (see the top).
enum class Schedule {
  kInOrder,      // warps 0, 1, ..., lanes 0..31, each warp to its next block barrier
  kReversed,     // warps and lanes (and blocks) in reverse order
  kInterleaved,  // warps 1, 0, 3, 2, ..., lanes 16..31 then 0..15, turns between warp barriers
};
inline constexpr Schedule kSchedules[] = {Schedule::kInOrder, Schedule::kReversed,
                                          Schedule::kInterleaved};
const char* schedule_name(Schedule schedule);
inline std::ostream& operator<<(std::ostream& os, Schedule s) { return os << schedule_name(s); }
// The schedule of the launches that follow (kInOrder until set).
void set_schedule(Schedule schedule);

// The opt-in dynamic shared memory per block of sm_80, the smaller of the architectures built.
inline constexpr size_t kMaxSharedBytes = 163 * 1024;

// A kernel broke a rule of the execution model (see the top); the launch stops.
class EmulationError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Runs body (a kernel call) on every thread of every block: grid (x, y, z) blocks of
// block.x * block.y * block.z threads (a multiple of 32, at most 1024) with shared_bytes of
// dynamic shared memory. kernel names it in messages. Throws EmulationError; a memory fault ends
// the process with a message.
void launch(const char* kernel, dim3 grid, dim3 block, size_t shared_bytes,
            const std::function<void()>& body);

// The running block's dynamic shared memory (`extern __shared__` in the generated header).
unsigned char* dynamic_shared();
// The running block's static `__shared__` array named key (unique per declaration): bytes with
// align, the same for every thread of the launch, NaN garbage at the start of each block.
void* static_shared(const char* key, size_t bytes, size_t align);

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 d, a, b, d for the calling lane: d (16x8
// f32) += a (16x16 bf16, row-major) * b (16x8 bf16, column-major), fragments per the PTX ISA.
void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

namespace detail {
// Block barrier of the calling thread; returns the OR of the votes of the threads that met.
int block_barrier(bool is_or, int vote);
void syncwarp(unsigned member_mask);
// value (bytes <= 8) becomes that of lane (this lane ^ lane_mask).
void shfl_xor(void* value, size_t bytes, int lane_mask, unsigned member_mask, int width);
}  // namespace detail

namespace detail {
// Registers [p, p + bytes) as device memory, or unregisters it (emu_runtime.cpp).
void note_device_memory(const void* p, size_t bytes, bool add);
// The fault handler (installed at the first launch or device allocation).
void install_fault_handler();
// A message when addr lies in device memory the host may not touch now (emu_runtime.cpp), for
// the fault handler; null otherwise.
const char* host_access_fault(const void* addr);
}  // namespace detail

// Device memory (emu_runtime.h's copies check it): bytes of memory that end at an inaccessible
// page and start after at least kCanaryBytes of NaN-pattern canary (reads before the start see
// NaN; canary_intact() finds writes there).
class GuardedBytes {
 public:
  static constexpr size_t kCanaryBytes = 256;
  explicit GuardedBytes(size_t bytes);
  ~GuardedBytes();
  GuardedBytes(const GuardedBytes&) = delete;
  GuardedBytes& operator=(const GuardedBytes&) = delete;
  void* data() const { return data_; }
  // From now on a store faults (inputs of a kernel).
  void make_read_only();
  // Every access faults (false) or none does (true): device memory outside stream operations.
  void set_accessible(bool accessible);
  bool contains(const void* p) const;
  bool canary_intact() const;

 private:
  unsigned char* base_ = nullptr;  // the mapping: canary, data, guard page
  size_t mapped_ = 0;
  unsigned char* data_ = nullptr;
};

// A global-memory buffer of n elements of T in GuardedBytes.
template <typename T>
class DeviceArray {
 public:
  static_assert(std::is_trivially_copyable_v<T>);
  DeviceArray(int64_t n, T fill) : memory_(size_t(n) * sizeof(T)), n_(n) {
    std::fill_n(data(), n, fill);
  }
  explicit DeviceArray(const std::vector<T>& init) : memory_(init.size() * sizeof(T)) {
    n_ = int64_t(init.size());
    if (n_) std::memcpy(data(), init.data(), init.size() * sizeof(T));
  }
  T* data() const { return static_cast<T*>(memory_.data()); }
  int64_t size() const { return n_; }
  std::vector<T> to_vector() const { return std::vector<T>(data(), data() + n_); }
  void make_read_only() { memory_.make_read_only(); }
  bool canary_intact() const { return memory_.canary_intact(); }

 private:
  GuardedBytes memory_;
  int64_t n_ = 0;
};

}  // namespace lt::cuda_emu

// ---------------------------------------------------------------------------------------------
// Synchronisation intrinsics (CUDA's names and signatures).

inline void __syncthreads() { lt::cuda_emu::detail::block_barrier(false, 0); }
inline int __syncthreads_or(int predicate) {
  return lt::cuda_emu::detail::block_barrier(true, predicate != 0);
}
inline void __syncwarp(unsigned mask = 0xffffffffu) { lt::cuda_emu::detail::syncwarp(mask); }
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = warpSize) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8);
  lt::cuda_emu::detail::shfl_xor(&value, sizeof(T), lane_mask, mask, width);
  return value;
}
// Fibers never preempt each other and blocks run in sequence: a plain update is atomic.
inline float atomicAdd(float* address, float value) {
  const float old = *address;
  *address = old + value;
  return old;
}
