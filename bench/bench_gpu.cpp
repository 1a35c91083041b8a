// GPU benchmark of one decoder layer of a preset's shape (default Llama-3-8B: D 4096, H 32, KVH 8,
// HD 128, F 14336) plus the chunked LM head + loss (V 128256), forward + backward through the
// Backend interface,
// at several sequence lengths: tokens/s per layer, extrapolated to the 32-layer model, MFU, the
// device memory this bench allocated, and the TFLOP/s of the attention forward and backward and
// of one MLP GEMM alone. Random weights; the result is validated (finite loss
// and gradients) before it is timed. Usage:
//   bench_gpu [--tokens 4096,16384,32768] [--precision bf16|f32] [--peak_tflops 989]
//             [--layers N (default: the preset's)] [--iters 3] [--preset llama3-8b]
//             [--deterministic] (Backend::set_deterministic: the attention backward's dQ by its
//             own kernel, no atomics; attn_bwd_TF still counts the atomics' 2.5x forward FLOPs)
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "bench/bench_common.h"
#include "core/error.h"
#include "model/presets.h"
#include "plan/planner.h"

namespace lt {
namespace {

struct Shape {
  int64_t D, H, KVH, HD, F, V;
};
Shape shape_of(const ModelConfig& c) {
  return {c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
          c.head_dim,    c.intermediate_size,   c.vocab_size};
}

// Counts what it allocates, so the figure is this bench's device memory.
class Buffers {
 public:
  explicit Buffers(Backend& be) : be_(be) {}
  ~Buffers() {
    for (void* p : ptrs_) be_.free(p);
  }
  float* f32(int64_t n, float fill_scale = 0.0f, uint64_t seed = 1) {
    auto* p = static_cast<float*>(be_.alloc(size_t(n) * 4));
    ptrs_.push_back(p);
    bytes_ += size_t(n) * 4;
    if (fill_scale == 0.0f) {
      be_.memset_zero(p, size_t(n) * 4);
    } else {
      // A 1M-float random block repeated: cheap to make, enough for timing.
      std::vector<float> host(size_t(std::min<int64_t>(n, 1 << 20)));
      uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
      for (auto& x : host) {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        x = fill_scale * (float(s >> 40) / float(1 << 24) * 2.0f - 1.0f);
      }
      for (int64_t off = 0; off < n; off += int64_t(host.size()))
        be_.copy_to_device(p + off, host.data(),
                           size_t(std::min<int64_t>(int64_t(host.size()), n - off)) * 4);
    }
    return p;
  }
  int32_t* i32(const std::vector<int32_t>& host) {
    auto* p = static_cast<int32_t*>(be_.alloc(host.size() * 4));
    ptrs_.push_back(p);
    bytes_ += host.size() * 4;
    be_.copy_to_device(p, host.data(), host.size() * 4);
    return p;
  }
  size_t bytes() const { return bytes_; }

 private:
  Backend& be_;
  std::vector<void*> ptrs_;
  size_t bytes_ = 0;
};

using Clock = std::chrono::steady_clock;

int run(int argc, char** argv) {
  std::vector<int64_t> token_counts = {4096, 16384, 32768};
  std::string precision = "bf16";
  double peak_tflops = 989.0;  // H100 SXM dense bf16
  int64_t layers = 0, iters = 3;
  std::string preset = "llama3-8b";
  bool deterministic = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const char* v = i + 1 < argc ? argv[i + 1] : "";
    if (a == "--tokens") {
      token_counts.clear();
      for (const char* p = v; *p;) {
        token_counts.push_back(std::strtoll(p, const_cast<char**>(&p), 10));
        if (*p == ',') ++p;
      }
      ++i;
    } else if (a == "--precision") {
      precision = v, ++i;
    } else if (a == "--peak_tflops") {
      peak_tflops = std::atof(v), ++i;
    } else if (a == "--layers") {
      layers = std::atoll(v), ++i;
    } else if (a == "--iters") {
      iters = std::atoll(v), ++i;
    } else if (a == "--preset") {
      preset = v, ++i;
    } else if (a == "--deterministic") {
      deterministic = true;
    } else {
      fail("bench_gpu: unknown argument '{}'", a);
    }
  }
  std::string reason;
  auto be =
      make_cuda_backend(&reason, precision == "f32" ? GemmPrecision::kF32 : GemmPrecision::kBf16);
  if (!be) {
    std::printf("bench_gpu: skipped: no CUDA device: %s\n", reason.c_str());
    return 0;
  }
  be->set_deterministic(deterministic);
  nlohmann::json shape = preset_config(preset);
  if (layers <= 0) layers = shape.value("num_hidden_layers", int64_t{1});
  shape["num_hidden_layers"] = layers;
  const ModelConfig config = parse_model_config(shape, preset);
  const Shape s = shape_of(config);
  const int64_t D = s.D, QD = s.H * s.HD, KVD = s.KVH * s.HD, F = s.F, V = s.V;
  std::printf(
      "bench_gpu: %s layer (D %lld H %lld KVH %lld HD %lld F %lld V %lld), "
      "GEMMs %s, peak %.0f TFLOP/s, %lld layers extrapolated%s%s\n",
      preset.c_str(), (long long)D, (long long)s.H, (long long)s.KVH, (long long)s.HD, (long long)F,
      (long long)V, precision.c_str(), peak_tflops, (long long)layers,
      std::getenv("LONGTUNE_ATTENTION_TRANSPOSED_TILES") ? " (attention backward: transposed tiles)"
                                                         : "",
      deterministic ? " (deterministic kernels)" : "");
  // Per kernel: the attention forward and backward (causal: half of the T x T products; the
  // backward does 2.5 times the forward's) and one MLP projection GEMM, in TFLOP/s, so a slow
  // kernel shows by name.
  std::printf("%8s %12s %12s %12s %14s %8s %12s %11s %11s %11s\n", "tokens", "layer_ms",
              "lm_head_ms", "model_s", "model_tok/s", "MFU", "bench_GiB", "attn_fwd_TF",
              "attn_bwd_TF", "gemm_TF");
  for (int64_t T : token_counts) {
    Buffers m(*be);
    const float ws = 0.02f;
    float *wq = m.f32(QD * D, ws, 1), *wk = m.f32(KVD * D, ws, 2), *wv = m.f32(KVD * D, ws, 3);
    float *wo = m.f32(D * QD, ws, 4), *wg = m.f32(F * D, ws, 5), *wu = m.f32(F * D, ws, 6);
    float *wd = m.f32(D * F, ws, 7), *n1 = m.f32(D, 1.0f, 8), *n2 = m.f32(D, 1.0f, 9);
    float *gq = m.f32(QD * D), *gk = m.f32(KVD * D), *gv = m.f32(KVD * D), *go = m.f32(D * QD);
    float *gg = m.f32(F * D), *gu = m.f32(F * D), *gd = m.f32(D * F), *gn1 = m.f32(D),
          *gn2 = m.f32(D);
    float *x = m.f32(T * D, 1.0f, 10), *a_in = m.f32(T * D), *rs1 = m.f32(T), *q = m.f32(T * QD);
    float *k = m.f32(T * KVD), *v = m.f32(T * KVD), *att = m.f32(T * QD), *lse = m.f32(s.H * T);
    float *xm = m.f32(T * D), *f_in = m.f32(T * D), *rs2 = m.f32(T), *gate = m.f32(T * F);
    float *up = m.f32(T * F), *hh = m.f32(T * F), *y = m.f32(T * D);
    float *dy = m.f32(T * D, 1e-3f, 11), *dh = m.f32(T * F), *dgate = m.f32(T * F),
          *dup = m.f32(T * F), *dnorm = m.f32(T * D), *dres = m.f32(T * D), *datt = m.f32(T * QD);
    float *dq = m.f32(T * QD), *dk = m.f32(T * KVD), *dv = m.f32(T * KVD);
    const int64_t half = s.HD / 2;
    std::vector<int32_t> pos(static_cast<size_t>(T)), targets(static_cast<size_t>(T));
    std::vector<float> inv_freq(static_cast<size_t>(half));
    for (int64_t i = 0; i < T; ++i) pos[i] = int32_t(i), targets[i] = int32_t((i * 7919) % V);
    for (int64_t i = 0; i < half; ++i) inv_freq[i] = float(std::pow(500000.0, -2.0 * i / s.HD));
    int32_t* d_pos = m.i32(pos);
    int32_t* d_tgt = m.i32(targets);
    float* d_if = m.f32(half);
    be->copy_to_device(d_if, inv_freq.data(), size_t(half) * 4);
    float *cos = m.f32(T * half), *sin = m.f32(T * half);
    be->rope_tables(cos, sin, d_pos, d_if, 1.0f, T, s.HD);
    // LM head: chunks of 4096 rows (the logits chunk is 4096 x V floats = 2 GiB).
    const int64_t chunk = std::min<int64_t>(T, 4096);
    float *w_lm = m.f32(V * D, ws, 12), *g_lm = m.f32(V * D), *ce_scratch = m.f32(chunk * V);
    AttentionShape as{1, T, s.H, s.KVH, s.HD, 0, nullptr, float(1.0 / std::sqrt(double(s.HD)))};

    auto layer = [&]() {
      be->rmsnorm_forward(a_in, rs1, x, n1, T, D, 1e-5f);
      be->linear_forward(q, a_in, wq, nullptr, T, D, QD);
      be->linear_forward(k, a_in, wk, nullptr, T, D, KVD);
      be->linear_forward(v, a_in, wv, nullptr, T, D, KVD);
      be->rope_forward(q, q, cos, sin, T, s.H, s.HD);
      be->rope_forward(k, k, cos, sin, T, s.KVH, s.HD);
      be->attention_forward(att, lse, q, k, v, as);
      be->linear_forward(xm, att, wo, nullptr, T, QD, D);
      be->add_inplace(xm, x, T * D);
      be->rmsnorm_forward(f_in, rs2, xm, n2, T, D, 1e-5f);
      be->linear_forward(gate, f_in, wg, nullptr, T, D, F);
      be->linear_forward(up, f_in, wu, nullptr, T, D, F);
      be->swiglu_forward(hh, gate, up, T * F);
      be->linear_forward(y, hh, wd, nullptr, T, F, D);
      be->add_inplace(y, xm, T * D);
      // backward from dy (the residual gradient)
      be->linear_backward(dh, gd, nullptr, dy, hh, wd, T, F, D, Accumulate::kNo);
      be->swiglu_backward(dgate, dup, dh, gate, up, T * F);
      be->linear_backward(dnorm, gg, nullptr, dgate, f_in, wg, T, D, F, Accumulate::kNo);
      be->linear_backward(dnorm, gu, nullptr, dup, f_in, wu, T, D, F, Accumulate::kYes);
      be->memset_zero(dres, size_t(T * D) * 4);
      be->add_inplace(dres, dy, T * D);
      be->rmsnorm_backward(dres, gn2, dnorm, xm, n2, rs2, T, D, Accumulate::kYes);
      be->linear_backward(datt, go, nullptr, dres, att, wo, T, QD, D, Accumulate::kNo);
      be->attention_backward(dq, dk, dv, datt, att, lse, q, k, v, as);
      be->rope_backward(dq, dq, cos, sin, T, s.H, s.HD);
      be->rope_backward(dk, dk, cos, sin, T, s.KVH, s.HD);
      be->linear_backward(dnorm, gq, nullptr, dq, a_in, wq, T, D, QD, Accumulate::kNo);
      be->linear_backward(dnorm, gk, nullptr, dk, a_in, wk, T, D, KVD, Accumulate::kYes);
      be->linear_backward(dnorm, gv, nullptr, dv, a_in, wv, T, D, KVD, Accumulate::kYes);
      be->rmsnorm_backward(dres, gn1, dnorm, x, n1, rs1, T, D, Accumulate::kYes);
    };
    double loss = 0;
    auto head = [&]() {
      loss = be->lm_head_cross_entropy(dnorm, g_lm, y, w_lm, d_tgt, T, D, V, chunk, 1.0f / float(T),
                                       ce_scratch);
    };
    // Validate once: finite loss and a finite gradient norm.
    layer();
    head();
    be->synchronize();
    const double gnorm = be->sum_squares(gq, QD * D) + be->sum_squares(dres, T * D);
    if (!std::isfinite(loss) || !std::isfinite(gnorm)) {
      std::printf("bench_gpu: INVALID result at T=%lld (loss %g, grad sum of squares %g)\n",
                  (long long)T, loss, gnorm);
      return 1;
    }
    auto t0 = Clock::now();
    for (int64_t it = 0; it < iters; ++it) layer();
    be->synchronize();
    const double layer_s = std::chrono::duration<double>(Clock::now() - t0).count() / iters;
    t0 = Clock::now();
    for (int64_t it = 0; it < iters; ++it) head();
    be->synchronize();
    const double head_s = std::chrono::duration<double>(Clock::now() - t0).count() / iters;
    auto seconds = [&](const auto& op) {
      const auto t = Clock::now();
      for (int64_t it = 0; it < iters; ++it) op();
      be->synchronize();
      return std::chrono::duration<double>(Clock::now() - t).count() / double(iters);
    };
    const double attn_flops = 2.0 * double(T) * double(T) * double(s.H * s.HD);  // causal fwd
    const double fwd_tf =
        attn_flops / seconds([&] { be->attention_forward(att, lse, q, k, v, as); }) / 1e12;
    const double bwd_tf =
        2.5 * attn_flops /
        seconds([&] { be->attention_backward(dq, dk, dv, datt, att, lse, q, k, v, as); }) / 1e12;
    const double gemm_tf = 2.0 * double(T) * double(D) * double(F) /
                           seconds([&] { be->linear_forward(gate, f_in, wg, nullptr, T, D, F); }) /
                           1e12;
    const double model_s = layer_s * layers + head_s;
    // PaLM's model FLOPs (plan/planner.h), as bench_train and `longtune plan` count them.
    const double Td = double(T);
    const double flops = training_flops(config, Td, Td);
    const double mfu = flops / model_s / (peak_tflops * 1e12);
    std::printf("%8lld %12.2f %12.2f %12.3f %14.0f %7.1f%% %12.2f %11.1f %11.1f %11.1f\n",
                (long long)T, layer_s * 1e3, head_s * 1e3, model_s, Td / model_s, 100.0 * mfu,
                double(m.bytes()) / double(1ull << 30), fwd_tf, bwd_tf, gemm_tf);
    std::fflush(stdout);
  }
  std::printf(
      "note: one layer's weights, gradients and activations (no recompute) plus the LM "
      "head (the whole model's training state may not fit one GPU); LoRA is not in this "
      "bench\n");
  return 0;
}

}  // namespace
}  // namespace lt

int main(int argc, char** argv) {
  try {
    return lt::run(argc, argv);
  } catch (const lt::UserError& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 2;
  }
}
