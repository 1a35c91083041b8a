// The kernel tests' cuda::Scratch (cuda_backend.cpp's, in the emulated module, rounds requests
// up and grows): each request gets memory of exactly its size, so that a kernel that writes past
// what its launcher asked for faults at the guard page.
#include <map>
#include <memory>

#include "cuda_emu_kernels.h"

namespace lt::cuda {
namespace {
// Never destroyed: a static Scratch may be released after it at exit.
std::map<const Scratch*, std::unique_ptr<cuda_emu::GuardedBytes>>& scratch_memory() {
  static auto* m = new std::map<const Scratch*, std::unique_ptr<cuda_emu::GuardedBytes>>;
  return *m;
}
}  // namespace

Scratch::~Scratch() { release(); }
void Scratch::release() {
  scratch_memory().erase(this);
  ptr_ = nullptr;
  bytes_ = 0;
}
void Scratch::bind(void* p, size_t bytes) {
  bound_ = p;
  bound_bytes_ = bytes;
}
void* Scratch::get(size_t bytes, cudaStream_t stream) {
  auto& memory = scratch_memory()[this];
  memory = std::make_unique<cuda_emu::GuardedBytes>(bytes);
  ptr_ = memory->data();
  bytes_ = bytes;
  stream_ = stream;
  return ptr_;
}
}  // namespace lt::cuda
