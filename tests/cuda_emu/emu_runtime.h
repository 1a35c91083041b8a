// Stand-ins for the CUDA runtime and cuBLAS (emu_cublas.h) names that the launchers of
// src/backend/cuda use, for the sources tools/emulate_cuda_kernel.py generates (no CUDA toolkit
// needed). A stream is a label: launches run to completion on the calling thread (emu.h), so every
// copy and synchronisation is immediate. The generator refuses a .cu file that names a runtime or
// cuBLAS entity missing here.
#pragma once

#include <cstddef>
#include <cstring>

#include "emu.h"
#include "emu_cublas.h"

using cudaStream_t = struct CUstream_st*;

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};

inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : "invalid argument (cuda_emu)";
}
// A launch error throws lt::cuda_emu::EmulationError from the launch itself.
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
// Host and device memory are one address space here; DeviceArray's guard pages catch overruns.
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind,
                                   cudaStream_t) {
  if (bytes) std::memmove(dst, src, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  if (bytes) std::memset(p, value, bytes);
  return cudaSuccess;
}
// `__constant__` arrays become plain globals (the generator): the symbol is the object itself.
template <typename T>
cudaError_t cudaMemcpyToSymbolAsync(T& symbol, const void* src, size_t bytes, size_t offset,
                                    cudaMemcpyKind kind, cudaStream_t) {
  if (offset + bytes > sizeof(T) || kind != cudaMemcpyHostToDevice) return cudaErrorInvalidValue;
  std::memcpy(reinterpret_cast<unsigned char*>(&symbol) + offset, src, bytes);
  return cudaSuccess;
}
