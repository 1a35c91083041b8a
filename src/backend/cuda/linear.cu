// CUDA linear layers: cuBLAS GEMMs (f32, or bf16 inputs with f32 accumulation), bias add and
// the deterministic bias gradient.
#include <cuda_bf16.h>

#include <algorithm>

#include "backend/cuda/common.cuh"
#include "backend/cuda/kernels.h"

namespace lt::cuda {
namespace {

// out (N,OUT) += bias (OUT) broadcast over rows.
__global__ void add_bias_kernel(float* out, const float* bias, int64_t N, int64_t OUT) {
  const int64_t n = N * OUT;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    out[i] += bias[i % OUT];
}

// Column sums of dout (N,OUT) in double, as the CPU op sums them, stage 1: block (x: 32
// columns, y: 8 row lanes) sums a slice of rows into partial[slice, col]. Stage 2 adds the
// slices in order: the result is deterministic.
constexpr int kColTile = 32, kRowLanes = 8;
__global__ void column_sum_partial_kernel(double* partial, const float* dout, int64_t N,
                                          int64_t OUT, int64_t rows_per_slice) {
  __shared__ double sums[kRowLanes][kColTile + 1];
  const int64_t col = blockIdx.x * int64_t(kColTile) + threadIdx.x;
  const int64_t r0 = blockIdx.y * rows_per_slice;
  const int64_t r1 = min(N, r0 + rows_per_slice);
  double s = 0;
  if (col < OUT)
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kRowLanes) s += dout[r * OUT + col];
  sums[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < OUT) {
    double t = 0;
    for (int i = 0; i < kRowLanes; ++i) t += sums[i][threadIdx.x];
    partial[blockIdx.y * OUT + col] = t;
  }
}
__global__ void column_sum_finish_kernel(float* dbias, const double* partial, int64_t slices,
                                         int64_t OUT) {
  const int64_t col = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (col >= OUT) return;
  double t = 0;
  for (int64_t s = 0; s < slices; ++s) t += partial[s * OUT + col];
  dbias[col] += float(t);
}

// Row-major C (M,N) = alpha * op(A) op(B) + beta * C on bf16 inputs, f32 accumulation and
// output (tensor cores), each matrix with its row pitch (lda, ldb, ldc elements). cuBLAS is
// column-major: the row-major C (M,N) is the column-major C^T (N,M) = op(B)^T op(A)^T, so B
// goes first; a row-major (M,K) is a column-major (K,M).
void gemm_on_bf16(const Context& ctx, float* C, int64_t ldc, const __nv_bfloat16* a16, int64_t lda,
                  const __nv_bfloat16* b16, int64_t ldb, int64_t M, int64_t N, int64_t K,
                  bool trans_a, bool trans_b, float alpha, float beta) {
  const Span span(ctx, "cuBLAS GEMM (bf16 inputs)");
  const cublasOperation_t op_a = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_b = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  LT_CUBLAS_CHECK(cublasGemmEx(ctx.cublas, op_b, op_a, int(N), int(M), int(K), &alpha, b16,
                               CUDA_R_16BF, int(ldb), a16, CUDA_R_16BF, int(lda), &beta, C,
                               CUDA_R_32F, int(ldc), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// dst (rows, cols), contiguous = bf16 of src (rows, cols) with row pitch `pitch`. Every GEMM
// input of the bf16 mode passes here: blocks stride over rows (y) and columns (x), so no element
// pays a 64-bit division for its row.
__global__ void to_bf16_2d_kernel(__nv_bfloat16* dst, const float* src, int64_t rows, int64_t cols,
                                  int64_t pitch) {
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const float* s = src + r * pitch;
    __nv_bfloat16* d = dst + r * cols;
    for (int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; c < cols;
         c += int64_t(gridDim.x) * blockDim.x)
      d[c] = __float2bfloat16_rn(s[c]);
  }
}

void to_bf16_2d(const Context& ctx, __nv_bfloat16* dst, const float* src, int64_t rows,
                int64_t cols, int64_t pitch) {
  if (rows * cols == 0) return;
  const Span span(ctx, "bf16 staging of GEMM inputs");
  constexpr int kThreads = 256;
  // As many blocks as grid_for would give the whole matrix: columns first, rows with the rest.
  const unsigned total = grid_for(rows * cols, kThreads, ctx.num_sms);
  const unsigned gx = std::min<unsigned>(total, unsigned((cols + kThreads - 1) / kThreads));
  const unsigned gy = unsigned(std::min<int64_t>({rows, int64_t(total / gx), 65535}));
  to_bf16_2d_kernel<<<dim3(gx, gy), kThreads, 0, ctx.stream>>>(dst, src, rows, cols, pitch);
  LT_CUDA_CHECK_LAUNCH();
}

size_t align256(size_t b) { return (b + 255) / 256 * 256; }

// A block of op(X) for a row-major X where op(X) is (R,S) (X itself, or X (S,R) transposed):
// rows [r0, r0+rb), columns [s0, s0+sb); where it starts and its shape as stored.
struct Block {
  const void* first;
  int64_t rows, cols, pitch;
};
template <typename T>
Block block_of(const T* X, int64_t R, int64_t S, bool trans, int64_t r0, int64_t rb, int64_t s0,
               int64_t sb) {
  if (!trans) return {X + r0 * S + s0, rb, sb, S};
  return {X + s0 * R + r0, sb, rb, R};
}

// The rounding of block b (f32, as stored) when it lies inside a held matrix with the same row
// pitch, made now if it is not yet; null when it does not.
const __nv_bfloat16* held_rounding(const Context& ctx, const Block& b) {
  if (!ctx.held) return nullptr;
  HeldInputs& h = *ctx.held;
  const auto* f = static_cast<const float*>(b.first);
  for (int i = h.depth - 1; i >= 0; --i) {
    HeldInput& e = h.stack[i];
    if (e.refs == 0 || b.pitch != e.cols || f < e.src || f >= e.src + e.rows * e.cols) continue;
    const int64_t off = f - e.src;
    if (off / e.cols + b.rows > e.rows || off % e.cols + b.cols > e.cols) continue;
    auto* bf = reinterpret_cast<__nv_bfloat16*>(static_cast<char*>(h.base) + e.offset);
    if (!e.ready) {
      to_bf16_2d(ctx, bf, e.src, e.rows, e.cols, e.cols);
      e.ready = true;
    }
    return bf + off;
  }
  return nullptr;
}

// A kBf16 GEMM staged through the GEMM scratch: f32 operands are rounded into it (A first,
// 256-aligned, then B); a bf16 B (b16) is multiplied where it lies. When the staged operands
// exceed the scratch's limit the product runs in the blocks gemm_blocks chooses (backend.h),
// K blocks accumulated into C in f32 (beta for the first, 1 after), each block's operands
// rounded as it runs. A product that fits is one cuBLAS call. An operand block inside a held
// matrix is multiplied from its rounding (held_rounding) where it lies, not staged.
void gemm_staged(const Context& ctx, float* C, const float* A, const float* B, const uint16_t* b16,
                 int64_t M, int64_t N, int64_t K, bool trans_a, bool trans_b, float alpha,
                 float beta) {
  const bool stage_b = b16 == nullptr;
  const GemmBlocks blk =
      gemm_blocks(M, N, K, stage_b, ctx.gemm_scratch->limit(kCudaGemmScratchCap));
  const int64_t mb = blk.m, nb = blk.n, kb = blk.k;
  char* base =
      static_cast<char*>(ctx.gemm_scratch->get(gemm_stage_bytes(mb, nb, kb, stage_b), ctx.stream));
  auto* a16 = reinterpret_cast<__nv_bfloat16*>(base);
  auto* bs16 = reinterpret_cast<__nv_bfloat16*>(base + align256(size_t(mb * kb) * 2));
  for (int64_t k0 = 0; k0 < K; k0 += kb) {
    const int64_t kn = std::min(kb, K - k0);
    for (int64_t m0 = 0; m0 < M; m0 += mb) {
      const int64_t mn = std::min(mb, M - m0);
      const Block a = block_of(A, M, K, trans_a, m0, mn, k0, kn);
      const __nv_bfloat16* ap = held_rounding(ctx, a);
      int64_t lda = a.pitch;
      if (!ap) {
        to_bf16_2d(ctx, a16, static_cast<const float*>(a.first), a.rows, a.cols, a.pitch);
        ap = a16, lda = a.cols;
      }
      for (int64_t n0 = 0; n0 < N; n0 += nb) {
        const int64_t nn = std::min(nb, N - n0);
        const __nv_bfloat16* bp;
        int64_t ldb;
        if (stage_b) {
          const Block b = block_of(B, K, N, trans_b, k0, kn, n0, nn);
          bp = held_rounding(ctx, b), ldb = b.pitch;
          if (!bp) {
            to_bf16_2d(ctx, bs16, static_cast<const float*>(b.first), b.rows, b.cols, b.pitch);
            bp = bs16, ldb = b.cols;
          }
        } else {
          const Block b =
              block_of(reinterpret_cast<const __nv_bfloat16*>(b16), K, N, trans_b, k0, kn, n0, nn);
          bp = static_cast<const __nv_bfloat16*>(b.first), ldb = b.pitch;
        }
        gemm_on_bf16(ctx, C + m0 * N + n0, N, ap, lda, bp, ldb, mn, nn, kn, trans_a, trans_b, alpha,
                     k0 == 0 ? beta : 1.0f);
      }
    }
  }
}

}  // namespace

bool hold_gemm_input(const Context& ctx, const float* x, int64_t rows, int64_t cols) {
  if (ctx.precision != GemmPrecision::kBf16 || !ctx.held || !ctx.held->enabled || rows <= 0 ||
      cols <= 0)
    return false;
  HeldInputs& h = *ctx.held;
  for (int i = 0; i < h.depth; ++i) {
    HeldInput& e = h.stack[i];
    if (e.refs > 0 && e.src == x && e.rows == rows && e.cols == cols) {
      ++e.refs;
      return true;
    }
  }
  constexpr int kDepth = int(sizeof(h.stack) / sizeof(h.stack[0]));
  const size_t need = align256(size_t(rows * cols) * 2);
  if (h.depth == kDepth || h.used + need > h.capacity) return false;
  void* base = ctx.held_scratch->get(h.used + need, ctx.stream);
  if (base != h.base) {  // an unbound scratch grew elsewhere: round the others again
    for (int i = 0; i < h.depth; ++i) h.stack[i].ready = false;
    h.base = base;
  }
  h.stack[h.depth++] = {x, rows, cols, h.used, 1, false};
  h.used += need;
  return true;
}

void release_gemm_input(const Context& ctx, const float* x) {
  HeldInputs& h = *ctx.held;
  for (int i = h.depth - 1; i >= 0; --i)
    if (h.stack[i].refs > 0 && h.stack[i].src == x) {
      --h.stack[i].refs;
      break;
    }
  while (h.depth > 0 && h.stack[h.depth - 1].refs == 0) h.used = h.stack[--h.depth].offset;
}

namespace {

void add_bias(const Context& ctx, float* out, const float* bias, int64_t N, int64_t OUT) {
  if (!bias || N * OUT == 0) return;
  add_bias_kernel<<<grid_for(N * OUT, 256, ctx.num_sms), 256, 0, ctx.stream>>>(out, bias, N, OUT);
  LT_CUDA_CHECK_LAUNCH();
}

// dbias (OUT) += column sums of dout (N,OUT), deterministic.
void bias_grad(const Context& ctx, float* dbias, const float* dout, int64_t N, int64_t OUT) {
  if (!dbias || N <= 0 || OUT <= 0) return;
  const int64_t rows_per_slice = cuda_scratch::kSliceRows;
  const int64_t slices = (N + rows_per_slice - 1) / rows_per_slice;
  auto* partial = static_cast<double*>(
      ctx.scratch->get(cuda_scratch::column_partials(N, OUT, sizeof(double)), ctx.stream));
  const dim3 grid(unsigned((OUT + kColTile - 1) / kColTile), unsigned(slices));
  column_sum_partial_kernel<<<grid, dim3(kColTile, kRowLanes), 0, ctx.stream>>>(
      partial, dout, N, OUT, rows_per_slice);
  LT_CUDA_CHECK_LAUNCH();
  column_sum_finish_kernel<<<unsigned((OUT + 255) / 256), 256, 0, ctx.stream>>>(dbias, partial,
                                                                                slices, OUT);
  LT_CUDA_CHECK_LAUNCH();
}

// gemm with B already in bf16 (kBf16 only): A rounded, B multiplied as it is.
void gemm_bf16_b(const Context& ctx, float* C, const float* A, const uint16_t* B, int64_t M,
                 int64_t N, int64_t K, bool trans_a, bool trans_b, float alpha, float beta) {
  if (M <= 0 || N <= 0 || K <= 0)
    return gemm(ctx, C, A, nullptr, M, N, K, trans_a, trans_b, alpha,
                beta);  // the degenerate cases
  gemm_staged(ctx, C, A, nullptr, B, M, N, K, trans_a, trans_b, alpha, beta);
}

}  // namespace

void gemm(const Context& ctx, float* C, const float* A, const float* B, int64_t M, int64_t N,
          int64_t K, bool trans_a, bool trans_b, float alpha, float beta) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {  // C = beta * C (cuBLAS needs leading dimensions >= 1)
    if (beta == 0.0f) {
      LT_CUDA_CHECK(cudaMemsetAsync(C, 0, size_t(M * N) * sizeof(float), ctx.stream));
    } else if (beta != 1.0f) {
      scale_inplace(ctx, C, M * N, beta);
    }
    return;
  }
  if (ctx.precision == GemmPrecision::kF32) {
    // cuBLAS is column-major: the row-major C (M,N) is the column-major C^T (N,M) = op(B)^T
    // op(A)^T, so B goes first. A row-major (M,K) is a column-major (K,M) with leading dim K.
    const cublasOperation_t op_a = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t op_b = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    const int64_t lda = trans_a ? M : K, ldb = trans_b ? K : N;
    const Span span(ctx, "cuBLAS GEMM (f32)");
    // CUBLAS_COMPUTE_32F_PEDANTIC: true f32 products, never TF32 (NVIDIA_TF32_OVERRIDE aside).
    LT_CUBLAS_CHECK(cublasGemmEx(ctx.cublas, op_b, op_a, int(N), int(M), int(K), &alpha, B,
                                 CUDA_R_32F, int(ldb), A, CUDA_R_32F, int(lda), &beta, C,
                                 CUDA_R_32F, int(N), CUBLAS_COMPUTE_32F_PEDANTIC,
                                 CUBLAS_GEMM_DEFAULT));
    return;
  }
  // kBf16: both inputs rounded to bf16 in the GEMM scratch, multiplied on tensor cores with f32
  // accumulation and an f32 output.
  gemm_staged(ctx, C, A, B, nullptr, M, N, K, trans_a, trans_b, alpha, beta);
}

void linear_forward(const Context& ctx, float* out, const float* inp, const float* weight,
                    const float* bias, int64_t N, int64_t IN, int64_t OUT) {
  // out (N,OUT) = inp (N,IN) @ weight (OUT,IN)^T (+ bias)
  gemm(ctx, out, inp, weight, N, OUT, IN, false, true, 1.0f, 0.0f);
  add_bias(ctx, out, bias, N, OUT);
}

void linear_backward(const Context& ctx, float* dinp, float* dweight, float* dbias,
                     const float* dout, const float* inp, const float* weight, int64_t N,
                     int64_t IN, int64_t OUT, Accumulate acc) {
  // dinp (N,IN) (+)= dout (N,OUT) @ weight (OUT,IN)
  if (dinp)
    gemm(ctx, dinp, dout, weight, N, IN, OUT, false, false, 1.0f,
         acc == Accumulate::kYes ? 1.0f : 0.0f);
  // dweight (OUT,IN) += dout^T (OUT,N) @ inp (N,IN)
  if (dweight) gemm(ctx, dweight, dout, inp, OUT, IN, N, true, false, 1.0f, 1.0f);
  bias_grad(ctx, dbias, dout, N, OUT);
}

namespace {

// f32 GEMM on sub-blocks: each matrix with its row pitch (true f32 products).
void gemm_f32_ld(const Context& ctx, float* C, int64_t ldc, const float* A, int64_t lda,
                 const float* B, int64_t ldb, int64_t M, int64_t N, int64_t K, bool trans_a,
                 bool trans_b, float alpha, float beta) {
  if (M <= 0 || N <= 0 || K <= 0) return;  // callers never pass K = 0
  const Span span(ctx, "cuBLAS GEMM (f32)");
  const cublasOperation_t op_a = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_b = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  LT_CUBLAS_CHECK(cublasGemmEx(ctx.cublas, op_b, op_a, int(N), int(M), int(K), &alpha, B,
                               CUDA_R_32F, int(ldb), A, CUDA_R_32F, int(lda), &beta, C, CUDA_R_32F,
                               int(ldc), CUBLAS_COMPUTE_32F_PEDANTIC, CUBLAS_GEMM_DEFAULT));
}

}  // namespace

void linear_forward_bf16w(const Context& ctx, float* out, const float* inp, const uint16_t* weight,
                          const float* bias, int64_t N, int64_t IN, int64_t OUT, float* expand,
                          int64_t expand_rows) {
  if (ctx.precision == GemmPrecision::kBf16) {
    gemm_bf16_b(ctx, out, inp, weight, N, OUT, IN, false, true, 1.0f, 0.0f);
  } else if (expand_rows >= OUT) {  // f32 GEMMs: on the widened weight, as the CPU
    bf16_to_f32(ctx, expand, weight, OUT * IN);
    gemm(ctx, out, inp, expand, N, OUT, IN, false, true, 1.0f, 0.0f);
  } else {  // out[:, o0:o1] = inp @ W[o0:o1]^T, block by block
    for (int64_t o0 = 0; o0 < OUT; o0 += expand_rows) {
      const int64_t rows = std::min(expand_rows, OUT - o0);
      bf16_to_f32(ctx, expand, weight + o0 * IN, rows * IN);
      gemm_f32_ld(ctx, out + o0, OUT, inp, IN, expand, IN, N, rows, IN, false, true, 1.0f, 0.0f);
    }
  }
  add_bias(ctx, out, bias, N, OUT);
}

void linear_backward_bf16w(const Context& ctx, float* dinp, float* dbias, const float* dout,
                           const uint16_t* weight, int64_t N, int64_t IN, int64_t OUT,
                           Accumulate acc, float* expand, int64_t expand_rows) {
  const float beta = acc == Accumulate::kYes ? 1.0f : 0.0f;
  if (!dinp) {
  } else if (ctx.precision == GemmPrecision::kBf16) {
    gemm_bf16_b(ctx, dinp, dout, weight, N, IN, OUT, false, false, 1.0f, beta);
  } else if (expand_rows >= OUT) {
    bf16_to_f32(ctx, expand, weight, OUT * IN);
    gemm(ctx, dinp, dout, expand, N, IN, OUT, false, false, 1.0f, beta);
  } else {  // dinp (+)= the sum over blocks of dout[:, o0:o1] @ W[o0:o1]
    for (int64_t o0 = 0; o0 < OUT; o0 += expand_rows) {
      const int64_t rows = std::min(expand_rows, OUT - o0);
      bf16_to_f32(ctx, expand, weight + o0 * IN, rows * IN);
      gemm_f32_ld(ctx, dinp, IN, dout + o0, OUT, expand, IN, N, IN, rows, false, false, 1.0f,
                  o0 == 0 ? beta : 1.0f);
    }
  }
  bias_grad(ctx, dbias, dout, N, OUT);
}

}  // namespace lt::cuda
