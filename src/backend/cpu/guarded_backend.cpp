// The guarded CPU backend (`--device cpu-guarded`): the CPU backend's arithmetic, but its device
// memory cannot be read or written outside the backend's own calls: every allocation is a
// mapping that stays PROT_NONE except while a backend call runs. It reports itself as not
// host-addressable, so everything above it behaves as it must on a GPU (weights staged through
// copies, host collectives staged, no CPU op on device pointers); any host code that touches
// device memory directly dies with SIGSEGV at the faulting line. A test backend for the
// device-memory discipline of the CUDA path, run on machines without a GPU.
//
// Asynchronous copies are deferred: they happen at the next wait_copies, synchronize_copies or
// synchronize (or before memory is freed), the latest moment the contract allows, whereas the
// CPU backend copies at once, the earliest. A caller that reads a copy's destination before
// waiting, or writes its source while it may still be in flight, gets different numbers on the
// two backends, and the tests that compare them exactly fail.
#include <sys/mman.h>

#include <cstring>
#include <map>
#include <mutex>
#include <vector>

#include "backend/backend.h"
#include "core/check.h"

namespace lt {
namespace {

constexpr size_t kPage = 4096;

class GuardedBackend final : public Backend {
 public:
  explicit GuardedBackend(std::unique_ptr<Backend> inner) : inner_(std::move(inner)) {}
  ~GuardedBackend() override { LT_CHECK(regions_.empty(), "device memory leaked"); }
  std::string_view name() const override { return "cpu-guarded"; }
  bool supports(OpKind op) const override { return inner_->supports(op); }
  bool host_addressable() const override { return false; }

  void* alloc(size_t bytes) override {
    if (bytes == 0) return nullptr;
    const size_t size = (bytes + kPage - 1) / kPage * kPage;
    void* p = mmap(nullptr, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    LT_CHECK(p != MAP_FAILED, "cpu-guarded: cannot map {} bytes", size);
    std::lock_guard<std::mutex> lock(mu_);
    regions_[p] = size;
    use_.in_use += size;
    use_.peak = std::max(use_.peak, use_.in_use);
    if (depth_ > 0) protect(p, size, PROT_READ | PROT_WRITE);
    return p;
  }
  void free(void* p) override {
    if (!p) return;
    flush_copies();  // as cudaFree waits for the work in flight
    std::lock_guard<std::mutex> lock(mu_);
    auto it = regions_.find(p);
    LT_CHECK(it != regions_.end(), "cpu-guarded: free of memory it did not allocate");
    munmap(p, it->second);
    use_.in_use -= it->second;
    regions_.erase(it);
  }
  // Page-rounded, as a GPU allocator rounds too.
  DeviceMemoryUse device_memory_use() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return use_;
  }
  // The CUDA backend's workspace contract (f32 GEMMs: op scratch only): once bound, every op
  // call is checked against it with the CUDA kernels' own request sizes, so the planner's
  // workspace shape is proven to cover every call of every training path.
  BackendWorkspace workspace_needs(const WorkspaceShape& shape) const override {
    return cuda_workspace_needs(shape, false, 0);  // no SMs: no reduction partials
  }
  void bind_workspace(void* op, size_t op_bytes, void* gemm, size_t gemm_bytes, void* held,
                      size_t held_bytes) override {
    std::lock_guard<std::mutex> lock(mu_);
    auto owns = [&](void* p, size_t n) {
      for (const auto& [base, size] : regions_)
        if (p >= base && static_cast<char*>(p) + n <= static_cast<char*>(base) + size) return true;
      return n == 0;
    };
    LT_CHECK(owns(op, op_bytes) && owns(gemm, gemm_bytes) && owns(held, held_bytes),
             "cpu-guarded: the workspace is not device memory of this backend");
    op_bound_ = op ? op_bytes : 0;
  }

  void set_deterministic(bool on) override { inner_->set_deterministic(on); }
  void set_op_profiling(bool on) override { inner_->set_op_profiling(on); }
  std::vector<OpTime> take_op_profile() override {
    flush_copies();
    return inner_->take_op_profile();
  }
  // Pinned host memory is host memory: readable everywhere (as on a GPU machine).
  void* alloc_pinned(size_t bytes) override { return inner_->alloc_pinned(bytes); }
  void free_pinned(void* p) override {
    flush_copies();
    inner_->free_pinned(p);
  }

#define LT_GUARDED(call) \
  Open open(*this);      \
  return inner_->call
  void copy_to_device(void* d, const void* s, size_t n) override {
    LT_GUARDED(copy_to_device(d, s, n));
  }
  void copy_to_host(void* d, const void* s, size_t n) override {
    LT_GUARDED(copy_to_host(d, s, n));
  }
  void memset_zero(void* p, size_t n) override { LT_GUARDED(memset_zero(p, n)); }
  void synchronize() override {
    flush_copies();
    LT_GUARDED(synchronize());
  }
  void copy_2d(void* dst, size_t dp, const void* src, size_t sp, size_t w, size_t h) override {
    LT_GUARDED(copy_2d(dst, dp, src, sp, w, h));
  }
  void copy_to_host_async(void* d, const void* s, size_t n) override {
    std::lock_guard<std::mutex> lock(mu_);
    pending_.push_back({d, s, n});
  }
  void copy_to_device_async(void* d, const void* s, size_t n) override {
    std::lock_guard<std::mutex> lock(mu_);
    pending_.push_back({d, s, n});
  }
  void wait_copies() override { flush_copies(); }
  void synchronize_copies() override { flush_copies(); }
  void embedding_forward(float* out, const int32_t* ids, const float* w, int64_t N,
                         int64_t D) override {
    LT_GUARDED(embedding_forward(out, ids, w, N, D));
  }
  void embedding_backward(float* dw, const float* dout, const int32_t* ids, int64_t N,
                          int64_t D) override {
    LT_GUARDED(embedding_backward(dw, dout, ids, N, D));
  }
  void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* w, int64_t N,
                       int64_t D, float eps) override {
    LT_GUARDED(rmsnorm_forward(out, rstd, inp, w, N, D, eps));
  }
  void rmsnorm_backward(float* dinp, float* dw, const float* dout, const float* inp, const float* w,
                        const float* rstd, int64_t N, int64_t D, Accumulate acc) override {
    if (dw) check_scratch("rmsnorm_backward", cuda_scratch::column_partials(N, D, 8));
    LT_GUARDED(rmsnorm_backward(dinp, dw, dout, inp, w, rstd, N, D, acc));
  }
  void linear_forward(float* out, const float* inp, const float* w, const float* b, int64_t N,
                      int64_t IN, int64_t OUT) override {
    LT_GUARDED(linear_forward(out, inp, w, b, N, IN, OUT));
  }
  void linear_backward(float* dinp, float* dw, float* db, const float* dout, const float* inp,
                       const float* w, int64_t N, int64_t IN, int64_t OUT,
                       Accumulate acc) override {
    if (db) check_scratch("linear_backward (bias)", cuda_scratch::column_partials(N, OUT, 8));
    LT_GUARDED(linear_backward(dinp, dw, db, dout, inp, w, N, IN, OUT, acc));
  }
  void rope_tables(float* cos, float* sin, const int32_t* pos, const float* inv_freq, float sc,
                   int64_t N, int64_t HD) override {
    LT_GUARDED(rope_tables(cos, sin, pos, inv_freq, sc, N, HD));
  }
  void rope_forward(float* out, const float* inp, const float* cos, const float* sin, int64_t N,
                    int64_t H, int64_t HD) override {
    LT_GUARDED(rope_forward(out, inp, cos, sin, N, H, HD));
  }
  void rope_backward(float* dinp, const float* dout, const float* cos, const float* sin, int64_t N,
                     int64_t H, int64_t HD) override {
    LT_GUARDED(rope_backward(dinp, dout, cos, sin, N, H, HD));
  }
  void swiglu_forward(float* out, const float* g, const float* u, int64_t n) override {
    LT_GUARDED(swiglu_forward(out, g, u, n));
  }
  void swiglu_backward(float* dg, float* du, const float* dout, const float* g, const float* u,
                       int64_t n) override {
    LT_GUARDED(swiglu_backward(dg, du, dout, g, u, n));
  }
  void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                         const AttentionShape& s) override {
    LT_GUARDED(attention_forward(out, lse, q, k, v, s));
  }
  void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* out,
                          const float* lse, const float* q, const float* k, const float* v,
                          const AttentionShape& s) override {
    check_scratch("attention_backward", cuda_scratch::attention_backward(s.B * s.q_rows() * s.H));
    LT_GUARDED(attention_backward(dq, dk, dv, dout, out, lse, q, k, v, s));
  }
  void attention_merge(float* out, float* lse, const float* ob, const float* lb, int64_t rows,
                       int64_t H, int64_t HD) override {
    LT_GUARDED(attention_merge(out, lse, ob, lb, rows, H, HD));
  }
  double lm_head_cross_entropy(float* dh, float* dw, const float* h, const float* w,
                               const int32_t* t, int64_t N, int64_t D, int64_t V, int64_t chunk,
                               float gs, float* scratch) override {
    check_scratch("lm_head_cross_entropy", cuda_scratch::cross_entropy(N));
    LT_GUARDED(lm_head_cross_entropy(dh, dw, h, w, t, N, D, V, chunk, gs, scratch));
  }
  double lm_head_cross_entropy_bf16w(float* dh, const float* h, const uint16_t* w, const int32_t* t,
                                     int64_t N, int64_t D, int64_t V, int64_t chunk, float gs,
                                     float* scratch, float* expand, int64_t rows) override {
    check_scratch("lm_head_cross_entropy_bf16w", cuda_scratch::cross_entropy(N));
    LT_GUARDED(lm_head_cross_entropy_bf16w(dh, h, w, t, N, D, V, chunk, gs, scratch, expand, rows));
  }
  void linear_forward_bf16w(float* out, const float* inp, const uint16_t* w, const float* b,
                            int64_t N, int64_t IN, int64_t OUT, float* expand,
                            int64_t rows) override {
    LT_GUARDED(linear_forward_bf16w(out, inp, w, b, N, IN, OUT, expand, rows));
  }
  void linear_backward_bf16w(float* dinp, float* db, const float* dout, const uint16_t* w,
                             int64_t N, int64_t IN, int64_t OUT, Accumulate acc, float* expand,
                             int64_t rows) override {
    if (db) check_scratch("linear_backward_bf16w (bias)", cuda_scratch::column_partials(N, OUT, 8));
    LT_GUARDED(linear_backward_bf16w(dinp, db, dout, w, N, IN, OUT, acc, expand, rows));
  }
  void embedding_forward_bf16(float* out, const int32_t* ids, const uint16_t* w, int64_t N,
                              int64_t D) override {
    LT_GUARDED(embedding_forward_bf16(out, ids, w, N, D));
  }
  void adamw_update(float* p, const float* g, float* m, float* v, int64_t n,
                    const AdamWParams& a) override {
    LT_GUARDED(adamw_update(p, g, m, v, n, a));
  }
  double sum_squares(const float* x, int64_t n) override { LT_GUARDED(sum_squares(x, n)); }
  void scale_inplace(float* x, int64_t n, float s) override { LT_GUARDED(scale_inplace(x, n, s)); }
  void add_inplace(float* y, const float* x, int64_t n) override {
    LT_GUARDED(add_inplace(y, x, n));
  }
  void bf16_to_f32(float* out, const uint16_t* in, int64_t n) override {
    LT_GUARDED(bf16_to_f32(out, in, n));
  }
  void f32_to_bf16(uint16_t* out, const float* in, int64_t n) override {
    LT_GUARDED(f32_to_bf16(out, in, n));
  }
  void round_to_bf16(float* x, int64_t n) override { LT_GUARDED(round_to_bf16(x, n)); }
  void lora_forward(float* out, float* t, float* xd, const float* inp, const float* a,
                    const float* b, int64_t N, int64_t IN, int64_t OUT,
                    const LoraCall& c) override {
    LT_GUARDED(lora_forward(out, t, xd, inp, a, b, N, IN, OUT, c));
  }
  void lora_backward(float* dinp, float* da, float* db, float* t, float* u, float* xd, float* dxd,
                     const float* dout, const float* inp, const float* a, const float* b, int64_t N,
                     int64_t IN, int64_t OUT, const LoraCall& c) override {
    LT_GUARDED(lora_backward(dinp, da, db, t, u, xd, dxd, dout, inp, a, b, N, IN, OUT, c));
  }
  void nf4_dequantize(float* out, const uint8_t* packed, const uint8_t* absmax_q,
                      const float* absmax_scale, float absmax_offset, int64_t n) override {
    LT_GUARDED(nf4_dequantize(out, packed, absmax_q, absmax_scale, absmax_offset, n));
  }
#undef LT_GUARDED

 private:
  // Device memory is readable for the duration of one backend call.
  struct Open {
    explicit Open(GuardedBackend& b) : be(b) { be.open(); }
    ~Open() { be.close(); }
    GuardedBackend& be;
  };
  static void protect(void* p, size_t n, int prot) {
    LT_CHECK(mprotect(p, n, prot) == 0, "cpu-guarded: mprotect failed");
  }
  void open() {
    std::lock_guard<std::mutex> lock(mu_);
    if (depth_++ == 0)
      for (auto& [p, n] : regions_) protect(p, n, PROT_READ | PROT_WRITE);
  }
  // Carries out the deferred copies, in the order they were issued.
  void flush_copies() {
    std::vector<PendingCopy> todo;
    {
      std::lock_guard<std::mutex> lock(mu_);
      todo.swap(pending_);
    }
    if (todo.empty()) return;
    Open open(*this);
    for (const PendingCopy& c : todo) std::memcpy(c.dst, c.src, c.bytes);
  }
  // What the CUDA kernel for `op` would ask of its scratch must fit the bound workspace.
  void check_scratch(const char* op, size_t bytes) const {
    bytes = (bytes + 255) / 256 * 256;
    LT_CHECK(op_bound_ == 0 || bytes <= op_bound_,
             "cpu-guarded: {} needs {} bytes of CUDA scratch; the planned workspace has {}", op,
             bytes, op_bound_);
  }
  void close() {
    std::lock_guard<std::mutex> lock(mu_);
    if (--depth_ == 0)
      for (auto& [p, n] : regions_) protect(p, n, PROT_NONE);
  }

  std::unique_ptr<Backend> inner_;
  mutable std::mutex mu_;
  std::map<void*, size_t> regions_;
  DeviceMemoryUse use_;
  size_t op_bound_ = 0;  // bound op scratch (bind_workspace); 0: unbound, nothing checked
  int depth_ = 0;
  struct PendingCopy {
    void* dst;
    const void* src;
    size_t bytes;
  };
  std::vector<PendingCopy> pending_;
};

}  // namespace

std::unique_ptr<Backend> make_guarded_backend(std::unique_ptr<Backend> inner) {
  return std::make_unique<GuardedBackend>(std::move(inner));
}

}  // namespace lt
