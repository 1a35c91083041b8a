// The backend interface: one method per op with the same contract as the free functions in
// src/ops/*.h (shapes and accumulate rules are documented there). Pointers are device pointers
// of this backend. Model code only talks to a Backend, never to a device API directly.
#pragma once
#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "backend/op_profile.h"
#include "ops/adamw.h"
#include "ops/attention.h"
#include "ops/common.h"
#include "ops/lora.h"

namespace lt {

enum class OpKind {
  kEmbedding,
  kRmsNorm,
  kLinear,
  kRope,
  kSwiGlu,
  kAttention,
  kLmHeadCrossEntropy,
  kAdamW,
  kSumSquares,
  kScale,
  kAdd,
  kLora,
  kNf4Dequantize
};

// Precision of the CUDA backend's linear-layer GEMMs. kF32 keeps the Backend contract (f32
// inputs, f32 products, f32 accumulation); kBf16 rounds both GEMM inputs to bf16 and
// accumulates in f32 (tensor-core speed, about 3 significant digits per product).
enum class GemmPrecision { kF32, kBf16 };

// Bytes of device memory a backend has handed out (alloc and its own scratch): now and the most
// at any time since it was created.
struct DeviceMemoryUse {
  size_t in_use = 0, peak = 0;
};

// The largest op calls of a run, for sizing a backend's workspace (tokens: the most rows one op
// sees: a micro-batch's local tokens; mlp_rows / lm_rows: a mini-sequence chunk of each).
struct WorkspaceShape {
  int64_t tokens = 0, mlp_rows = 0, lm_rows = 0;
  int64_t hidden = 0, intermediate = 0, vocab = 0, heads = 0, q_dim = 0, kv_dim = 0;
  int64_t lora_rank = 0;
};
struct BackendWorkspace {
  size_t op_bytes = 0, gemm_bytes = 0, held_bytes = 0;
};

// The most device memory the CUDA backend stages GEMM inputs in at bf16: larger products are
// multiplied block by block (src/backend/cuda/linear.cu).
inline constexpr size_t kCudaGemmScratchCap = size_t(256) << 20;
// The most device memory the CUDA backend keeps held GEMM inputs in (Backend::hold_gemm_input):
// the bf16 roundings of an input and of an output gradient that several GEMMs read.
inline constexpr size_t kCudaHeldInputCap = size_t(512) << 20;

// The device scratch each CUDA kernel asks for (src/backend/cuda/*.cu size their requests with
// these; cuda_workspace_needs plans them; the guarded test backend checks every op call against
// the planned workspace with them).
namespace cuda_scratch {
inline constexpr int64_t kSliceRows = 256;  // rows per partial column sum
// attention_backward: D = rowsum(dO * O), one float per query row and head (B * q_rows * H).
inline size_t attention_backward(int64_t rows) { return size_t(rows > 1 ? rows : 1) * 4; }
// lm_head_cross_entropy: one double loss per row.
inline size_t cross_entropy(int64_t N) { return size_t(N) * 8; }
// Deterministic column sums over row slices in double: RMSNorm's weight gradient, the bias
// gradient.
inline size_t column_partials(int64_t N, int64_t cols, size_t elem) {
  return size_t((N + kSliceRows - 1) / kSliceRows) * size_t(cols) * elem;
}
// sum_squares: one double per block, at most 32 blocks per SM (1 MiB covers any GPU: the plan's
// figure when the GPU is not known).
inline constexpr size_t kReduceBytes = size_t(1) << 20;
inline size_t sum_squares(int num_sms) { return size_t(num_sms) * 32 * 8; }
}  // namespace cuda_scratch

// The blocks a bf16 GEMM C (M,N) = op(A) (M,K) op(B) (K,N) runs in so that its staged operands
// fit `limit` bytes: op(A) rounded (256-aligned), then op(B) rounded when stage_b (B f32).
// Halves the largest staged dimension until they fit: C's rows (the tokens of a projection),
// C's columns (the vocabulary of the LM head) or K (the tokens of a weight gradient), in
// multiples of 64 while a block is larger than 64. A product that fits is one block.
struct GemmBlocks {
  int64_t m = 0, n = 0, k = 0;
};
size_t gemm_stage_bytes(int64_t m, int64_t n, int64_t k, bool stage_b);
GemmBlocks gemm_blocks(int64_t M, int64_t N, int64_t K, bool stage_b, size_t limit);

// What the CUDA backend's kernels ask for (src/backend/cuda/*.cu: every ctx.scratch request and
// the bf16 GEMM staging), here so that the planner counts it without loading the CUDA module.
// reduce_bytes: sum_squares' partials (a GPU's own: 8 bytes x 32 blocks per SM).
BackendWorkspace cuda_workspace_needs(const WorkspaceShape& s, bool bf16_gemms,
                                      size_t reduce_bytes = cuda_scratch::kReduceBytes);

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string_view name() const = 0;
  virtual bool supports(OpKind op) const = 0;

  // Device memory (arenas are built on these) and transfers.
  virtual void* alloc(size_t bytes) = 0;
  virtual void free(void* p) = 0;
  virtual DeviceMemoryUse device_memory_use() const = 0;
  // Device memory free now and in all, as the driver reports them; zeros when the backend does
  // not know (the CPU backends: their memory is the host's).
  struct DeviceMemoryInfo {
    size_t free = 0, total = 0;
  };
  virtual DeviceMemoryInfo device_memory_info() const { return {}; }
  virtual void copy_to_device(void* dst, const void* host_src, size_t bytes) = 0;
  virtual void copy_to_host(void* host_dst, const void* src, size_t bytes) = 0;
  virtual void memset_zero(void* p, size_t bytes) = 0;
  virtual void synchronize() = 0;
  // Device-to-device copy of `rows` rows of `row_bytes` bytes: source rows src_pitch bytes
  // apart, destination rows dst_pitch apart (the packing of sequence-parallel all-to-alls); in
  // order with the ops. copy_device is a single row.
  virtual void copy_2d(void* dst, size_t dst_pitch, const void* src, size_t src_pitch,
                       size_t row_bytes, size_t rows) = 0;
  void copy_device(void* dst, const void* src, size_t bytes) {
    copy_2d(dst, bytes, src, bytes, bytes, 1);
  }
  // n floats of device memory into a new host vector.
  std::vector<float> download(const float* src, size_t n) {
    std::vector<float> host(n);
    if (n) copy_to_host(host.data(), src, n * 4);
    return host;
  }
  // True when device pointers are host addresses (CPU): host libraries such as MPI may then
  // read and write them directly instead of staging through copies.
  virtual bool host_addressable() const = 0;

  // Planned device memory for the backend's own temporaries (plan/planner.h `device_workspace`
  // sizes it for a run): op scratch (row losses, partial sums) and the bf16 copies of GEMM
  // inputs. A backend that needs none returns {} and ignores bind_workspace; one that is never
  // bound allocates its temporaries as they are asked for.
  virtual BackendWorkspace workspace_needs(const WorkspaceShape& shape) const {
    (void)shape;
    return {};
  }
  virtual void bind_workspace(void* op_scratch, size_t op_bytes, void* gemm_scratch,
                              size_t gemm_bytes, void* held, size_t held_bytes) {
    (void)op_scratch, (void)op_bytes, (void)gemm_scratch, (void)gemm_bytes, (void)held,
        (void)held_bytes;
  }

  // A GEMM input that several following calls read unchanged (a layer's normed input for the
  // q/k/v projections and their adapters, a projection's output gradient for its base and
  // adapter GEMMs): a backend whose GEMMs round f32 inputs to bf16 (CUDA with bf16 GEMMs) may
  // round x (rows x cols, contiguous) once, on its first use, and multiply that rounding until
  // release_gemm_input(x). The caller must not write x in between. False: nothing is kept (no
  // bf16 GEMMs, or no room), and there is nothing to release. Holds nest, last in first out.
  virtual bool hold_gemm_input(const float* x, int64_t rows, int64_t cols) {
    (void)x, (void)rows, (void)cols;
    return false;
  }
  virtual void release_gemm_input(const float* x) { (void)x; }

  // Run-to-run bit-identical results (`--full_determinism True`): ops whose fast kernels sum in
  // an order that varies between runs (CUDA: atomics in the attention backward's dQ and the
  // embedding backward) switch to kernels with one owner per output. The CPU backend is always
  // deterministic (whatever the thread count) and ignores it.
  virtual void set_deterministic(bool on) { (void)on; }

  // Op timing (backend/op_profile.h): while on, the backend times every op call where it runs.
  // take_op_profile waits for the work issued so far and returns the sums since profiling was
  // turned on or last taken. A backend that cannot time returns nothing.
  virtual void set_op_profiling(bool on) { (void)on; }
  virtual std::vector<OpTime> take_op_profile() { return {}; }

  // Pinned (page-locked) host memory for asynchronous transfers (CPU: ordinary memory).
  virtual void* alloc_pinned(size_t bytes) = 0;
  virtual void free_pinned(void* p) = 0;
  // Asynchronous transfers for activation offload and prefetch, on the backend's copy stream:
  // each starts after all compute work issued before it and overlaps with compute issued after.
  // host buffers must be pinned. CPU: plain synchronous copies.
  virtual void copy_to_host_async(void* host_dst, const void* src, size_t bytes) = 0;
  virtual void copy_to_device_async(void* dst, const void* host_src, size_t bytes) = 0;
  // Compute issued after this call waits for every copy issued before it (use a prefetched
  // buffer). CPU: nothing to do.
  virtual void wait_copies() = 0;
  // The host waits for every copy issued so far (read or reuse an offload buffer).
  virtual void synchronize_copies() = 0;

  virtual void embedding_forward(float* out, const int32_t* ids, const float* weight, int64_t N,
                                 int64_t D) = 0;
  virtual void embedding_backward(float* dweight, const float* dout, const int32_t* ids, int64_t N,
                                  int64_t D) = 0;
  virtual void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight,
                               int64_t N, int64_t D, float eps) = 0;
  virtual void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp,
                                const float* weight, const float* rstd, int64_t N, int64_t D,
                                Accumulate acc) = 0;
  virtual void linear_forward(float* out, const float* inp, const float* weight, const float* bias,
                              int64_t N, int64_t IN, int64_t OUT) = 0;
  virtual void linear_backward(float* dinp, float* dweight, float* dbias, const float* dout,
                               const float* inp, const float* weight, int64_t N, int64_t IN,
                               int64_t OUT, Accumulate acc) = 0;
  virtual void rope_tables(float* cos, float* sin, const int32_t* pos, const float* inv_freq,
                           float attention_scaling, int64_t N, int64_t HD) = 0;
  virtual void rope_forward(float* out, const float* inp, const float* cos, const float* sin,
                            int64_t N, int64_t H, int64_t HD) = 0;
  virtual void rope_backward(float* dinp, const float* dout, const float* cos, const float* sin,
                             int64_t N, int64_t H, int64_t HD) = 0;
  virtual void swiglu_forward(float* out, const float* gate, const float* up, int64_t n) = 0;
  virtual void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate,
                               const float* up, int64_t n) = 0;
  virtual void attention_forward(float* out, float* lse, const float* q, const float* k,
                                 const float* v, const AttentionShape& s) = 0;
  virtual void attention_backward(float* dq, float* dk, float* dv, const float* dout,
                                  const float* out, const float* lse, const float* q,
                                  const float* k, const float* v, const AttentionShape& s) = 0;
  // ops/attention.h: (out, lse) of rows x H becomes the merge with a second partial result.
  virtual void attention_merge(float* out, float* lse, const float* out_b, const float* lse_b,
                               int64_t rows, int64_t H, int64_t HD) = 0;
  virtual double lm_head_cross_entropy(float* dhidden, float* dweight, const float* hidden,
                                       const float* weight, const int32_t* targets, int64_t N,
                                       int64_t D, int64_t V, int64_t chunk, float grad_scale,
                                       float* scratch) = 0;
  virtual void adamw_update(float* param, const float* grad, float* m, float* v, int64_t n,
                            const AdamWParams& p) = 0;
  virtual double sum_squares(const float* x, int64_t n) = 0;
  // The sum of sum_squares over several vectors, read back once: on a GPU one synchronisation
  // instead of one per vector (global-norm clipping over hundreds of LoRA tensors). The default
  // calls sum_squares per part.
  struct SquaresPart {
    const float* x;
    int64_t n;
  };
  virtual double sum_squares_many(const std::vector<SquaresPart>& parts);
  virtual void scale_inplace(float* x, int64_t n, float s) = 0;
  // y (n) += x (n)
  virtual void add_inplace(float* y, const float* x, int64_t n) = 0;
  // out (n) f32 = in (n) bf16 (exact: bf16 is f32's upper half; NaN and Inf stay themselves).
  virtual void bf16_to_f32(float* out, const uint16_t* in, int64_t n) = 0;
  // out (n) bf16 = in (n) f32 rounded to nearest even (core/dtype.h's f32_to_bf16, bit for bit:
  // a NaN stays a quiet NaN of its sign); round_to_bf16: x = bf16_to_f32(f32_to_bf16(x)) in
  // place (the bf16 residual stream, RunSettings::bf16_residual).
  virtual void f32_to_bf16(uint16_t* out, const float* in, int64_t n) = 0;
  virtual void round_to_bf16(float* x, int64_t n) = 0;
  // Frozen bf16 weights (LoRA/QLoRA with --bf16 True: the base projections, the embedding, the
  // LM head). The linears give linear_forward / linear_backward's results (no weight gradient)
  // on the weight widened to f32; a backend that widens does so expand_rows weight rows at a
  // time into `expand` (expand_rows * IN floats; ops/linear.h). A backend whose GEMMs take bf16
  // inputs (CUDA with GemmPrecision::kBf16) multiplies the bf16 weight as it is and leaves
  // `expand` alone. The embedding widens the rows it looks up; the LM head + cross-entropy is
  // lm_head_cross_entropy without a weight gradient, its products those linears.
  virtual void linear_forward_bf16w(float* out, const float* inp, const uint16_t* weight,
                                    const float* bias, int64_t N, int64_t IN, int64_t OUT,
                                    float* expand, int64_t expand_rows) = 0;
  virtual void linear_backward_bf16w(float* dinp, float* dbias, const float* dout,
                                     const uint16_t* weight, int64_t N, int64_t IN, int64_t OUT,
                                     Accumulate acc, float* expand, int64_t expand_rows) = 0;
  virtual void embedding_forward_bf16(float* out, const int32_t* ids, const uint16_t* weight,
                                      int64_t N, int64_t D) = 0;
  virtual double lm_head_cross_entropy_bf16w(float* dhidden, const float* hidden,
                                             const uint16_t* weight, const int32_t* targets,
                                             int64_t N, int64_t D, int64_t V, int64_t chunk,
                                             float grad_scale, float* scratch, float* expand,
                                             int64_t expand_rows) = 0;

  // LoRA and QLoRA (ops/lora.h, ops/nf4.h). Not pure: a backend without them reports
  // supports(kLora / kNf4Dequantize) == false and the model refuses LoRA / 4-bit runs on it.
  // (Defaults in backend.cpp abort: the model checks supports() before calling them.)
  virtual void lora_forward(float* out, float* t, float* xd, const float* inp, const float* a,
                            const float* b, int64_t N, int64_t IN, int64_t OUT, const LoraCall& c);
  virtual void lora_backward(float* dinp, float* da, float* db, float* t, float* u, float* xd,
                             float* dxd, const float* dout, const float* inp, const float* a,
                             const float* b, int64_t N, int64_t IN, int64_t OUT, const LoraCall& c);
  // out (n) f32 from NF4 storage: packed (ceil(n/2)) absmax_q (ceil(n/64)) absmax_scale
  // (ceil(n/64/256)); all device pointers.
  virtual void nf4_dequantize(float* out, const uint8_t* packed, const uint8_t* absmax_q,
                              const float* absmax_scale, float absmax_offset, int64_t n);
};

// Backend::hold_gemm_input for a scope.
class HeldGemmInput {
 public:
  HeldGemmInput(Backend& be, const float* x, int64_t rows, int64_t cols)
      : be_(be), x_(x), held_(be.hold_gemm_input(x, rows, cols)) {}
  ~HeldGemmInput() {
    if (held_) be_.release_gemm_input(x_);
  }
  HeldGemmInput(const HeldGemmInput&) = delete;
  HeldGemmInput& operator=(const HeldGemmInput&) = delete;

 private:
  Backend& be_;
  const float* x_;
  bool held_;
};

// The CPU backend (reference; BLAS + OpenMP).
std::unique_ptr<Backend> make_cpu_backend();
// This process's rank on its node from the launcher's environment (Open MPI, MPICH/Hydra,
// MVAPICH, Slurm, torchrun), 0 when none is set; UserError naming the variable when it is not a
// non-negative integer.
int local_rank_from_env();
// The CUDA backend on GPU local_rank_from_env() % (visible GPUs), so that the ranks of a node
// take one GPU each; null when it was not built or no usable GPU is present (reason set).
std::unique_ptr<Backend> make_cuda_backend(std::string* reason,
                                           GemmPrecision gemm = GemmPrecision::kF32);
// A backend with `inner`'s arithmetic whose device memory is unreadable outside its own calls
// and that reports itself as not host-addressable (backend/cpu/guarded_backend.cpp): on a CPU
// it shows that nothing above the backend touches device memory directly.
std::unique_ptr<Backend> make_guarded_backend(std::unique_ptr<Backend> inner);
// "auto" (cuda when it was built and a GPU is present, else cpu), "cpu", "cuda" or "cpu-guarded"
// (the CPU backend guarded); UserError for an unknown or unavailable device. bf16: the CUDA
// backend's GEMMs take bf16 inputs (tensor cores, f32 accumulation); no effect on the CPU.
std::unique_ptr<Backend> make_backend(std::string_view device, bool bf16 = false);

}  // namespace lt
