// Stand-ins for the CUDA runtime names that src/backend/cuda uses (its launchers and
// cuda_backend.cpp), for the sources tools/emulate_cuda_kernel.py generates; cuBLAS is
// emu_cublas.h. No CUDA toolkit is needed. The generator refuses a file that names a runtime or
// cuBLAS entity missing here.
//
// The emulated device: one GPU of compute capability 8.0 with 2 SMs (grids stay small), sm_80's
// 163 KiB of opt-in shared memory, a memPitch of 4 KiB (so that small tensors take both of
// copy_2d's paths) and LONGTUNE_CUDA_EMU_MEMORY bytes of memory (default 4 GiB; read at every
// use; an allocation past it fails as cudaMalloc does).
//
// Memory: device allocations (cudaMalloc, cudaMallocAsync, and emu.h's GuardedBytes) are
// 256-byte aligned, start as 0xff bytes (NaN as f32 and bf16) and end at an inaccessible page;
// cudaFree checks the canary before them. cudaMalloc'd memory is inaccessible to the host except
// while stream operations run, so a host dereference of a device pointer faults, as on a GPU,
// and the fault handler says so; a copy whose kind does not match where its pointers are (host,
// pinned host, device) is refused.
//
// Streams: every operation (kernel launch, copy, memset, cuBLAS call, stream-ordered free) goes
// into its stream's queue. LONGTUNE_CUDA_EMU_STREAMS picks the policy: lazy (the default),
// lazy-others-first or eager. Under lazy an operation runs only when something needs it:
// cudaStreamSynchronize, cudaDeviceSynchronize (also implied by cudaFree and cudaFreeHost), an
// event wait whose stream runs, a copy to pageable host memory (synchronous in CUDA). So work on
// two streams runs in an order the GPU may choose but the issuing order hides: a copy that is not
// ordered after the kernel writing its source, or a kernel that overwrites a buffer a pending copy
// still reads, or a host read of pinned memory before the copy that fills it was waited for, gives
// wrong data. Under lazy-others-first, when the host waits for one stream every other stream first
// runs all it can: a kernel that reads a prefetch's destination without waiting for the copy stream
// runs before the copy. Under eager every operation runs when issued. The null stream is always
// eager (the kernel tests use it). longtune_cuda_emu_host_waits() (exported) counts the times
// the host waited for a stream.
#pragma once

#include <cstddef>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#include "emu.h"
#include "emu_cublas.h"

using cudaStream_t = struct CUstream_st*;
using cudaEvent_t = struct CUevent_st*;

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidPitchValue = 12,
  cudaErrorInvalidDevice = 101,
  cudaErrorInvalidResourceHandle = 400,
  cudaErrorNotReady = 600,
};
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};
enum cudaDeviceAttr { cudaDevAttrComputeCapabilityMajor = 75 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
inline constexpr unsigned cudaStreamNonBlocking = 1;
inline constexpr unsigned cudaEventDefault = 0;
inline constexpr unsigned cudaEventDisableTiming = 2;

// The fields cuda_backend.cpp reads.
struct cudaDeviceProp {
  char name[256];
  size_t totalGlobalMem;
  size_t memPitch;
  int multiProcessorCount;
  size_t sharedMemPerBlockOptin;
  int major, minor;
};

const char* cudaGetErrorString(cudaError_t e);
// The last error of a runtime call (reset by reading it); launch errors throw
// lt::cuda_emu::EmulationError from the launch (or from the call that runs a lazy launch).
cudaError_t cudaGetLastError();

cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes);
cudaError_t cudaDeviceSynchronize();

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned flags);
cudaError_t cudaStreamDestroy(cudaStream_t stream);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
// The stream's work runs now (lazily issued work is always ready once asked about): cudaSuccess.
cudaError_t cudaStreamQuery(cudaStream_t stream);
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned flags);
cudaError_t cudaEventDestroy(cudaEvent_t event);
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream);
cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned flags);
// Milliseconds between two timing events' records (the host clock when each ran on its stream);
// cudaErrorNotReady until both have run.
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end);

cudaError_t cudaMalloc(void** p, size_t bytes);
cudaError_t cudaFree(void* p);
cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t stream);
cudaError_t cudaFreeAsync(void* p, cudaStream_t stream);
cudaError_t cudaMallocHost(void** p, size_t bytes);
cudaError_t cudaFreeHost(void* p);

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t stream);
cudaError_t cudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src, size_t spitch,
                              size_t width, size_t height, cudaMemcpyKind kind,
                              cudaStream_t stream);
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t stream);

namespace lt::cuda_emu {

enum class StreamPolicy { kLazy, kLazyOthersFirst, kEager };
// The policy of operations issued from now on (LONGTUNE_CUDA_EMU_STREAMS until set).
void set_stream_policy(StreamPolicy policy);

// Puts op on stream (runs it now on the null stream or under kEager); what names it in errors.
void enqueue(cudaStream_t stream, const char* what, std::function<void()> op);
// A kernel launch on stream (the generated launchers' `<<<grid, block, shared, stream>>>`):
// more than 48 KiB of dynamic shared memory needs cudaFuncSetAttribute on func first. When
// LONGTUNE_CUDA_EMU_SCHEDULE is set (in-order, reversed, interleaved; read at every launch, so
// that a test can change it between runs) the kernel runs under that schedule (emu.h), as a
// GPU's blocks finish in another order from run to run; else under the one last set.
void launch_on(cudaStream_t stream, const char* kernel, const void* func, dim3 grid, dim3 block,
               size_t shared_bytes, std::function<void()> body);

namespace detail {
cudaError_t func_set_attribute(const void* func, cudaFuncAttribute attr, int value);
// Where bytes at p lie: 'd' inside one device allocation, 'p' inside pinned host memory, 'h'
// elsewhere (pageable host memory), '?' partly in a device allocation.
char where(const void* p, size_t bytes);
}  // namespace detail

}  // namespace lt::cuda_emu

template <typename T>
cudaError_t cudaFuncSetAttribute(T* func, cudaFuncAttribute attr, int value) {
  return lt::cuda_emu::detail::func_set_attribute(reinterpret_cast<const void*>(func), attr, value);
}

// `__constant__` arrays become plain globals (the generator): the symbol is the object itself.
// The source is pageable host memory: copied when issued, as CUDA stages it.
template <typename T>
cudaError_t cudaMemcpyToSymbolAsync(T& symbol, const void* src, size_t bytes, size_t offset,
                                    cudaMemcpyKind kind, cudaStream_t stream) {
  if (offset + bytes > sizeof(T) || kind != cudaMemcpyHostToDevice) return cudaErrorInvalidValue;
  auto staged = std::make_shared<std::vector<unsigned char>>(
      static_cast<const unsigned char*>(src), static_cast<const unsigned char*>(src) + bytes);
  unsigned char* dst = reinterpret_cast<unsigned char*>(&symbol) + offset;
  lt::cuda_emu::enqueue(stream, "cudaMemcpyToSymbolAsync",
                        [dst, staged] { std::memcpy(dst, staged->data(), staged->size()); });
  return cudaSuccess;
}
