// The cuBLAS stand-in of emu_cublas.h.
#include "emu_cublas.h"

#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "emu_runtime.h"

struct cublasContext {
  cudaStream_t stream = nullptr;
};

namespace lt::cuda_emu {
namespace {
std::mutex handles_mu;
std::set<cublasHandle_t>& handles() {
  static std::set<cublasHandle_t> live{cublas_handle()};
  return live;
}
bool valid(cublasHandle_t h) {
  std::lock_guard lock(handles_mu);
  return handles().count(h) != 0;
}
int64_t gemm_calls = 0;

[[noreturn]] void refuse(const std::string& what) {
  throw EmulationError("cublasGemmEx (cuda_emu): " + what + " is not implemented or invalid");
}

// Element (i,j) of the column-major matrix X of type t with leading dimension ld, transposed
// when op is CUBLAS_OP_T: op(X)(i,j).
double element(const void* X, cudaDataType_t t, int64_t ld, cublasOperation_t op, int64_t i,
               int64_t j) {
  const int64_t at = op == CUBLAS_OP_N ? i + j * ld : j + i * ld;
  if (t == CUDA_R_32F) return double(static_cast<const float*>(X)[at]);
  return double(__bfloat162float(static_cast<const __nv_bfloat16*>(X)[at]));
}
}  // namespace

cublasHandle_t cublas_handle() {
  static cublasContext null_stream;
  return &null_stream;
}
int64_t cublas_gemm_calls() { return gemm_calls; }
}  // namespace lt::cuda_emu

cublasStatus_t cublasCreate(cublasHandle_t* handle) {
  std::lock_guard lock(lt::cuda_emu::handles_mu);
  *handle = new cublasContext;
  lt::cuda_emu::handles().insert(*handle);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasDestroy(cublasHandle_t handle) {
  std::lock_guard lock(lt::cuda_emu::handles_mu);
  if (handle == lt::cuda_emu::cublas_handle() || !lt::cuda_emu::handles().erase(handle))
    return CUBLAS_STATUS_NOT_INITIALIZED;
  delete handle;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetStream(cublasHandle_t handle, cudaStream_t stream) {
  if (!lt::cuda_emu::valid(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  handle->stream = stream;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetMathMode(cublasHandle_t handle, cublasMath_t mode) {
  if (!lt::cuda_emu::valid(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (mode != CUBLAS_DEFAULT_MATH) lt::cuda_emu::refuse("math mode " + std::to_string(mode));
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa,
                            cublasOperation_t transb, int m, int n, int k, const void* alpha,
                            const void* A, cudaDataType_t Atype, int lda, const void* B,
                            cudaDataType_t Btype, int ldb, const void* beta, void* C,
                            cudaDataType_t Ctype, int ldc, cublasComputeType_t computeType,
                            cublasGemmAlgo_t algo) {
  using lt::cuda_emu::refuse;
  const auto str = [](int64_t v) { return std::to_string(v); };
  if (!lt::cuda_emu::valid(handle)) refuse("a handle cublasCreate did not return");
  for (const cublasOperation_t op : {transa, transb})
    if (op != CUBLAS_OP_N && op != CUBLAS_OP_T) refuse("operation " + str(op));
  if (computeType != CUBLAS_COMPUTE_32F && computeType != CUBLAS_COMPUTE_32F_PEDANTIC)
    refuse("compute type " + str(computeType));
  if (algo != CUBLAS_GEMM_DEFAULT) refuse("algorithm " + str(algo));
  if (Ctype != CUDA_R_32F) refuse("C type " + str(Ctype));
  if (Atype != Btype || (Atype != CUDA_R_32F && Atype != CUDA_R_16BF))
    refuse("A type " + str(Atype) + " with B type " + str(Btype));
  if (m < 0 || n < 0 || k < 0) refuse("m, n, k = " + str(m) + ", " + str(n) + ", " + str(k));
  // cuBLAS: lda >= max(1, rows of A as stored), likewise ldb; ldc >= max(1, m).
  const int64_t a_rows = transa == CUBLAS_OP_N ? m : k, b_rows = transb == CUBLAS_OP_N ? k : n;
  if (lda < std::max<int64_t>(1, a_rows)) refuse("lda " + str(lda) + " < " + str(a_rows));
  if (ldb < std::max<int64_t>(1, b_rows)) refuse("ldb " + str(ldb) + " < " + str(b_rows));
  if (ldc < std::max<int64_t>(1, m)) refuse("ldc " + str(ldc) + " < " + str(m));
  if (!alpha || !beta) refuse("a null alpha or beta");
  ++lt::cuda_emu::gemm_calls;
  if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
  if (k > 0 && (!A || !B)) refuse("a null A or B");
  if (!C) refuse("a null C");
  const double a = *static_cast<const float*>(alpha), b = *static_cast<const float*>(beta);
  lt::cuda_emu::enqueue(handle->stream, "cublasGemmEx", [=] {
    // op(A) (m,k) and op(B)^T (n,k) as dense double rows, then one dot product per element.
    std::vector<double> opa(size_t(m) * k), opbt(size_t(n) * k);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t l = 0; l < k; ++l)
        opa[i * k + l] = lt::cuda_emu::element(A, Atype, lda, transa, i, l);
    for (int64_t j = 0; j < n; ++j)
      for (int64_t l = 0; l < k; ++l)
        opbt[j * k + l] = lt::cuda_emu::element(B, Btype, ldb, transb, l, j);
    float* c = static_cast<float*>(C);
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t i = 0; i < m; ++i) {
        const double* x = opa.data() + i * k;
        const double* y = opbt.data() + j * k;
        double s = 0;
        for (int64_t l = 0; l < k; ++l) s += x[l] * y[l];
        float& cij = c[i + j * int64_t(ldc)];
        cij = float(b == 0 ? a * s : a * s + b * double(cij));
      }
    }
  });
  return CUBLAS_STATUS_SUCCESS;
}
