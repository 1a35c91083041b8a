// Error checks for every CUDA runtime and cuBLAS call: a failure is a broken invariant (or a
// device fault) and aborts with the call, file, line and the library's error string.
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

namespace lt::cuda_detail {
[[noreturn]] inline void cuda_failed(const char* call, const char* what, int code,
                                     const char* file, int line) {
  std::fprintf(stderr, "longtune: CUDA error: %s failed at %s:%d: %s (%d)\n", call, file, line,
               what, code);
  std::fflush(stderr);
  std::abort();
}
}  // namespace lt::cuda_detail

// LT_CUDA_CHECK(cudaMemcpyAsync(...));
#define LT_CUDA_CHECK(call)                                                                  \
  do {                                                                                       \
    const cudaError_t lt_err_ = (call);                                                      \
    if (lt_err_ != cudaSuccess) [[unlikely]]                                                 \
      ::lt::cuda_detail::cuda_failed(#call, cudaGetErrorString(lt_err_), int(lt_err_),       \
                                     __FILE__, __LINE__);                                    \
  } while (0)

// LT_CUBLAS_CHECK(cublasGemmEx(...));
#define LT_CUBLAS_CHECK(call)                                                                \
  do {                                                                                       \
    const cublasStatus_t lt_st_ = (call);                                                    \
    if (lt_st_ != CUBLAS_STATUS_SUCCESS) [[unlikely]]                                        \
      ::lt::cuda_detail::cuda_failed(#call, cublasGetStatusString(lt_st_), int(lt_st_),      \
                                     __FILE__, __LINE__);                                    \
  } while (0)

// After a kernel launch: reports launch-configuration errors at the launch site.
#define LT_CUDA_CHECK_LAUNCH() LT_CUDA_CHECK(cudaGetLastError())
