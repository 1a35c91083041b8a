// Launchers of the CUDA kernels, one op family per .cu file. Every launcher enqueues its work on
// ctx.stream, takes device pointers and has the shapes and contract of the CPU op of the same
// name in src/ops/*.h. Arguments are validated by the caller (cuda_backend.cpp): the .cu files
// are compiled by nvcc, which cannot build fmt's compile-time format checks used by LT_CHECK.
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "backend/backend.h"

namespace lt::cuda {

// Device scratch for op temporaries. Bound to planned workspace memory (bind), requests up to
// its size use it; an unbound scratch, or a request past the bound size, allocates its own,
// stream-ordered (cudaMallocAsync / cudaFreeAsync on the stream that uses it) so that growing
// never synchronizes, and a bound one says once on stderr that the plan was short. One user at
// a time.
class Scratch {
 public:
  explicit Scratch(const char* name) : name_(name) {}
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  ~Scratch();
  // At least `bytes` bytes, 256-byte aligned, valid for work enqueued on `stream` from now on.
  void* get(size_t bytes, cudaStream_t stream);
  // Use `bytes` bytes at `p` (memory the caller owns and keeps) from now on.
  void bind(void* p, size_t bytes);
  // Frees the memory it allocated (stream-ordered); the owner calls it before destroying its
  // stream.
  void release();
  // Bytes it allocated itself (bound memory is the caller's and counted there).
  size_t own_bytes() const { return bytes_; }
  // The bound size, or `fallback` when unbound.
  size_t limit(size_t fallback) const { return bound_ ? bound_bytes_ : fallback; }

 private:
  const char* name_;
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
  cudaStream_t stream_ = nullptr;
  void* bound_ = nullptr;
  size_t bound_bytes_ = 0;
  bool warned_ = false;
};

// Op timing (Backend::set_op_profiling): what times a piece of work on a stream, begin to end;
// spans nest. The backend's implementation (cuda_backend.cpp) records timing events.
class Profiler {
 public:
  virtual void begin(cudaStream_t stream, const char* name) = 0;
  virtual void end(cudaStream_t stream) = 0;

 protected:
  ~Profiler() = default;
};

// GEMM inputs held in bf16 (Backend::hold_gemm_input): a stack of f32 matrices whose roundings
// lie in the held scratch at `offset`, made on first use (ready).
struct HeldInput {
  const float* src;
  int64_t rows, cols;
  size_t offset;
  int refs;  // holds of this same matrix not yet released
  bool ready;
};
struct HeldInputs {
  HeldInput stack[4];
  int depth = 0;
  size_t used = 0;                      // bytes of the held scratch the stack takes
  size_t capacity = kCudaHeldInputCap;  // the planned bytes once a workspace is bound
  void* base = nullptr;                 // where the held scratch was when the roundings were made
  bool enabled = true;  // LONGTUNE_CUDA_HOLD_GEMM_INPUTS=0 turns holding off (A/B runs)
};

// Everything a launcher needs: no globals (the streams and handles belong to one CudaBackend).
struct Context {
  cudaStream_t stream = nullptr;    // the compute stream
  cublasHandle_t cublas = nullptr;  // bound to `stream`
  GemmPrecision precision = GemmPrecision::kF32;
  Scratch* scratch = nullptr;          // op temporaries (row losses, partial sums, D = dO.O)
  Scratch* gemm_scratch = nullptr;     // bf16 copies of GEMM inputs (kBf16 only; products
                                       // are blocked to its limit(kCudaGemmScratchCap))
  int num_sms = 1;                     // streaming multiprocessors (grid sizing)
  size_t max_shared_bytes = 48 << 10;  // opt-in shared memory per block
  // The attention backward's former kernel, with transposed tile copies (attention.cu; set from
  // LONGTUNE_ATTENTION_TRANSPOSED_TILES=1, to compare the two on a GPU).
  bool attention_transposed_tiles = false;
  // Deterministic kernels where the fast ones sum in an order that varies run to run (the
  // attention backward's dQ: a second, query-tile kernel instead of atomics). Backend::
  // set_deterministic (`--full_determinism True`).
  bool deterministic = false;
  Profiler* profiler = nullptr;     // while op timing is on
  Scratch* held_scratch = nullptr;  // the bf16 roundings of held GEMM inputs (kBf16 only)
  HeldInputs* held = nullptr;
};

// Times the work its scope enqueues on ctx.stream (nothing when ctx.profiler is null).
class Span {
 public:
  Span(const Context& ctx, const char* name) : p_(ctx.profiler), stream_(ctx.stream) {
    if (p_) p_->begin(stream_, name);
  }
  ~Span() {
    if (p_) p_->end(stream_);
  }
  Span(const Span&) = delete;
  Span& operator=(const Span&) = delete;

 private:
  Profiler* p_;
  cudaStream_t stream_;
};

// ---- linear.cu: cuBLAS GEMMs --------------------------------------------------------------
// Row-major C (M,N) = alpha * op(A) (M,K) op(B) (K,N) + beta * C, as lt::gemm (ops/linear.h).
void gemm(const Context& ctx, float* C, const float* A, const float* B, int64_t M, int64_t N,
          int64_t K, bool trans_a, bool trans_b, float alpha, float beta);
void linear_forward(const Context& ctx, float* out, const float* inp, const float* weight,
                    const float* bias, int64_t N, int64_t IN, int64_t OUT);
// Backend::hold_gemm_input / release_gemm_input: kBf16 GEMMs whose f32 operand (a block of it)
// lies in a held matrix multiply its rounding, made once, instead of staging it.
bool hold_gemm_input(const Context& ctx, const float* x, int64_t rows, int64_t cols);
void release_gemm_input(const Context& ctx, const float* x);
void linear_backward(const Context& ctx, float* dinp, float* dweight, float* dbias,
                     const float* dout, const float* inp, const float* weight, int64_t N,
                     int64_t IN, int64_t OUT, Accumulate acc);
// The same on a bf16 weight (Backend::linear_forward_bf16w): kBf16 multiplies it as it is;
// kF32 widens expand_rows weight rows at a time into expand and runs f32 GEMMs on the blocks.
void linear_forward_bf16w(const Context& ctx, float* out, const float* inp, const uint16_t* weight,
                          const float* bias, int64_t N, int64_t IN, int64_t OUT, float* expand,
                          int64_t expand_rows);
void linear_backward_bf16w(const Context& ctx, float* dinp, float* dbias, const float* dout,
                           const uint16_t* weight, int64_t N, int64_t IN, int64_t OUT,
                           Accumulate acc, float* expand, int64_t expand_rows);

// ---- rmsnorm.cu ---------------------------------------------------------------------------
void rmsnorm_forward(const Context& ctx, float* out, float* rstd, const float* inp,
                     const float* weight, int64_t N, int64_t D, float eps);
void rmsnorm_backward(const Context& ctx, float* dinp, float* dweight, const float* dout,
                      const float* inp, const float* weight, const float* rstd, int64_t N,
                      int64_t D, Accumulate acc);

// ---- rope.cu ------------------------------------------------------------------------------
void rope_tables(const Context& ctx, float* cos, float* sin, const int32_t* pos,
                 const float* inv_freq, float attention_scaling, int64_t N, int64_t HD);
void rope_forward(const Context& ctx, float* out, const float* inp, const float* cos,
                  const float* sin, int64_t N, int64_t H, int64_t HD);
void rope_backward(const Context& ctx, float* dinp, const float* dout, const float* cos,
                   const float* sin, int64_t N, int64_t H, int64_t HD);

// ---- swiglu.cu ----------------------------------------------------------------------------
void swiglu_forward(const Context& ctx, float* out, const float* gate, const float* up, int64_t n);
void swiglu_backward(const Context& ctx, float* dgate, float* dup, const float* dout,
                     const float* gate, const float* up, int64_t n);

// ---- embedding.cu -------------------------------------------------------------------------
void embedding_forward(const Context& ctx, float* out, const int32_t* ids, const float* weight,
                       int64_t N, int64_t D);
void embedding_forward_bf16(const Context& ctx, float* out, const int32_t* ids,
                            const uint16_t* weight, int64_t N, int64_t D);
void embedding_backward(const Context& ctx, float* dweight, const float* dout, const int32_t* ids,
                        int64_t N, int64_t D);

// ---- cross_entropy.cu ---------------------------------------------------------------------
// host_targets (N) is a host copy of targets (validated by the caller; used to skip chunks
// without labels, as the CPU op does). Synchronizes (the loss is returned to the host).
double lm_head_cross_entropy(const Context& ctx, float* dhidden, float* dweight,
                             const float* hidden, const float* weight, const int32_t* targets,
                             const int32_t* host_targets, int64_t N, int64_t D, int64_t V,
                             int64_t chunk, float grad_scale, float* scratch);
// The same over a bf16 weight, without a weight gradient (its products linear_*_bf16w).
double lm_head_cross_entropy_bf16w(const Context& ctx, float* dhidden, const float* hidden,
                                   const uint16_t* weight, const int32_t* targets,
                                   const int32_t* host_targets, int64_t N, int64_t D, int64_t V,
                                   int64_t chunk, float grad_scale, float* scratch, float* expand,
                                   int64_t expand_rows);

// ---- adamw.cu / reduce.cu -----------------------------------------------------------------
void adamw_update(const Context& ctx, float* param, const float* grad, float* m, float* v,
                  int64_t n, const AdamWParams& p);
double sum_squares(const Context& ctx, const float* x, int64_t n);  // synchronizes
// Every part's squares added into one set of partials, read back once (synchronizes once).
double sum_squares_many(const Context& ctx, const Backend::SquaresPart* parts, size_t count);
void scale_inplace(const Context& ctx, float* x, int64_t n, float s);
void add_inplace(const Context& ctx, float* y, const float* x, int64_t n);
void bf16_to_f32(const Context& ctx, float* out, const uint16_t* in, int64_t n);
void f32_to_bf16(const Context& ctx, uint16_t* out, const float* in, int64_t n);
void round_to_bf16(const Context& ctx, float* x, int64_t n);

// ---- nf4.cu -------------------------------------------------------------------------------
// NF4 weight in device memory, the layout of src/ops/nf4.h: element i is
//   code[nibble(i)] * (absmax_table[absmax_codes[i/64]] * absmax_scale[i/(64*256)] + offset),
// nibble(i) = i even ? codes[i/2] >> 4 : codes[i/2] & 15 (high nibble first, as bitsandbytes);
// code = nf4_code(), absmax_table = dynamic_map_code() (src/ops/nf4.h), both in constant memory.
struct Nf4Device {
  const uint8_t* codes = nullptr;         // (ceil(n/2)) packed 4-bit codes
  const uint8_t* absmax_codes = nullptr;  // (ceil(n/64)) 8-bit code of each 64-block absmax
  const float* absmax_scale = nullptr;    // (ceil(n/(64*256))) scale of each 256-block group
  float absmax_offset = 0;                // mean subtracted before quantizing the absmax
  int64_t n = 0;                          // elements
};
// The two code tables into constant memory, on ctx.stream: before the first nf4_dequantize.
void nf4_upload_tables(const Context& ctx);
void nf4_dequantize(const Context& ctx, float* out, const Nf4Device& w);

// ---- lora.cu: LoRA's low-rank GEMMs and dropout with the CPU op's masks --------------------
void lora_forward(const Context& ctx, float* out, float* t, float* xd, const float* inp,
                  const float* a, const float* b, int64_t N, int64_t IN, int64_t OUT,
                  const LoraCall& c);
void lora_backward(const Context& ctx, float* dinp, float* da, float* db, float* t, float* u,
                   float* xd, float* dxd, const float* dout, const float* inp, const float* a,
                   const float* b, int64_t N, int64_t IN, int64_t OUT, const LoraCall& c);

// ---- attention.cu: FlashAttention-2 on tensor cores (bf16 operands, f32 accumulation) -----
// Supported head dims: HD <= kMaxAttentionHeadDim (padded to 32, 64 or 128 inside).
inline constexpr int64_t kMaxAttentionHeadDim = 128;
// Dynamic shared memory the attention kernels need for head dim HD (forward or backward).
size_t attention_shared_bytes(int64_t HD);
void attention_forward(const Context& ctx, float* out, float* lse, const float* q, const float* k,
                       const float* v, const AttentionShape& s);
void attention_backward(const Context& ctx, float* dq, float* dk, float* dv, const float* dout,
                        const float* out, const float* lse, const float* q, const float* k,
                        const float* v, const AttentionShape& s);
void attention_merge(const Context& ctx, float* out, float* lse, const float* out_b,
                     const float* lse_b, int64_t rows, int64_t H, int64_t HD);

}  // namespace lt::cuda
