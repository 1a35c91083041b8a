// The CUDA backend: owns the device, a compute stream and a copy stream, the cuBLAS handle and
// the scratch buffers; validates each op's arguments (as the CPU ops do) and forwards it to the
// launchers in kernels.h. Built into the module liblongtune_cuda.so (backend/cuda_module.h),
// whose entry point at the end of this file is the one place the backend is created.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "backend/backend.h"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/kernels.h"
#include "backend/cuda_module.h"
#include "core/check.h"
#include "core/error.h"

namespace lt {
namespace cuda {

Scratch::~Scratch() { release(); }

void Scratch::release() {
  // Teardown path: an error here (e.g. the context is already gone at exit) is not fatal.
  if (ptr_) (void)cudaFreeAsync(ptr_, stream_);
  ptr_ = nullptr;
  bytes_ = 0;
}

void Scratch::bind(void* p, size_t bytes) {
  bound_ = bytes ? p : nullptr;
  bound_bytes_ = bound_ ? bytes : 0;
  warned_ = false;
}

void* Scratch::get(size_t bytes, cudaStream_t stream) {
  bytes = (bytes + 255) / 256 * 256;
  if (bound_ && bytes <= bound_bytes_) return bound_;
  if (bytes <= bytes_ && stream == stream_) return ptr_;
  if (bound_ && !warned_) {
    warned_ = true;
    std::fprintf(stderr,
                 "longtune: warning: the CUDA backend's %s needs %zu bytes, more than the %zu "
                 "planned; allocating it outside the plan\n",
                 name_, bytes, bound_bytes_);
  }
  // Grow by 1.5x at least, so that slowly rising sizes do not reallocate every call.
  const size_t want = std::max(bytes, bytes_ + bytes_ / 2);
  if (ptr_) LT_CUDA_CHECK(cudaFreeAsync(ptr_, stream_));
  ptr_ = nullptr;
  bytes_ = 0;
  stream_ = stream;
  const cudaError_t err = cudaMallocAsync(&ptr_, want, stream);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    ptr_ = nullptr;
    fail("out of GPU memory: the CUDA backend's scratch needs {} bytes ({})", want,
         cudaGetErrorString(err));
  }
  bytes_ = want;
  return ptr_;
}

// The backend's Profiler: a pair of timing events on the stream around each span, read once
// the stream has been waited for and summed by name (depth: how many spans enclose it). Events
// are reused; with more than kMaxPending spans unread, begin waits for the stream and reads them
// (profiled runs only).
class EventProfiler final : public Profiler {
 public:
  EventProfiler() = default;
  EventProfiler(const EventProfiler&) = delete;
  EventProfiler& operator=(const EventProfiler&) = delete;
  ~EventProfiler() {
    // Teardown path: errors are not fatal.
    for (const Timed& t : open_) (void)cudaEventDestroy(t.begin);
    for (const Timed& t : done_) (void)cudaEventDestroy(t.begin), (void)cudaEventDestroy(t.end);
    for (cudaEvent_t e : free_) (void)cudaEventDestroy(e);
  }
  void begin(cudaStream_t stream, const char* name) override {
    if (done_.size() >= kMaxPending) read(stream);
    const cudaEvent_t e = event();
    LT_CUDA_CHECK(cudaEventRecord(e, stream));
    open_.push_back({name, int(open_.size()), e, nullptr});
  }
  void end(cudaStream_t stream) override {
    LT_CHECK(!open_.empty(), "cuda profiler: end without begin");
    Timed t = open_.back();
    open_.pop_back();
    t.end = event();
    LT_CUDA_CHECK(cudaEventRecord(t.end, stream));
    done_.push_back(t);
  }
  // Waits for stream and returns the sums since the last take.
  std::vector<OpTime> take(cudaStream_t stream) {
    read(stream);
    return times_.take();
  }

 private:
  static constexpr size_t kMaxPending = size_t(1) << 16;
  struct Timed {
    const char* name;
    int depth;
    cudaEvent_t begin, end;
  };
  cudaEvent_t event() {
    cudaEvent_t e = nullptr;
    if (free_.empty()) {
      LT_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDefault));
    } else {
      e = free_.back();
      free_.pop_back();
    }
    return e;
  }
  void read(cudaStream_t stream) {
    LT_CUDA_CHECK(cudaStreamSynchronize(stream));
    for (const Timed& t : done_) {
      float ms = 0;
      LT_CUDA_CHECK(cudaEventElapsedTime(&ms, t.begin, t.end));
      times_.add(t.name, t.depth, double(ms));
      free_.push_back(t.begin);
      free_.push_back(t.end);
    }
    done_.clear();
  }
  std::vector<Timed> open_, done_;
  std::vector<cudaEvent_t> free_;
  OpTimes times_;
};

}  // namespace cuda

namespace {

class CudaBackend final : public Backend {
 public:
  CudaBackend(int device, GemmPrecision precision) : device_(device) {
    LT_CUDA_CHECK(cudaSetDevice(device));
    cudaDeviceProp prop{};
    LT_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    device_name_ = prop.name;
    max_pitch_ = prop.memPitch;
    LT_CUDA_CHECK(cudaStreamCreateWithFlags(&compute_, cudaStreamNonBlocking));
    LT_CUDA_CHECK(cudaStreamCreateWithFlags(&copy_, cudaStreamNonBlocking));
    LT_CUDA_CHECK(cudaEventCreateWithFlags(&compute_done_, cudaEventDisableTiming));
    LT_CUDA_CHECK(cudaEventCreateWithFlags(&copies_done_, cudaEventDisableTiming));
    LT_CUBLAS_CHECK(cublasCreate(&cublas_));
    LT_CUBLAS_CHECK(cublasSetStream(cublas_, compute_));
    // Never TF32 behind the caller's back: kF32 GEMMs use CUBLAS_COMPUTE_32F_PEDANTIC anyway.
    LT_CUBLAS_CHECK(cublasSetMathMode(cublas_, CUBLAS_DEFAULT_MATH));
    ctx_.stream = compute_;
    ctx_.cublas = cublas_;
    ctx_.precision = precision;
    ctx_.scratch = &scratch_;
    ctx_.gemm_scratch = &gemm_scratch_;
    ctx_.held_scratch = &held_scratch_;
    ctx_.held = &held_;
    const char* hold = std::getenv("LONGTUNE_CUDA_HOLD_GEMM_INPUTS");
    held_.enabled = !(hold && std::string(hold) == "0");
    ctx_.num_sms = prop.multiProcessorCount;
    ctx_.max_shared_bytes = prop.sharedMemPerBlockOptin;
    const char* transposed = std::getenv("LONGTUNE_ATTENTION_TRANSPOSED_TILES");
    ctx_.attention_transposed_tiles = transposed && std::string(transposed) == "1";
  }

  ~CudaBackend() override {
    // Errors are not fatal during teardown; each handle is released once.
    (void)cudaStreamSynchronize(copy_);
    scratch_.release();
    gemm_scratch_.release();
    held_scratch_.release();
    (void)cudaStreamSynchronize(compute_);
    (void)cublasDestroy(cublas_);
    (void)cudaEventDestroy(compute_done_);
    (void)cudaEventDestroy(copies_done_);
    (void)cudaStreamDestroy(copy_);
    (void)cudaStreamDestroy(compute_);
  }

  std::string_view name() const override { return "cuda"; }
  void set_deterministic(bool on) override { ctx_.deterministic = on; }
  void set_op_profiling(bool on) override { ctx_.profiler = on ? &profiler_ : nullptr; }
  std::vector<OpTime> take_op_profile() override { return profiler_.take(compute_); }
  bool supports(OpKind) const override { return true; }  // attention: HD <= 128 (per call)

  // ---- memory and transfers ----------------------------------------------------------------
  void* alloc(size_t bytes) override {
    void* p = nullptr;
    if (bytes == 0) return nullptr;
    const cudaError_t err = cudaMalloc(&p, bytes);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      size_t free_b = 0, total_b = 0;
      (void)cudaMemGetInfo(&free_b, &total_b);
      fail("out of GPU memory allocating {} bytes on {} ({} bytes free of {}): {}", bytes,
           device_name_, free_b, total_b, cudaGetErrorString(err));
    }
    std::lock_guard<std::mutex> lock(mu_);
    sizes_[p] = bytes;
    allocated_ += bytes;
    note_peak();
    return p;
  }
  void free(void* p) override {
    if (!p) return;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = sizes_.find(p);
      LT_CHECK(it != sizes_.end(), "cuda: free of memory this backend did not allocate");
      note_peak();  // the scratch may have grown since the last allocation
      allocated_ -= it->second;
      sizes_.erase(it);
    }
    LT_CUDA_CHECK(cudaFree(p));
  }
  BackendWorkspace workspace_needs(const WorkspaceShape& shape) const override {
    return cuda_workspace_needs(shape, ctx_.precision == GemmPrecision::kBf16,
                                cuda_scratch::sum_squares(ctx_.num_sms));
  }
  void bind_workspace(void* op_scratch, size_t op_bytes, void* gemm_scratch, size_t gemm_bytes,
                      void* held, size_t held_bytes) override {
    LT_CHECK(held_.depth == 0, "bind_workspace while {} GEMM inputs are held", held_.depth);
    synchronize();  // nothing in flight still uses the memory bound before
    scratch_.bind(op_scratch, op_bytes);
    gemm_scratch_.bind(gemm_scratch, gemm_bytes);
    held_scratch_.bind(held, held_bytes);
    held_.capacity = held ? held_bytes : 0;  // planned none: hold nothing rather than allocate
  }
  // alloc's bytes plus the backend's own scratch (which only grows), sampled at every
  // allocation, free and query.
  DeviceMemoryUse device_memory_use() const override {
    std::lock_guard<std::mutex> lock(mu_);
    note_peak();
    return {
        allocated_ + scratch_.own_bytes() + gemm_scratch_.own_bytes() + held_scratch_.own_bytes(),
        peak_};
  }
  DeviceMemoryInfo device_memory_info() const override {
    DeviceMemoryInfo m;
    LT_CUDA_CHECK(cudaMemGetInfo(&m.free, &m.total));
    return m;
  }
  void copy_to_device(void* d, const void* s, size_t n) override {
    if (n == 0) return;
    LT_CUDA_CHECK(cudaMemcpyAsync(d, s, n, cudaMemcpyHostToDevice, compute_));
    LT_CUDA_CHECK(cudaStreamSynchronize(compute_));  // the host buffer may be reused at once
  }
  void copy_to_host(void* d, const void* s, size_t n) override {
    if (n == 0) return;
    LT_CUDA_CHECK(cudaMemcpyAsync(d, s, n, cudaMemcpyDeviceToHost, compute_));
    LT_CUDA_CHECK(cudaStreamSynchronize(compute_));
  }
  void memset_zero(void* p, size_t n) override {
    const cuda::Span span(ctx_, "memset_zero");
    if (n) LT_CUDA_CHECK(cudaMemsetAsync(p, 0, n, compute_));
  }
  void synchronize() override {
    LT_CUDA_CHECK(cudaStreamSynchronize(copy_));
    LT_CUDA_CHECK(cudaStreamSynchronize(compute_));
  }
  void copy_2d(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t row_bytes,
               size_t rows) override {
    const cuda::Span span(ctx_, "copy_2d");
    if (row_bytes == 0 || rows == 0) return;
    // cudaMemcpy2D refuses pitches above the device's memPitch (2^31 - 1 bytes): one contiguous
    // block (copy_device of a whole N x D activation is 2 GiB at 128K tokens) is a plain copy,
    // and rows further apart than that go one at a time.
    if (rows == 1 || (dst_pitch == row_bytes && src_pitch == row_bytes)) {
      LT_CUDA_CHECK(
          cudaMemcpyAsync(dst, src, row_bytes * rows, cudaMemcpyDeviceToDevice, compute_));
    } else if (std::max(dst_pitch, src_pitch) > max_pitch_) {
      for (size_t r = 0; r < rows; ++r)
        LT_CUDA_CHECK(cudaMemcpyAsync(static_cast<char*>(dst) + r * dst_pitch,
                                      static_cast<const char*>(src) + r * src_pitch, row_bytes,
                                      cudaMemcpyDeviceToDevice, compute_));
    } else {
      LT_CUDA_CHECK(cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, row_bytes, rows,
                                      cudaMemcpyDeviceToDevice, compute_));
    }
  }
  bool host_addressable() const override { return false; }

  void* alloc_pinned(size_t bytes) override {
    void* p = nullptr;
    if (bytes == 0) return nullptr;
    const cudaError_t err = cudaMallocHost(&p, bytes);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      fail("out of pinned host memory allocating {} bytes: {}", bytes, cudaGetErrorString(err));
    }
    return p;
  }
  void free_pinned(void* p) override {
    if (p) LT_CUDA_CHECK(cudaFreeHost(p));
  }
  // Copy-stream transfers start after the compute work issued so far (an event on compute).
  void copy_to_host_async(void* d, const void* s, size_t n) override {
    if (n == 0) return;
    LT_CUDA_CHECK(cudaEventRecord(compute_done_, compute_));
    LT_CUDA_CHECK(cudaStreamWaitEvent(copy_, compute_done_, 0));
    LT_CUDA_CHECK(cudaMemcpyAsync(d, s, n, cudaMemcpyDeviceToHost, copy_));
  }
  void copy_to_device_async(void* d, const void* s, size_t n) override {
    if (n == 0) return;
    LT_CUDA_CHECK(cudaEventRecord(compute_done_, compute_));
    LT_CUDA_CHECK(cudaStreamWaitEvent(copy_, compute_done_, 0));
    LT_CUDA_CHECK(cudaMemcpyAsync(d, s, n, cudaMemcpyHostToDevice, copy_));
  }
  void wait_copies() override {
    LT_CUDA_CHECK(cudaEventRecord(copies_done_, copy_));
    LT_CUDA_CHECK(cudaStreamWaitEvent(compute_, copies_done_, 0));
  }
  void synchronize_copies() override { LT_CUDA_CHECK(cudaStreamSynchronize(copy_)); }

  // ---- ops ---------------------------------------------------------------------------------
  void embedding_forward(float* out, const int32_t* ids, const float* w, int64_t N,
                         int64_t D) override {
    const cuda::Span span(ctx_, "embedding_forward");
    LT_CHECK(N >= 0 && D >= 0, "embedding_forward: N={} D={}", N, D);
    cuda::embedding_forward(ctx_, out, ids, w, N, D);
  }
  void embedding_backward(float* dw, const float* dout, const int32_t* ids, int64_t N,
                          int64_t D) override {
    const cuda::Span span(ctx_, "embedding_backward");
    LT_CHECK(N >= 0 && D >= 0, "embedding_backward: N={} D={}", N, D);
    cuda::embedding_backward(ctx_, dw, dout, ids, N, D);
  }
  void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* w, int64_t N,
                       int64_t D, float eps) override {
    const cuda::Span span(ctx_, "rmsnorm_forward");
    LT_CHECK(N >= 0 && D >= 1, "rmsnorm_forward: N={} D={}", N, D);
    cuda::rmsnorm_forward(ctx_, out, rstd, inp, w, N, D, eps);
  }
  void rmsnorm_backward(float* dinp, float* dw, const float* dout, const float* inp, const float* w,
                        const float* rstd, int64_t N, int64_t D, Accumulate acc) override {
    const cuda::Span span(ctx_, "rmsnorm_backward");
    LT_CHECK(N >= 0 && D >= 1, "rmsnorm_backward: N={} D={}", N, D);
    cuda::rmsnorm_backward(ctx_, dinp, dw, dout, inp, w, rstd, N, D, acc);
  }
  void linear_forward(float* out, const float* inp, const float* w, const float* b, int64_t N,
                      int64_t IN, int64_t OUT) override {
    const cuda::Span span(ctx_, "linear_forward");
    check_gemm_dims("linear_forward", N, IN, OUT);
    cuda::linear_forward(ctx_, out, inp, w, b, N, IN, OUT);
  }
  void linear_backward(float* dinp, float* dw, float* db, const float* dout, const float* inp,
                       const float* w, int64_t N, int64_t IN, int64_t OUT,
                       Accumulate acc) override {
    const cuda::Span span(ctx_, "linear_backward");
    check_gemm_dims("linear_backward", N, IN, OUT);
    cuda::linear_backward(ctx_, dinp, dw, db, dout, inp, w, N, IN, OUT, acc);
  }
  void linear_forward_bf16w(float* out, const float* inp, const uint16_t* w, const float* b,
                            int64_t N, int64_t IN, int64_t OUT, float* expand,
                            int64_t expand_rows) override {
    const cuda::Span span(ctx_, "linear_forward_bf16w");
    check_gemm_dims("linear_forward_bf16w", N, IN, OUT);
    LT_CHECK(expand_rows >= 1, "linear_forward_bf16w: expand_rows={}", expand_rows);
    cuda::linear_forward_bf16w(ctx_, out, inp, w, b, N, IN, OUT, expand, expand_rows);
  }
  void linear_backward_bf16w(float* dinp, float* db, const float* dout, const uint16_t* w,
                             int64_t N, int64_t IN, int64_t OUT, Accumulate acc, float* expand,
                             int64_t expand_rows) override {
    const cuda::Span span(ctx_, "linear_backward_bf16w");
    check_gemm_dims("linear_backward_bf16w", N, IN, OUT);
    LT_CHECK(expand_rows >= 1, "linear_backward_bf16w: expand_rows={}", expand_rows);
    cuda::linear_backward_bf16w(ctx_, dinp, db, dout, w, N, IN, OUT, acc, expand, expand_rows);
  }
  void embedding_forward_bf16(float* out, const int32_t* ids, const uint16_t* w, int64_t N,
                              int64_t D) override {
    const cuda::Span span(ctx_, "embedding_forward_bf16");
    LT_CHECK(N >= 0 && D >= 0, "embedding_forward_bf16: N={} D={}", N, D);
    cuda::embedding_forward_bf16(ctx_, out, ids, w, N, D);
  }
  void rope_tables(float* cos, float* sin, const int32_t* pos, const float* inv_freq, float sc,
                   int64_t N, int64_t HD) override {
    const cuda::Span span(ctx_, "rope_tables");
    LT_CHECK(N >= 0 && HD >= 2 && HD % 2 == 0, "rope_tables: N={} HD={}", N, HD);
    cuda::rope_tables(ctx_, cos, sin, pos, inv_freq, sc, N, HD);
  }
  void rope_forward(float* out, const float* inp, const float* cos, const float* sin, int64_t N,
                    int64_t H, int64_t HD) override {
    const cuda::Span span(ctx_, "rope_forward");
    LT_CHECK(N >= 0 && H >= 1 && HD >= 2 && HD % 2 == 0, "rope_forward: N={} H={} HD={}", N, H, HD);
    cuda::rope_forward(ctx_, out, inp, cos, sin, N, H, HD);
  }
  void rope_backward(float* dinp, const float* dout, const float* cos, const float* sin, int64_t N,
                     int64_t H, int64_t HD) override {
    const cuda::Span span(ctx_, "rope_backward");
    LT_CHECK(N >= 0 && H >= 1 && HD >= 2 && HD % 2 == 0, "rope_backward: N={} H={} HD={}", N, H,
             HD);
    cuda::rope_backward(ctx_, dinp, dout, cos, sin, N, H, HD);
  }
  void swiglu_forward(float* out, const float* g, const float* u, int64_t n) override {
    const cuda::Span span(ctx_, "swiglu_forward");
    LT_CHECK(n >= 0, "swiglu_forward: n={}", n);
    cuda::swiglu_forward(ctx_, out, g, u, n);
  }
  void swiglu_backward(float* dg, float* du, const float* dout, const float* g, const float* u,
                       int64_t n) override {
    const cuda::Span span(ctx_, "swiglu_backward");
    LT_CHECK(n >= 0, "swiglu_backward: n={}", n);
    cuda::swiglu_backward(ctx_, dg, du, dout, g, u, n);
  }
  void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                         const AttentionShape& s) override {
    const cuda::Span span(ctx_, "attention_forward");
    check_attention(s);
    cuda::attention_forward(ctx_, out, lse, q, k, v, s);
  }
  void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* out,
                          const float* lse, const float* q, const float* k, const float* v,
                          const AttentionShape& s) override {
    const cuda::Span span(ctx_, "attention_backward");
    check_attention(s);
    cuda::attention_backward(ctx_, dq, dk, dv, dout, out, lse, q, k, v, s);
  }
  void attention_merge(float* out, float* lse, const float* out_b, const float* lse_b, int64_t rows,
                       int64_t H, int64_t HD) override {
    const cuda::Span span(ctx_, "attention_merge");
    LT_CHECK(rows >= 0 && H >= 1 && HD >= 1, "attention_merge: rows={} H={} HD={}", rows, H, HD);
    cuda::attention_merge(ctx_, out, lse, out_b, lse_b, rows, H, HD);
  }
  double lm_head_cross_entropy(float* dh, float* dw, const float* h, const float* w,
                               const int32_t* t, int64_t N, int64_t D, int64_t V, int64_t chunk,
                               float gs, float* scratch) override {
    const cuda::Span span(ctx_, "lm_head_cross_entropy");
    check_cross_entropy("lm_head_cross_entropy", t, N, D, V, chunk);
    return cuda::lm_head_cross_entropy(ctx_, dh, dw, h, w, t, host_targets_.data(), N, D, V, chunk,
                                       gs, scratch);
  }
  double lm_head_cross_entropy_bf16w(float* dh, const float* h, const uint16_t* w, const int32_t* t,
                                     int64_t N, int64_t D, int64_t V, int64_t chunk, float gs,
                                     float* scratch, float* expand, int64_t expand_rows) override {
    const cuda::Span span(ctx_, "lm_head_cross_entropy_bf16w");
    check_cross_entropy("lm_head_cross_entropy_bf16w", t, N, D, V, chunk);
    LT_CHECK(expand_rows >= 1, "lm_head_cross_entropy_bf16w: expand_rows={}", expand_rows);
    return cuda::lm_head_cross_entropy_bf16w(ctx_, dh, h, w, t, host_targets_.data(), N, D, V,
                                             chunk, gs, scratch, expand, expand_rows);
  }
  void adamw_update(float* p, const float* g, float* m, float* v, int64_t n,
                    const AdamWParams& a) override {
    const cuda::Span span(ctx_, "adamw_update");
    LT_CHECK(n >= 0, "adamw_update: n={}", n);
    cuda::adamw_update(ctx_, p, g, m, v, n, a);
  }
  double sum_squares(const float* x, int64_t n) override {
    const cuda::Span span(ctx_, "sum_squares");
    return cuda::sum_squares(ctx_, x, n);
  }
  double sum_squares_many(const std::vector<SquaresPart>& parts) override {
    const cuda::Span span(ctx_, "sum_squares_many");
    for (const SquaresPart& p : parts) LT_CHECK(p.n >= 0, "sum_squares_many: n={}", p.n);
    return cuda::sum_squares_many(ctx_, parts.data(), parts.size());
  }
  void scale_inplace(float* x, int64_t n, float s) override {
    const cuda::Span span(ctx_, "scale_inplace");
    cuda::scale_inplace(ctx_, x, n, s);
  }
  void add_inplace(float* y, const float* x, int64_t n) override {
    const cuda::Span span(ctx_, "add_inplace");
    cuda::add_inplace(ctx_, y, x, n);
  }
  void bf16_to_f32(float* out, const uint16_t* in, int64_t n) override {
    const cuda::Span span(ctx_, "bf16_to_f32");
    cuda::bf16_to_f32(ctx_, out, in, n);
  }
  void f32_to_bf16(uint16_t* out, const float* in, int64_t n) override {
    const cuda::Span span(ctx_, "f32_to_bf16");
    cuda::f32_to_bf16(ctx_, out, in, n);
  }
  bool hold_gemm_input(const float* x, int64_t rows, int64_t cols) override {
    LT_CHECK(rows >= 0 && cols >= 0, "hold_gemm_input: rows={} cols={}", rows, cols);
    return cuda::hold_gemm_input(ctx_, x, rows, cols);
  }
  void release_gemm_input(const float* x) override { cuda::release_gemm_input(ctx_, x); }
  void round_to_bf16(float* x, int64_t n) override {
    const cuda::Span span(ctx_, "round_to_bf16");
    cuda::round_to_bf16(ctx_, x, n);
  }
  void lora_forward(float* out, float* t, float* xd, const float* inp, const float* a,
                    const float* b, int64_t N, int64_t IN, int64_t OUT,
                    const LoraCall& c) override {
    const cuda::Span span(ctx_, "lora_forward");
    LT_CHECK(c.R > 0 && N >= 0, "lora_forward R={} N={}", c.R, N);
    LT_CHECK(c.dropout <= 0 || xd, "lora_forward: dropout needs the xd scratch");
    check_gemm_dims("lora_forward", N, IN, OUT);
    cuda::lora_forward(ctx_, out, t, xd, inp, a, b, N, IN, OUT, c);
  }
  void lora_backward(float* dinp, float* da, float* db, float* t, float* u, float* xd, float* dxd,
                     const float* dout, const float* inp, const float* a, const float* b, int64_t N,
                     int64_t IN, int64_t OUT, const LoraCall& c) override {
    const cuda::Span span(ctx_, "lora_backward");
    LT_CHECK(c.R > 0 && N >= 0, "lora_backward R={} N={}", c.R, N);
    LT_CHECK(c.dropout <= 0 || (xd && dxd), "lora_backward: dropout needs the xd/dxd scratch");
    check_gemm_dims("lora_backward", N, IN, OUT);
    cuda::lora_backward(ctx_, dinp, da, db, t, u, xd, dxd, dout, inp, a, b, N, IN, OUT, c);
  }
  void nf4_dequantize(float* out, const uint8_t* packed, const uint8_t* absmax_q,
                      const float* absmax_scale, float absmax_offset, int64_t n) override {
    const cuda::Span span(ctx_, "nf4_dequantize");
    LT_CHECK(n >= 0 && n % 2 == 0, "nf4_dequantize: n={} must be even on CUDA", n);
    if (!nf4_tables_uploaded_) {  // the code tables into constant memory, once
      cuda::nf4_upload_tables(ctx_);
      nf4_tables_uploaded_ = true;
    }
    cuda::nf4_dequantize(ctx_, out, {packed, absmax_q, absmax_scale, absmax_offset, n});
  }

 private:
  static void check_gemm_dims(const char* op, int64_t N, int64_t IN, int64_t OUT) {
    // cuBLAS takes int dimensions; every product of two must also index within int64.
    constexpr int64_t kMax = (int64_t(1) << 31) - 1;
    LT_CHECK(N >= 0 && IN >= 0 && OUT >= 0 && N <= kMax && IN <= kMax && OUT <= kMax,
             "{}: N={} IN={} OUT={} (cuBLAS needs each < 2^31)", op, N, IN, OUT);
  }
  void check_attention(const AttentionShape& s) const {
    LT_CHECK(s.B >= 0 && s.T >= 0 && s.H > 0 && s.KVH > 0 && s.HD > 0,
             "attention: B={} T={} H={} KVH={} HD={}", s.B, s.T, s.H, s.KVH, s.HD);
    LT_CHECK(s.q_begin >= 0 && s.Tq >= 0 && s.q_begin + s.q_rows() <= s.T && s.k_begin >= 0 &&
                 s.Tk >= 0 && s.k_begin + s.k_rows() <= s.T,
             "attention: block queries [{}, +{}) keys [{}, +{}) outside T={}", s.q_begin,
             s.q_rows(), s.k_begin, s.k_rows(), s.T);
    LT_CHECK(s.H % s.KVH == 0, "attention: H={} is not a multiple of KVH={}", s.H, s.KVH);
    LT_CHECK(s.window >= 0, "attention: window={}", s.window);
    LT_CHECK(s.scale > 0 && std::isfinite(s.scale), "attention: softmax scale={}", s.scale);
    LT_CHECK(s.HD <= cuda::kMaxAttentionHeadDim,
             "attention: head dim {} > {} is not supported by the CUDA kernels", s.HD,
             cuda::kMaxAttentionHeadDim);
    const size_t need = cuda::attention_shared_bytes(s.HD);
    LT_CHECK(need <= ctx_.max_shared_bytes,
             "attention: head dim {} needs {} bytes of shared memory per block; {} has {}", s.HD,
             need, device_name_, ctx_.max_shared_bytes);
    LT_CHECK(s.B * s.H <= 65535 && s.B * s.KVH <= 65535, "attention: B*H={} exceeds the grid",
             s.B * s.H);
  }

  // The targets come to the host once (host_targets_): validated like the CPU op, and used to
  // skip chunks without labels (the loss is returned to the host anyway: no extra wait).
  void check_cross_entropy(const char* op, const int32_t* t, int64_t N, int64_t D, int64_t V,
                           int64_t chunk) {
    LT_CHECK(chunk >= 1, "{}: chunk={} must be >= 1", op, chunk);
    LT_CHECK(N >= 0 && D >= 1 && V >= 1, "{}: N={} D={} V={}", op, N, D, V);
    check_gemm_dims(op, std::min(N, chunk), D, V);
    host_targets_.resize(size_t(N));
    copy_to_host(host_targets_.data(), t, size_t(N) * sizeof(int32_t));
    for (int64_t n = 0; n < N; ++n) {
      const int32_t y = host_targets_[size_t(n)];
      LT_CHECK(y == kIgnoreIndex || (y >= 0 && y < V), "target[{}]={} outside [0,{}) and not {}", n,
               y, V, kIgnoreIndex);
    }
  }

  int device_;
  std::string device_name_;
  size_t max_pitch_ = 0;              // cudaMemcpy2D's largest pitch
  bool nf4_tables_uploaded_ = false;  // cuda::nf4_upload_tables
  cudaStream_t compute_ = nullptr, copy_ = nullptr;
  cudaEvent_t compute_done_ = nullptr, copies_done_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  cuda::Scratch scratch_{"op scratch"}, gemm_scratch_{"GEMM scratch"},
      held_scratch_{"held GEMM inputs"};
  cuda::HeldInputs held_;
  cuda::Context ctx_;
  cuda::EventProfiler profiler_;
  void note_peak() const {
    peak_ = std::max(peak_, allocated_ + scratch_.own_bytes() + gemm_scratch_.own_bytes() +
                                held_scratch_.own_bytes());
  }
  mutable std::mutex mu_;
  std::unordered_map<void*, size_t> sizes_;
  size_t allocated_ = 0;
  mutable size_t peak_ = 0;
  std::vector<int32_t> host_targets_;
};

}  // namespace

#ifdef LONGTUNE_HAVE_NCCL
std::unique_ptr<Communicator> make_nccl_in_module(Communicator& group, double timeout_seconds,
                                                  std::string* reason);  // dist/nccl_comm.cpp
#endif

namespace {

std::unique_ptr<Backend> make_backend_in_module(std::string* reason, GemmPrecision gemm) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    if (reason) *reason = std::string("cudaGetDeviceCount failed: ") + cudaGetErrorString(err);
    return nullptr;
  }
  if (count == 0) {
    if (reason) *reason = "no CUDA device is present";
    return nullptr;
  }
  const int device = local_rank_from_env() % count;  // one GPU per rank of the node
  int major = 0;
  LT_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  if (major < 8) {
    if (reason)
      *reason = fmt::format(
          "GPU {} has compute capability {}.x; the CUDA backend needs 8.0 or newer (bf16 tensor "
          "cores)",
          device, major);
    return nullptr;
  }
  return std::make_unique<CudaBackend>(device, gemm);
}

}  // namespace

}  // namespace lt

// The module's one export (backend/cuda_module.h).
extern "C" __attribute__((visibility("default"))) const lt::CudaModule* longtune_cuda_module() {
  static const lt::CudaModule module{lt::kCudaModuleAbi, &lt::make_backend_in_module,
#ifdef LONGTUNE_HAVE_NCCL
                                     &lt::make_nccl_in_module
#else
                                     nullptr
#endif
  };
  return &module;
}
