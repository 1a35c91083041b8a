// A stand-in for the part of cuBLAS that src/backend/cuda uses: cublasGemmEx on f32 or bf16
// operands with an f32 output and f32 compute, column-major as cuBLAS. Written from the cuBLAS
// documentation, not from the callers: C (m,n) = alpha * op(A) (m,k) op(B) (k,n) + beta * C,
// op(X) = X (CUBLAS_OP_N) or X^T (CUBLAS_OP_T), element (i,j) of a matrix at X[i + j * ldX].
// Every product is summed in double and rounded to f32 once (the tests' tolerances absorb the
// GPU's summation order); bf16 operands are read as their exact values; beta == 0 means C is not
// read (a NaN there does not propagate). Any argument combination not implemented here (other
// types, operations, compute types, a null handle, a leading dimension too small, a negative
// size) throws lt::cuda_emu::EmulationError naming it, rather than computing something else.
// A product is checked when issued and computed on the handle's stream (emu_runtime.h); alpha
// and beta are read when issued (host pointer mode).
#pragma once

#include "emu.h"

using cudaStream_t = struct CUstream_st*;
using cublasHandle_t = struct cublasContext*;
enum cublasStatus_t { CUBLAS_STATUS_SUCCESS = 0, CUBLAS_STATUS_NOT_INITIALIZED = 1 };
enum cublasMath_t { CUBLAS_DEFAULT_MATH = 0 };
enum cublasOperation_t { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 };
enum cudaDataType_t { CUDA_R_32F = 0, CUDA_R_16BF = 14 };
enum cublasComputeType_t { CUBLAS_COMPUTE_32F = 68, CUBLAS_COMPUTE_32F_PEDANTIC = 69 };
enum cublasGemmAlgo_t { CUBLAS_GEMM_DEFAULT = -1 };

inline const char* cublasGetStatusString(cublasStatus_t) { return "cuBLAS (cuda_emu)"; }

cublasStatus_t cublasCreate(cublasHandle_t* handle);
cublasStatus_t cublasDestroy(cublasHandle_t handle);
cublasStatus_t cublasSetStream(cublasHandle_t handle, cudaStream_t stream);
// Only the default math mode (no TF32) is emulated.
cublasStatus_t cublasSetMathMode(cublasHandle_t handle, cublasMath_t mode);

// Host pointer mode: alpha and beta point to floats (the f32 compute types).
cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa,
                            cublasOperation_t transb, int m, int n, int k, const void* alpha,
                            const void* A, cudaDataType_t Atype, int lda, const void* B,
                            cudaDataType_t Btype, int ldb, const void* beta, void* C,
                            cudaDataType_t Ctype, int ldc, cublasComputeType_t computeType,
                            cublasGemmAlgo_t algo);

namespace lt::cuda_emu {
// A handle on the null stream for the kernel tests (cuBLAS refuses an uninitialised one).
cublasHandle_t cublas_handle();
// The number of cublasGemmEx calls so far (tests check that a product was split into blocks).
int64_t cublas_gemm_calls();
}  // namespace lt::cuda_emu
