// The CPU backend: forwards each op to its implementation in src/ops.
#include <sys/mman.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>

#include "backend/backend.h"
#include "core/check.h"
#include "core/dtype.h"
#include "core/error.h"
#include "core/memory.h"
#include "ops/cross_entropy.h"
#include "ops/embedding.h"
#include "ops/linear.h"
#include "ops/lora.h"
#include "ops/nf4.h"
#include "ops/rmsnorm.h"
#include "ops/rope.h"
#include "ops/swiglu.h"

namespace lt {
namespace {

class CpuBackend final : public Backend {
 public:
  std::string_view name() const override { return "cpu"; }
  bool supports(OpKind) const override { return true; }
  // Device memory of the CPU backend: anonymous mappings (zeroed, committed page by page as they
  // are touched, so a planned but unused buffer costs no resident memory).
  void* alloc(size_t bytes) override {
    if (bytes == 0) return nullptr;
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
      fail("out of host memory allocating {} ({} bytes); see the memory plan above",
           format_bytes(bytes), bytes);
    std::lock_guard<std::mutex> lock(mu_);
    sizes_[p] = bytes;
    use_.in_use += bytes;
    use_.peak = std::max(use_.peak, use_.in_use);
    return p;
  }
  void free(void* p) override {
    if (!p) return;
    size_t bytes = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = sizes_.find(p);
      LT_CHECK(it != sizes_.end(), "free of memory this backend did not allocate");
      bytes = it->second;
      sizes_.erase(it);
      use_.in_use -= bytes;
    }
    munmap(p, bytes);
  }
  DeviceMemoryUse device_memory_use() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return use_;
  }
  void copy_to_device(void* d, const void* s, size_t n) override { std::memcpy(d, s, n); }
  void copy_to_host(void* d, const void* s, size_t n) override { std::memcpy(d, s, n); }
  void memset_zero(void* p, size_t n) override {
    const WallSpan span(prof_, "memset_zero");
    std::memset(p, 0, n);
  }
  void synchronize() override {}
  void copy_2d(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t row_bytes,
               size_t rows) override {
    const WallSpan span(prof_, "copy_2d");
    for (size_t r = 0; r < rows; ++r)
      std::memcpy(static_cast<char*>(dst) + r * dst_pitch,
                  static_cast<const char*>(src) + r * src_pitch, row_bytes);
  }
  bool host_addressable() const override { return true; }
  void* alloc_pinned(size_t bytes) override { return alloc(bytes); }
  void free_pinned(void* p) override { free(p); }
  void copy_to_host_async(void* d, const void* s, size_t n) override { std::memcpy(d, s, n); }
  void copy_to_device_async(void* d, const void* s, size_t n) override { std::memcpy(d, s, n); }
  void wait_copies() override {}
  void synchronize_copies() override {}
  void set_op_profiling(bool on) override { prof_ = on ? &times_ : nullptr; }
  std::vector<OpTime> take_op_profile() override { return times_.take(); }

  void embedding_forward(float* out, const int32_t* ids, const float* w, int64_t N,
                         int64_t D) override {
    const WallSpan span(prof_, "embedding_forward");
    lt::embedding_forward(out, ids, w, N, D);
  }
  void embedding_backward(float* dw, const float* dout, const int32_t* ids, int64_t N,
                          int64_t D) override {
    const WallSpan span(prof_, "embedding_backward");
    lt::embedding_backward(dw, dout, ids, N, D);
  }
  void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* w, int64_t N,
                       int64_t D, float eps) override {
    const WallSpan span(prof_, "rmsnorm_forward");
    lt::rmsnorm_forward(out, rstd, inp, w, N, D, eps);
  }
  void rmsnorm_backward(float* dinp, float* dw, const float* dout, const float* inp, const float* w,
                        const float* rstd, int64_t N, int64_t D, Accumulate acc) override {
    const WallSpan span(prof_, "rmsnorm_backward");
    lt::rmsnorm_backward(dinp, dw, dout, inp, w, rstd, N, D, acc);
  }
  void linear_forward(float* out, const float* inp, const float* w, const float* b, int64_t N,
                      int64_t IN, int64_t OUT) override {
    const WallSpan span(prof_, "linear_forward");
    lt::linear_forward(out, inp, w, b, N, IN, OUT);
  }
  void linear_backward(float* dinp, float* dw, float* db, const float* dout, const float* inp,
                       const float* w, int64_t N, int64_t IN, int64_t OUT,
                       Accumulate acc) override {
    const WallSpan span(prof_, "linear_backward");
    lt::linear_backward(dinp, dw, db, dout, inp, w, N, IN, OUT, acc);
  }
  void rope_tables(float* cos, float* sin, const int32_t* pos, const float* inv_freq, float sc,
                   int64_t N, int64_t HD) override {
    const WallSpan span(prof_, "rope_tables");
    lt::rope_tables(cos, sin, pos, inv_freq, sc, N, HD);
  }
  void rope_forward(float* out, const float* inp, const float* cos, const float* sin, int64_t N,
                    int64_t H, int64_t HD) override {
    const WallSpan span(prof_, "rope_forward");
    lt::rope_forward(out, inp, cos, sin, N, H, HD);
  }
  void rope_backward(float* dinp, const float* dout, const float* cos, const float* sin, int64_t N,
                     int64_t H, int64_t HD) override {
    const WallSpan span(prof_, "rope_backward");
    lt::rope_backward(dinp, dout, cos, sin, N, H, HD);
  }
  void swiglu_forward(float* out, const float* g, const float* u, int64_t n) override {
    const WallSpan span(prof_, "swiglu_forward");
    lt::swiglu_forward(out, g, u, n);
  }
  void swiglu_backward(float* dg, float* du, const float* dout, const float* g, const float* u,
                       int64_t n) override {
    const WallSpan span(prof_, "swiglu_backward");
    lt::swiglu_backward(dg, du, dout, g, u, n);
  }
  void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                         const AttentionShape& s) override {
    const WallSpan span(prof_, "attention_forward");
    lt::attention_forward(out, lse, q, k, v, s);
  }
  void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* out,
                          const float* lse, const float* q, const float* k, const float* v,
                          const AttentionShape& s) override {
    const WallSpan span(prof_, "attention_backward");
    lt::attention_backward(dq, dk, dv, dout, out, lse, q, k, v, s);
  }
  void attention_merge(float* out, float* lse, const float* out_b, const float* lse_b, int64_t rows,
                       int64_t H, int64_t HD) override {
    const WallSpan span(prof_, "attention_merge");
    lt::attention_merge(out, lse, out_b, lse_b, rows, H, HD);
  }
  double lm_head_cross_entropy(float* dh, float* dw, const float* h, const float* w,
                               const int32_t* t, int64_t N, int64_t D, int64_t V, int64_t chunk,
                               float gs, float* scratch) override {
    const WallSpan span(prof_, "lm_head_cross_entropy");
    return lt::lm_head_cross_entropy(dh, dw, h, w, t, N, D, V, chunk, gs, scratch);
  }
  double lm_head_cross_entropy_bf16w(float* dh, const float* h, const uint16_t* w, const int32_t* t,
                                     int64_t N, int64_t D, int64_t V, int64_t chunk, float gs,
                                     float* scratch, float* expand, int64_t expand_rows) override {
    const WallSpan span(prof_, "lm_head_cross_entropy_bf16w");
    return lt::lm_head_cross_entropy_bf16w(dh, h, w, t, N, D, V, chunk, gs, scratch, expand,
                                           expand_rows);
  }
  void linear_forward_bf16w(float* out, const float* inp, const uint16_t* w, const float* b,
                            int64_t N, int64_t IN, int64_t OUT, float* expand,
                            int64_t expand_rows) override {
    const WallSpan span(prof_, "linear_forward_bf16w");
    lt::linear_forward_bf16w(out, inp, w, b, N, IN, OUT, expand, expand_rows);
  }
  void linear_backward_bf16w(float* dinp, float* db, const float* dout, const uint16_t* w,
                             int64_t N, int64_t IN, int64_t OUT, Accumulate acc, float* expand,
                             int64_t expand_rows) override {
    const WallSpan span(prof_, "linear_backward_bf16w");
    lt::linear_backward_bf16w(dinp, db, dout, w, N, IN, OUT, acc, expand, expand_rows);
  }
  void embedding_forward_bf16(float* out, const int32_t* ids, const uint16_t* w, int64_t N,
                              int64_t D) override {
    const WallSpan span(prof_, "embedding_forward_bf16");
    lt::embedding_forward_bf16(out, ids, w, N, D);
  }
  void adamw_update(float* p, const float* g, float* m, float* v, int64_t n,
                    const AdamWParams& a) override {
    const WallSpan span(prof_, "adamw_update");
    lt::adamw_update(p, g, m, v, n, a);
  }
  double sum_squares(const float* x, int64_t n) override {
    const WallSpan span(prof_, "sum_squares");
    return lt::sum_squares(x, n);
  }
  void scale_inplace(float* x, int64_t n, float s) override {
    const WallSpan span(prof_, "scale_inplace");
    lt::scale_inplace(x, n, s);
  }
  void add_inplace(float* y, const float* x, int64_t n) override {
    const WallSpan span(prof_, "add_inplace");
#pragma omp parallel for simd schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; ++i) y[i] += x[i];
  }
  void bf16_to_f32(float* out, const uint16_t* in, int64_t n) override {
    const WallSpan span(prof_, "bf16_to_f32");
#pragma omp parallel for simd schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; ++i) out[i] = lt::bf16_to_f32(in[i]);
  }
  void f32_to_bf16(uint16_t* out, const float* in, int64_t n) override {
    const WallSpan span(prof_, "f32_to_bf16");
#pragma omp parallel for simd schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; ++i) out[i] = lt::f32_to_bf16(in[i]);
  }
  void round_to_bf16(float* x, int64_t n) override {
    const WallSpan span(prof_, "round_to_bf16");
#pragma omp parallel for simd schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; ++i) x[i] = lt::bf16_to_f32(lt::f32_to_bf16(x[i]));
  }
  void lora_forward(float* out, float* t, float* xd, const float* inp, const float* a,
                    const float* b, int64_t N, int64_t IN, int64_t OUT,
                    const LoraCall& c) override {
    const WallSpan span(prof_, "lora_forward");
    lt::lora_forward(out, t, xd, inp, a, b, N, IN, OUT, c);
  }
  void lora_backward(float* dinp, float* da, float* db, float* t, float* u, float* xd, float* dxd,
                     const float* dout, const float* inp, const float* a, const float* b, int64_t N,
                     int64_t IN, int64_t OUT, const LoraCall& c) override {
    const WallSpan span(prof_, "lora_backward");
    lt::lora_backward(dinp, da, db, t, u, xd, dxd, dout, inp, a, b, N, IN, OUT, c);
  }
  void nf4_dequantize(float* out, const uint8_t* packed, const uint8_t* absmax_q,
                      const float* absmax_scale, float absmax_offset, int64_t n) override {
    const WallSpan span(prof_, "nf4_dequantize");
    lt::nf4_dequantize(out, packed, absmax_q, absmax_scale, absmax_offset, n);
  }

 private:
  OpTimes times_;
  OpTimes* prof_ = nullptr;  // &times_ while profiling
  mutable std::mutex mu_;
  std::map<void*, size_t> sizes_;
  DeviceMemoryUse use_;
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend() { return std::make_unique<CpuBackend>(); }

std::unique_ptr<Backend> make_backend(std::string_view device, bool bf16) {
  const GemmPrecision gemm = bf16 ? GemmPrecision::kBf16 : GemmPrecision::kF32;
  if (device == "cpu") return make_cpu_backend();
  if (device == "cpu-guarded") return make_guarded_backend(make_cpu_backend());
  if (device == "cuda" || device == "auto") {
    std::string reason;
    auto b = make_cuda_backend(&reason, gemm);
    if (b) return b;
    if (device == "auto") return make_cpu_backend();
    fail("--device cuda: {}", reason);
  }
  fail("--device: '{}' is not a device; allowed: auto, cpu, cuda, cpu-guarded", device);
}

}  // namespace lt
