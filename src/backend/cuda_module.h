// The CUDA backend and the NCCL communicator live in a module of their own,
// liblongtune_cuda.so (src/backend/cuda/, src/dist/nccl_comm.cpp), loaded with dlopen on first
// use: a process that runs on the CPU never maps cuBLAS and NCCL (cuBLAS alone is about
// 150 MiB resident once loaded), and a machine without the CUDA runtime runs the CPU build
// unchanged. make_cuda_backend (backend.h) and make_nccl_communicator (dist/comm.h) go through
// here.
#pragma once
#include <memory>
#include <string>

#include "backend/backend.h"

namespace lt {

class Communicator;

// What the module exports (one C symbol, kCudaModuleEntry, returning a pointer to this).
struct CudaModule {
  int abi;  // kCudaModuleAbi: the module and the library were built together
  std::unique_ptr<Backend> (*make_backend)(std::string* reason, GemmPrecision gemm);
  // Null when the module was built without NCCL.
  std::unique_ptr<Communicator> (*make_nccl)(Communicator& group, double timeout_seconds,
                                             std::string* reason);
};
inline constexpr int kCudaModuleAbi = 1;
inline constexpr const char* kCudaModuleEntry = "longtune_cuda_module";
inline constexpr const char* kCudaModuleFile = "liblongtune_cuda.so";
// Exported, besides kCudaModuleEntry, only by the CPU emulator's module (tests/cuda_emu,
// liblongtune_cuda_emu.so), which needs no driver or GPU.
inline constexpr const char* kCudaEmulatorEntry = "longtune_cuda_emulator";

// True when this longtune was built with the CUDA module.
bool cuda_module_built();
// The module's path: $LONGTUNE_CUDA_MODULE, else kCudaModuleFile beside the library.
std::string cuda_module_path();
// The loaded module (loaded once, kept for the process), or null with `reason` set: not built,
// no CUDA driver or no visible GPU (checked through the driver, libcuda.so.1, before anything
// large is mapped), or the module does not load. A module named by $LONGTUNE_CUDA_MODULE that
// exports kCudaEmulatorEntry (the CPU emulator of tests/cuda_emu) is used without a driver, in
// any build. `probe_driver` false skips the driver check
// (tests that the module loads and resolves every symbol on a machine without a GPU).
const CudaModule* cuda_module(std::string* reason, bool probe_driver = true);

}  // namespace lt
