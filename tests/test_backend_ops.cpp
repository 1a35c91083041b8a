// Op-conformance suite (ggml's test-backend-ops idea): every Backend op on every available
// backend (CPU always; CUDA when make_cuda_backend finds a device) against the CPU reference ops
// of src/ops, with odd sizes, NaN/Inf propagation, and guard bytes around every device buffer
// (sentinel margins copied back and checked). The CUDA cases skip with "no CUDA device: ..."
// where there is none. Every case in this executable carries the ctest label "gpu".
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "core/dtype.h"
#include "core/error.h"
#include "ops/adamw.h"
#include "ops/attention.h"
#include "ops/cross_entropy.h"
#include "ops/embedding.h"
#include "ops/linear.h"
#include "ops/lora.h"
#include "ops/nf4.h"
#include "ops/rmsnorm.h"
#include "ops/rope.h"
#include "ops/swiglu.h"
#include "reference.h"

namespace lt {
namespace {

using test::all_close;
using test::random_ids;
using test::random_vec;
using test::Vec;
using Ids = std::vector<int32_t>;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

// A device buffer of n elements with kGuardBytes of sentinel bytes on both sides. The data area
// starts as `init` (or, without one, as NaN floats / 0xA5 bytes, so an op that must overwrite
// every element and skips one is caught). read() copies everything back and checks the guards.
template <typename T>
class DeviceBuffer {
 public:
  static constexpr size_t kGuardBytes = 256;
  static constexpr unsigned char kSentinel = 0xA5;

  DeviceBuffer(Backend& be, std::string name, int64_t n) : be_(be), name_(std::move(name)), n_(n) {
    image_.assign(bytes() + 2 * kGuardBytes, kSentinel);
    if constexpr (std::is_same_v<T, float>) {
      for (int64_t i = 0; i < n; ++i) std::memcpy(data_in_image() + i * sizeof(T), &kNaN, 4);
    }
    upload();
  }
  DeviceBuffer(Backend& be, std::string name, const std::vector<T>& init)
      : be_(be), name_(std::move(name)), n_(int64_t(init.size())) {
    image_.assign(bytes() + 2 * kGuardBytes, kSentinel);
    if (!init.empty()) std::memcpy(data_in_image(), init.data(), bytes());
    upload();
  }
  ~DeviceBuffer() { be_.free(base_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  T* get() { return reinterpret_cast<T*>(static_cast<char*>(base_) + kGuardBytes); }
  // The data (n elements); the guards must be intact (a failure names the buffer and byte).
  std::vector<T> read() {
    std::vector<unsigned char> img(image_.size());
    be_.synchronize();
    be_.copy_to_host(img.data(), base_, img.size());
    for (size_t i = 0; i < img.size(); ++i) {
      if (i >= kGuardBytes && i < kGuardBytes + bytes()) continue;
      if (img[i] != kSentinel) {
        ADD_FAILURE() << name_ << ": guard byte " << (i < kGuardBytes ? "before" : "after")
                      << " the buffer overwritten (offset " << int64_t(i) - int64_t(kGuardBytes)
                      << ", value " << int(img[i]) << ")";
        break;
      }
    }
    std::vector<T> data(static_cast<size_t>(n_));
    if (n_) std::memcpy(data.data(), img.data() + kGuardBytes, bytes());
    return data;
  }

 private:
  size_t bytes() const { return size_t(n_) * sizeof(T); }
  unsigned char* data_in_image() { return image_.data() + kGuardBytes; }
  void upload() {
    base_ = be_.alloc(image_.size());
    be_.copy_to_device(base_, image_.data(), image_.size());
  }
  Backend& be_;
  std::string name_;
  int64_t n_;
  std::vector<unsigned char> image_;
  void* base_ = nullptr;
};

// Skips the calling test when no GPU is visible, unless LONGTUNE_CUDA_MODULE names a module (the
// CPU emulator of tests/cuda_emu, label emu): then a missing backend fails.
#define LT_CUDA_OR_SKIP(be, reason)                                                      \
  do {                                                                                   \
    if (be) break;                                                                       \
    const char* named = std::getenv("LONGTUNE_CUDA_MODULE");                             \
    if (named && *named) FAIL() << "LONGTUNE_CUDA_MODULE=" << named << ": " << (reason); \
    GTEST_SKIP() << "no CUDA device: " << (reason);                                      \
  } while (0)

// Tolerances per op class and backend: |got - want| <= atol + rtol |want|.
struct Tol {
  double atol, rtol;
};

class BackendOps : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (GetParam() == "cpu") {
      be_ = make_cpu_backend();
    } else if (GetParam() == "cpu-guarded") {  // device memory unreadable from the host
      be_ = make_backend("cpu-guarded");
    } else {
      std::string reason;
      be_ = make_cuda_backend(&reason);
      LT_CUDA_OR_SKIP(be_, reason);
    }
  }
  bool cpu() const { return be_->name() == "cpu" || be_->name() == "cpu-guarded"; }
  // Same formula, same f32 rounding except a few ulp (libm vs CUDA math, summation order).
  Tol elementwise() const { return cpu() ? Tol{0, 0} : Tol{1e-6, 4e-6}; }
  // GEMMs and reductions over K terms in a different order (f32 accumulation).
  Tol gemm() const { return cpu() ? Tol{0, 0} : Tol{2e-5, 2e-4}; }
  // Flash attention on tensor cores: bf16 operands (8 significant bits), f32 accumulation.
  Tol attention(double scale) const { return cpu() ? Tol{0, 0} : Tol{2.5e-2 * scale, 2e-2}; }

  template <typename T>
  std::unique_ptr<DeviceBuffer<T>> buf(const std::string& name, const std::vector<T>& init) {
    return std::make_unique<DeviceBuffer<T>>(*be_, name, init);
  }
  std::unique_ptr<DeviceBuffer<float>> out(const std::string& name, int64_t n) {
    return std::make_unique<DeviceBuffer<float>>(*be_, name, n);
  }

  std::unique_ptr<Backend> be_;
};

#define EXPECT_CLOSE(got, want, tol, what)                                               \
  EXPECT_TRUE(all_close((got).data(), (want).data(), int64_t((want).size()), (tol).atol, \
                        (tol).rtol, what))

double max_abs(const Vec& v) {
  double m = 0;
  for (float x : v)
    if (std::isfinite(x)) m = std::max(m, double(std::fabs(x)));
  return m;
}

// ---------------------------------------------------------------------------------------------

TEST_P(BackendOps, Embedding) {
  const int64_t V = 37, D = 45, N = 53;  // N > V: ids repeat
  const Vec weight = random_vec(V * D, 1);
  const Ids ids = random_ids(N, V, 2);
  const Vec dout = random_vec(N * D, 3);
  const Vec dw0 = random_vec(V * D, 4);
  Vec want(N * D), dw_want = dw0;
  embedding_forward(want.data(), ids.data(), weight.data(), N, D);
  embedding_backward(dw_want.data(), dout.data(), ids.data(), N, D);

  auto d_ids = buf("ids", ids);
  auto d_w = buf("weight", weight);
  auto d_out = out("out", N * D);
  be_->embedding_forward(d_out->get(), d_ids->get(), d_w->get(), N, D);
  EXPECT_CLOSE(d_out->read(), want, Tol({0, 0}), "embedding_forward");
  auto d_dout = buf("dout", dout);
  auto d_dw = buf("dweight", dw0);
  be_->embedding_backward(d_dw->get(), d_dout->get(), d_ids->get(), N, D);
  EXPECT_CLOSE(d_dw->read(), dw_want, elementwise(), "embedding_backward (+=)");
  // Deterministic kernels (--full_determinism): the CPU op's additions in its order, bit for bit.
  be_->set_deterministic(true);
  auto d_dw2 = buf("dweight", dw0);
  be_->embedding_backward(d_dw2->get(), d_dout->get(), d_ids->get(), N, D);
  EXPECT_CLOSE(d_dw2->read(), dw_want, Tol({0, 0}), "embedding_backward, deterministic (+=)");
}

// With a NaN in row 3 (NaN propagation: that row's rstd is NaN, so is every dweight column)
// and with finite data over two of the CUDA kernel's 256-row weight-gradient slices (the
// dweight values themselves).
TEST_P(BackendOps, RmsNorm) {
  struct Case {
    int64_t N, D;
    bool nan;
  };
  for (const Case& c : {Case{19, 77, true}, Case{300, 130, false}}) {
    SCOPED_TRACE(::testing::Message() << "N " << c.N << " D " << c.D << (c.nan ? " NaN" : ""));
    const int64_t N = c.N, D = c.D;
    Vec x = random_vec(N * D, 5, -2, 2);
    if (c.nan) x[3 * D + 5] = kNaN;  // row 3: NaN everywhere downstream
    const Vec w = random_vec(D, 6, 0.5, 1.5);
    const Vec dy = random_vec(N * D, 7);
    const float eps = 1e-5f;
    Vec y(N * D), rstd(N);
    rmsnorm_forward(y.data(), rstd.data(), x.data(), w.data(), N, D, eps);

    auto d_x = buf("inp", x);
    auto d_w = buf("weight", w);
    auto d_y = out("out", N * D);
    auto d_rstd = out("rstd", N);
    be_->rmsnorm_forward(d_y->get(), d_rstd->get(), d_x->get(), d_w->get(), N, D, eps);
    EXPECT_CLOSE(d_y->read(), y, elementwise(), "rmsnorm_forward out");
    EXPECT_CLOSE(d_rstd->read(), rstd, elementwise(), "rmsnorm_forward rstd");

    for (Accumulate acc : {Accumulate::kNo, Accumulate::kYes}) {
      const Vec dx0 = random_vec(N * D, 8), dw0 = random_vec(D, 9);
      Vec dx = dx0, dw = dw0;
      rmsnorm_backward(dx.data(), dw.data(), dy.data(), x.data(), w.data(), rstd.data(), N, D, acc);
      auto d_dy = buf("dout", dy);
      auto d_dx = acc == Accumulate::kYes ? buf("dinp", dx0) : out("dinp", N * D);
      auto d_dw = buf("dweight", dw0);
      auto d_rs = buf("rstd", rstd);
      be_->rmsnorm_backward(d_dx->get(), d_dw->get(), d_dy->get(), d_x->get(), d_w->get(),
                            d_rs->get(), N, D, acc);
      // dweight: a column sum over N rows.
      EXPECT_CLOSE(d_dx->read(), dx, elementwise(), "rmsnorm_backward dinp");
      EXPECT_CLOSE(d_dw->read(), dw, c.nan ? elementwise() : gemm(),
                   "rmsnorm_backward dweight (+=)");
    }
  }
}

TEST_P(BackendOps, Linear) {
  const int64_t N = 33, IN = 47, OUT = 29;
  Vec x = random_vec(N * IN, 10);
  x[7 * IN + 3] = kNaN;  // row 7 of out, column 3 of dweight become NaN
  const Vec w = random_vec(OUT * IN, 11), bias = random_vec(OUT, 12), dy = random_vec(N * OUT, 13);
  for (bool with_bias : {false, true}) {
    Vec y(N * OUT);
    linear_forward(y.data(), x.data(), w.data(), with_bias ? bias.data() : nullptr, N, IN, OUT);
    auto d_x = buf("inp", x);
    auto d_w = buf("weight", w);
    auto d_b = buf("bias", bias);
    auto d_y = out("out", N * OUT);
    be_->linear_forward(d_y->get(), d_x->get(), d_w->get(), with_bias ? d_b->get() : nullptr, N, IN,
                        OUT);
    EXPECT_CLOSE(d_y->read(), y, gemm(), with_bias ? "linear_forward +bias" : "linear_forward");
  }
  for (Accumulate acc : {Accumulate::kNo, Accumulate::kYes}) {
    const Vec dx0 = random_vec(N * IN, 14), dw0 = random_vec(OUT * IN, 15),
              db0 = random_vec(OUT, 16);
    Vec dx = dx0, dw = dw0, db = db0;
    linear_backward(dx.data(), dw.data(), db.data(), dy.data(), x.data(), w.data(), N, IN, OUT,
                    acc);
    auto d_x = buf("inp", x);
    auto d_w = buf("weight", w);
    auto d_dy = buf("dout", dy);
    auto d_dx = acc == Accumulate::kYes ? buf("dinp", dx0) : out("dinp", N * IN);
    auto d_dw = buf("dweight", dw0);
    auto d_db = buf("dbias", db0);
    be_->linear_backward(d_dx->get(), d_dw->get(), d_db->get(), d_dy->get(), d_x->get(), d_w->get(),
                         N, IN, OUT, acc);
    EXPECT_CLOSE(d_dx->read(), dx, gemm(), "linear_backward dinp");
    EXPECT_CLOSE(d_dw->read(), dw, gemm(), "linear_backward dweight (+=)");
    EXPECT_CLOSE(d_db->read(), db, gemm(), "linear_backward dbias (+=)");
  }
}

// A frozen bf16 weight (LoRA's base with --bf16 True): the f32 linear on the widened weight,
// widened whole (expand_rows >= OUT: as the CPU op on the widened weight) or 7 rows at a time
// (a short last block; the expansion buffer holds exactly 7 rows, its guards catch more).
TEST_P(BackendOps, LinearBf16Weight) {
  const int64_t N = 21, IN = 45, OUT = 31;
  const Vec x = random_vec(N * IN, 90), dy = random_vec(N * OUT, 91), bias = random_vec(OUT, 92);
  std::vector<uint16_t> w16(OUT * IN);
  const Vec wf = random_vec(OUT * IN, 93);
  for (int64_t i = 0; i < OUT * IN; ++i) w16[i] = f32_to_bf16(wf[i]);
  w16[4 * IN + 6] = 0x7fc0;  // NaN: row 4 of out and column 6 of dinp become NaN
  Vec w(OUT * IN);
  for (int64_t i = 0; i < OUT * IN; ++i) w[i] = bf16_to_f32(w16[i]);
  Vec y(N * OUT);
  linear_forward(y.data(), x.data(), w.data(), bias.data(), N, IN, OUT);
  for (int64_t rows : {OUT, int64_t(7)}) {
    SCOPED_TRACE(::testing::Message() << "expand_rows=" << rows);
    // Blocks sum dinp's products block by block: another order of f32 additions.
    const Tol tol = rows >= OUT ? gemm() : Tol{1e-5, 1e-4};
    auto d_x = buf("inp", x);
    auto d_w = buf("weight", w16);
    auto d_b = buf("bias", bias);
    auto d_y = out("out", N * OUT);
    auto d_e = out("expand", rows * IN);
    be_->linear_forward_bf16w(d_y->get(), d_x->get(), d_w->get(), d_b->get(), N, IN, OUT,
                              d_e->get(), rows);
    EXPECT_CLOSE(d_y->read(), y, tol, "linear_forward_bf16w +bias");
    for (Accumulate acc : {Accumulate::kNo, Accumulate::kYes}) {
      const Vec dx0 = random_vec(N * IN, 94), db0 = random_vec(OUT, 95);
      Vec dx = dx0, db = db0;
      linear_backward(dx.data(), nullptr, db.data(), dy.data(), x.data(), w.data(), N, IN, OUT,
                      acc);
      auto d_dy = buf("dout", dy);
      auto d_dx = acc == Accumulate::kYes ? buf("dinp", dx0) : out("dinp", N * IN);
      auto d_db = buf("dbias", db0);
      be_->linear_backward_bf16w(d_dx->get(), d_db->get(), d_dy->get(), d_w->get(), N, IN, OUT, acc,
                                 d_e->get(), rows);
      EXPECT_CLOSE(d_dx->read(), dx, tol, "linear_backward_bf16w dinp");
      EXPECT_CLOSE(d_db->read(), db, gemm(), "linear_backward_bf16w dbias (+=)");
    }
    d_e->read();  // guards only
  }
}

// A bf16 embedding table: rows widened exactly (NaN and Inf stay themselves).
TEST_P(BackendOps, EmbeddingBf16) {
  const int64_t V = 37, D = 45, N = 53;
  const Vec wf = random_vec(V * D, 96);
  std::vector<uint16_t> w16(V * D);
  for (int64_t i = 0; i < V * D; ++i) w16[i] = f32_to_bf16(wf[i]);
  w16[5] = 0x7fc0, w16[D + 1] = 0x7f80, w16[2 * D] = 0xff80;  // NaN, +Inf, -Inf
  Vec w(V * D);
  for (int64_t i = 0; i < V * D; ++i) w[i] = bf16_to_f32(w16[i]);
  Ids ids = random_ids(N, V, 97);
  ids[0] = 0, ids[1] = 1, ids[2] = 2;
  Vec want(N * D);
  embedding_forward(want.data(), ids.data(), w.data(), N, D);
  auto d_ids = buf("ids", ids);
  auto d_w = buf("weight", w16);
  auto d_out = out("out", N * D);
  be_->embedding_forward_bf16(d_out->get(), d_ids->get(), d_w->get(), N, D);
  EXPECT_CLOSE(d_out->read(), want, Tol({0, 0}), "embedding_forward_bf16");
}

TEST_P(BackendOps, Rope) {
  const int64_t N = 23, H = 3, HD = 18, half = HD / 2;
  Ids pos(N);
  for (int64_t i = 0; i < N; ++i) pos[i] = int32_t((i * 37) % 4099);  // large angles too
  Vec inv_freq(half);
  for (int64_t i = 0; i < half; ++i) inv_freq[i] = float(std::pow(10000.0, -2.0 * i / HD));
  const float scaling = 1.25f;
  Vec cos(N * half), sin(N * half);
  rope_tables(cos.data(), sin.data(), pos.data(), inv_freq.data(), scaling, N, HD);
  auto d_pos = buf("pos", pos);
  auto d_if = buf("inv_freq", inv_freq);
  auto d_cos = out("cos", N * half);
  auto d_sin = out("sin", N * half);
  be_->rope_tables(d_cos->get(), d_sin->get(), d_pos->get(), d_if->get(), scaling, N, HD);
  // cos/sin of angles up to ~4000 rad: CUDA's cosf/sinf and libm agree to a few ulp.
  EXPECT_CLOSE(d_cos->read(), cos, elementwise(), "rope_tables cos");
  EXPECT_CLOSE(d_sin->read(), sin, elementwise(), "rope_tables sin");

  Vec x = random_vec(N * H * HD, 17);
  x[5] = kInf;
  Vec y(N * H * HD), dx(N * H * HD);
  rope_forward(y.data(), x.data(), cos.data(), sin.data(), N, H, HD);
  rope_backward(dx.data(), x.data(), cos.data(), sin.data(), N, H, HD);
  auto d_c = buf("cos", cos);
  auto d_s = buf("sin", sin);
  auto d_x = buf("inp", x);
  auto d_y = out("out", N * H * HD);
  be_->rope_forward(d_y->get(), d_x->get(), d_c->get(), d_s->get(), N, H, HD);
  EXPECT_CLOSE(d_y->read(), y, elementwise(), "rope_forward");
  auto d_dx = out("dinp", N * H * HD);
  be_->rope_backward(d_dx->get(), d_x->get(), d_c->get(), d_s->get(), N, H, HD);
  EXPECT_CLOSE(d_dx->read(), dx, elementwise(), "rope_backward");
  be_->rope_forward(d_x->get(), d_x->get(), d_c->get(), d_s->get(), N, H, HD);  // in place
  EXPECT_CLOSE(d_x->read(), y, elementwise(), "rope_forward in place");
}

TEST_P(BackendOps, SwiGlu) {
  const int64_t n = 1001;
  Vec g = random_vec(n, 18, -6, 6), u = random_vec(n, 19), dy = random_vec(n, 20);
  const float specials[] = {kNaN, kInf, -kInf, 100.0f, -100.0f, 0.0f, -0.0f, 88.7f, -88.8f};
  for (size_t i = 0; i < std::size(specials); ++i) g[i * 7] = specials[i];
  u[500] = kNaN, dy[600] = kInf;
  Vec y(n), dg(n), du(n);
  swiglu_forward(y.data(), g.data(), u.data(), n);
  swiglu_backward(dg.data(), du.data(), dy.data(), g.data(), u.data(), n);
  auto d_g = buf("gate", g);
  auto d_u = buf("up", u);
  auto d_dy = buf("dout", dy);
  auto d_y = out("out", n);
  auto d_dg = out("dgate", n);
  auto d_du = out("dup", n);
  be_->swiglu_forward(d_y->get(), d_g->get(), d_u->get(), n);
  be_->swiglu_backward(d_dg->get(), d_du->get(), d_dy->get(), d_g->get(), d_u->get(), n);
  EXPECT_CLOSE(d_y->read(), y, elementwise(), "swiglu_forward");
  EXPECT_CLOSE(d_dg->read(), dg, elementwise(), "swiglu_backward dgate");
  EXPECT_CLOSE(d_du->read(), du, elementwise(), "swiglu_backward dup");
}

struct AttnCase {
  int64_t B, T, H, KVH, HD, window;
  int docs;  // documents per row (0: no doc ids)
};

TEST_P(BackendOps, Attention) {
  const AttnCase cases[] = {
      {2, 77, 4, 2, 24, 0, 0},    // GQA, HD padded 24 -> 32, T not a tile multiple
      {1, 130, 3, 1, 64, 33, 0},  // sliding window across tile boundaries, MQA
      {2, 100, 2, 2, 40, 0, 3},   // packed documents
      {1, 65, 2, 1, 128, 20, 2},  // documents and window, HD 128
      {1, 7, 1, 1, 8, 0, 0},      // tiny: one partial tile
  };
  for (const AttnCase& c : cases) {
    SCOPED_TRACE(::testing::Message()
                 << "B=" << c.B << " T=" << c.T << " H=" << c.H << " KVH=" << c.KVH
                 << " HD=" << c.HD << " window=" << c.window << " docs=" << c.docs);
    const int64_t nq = c.B * c.T * c.H * c.HD, nk = c.B * c.T * c.KVH * c.HD;
    const Vec q = random_vec(nq, 21, -2, 2), k = random_vec(nk, 22, -2, 2), v = random_vec(nk, 23),
              dout = random_vec(nq, 24);
    Ids docs(c.B * c.T);
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t t = 0; t < c.T; ++t)
        docs[b * c.T + t] = c.docs ? int32_t(b * 10 + t * c.docs / c.T) : 0;
    AttentionShape s{c.B,
                     c.T,
                     c.H,
                     c.KVH,
                     c.HD,
                     c.window,
                     c.docs ? docs.data() : nullptr,
                     float(1.0 / std::sqrt(double(c.HD)))};
    Vec o(nq), lse(c.B * c.H * c.T), dq(nq), dk(nk), dv(nk);
    attention_forward(o.data(), lse.data(), q.data(), k.data(), v.data(), s);
    attention_backward(dq.data(), dk.data(), dv.data(), dout.data(), o.data(), lse.data(), q.data(),
                       k.data(), v.data(), s);

    auto d_q = buf("q", q);
    auto d_k = buf("k", k);
    auto d_v = buf("v", v);
    auto d_docs = buf("doc_ids", docs);
    AttentionShape ds = s;
    ds.doc_ids = c.docs ? d_docs->get() : nullptr;
    auto d_o = out("out", nq);
    auto d_lse = out("lse", c.B * c.H * c.T);
    be_->attention_forward(d_o->get(), d_lse->get(), d_q->get(), d_k->get(), d_v->get(), ds);
    EXPECT_CLOSE(d_o->read(), o, attention(max_abs(o)), "attention_forward out");
    EXPECT_CLOSE(d_lse->read(), lse, attention(1.0), "attention_forward lse");

    // The backward takes the reference forward's out and lse, so only the backward is judged.
    auto d_do = buf("dout", dout);
    auto d_o_ref = buf("out", o);
    auto d_lse_ref = buf("lse", lse);
    auto d_dq = out("dq", nq);
    auto d_dk = out("dk", nk);
    auto d_dv = out("dv", nk);
    be_->attention_backward(d_dq->get(), d_dk->get(), d_dv->get(), d_do->get(), d_o_ref->get(),
                            d_lse_ref->get(), d_q->get(), d_k->get(), d_v->get(), ds);
    EXPECT_CLOSE(d_dq->read(), dq, attention(max_abs(dq)), "attention_backward dq");
    EXPECT_CLOSE(d_dk->read(), dk, attention(max_abs(dk)), "attention_backward dk");
    EXPECT_CLOSE(d_dv->read(), dv, attention(max_abs(dv)), "attention_backward dv");
    // The deterministic backward (--full_determinism; CUDA: dQ by a query-tile kernel).
    be_->set_deterministic(true);
    auto d_dq2 = out("dq", nq);
    auto d_dk2 = out("dk", nk);
    auto d_dv2 = out("dv", nk);
    be_->attention_backward(d_dq2->get(), d_dk2->get(), d_dv2->get(), d_do->get(), d_o_ref->get(),
                            d_lse_ref->get(), d_q->get(), d_k->get(), d_v->get(), ds);
    be_->set_deterministic(false);
    EXPECT_CLOSE(d_dq2->read(), dq, attention(max_abs(dq)), "attention_backward dq, deterministic");
    EXPECT_CLOSE(d_dk2->read(), dk, attention(max_abs(dk)), "attention_backward dk, deterministic");
    EXPECT_CLOSE(d_dv2->read(), dv, attention(max_abs(dv)), "attention_backward dv, deterministic");
  }
}

// On a GPU blocks finish in a different order every run: the deterministic kernels must still
// give the same bits, run after run (the emulator's block orders: AttentionEmuDeterminism). An
// 8B-shaped head layout over 5 key tiles, and an embedding gradient whose ids repeat.
TEST_P(BackendOps, DeterministicKernelsRepeatBitForBit) {
  be_->set_deterministic(true);
  AttentionShape s{1, 300, 8, 2, 128, 0, nullptr, float(1.0 / std::sqrt(128.0))};
  const int64_t nq = s.T * s.H * s.HD, nk = s.T * s.KVH * s.HD, nl = s.H * s.T;
  auto d_q = buf("q", random_vec(nq, 51, -2, 2));
  auto d_k = buf("k", random_vec(nk, 52, -2, 2));
  auto d_v = buf("v", random_vec(nk, 53));
  auto d_do = buf("dout", random_vec(nq, 54));
  auto d_o = out("out", nq);
  auto d_lse = out("lse", nl);
  be_->attention_forward(d_o->get(), d_lse->get(), d_q->get(), d_k->get(), d_v->get(), s);
  const int64_t V = 11, D = 96, N = 500;  // every id about 45 times
  auto d_ids = buf("ids", random_ids(N, V, 55));
  auto d_g = buf("dout", random_vec(N * D, 56));
  std::vector<uint32_t> first;
  for (int run = 0; run < 3; ++run) {
    auto d_dq = out("dq", nq);
    auto d_dk = out("dk", nk);
    auto d_dv = out("dv", nk);
    auto d_dw = buf("dweight", Vec(V * D, 0.0f));
    be_->attention_backward(d_dq->get(), d_dk->get(), d_dv->get(), d_do->get(), d_o->get(),
                            d_lse->get(), d_q->get(), d_k->get(), d_v->get(), s);
    be_->embedding_backward(d_dw->get(), d_g->get(), d_ids->get(), N, D);
    std::vector<uint32_t> bits;
    for (auto* b : {d_dq.get(), d_dk.get(), d_dv.get(), d_dw.get()})
      for (float x : b->read()) bits.push_back(std::bit_cast<uint32_t>(x));
    if (run == 0) {
      first = bits;
      continue;
    }
    size_t diff = 0;
    while (diff < bits.size() && bits[diff] == first[diff]) ++diff;
    EXPECT_EQ(diff, bits.size()) << "run " << run << ": element " << diff
                                 << " of dq|dk|dv|dweight differs from run 0";
  }
}

// Blocks of the attention (FPDT's chunk pairs: queries of one chunk against keys of another,
// masks in whole-sequence coordinates) and the online-softmax merge of two partial results.
TEST_P(BackendOps, AttentionBlocksAndMerge) {
  struct BlockCase {
    int64_t T, H, KVH, HD, window, docs, q_begin, Tq, k_begin, Tk;
  };
  const BlockCase cases[] = {
      {200, 4, 2, 24, 0, 0, 130, 70, 0, 65},    // a later query chunk against the first keys
      {200, 4, 2, 24, 0, 3, 64, 66, 64, 66},    // the diagonal block, documents
      {150, 2, 1, 64, 40, 0, 100, 50, 50, 50},  // window reaching into the previous chunk
      {90, 2, 2, 8, 0, 0, 0, 45, 45, 45},       // keys after every query: nothing visible
  };
  for (const BlockCase& c : cases) {
    SCOPED_TRACE(::testing::Message() << "T=" << c.T << " q [" << c.q_begin << ", +" << c.Tq
                                      << ") k [" << c.k_begin << ", +" << c.Tk << ")");
    const int64_t nq = c.Tq * c.H * c.HD, nk = c.Tk * c.KVH * c.HD;
    const Vec q = random_vec(nq, 31, -2, 2), k = random_vec(nk, 32, -2, 2), v = random_vec(nk, 33),
              dout = random_vec(nq, 34);
    Ids docs(c.T);
    for (int64_t t = 0; t < c.T; ++t) docs[t] = c.docs ? int32_t(t * c.docs / c.T) : 0;
    AttentionShape s{1,
                     c.T,
                     c.H,
                     c.KVH,
                     c.HD,
                     c.window,
                     c.docs ? docs.data() : nullptr,
                     float(1.0 / std::sqrt(double(c.HD)))};
    s.q_begin = c.q_begin, s.Tq = c.Tq, s.k_begin = c.k_begin, s.Tk = c.Tk;
    Vec o(nq), lse(c.H * c.Tq), dq(nq), dk(nk), dv(nk);
    attention_forward(o.data(), lse.data(), q.data(), k.data(), v.data(), s);
    // The backward of a block takes the final (merged) out and lse; any finite values do here.
    Vec lse_final = lse;
    for (auto& x : lse_final) x = std::isfinite(x) ? x + 0.25f : 0.5f;
    attention_backward(dq.data(), dk.data(), dv.data(), dout.data(), o.data(), lse_final.data(),
                       q.data(), k.data(), v.data(), s);
    auto d_q = buf("q", q);
    auto d_k = buf("k", k);
    auto d_v = buf("v", v);
    auto d_docs = buf("doc_ids", docs);
    AttentionShape ds = s;
    ds.doc_ids = c.docs ? d_docs->get() : nullptr;
    auto d_o = out("out", nq);
    auto d_lse = out("lse", c.H * c.Tq);
    be_->attention_forward(d_o->get(), d_lse->get(), d_q->get(), d_k->get(), d_v->get(), ds);
    EXPECT_CLOSE(d_o->read(), o, attention(max_abs(o)), "block forward out");
    EXPECT_CLOSE(d_lse->read(), lse, attention(1.0), "block forward lse");
    auto d_do = buf("dout", dout);
    auto d_o_ref = buf("out", o);
    auto d_lse_ref = buf("lse", lse_final);
    auto d_dq = out("dq", nq);
    auto d_dk = out("dk", nk);
    auto d_dv = out("dv", nk);
    be_->attention_backward(d_dq->get(), d_dk->get(), d_dv->get(), d_do->get(), d_o_ref->get(),
                            d_lse_ref->get(), d_q->get(), d_k->get(), d_v->get(), ds);
    EXPECT_CLOSE(d_dq->read(), dq, attention(max_abs(dq)), "block backward dq");
    EXPECT_CLOSE(d_dk->read(), dk, attention(max_abs(dk)), "block backward dk");
    EXPECT_CLOSE(d_dv->read(), dv, attention(max_abs(dv)), "block backward dv");
  }
  // Merge: rows 0-2 ordinary, row 3 with an empty first partial, row 4 with an empty second
  // one, row 5 NaN.
  const int64_t rows = 6, H = 3, HD = 5;
  Vec a = random_vec(rows * H * HD, 35), b = random_vec(rows * H * HD, 36);
  Vec la = random_vec(H * rows, 37, -3, 3), lb = random_vec(H * rows, 38, -3, 3);
  for (int64_t h = 0; h < H; ++h) {
    la[h * rows + 3] = -kInf;
    lb[h * rows + 4] = -kInf;
    lb[h * rows + 5] = kNaN;
  }
  Vec want = a, want_l = la;
  attention_merge(want.data(), want_l.data(), b.data(), lb.data(), rows, H, HD);
  auto d_a = buf("out", a);
  auto d_la = buf("lse", la);
  auto d_b = buf("out_b", b);
  auto d_lb = buf("lse_b", lb);
  be_->attention_merge(d_a->get(), d_la->get(), d_b->get(), d_lb->get(), rows, H, HD);
  const Vec got = d_a->read(), got_l = d_la->read();
  EXPECT_CLOSE(got, want, elementwise(), "attention_merge out");
  EXPECT_CLOSE(got_l, want_l, elementwise(), "attention_merge lse");
  EXPECT_TRUE(std::isnan(got_l[5]) && std::isnan(got[5 * H * HD]));
}

// copy_2d: strided device-to-device rows (the all-to-all packing); bytes between rows untouched.
TEST_P(BackendOps, Copy2d) {
  const Vec src = random_vec(7 * 13, 39);
  Vec dst0 = random_vec(7 * 9, 40);
  auto d_src = buf("src", src);
  auto d_dst = buf("dst", dst0);
  // Columns 2..6 of each 13-float source row into columns 3..7 of each 9-float destination row.
  be_->copy_2d(d_dst->get() + 3, 9 * 4, d_src->get() + 2, 13 * 4, 5 * 4, 7);
  Vec want = dst0;
  for (int r = 0; r < 7; ++r)
    for (int c = 0; c < 5; ++c) want[r * 9 + 3 + c] = src[r * 13 + 2 + c];
  EXPECT_CLOSE(d_dst->read(), want, Tol({0, 0}), "copy_2d");
  auto d_flat = out("flat", 7 * 13);
  be_->copy_device(d_flat->get(), d_src->get(), src.size() * 4);
  EXPECT_CLOSE(d_flat->read(), src, Tol({0, 0}), "copy_device");
}

// The LoRA path and its gradients in double precision, straight from the formulas of
// ops/lora.h (the dropout factor is the mask's definition, ops/lora_mask.h): an independent
// reference for the CPU op too, which the CUDA op is also held to.
struct LoraReference {
  std::vector<double> out, dx, da, db;
};
LoraReference lora_reference(const Vec& x, const Vec& a, const Vec& b, const Vec& dout,
                             const Vec& out0, const Vec& dx0, const Vec& da0, const Vec& db0,
                             int64_t N, int64_t IN, int64_t OUT, const LoraCall& c) {
  const int64_t R = c.R;
  std::vector<double> xd(size_t(N * IN)), t(size_t(N * R), 0.0), u(size_t(N * R), 0.0);
  for (int64_t i = 0; i < N; ++i)
    for (int64_t k = 0; k < IN; ++k)
      xd[i * IN + k] =
          double(x[i * IN + k]) * lora_dropout_factor(c.seed, c.row0 + i, k, IN, c.dropout);
  LoraReference r;
  r.out.assign(out0.begin(), out0.end());
  r.dx.assign(dx0.begin(), dx0.end());
  r.da.assign(da0.begin(), da0.end());
  r.db.assign(db0.begin(), db0.end());
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < R; ++j) {
      for (int64_t k = 0; k < IN; ++k) t[i * R + j] += xd[i * IN + k] * a[j * IN + k];
      for (int64_t o = 0; o < OUT; ++o) u[i * R + j] += double(dout[i * OUT + o]) * b[o * R + j];
    }
  for (int64_t i = 0; i < N; ++i)
    for (int64_t o = 0; o < OUT; ++o) {
      double s = 0;
      for (int64_t j = 0; j < R; ++j) s += t[i * R + j] * b[o * R + j];
      r.out[i * OUT + o] += c.scale * s;
    }
  for (int64_t i = 0; i < N; ++i)
    for (int64_t k = 0; k < IN; ++k) {
      double s = 0;
      for (int64_t j = 0; j < R; ++j) s += u[i * R + j] * a[j * IN + k];
      r.dx[i * IN + k] += c.scale * s * lora_dropout_factor(c.seed, c.row0 + i, k, IN, c.dropout);
    }
  for (int64_t j = 0; j < R; ++j) {
    for (int64_t k = 0; k < IN; ++k) {
      double s = 0;
      for (int64_t i = 0; i < N; ++i) s += u[i * R + j] * xd[i * IN + k];
      r.da[j * IN + k] += c.scale * s;
    }
    for (int64_t o = 0; o < OUT; ++o) {
      double s = 0;
      for (int64_t i = 0; i < N; ++i) s += double(dout[i * OUT + o]) * t[i * R + j];
      r.db[o * R + j] += c.scale * s;
    }
  }
  return r;
}

// |got - want| <= atol + rtol |want| for every element against a double reference; a failure
// names the worst element.
::testing::AssertionResult close_to_double(const Vec& got, const std::vector<double>& want,
                                           double atol, double rtol, const char* what) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure()
           << what << ": " << got.size() << " elements, want " << want.size();
  size_t worst = 0;
  double worst_excess = -1;
  for (size_t i = 0; i < want.size(); ++i) {
    const double err = std::fabs(double(got[i]) - want[i]);
    const double excess = std::isfinite(err) ? err - (atol + rtol * std::fabs(want[i])) : 1e300;
    if (excess > worst_excess) worst_excess = excess, worst = i;
  }
  if (worst_excess <= 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << what << ": worst element " << worst << " is " << got[worst] << ", the double reference "
         << want[worst] << " (atol " << atol << ", rtol " << rtol << ")";
}

// LoRA: the low-rank path and its gradients, with and without dropout (the masks are a hash
// of (seed, row, column): every backend drops the same elements); every backend against the
// double-precision reference, then against the CPU op.
TEST_P(BackendOps, Lora) {
  const int64_t N = 37, IN = 48, OUT = 29;
  for (float p : {0.0f, 0.25f}) {
    SCOPED_TRACE(::testing::Message() << "dropout " << p);
    LoraCall c;
    c.R = 5;
    c.scale = 0.75f;
    c.dropout = p;
    c.seed = 12345;
    c.row0 = 17;
    const Vec x = random_vec(N * IN, 70), a = random_vec(c.R * IN, 71),
              b = random_vec(OUT * c.R, 72);
    const Vec out0 = random_vec(N * OUT, 73), dout = random_vec(N * OUT, 74);
    const Vec dx0 = random_vec(N * IN, 75), da0 = random_vec(c.R * IN, 76),
              db0 = random_vec(OUT * c.R, 77);
    Vec want = out0, t(N * c.R), xd(N * IN), u(N * c.R), dxd(N * IN);
    lora_forward(want.data(), t.data(), xd.data(), x.data(), a.data(), b.data(), N, IN, OUT, c);
    Vec dx = dx0, da = da0, db = db0;
    lora_backward(dx.data(), da.data(), db.data(), t.data(), u.data(), xd.data(), dxd.data(),
                  dout.data(), x.data(), a.data(), b.data(), N, IN, OUT, c);
    const LoraReference ref = lora_reference(x, a, b, dout, out0, dx0, da0, db0, N, IN, OUT, c);
    // f32 products over at most 48 terms of values below 1 in magnitude: a few 1e-6.
    const double ratol = 2e-5, rrtol = cpu() ? 2e-5 : 2e-4;
    auto d_x = buf("inp", x);
    auto d_a = buf("a", a);
    auto d_b = buf("b", b);
    auto d_out = buf("out", out0);
    auto d_t = out("t", N * c.R);
    auto d_u = out("u", N * c.R);
    auto d_xd = out("xd", N * IN);
    auto d_dxd = out("dxd", N * IN);
    be_->lora_forward(d_out->get(), d_t->get(), d_xd->get(), d_x->get(), d_a->get(), d_b->get(), N,
                      IN, OUT, c);
    const Vec got_out = d_out->read();
    EXPECT_TRUE(close_to_double(got_out, ref.out, ratol, rrtol, "lora_forward out vs double"));
    EXPECT_CLOSE(got_out, want, gemm(), "lora_forward out (+=)");
    auto d_dout = buf("dout", dout);
    auto d_dx = buf("dinp", dx0);
    auto d_da = buf("da", da0);
    auto d_db = buf("db", db0);
    be_->lora_backward(d_dx->get(), d_da->get(), d_db->get(), d_t->get(), d_u->get(), d_xd->get(),
                       d_dxd->get(), d_dout->get(), d_x->get(), d_a->get(), d_b->get(), N, IN, OUT,
                       c);
    const Vec got_dx = d_dx->read(), got_da = d_da->read(), got_db = d_db->read();
    EXPECT_TRUE(close_to_double(got_dx, ref.dx, ratol, rrtol, "lora_backward dinp vs double"));
    EXPECT_TRUE(close_to_double(got_da, ref.da, ratol, rrtol, "lora_backward da vs double"));
    EXPECT_TRUE(close_to_double(got_db, ref.db, ratol, rrtol, "lora_backward db vs double"));
    EXPECT_CLOSE(got_dx, dx, gemm(), "lora_backward dinp (+=)");
    EXPECT_CLOSE(got_da, da, gemm(), "lora_backward da (+=)");
    EXPECT_CLOSE(got_db, db, gemm(), "lora_backward db (+=)");
  }
}

TEST_P(BackendOps, LmHeadCrossEntropy) {
  const int64_t N = 37, D = 24, V = 53;
  const Vec h = random_vec(N * D, 25, -2, 2), w = random_vec(V * D, 26);
  Ids t = random_ids(N, V, 27);
  for (int64_t i = 8; i < 16; ++i) t[i] = kIgnoreIndex;  // chunk [8,16) has no label
  t[0] = t[20] = t[36] = kIgnoreIndex;
  int64_t labelled = 0;
  for (int32_t y : t) labelled += y != kIgnoreIndex;
  const float gs = 1.0f / float(labelled);
  for (int64_t chunk : {int64_t(8), int64_t(64)}) {
    SCOPED_TRACE(::testing::Message() << "chunk=" << chunk);
    const Vec dw0 = random_vec(V * D, 28);
    Vec dh(N * D), dw = dw0, scratch(chunk * V);
    const double loss = lm_head_cross_entropy(dh.data(), dw.data(), h.data(), w.data(), t.data(), N,
                                              D, V, chunk, gs, scratch.data());
    auto d_h = buf("hidden", h);
    auto d_w = buf("weight", w);
    auto d_t = buf("targets", t);
    auto d_dh = out("dhidden", N * D);
    auto d_dw = buf("dweight", dw0);
    auto d_scratch = out("scratch", chunk * V);
    const double got = be_->lm_head_cross_entropy(d_dh->get(), d_dw->get(), d_h->get(), d_w->get(),
                                                  d_t->get(), N, D, V, chunk, gs, d_scratch->get());
    EXPECT_NEAR(got, loss, cpu() ? 0.0 : 1e-5 * std::fabs(loss));
    EXPECT_CLOSE(d_dh->read(), dh, gemm(), "lm_head_cross_entropy dhidden");
    EXPECT_CLOSE(d_dw->read(), dw, gemm(), "lm_head_cross_entropy dweight (+=)");
    d_scratch->read();  // guards only
    // Loss only (no gradients).
    const double got2 = be_->lm_head_cross_entropy(
        nullptr, nullptr, d_h->get(), d_w->get(), d_t->get(), N, D, V, chunk, gs, d_scratch->get());
    EXPECT_NEAR(got2, loss, cpu() ? 0.0 : 1e-5 * std::fabs(loss));
  }
}

// The LM head + cross-entropy over a frozen bf16 head: lm_head_cross_entropy's loss and dhidden
// on the widened weight, widened whole or 10 vocabulary rows at a time.
TEST_P(BackendOps, LmHeadCrossEntropyBf16Weight) {
  const int64_t N = 37, D = 24, V = 53;
  const Vec h = random_vec(N * D, 98, -2, 2), wf = random_vec(V * D, 99);
  std::vector<uint16_t> w16(V * D);
  Vec w(V * D);
  for (int64_t i = 0; i < V * D; ++i) w[i] = bf16_to_f32(w16[i] = f32_to_bf16(wf[i]));
  Ids t = random_ids(N, V, 100);
  for (int64_t i = 8; i < 16; ++i) t[i] = kIgnoreIndex;
  const float gs = 1.0f / 29.0f;
  for (int64_t chunk : {int64_t(8), int64_t(64)}) {
    Vec dh(N * D), scratch(chunk * V);
    const double loss = lm_head_cross_entropy(dh.data(), nullptr, h.data(), w.data(), t.data(), N,
                                              D, V, chunk, gs, scratch.data());
    for (int64_t rows : {V, int64_t(10)}) {
      SCOPED_TRACE(::testing::Message() << "chunk=" << chunk << " expand_rows=" << rows);
      const bool whole = rows >= V;
      auto d_h = buf("hidden", h);
      auto d_w = buf("weight", w16);
      auto d_t = buf("targets", t);
      auto d_dh = out("dhidden", N * D);
      auto d_scratch = out("scratch", chunk * V);
      auto d_e = out("expand", rows * D);
      const double got =
          be_->lm_head_cross_entropy_bf16w(d_dh->get(), d_h->get(), d_w->get(), d_t->get(), N, D, V,
                                           chunk, gs, d_scratch->get(), d_e->get(), rows);
      EXPECT_NEAR(got, loss, cpu() && whole ? 0.0 : 1e-5 * std::fabs(loss));
      const Tol tol = whole ? gemm() : Tol{1e-5, 1e-4};
      EXPECT_CLOSE(d_dh->read(), dh, tol, "lm_head_cross_entropy_bf16w dhidden");
      const double only =
          be_->lm_head_cross_entropy_bf16w(nullptr, d_h->get(), d_w->get(), d_t->get(), N, D, V,
                                           chunk, gs, d_scratch->get(), d_e->get(), rows);
      EXPECT_NEAR(only, loss, cpu() && whole ? 0.0 : 1e-5 * std::fabs(loss));
      d_scratch->read(), d_e->read();  // guards only
    }
  }
}

TEST_P(BackendOps, AdamW) {
  const int64_t n = 1003;
  for (float wd : {0.0f, 0.1f}) {
    Vec p = random_vec(n, 29), m(n, 0.0f), v(n, 0.0f);
    auto d_p = buf("param", p);
    auto d_m = buf("m", m);
    auto d_v = buf("v", v);
    for (int64_t step = 1; step <= 3; ++step) {
      Vec g = random_vec(n, 30 + uint64_t(step), -1e-2f, 1e-2f);
      g[0] = 0.0f, g[1] = 1e-30f;
      AdamWParams a;
      a.lr = 1e-3f, a.weight_decay = wd, a.step = step;
      adamw_update(p.data(), g.data(), m.data(), v.data(), n, a);
      auto d_g = buf("grad", g);
      be_->adamw_update(d_p->get(), d_g->get(), d_m->get(), d_v->get(), n, a);
    }
    // The same rounding as torch on every backend: bit-exact.
    EXPECT_CLOSE(d_p->read(), p, Tol({0, 0}), "adamw param");
    EXPECT_CLOSE(d_m->read(), m, Tol({0, 0}), "adamw m");
    EXPECT_CLOSE(d_v->read(), v, Tol({0, 0}), "adamw v");
  }
}

TEST_P(BackendOps, ReductionsAndElementwise) {
  const int64_t n = 100003;
  Vec x = random_vec(n, 40, -3, 3), y = random_vec(n, 41);
  auto d_x = buf("x", x);
  const double want = sum_squares(x.data(), n);
  EXPECT_NEAR(be_->sum_squares(d_x->get(), n), want, cpu() ? 0.0 : 1e-12 * want);
  EXPECT_EQ(be_->sum_squares(d_x->get(), 0), 0.0);
  // Several vectors read back once (the gradient norm over many tensors).
  const double many = sum_squares(x.data() + 11, 60000) + sum_squares(x.data() + 2, 37);
  EXPECT_NEAR(
      be_->sum_squares_many({{d_x->get() + 11, 60000}, {d_x->get(), 0}, {d_x->get() + 2, 37}}),
      many, cpu() ? 0.0 : 1e-12 * many);
  be_->scale_inplace(d_x->get(), n, 0.37f);
  Vec xs = x;
  scale_inplace(xs.data(), n, 0.37f);
  EXPECT_CLOSE(d_x->read(), xs, Tol({0, 0}), "scale_inplace");
  auto d_y = buf("y", y);
  be_->add_inplace(d_y->get(), d_x->get(), n);
  Vec ys = y;
  for (int64_t i = 0; i < n; ++i) ys[i] += xs[i];
  EXPECT_CLOSE(d_y->read(), ys, Tol({0, 0}), "add_inplace");
  x[777] = kNaN;
  auto d_nan = buf("x_nan", x);
  EXPECT_TRUE(std::isnan(be_->sum_squares(d_nan->get(), n)));
  x[777] = kInf;
  auto d_inf = buf("x_inf", x);
  EXPECT_EQ(be_->sum_squares(d_inf->get(), n), INFINITY);
}

TEST_P(BackendOps, Nf4Dequantize) {
  // Quantized by the reference quantizer (ops/nf4.h); the CPU op is the reference, and one
  // element is also checked by hand against the layout.
  const int64_t n = kNf4Block * kNf4AbsmaxBlock * 2 + 3 * kNf4Block + 2;  // partial groups
  const Nf4Sizes z = nf4_sizes(n);
  const Vec w = random_vec(n, 50, -2, 2);
  std::vector<uint8_t> codes(z.packed_bytes), absmax_codes(z.blocks);
  Vec scale(z.scale_blocks);
  float offset = 0;
  nf4_quantize(codes.data(), absmax_codes.data(), scale.data(), &offset, w.data(), n);
  Vec want(n);
  nf4_dequantize(want.data(), codes.data(), absmax_codes.data(), scale.data(), offset, n);
  const int64_t i = kNf4Block * kNf4AbsmaxBlock + 65;  // group 1, block 257, odd: low nibble
  const float absmax = dynamic_map_code()[absmax_codes[i / 64]] * scale[1] + offset;
  EXPECT_NEAR(want[i], nf4_code()[codes[i / 2] & 15] * absmax, 1e-6f * std::fabs(absmax));

  auto d_codes = buf("codes", codes);
  auto d_ac = buf("absmax_codes", absmax_codes);
  auto d_scale = buf("absmax_scale", scale);
  auto d_out = out("out", n);
  be_->nf4_dequantize(d_out->get(), d_codes->get(), d_ac->get(), d_scale->get(), offset, n);
  EXPECT_CLOSE(d_out->read(), want, Tol({0, 0}), "nf4_dequantize");
}

// bf16 -> f32 widening (the bf16 base weights of LoRA with --bf16 True): bit-exact on every
// backend, odd length, with NaN, +-Inf, -0 and subnormals among the values.
TEST_P(BackendOps, Bf16ToF32) {
  const int64_t n = 1001;
  const Vec x = random_vec(n, 80, -3, 3);
  std::vector<uint16_t> in(n);
  for (int64_t i = 0; i < n; ++i) in[i] = f32_to_bf16(x[i]);
  in[0] = 0x7fc0;      // NaN
  in[1] = 0x7f80;      // +Inf
  in[2] = 0xff80;      // -Inf
  in[3] = 0x8000;      // -0
  in[4] = 0x0001;      // smallest subnormal
  in[n - 1] = 0xffff;  // NaN with every payload bit
  auto d_in = buf("in", in);
  auto d_out = out("out", n);
  be_->bf16_to_f32(d_out->get(), d_in->get(), n);
  const Vec got = d_out->read();
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t want = uint32_t(in[i]) << 16;
    uint32_t bits;
    std::memcpy(&bits, &got[i], 4);
    ASSERT_EQ(bits, want) << "element " << i << " of " << n;
  }
}

// f32 -> bf16, round to nearest even, bit for bit as core/dtype.h (ties, NaN, Inf, overflow
// to Inf, subnormals), packed and in place.
// bf16 round-to-nearest-even by arithmetic instead of bit manipulation (an independent
// reference for core/dtype.h's integer rounding): x rounded to 8 significant bits, or to the
// bf16 subnormal unit 2^-133 below 2^-126, ties to even (nearbyint in the default rounding
// mode), overflowing to Inf. Returns the bf16 bits; not for NaN.
uint16_t bf16_by_arithmetic(float x) {
  const double d = x;
  double r = 0;
  if (std::isinf(d) || d == 0) {
    r = d;
  } else {
    int k = 0;
    std::frexp(d, &k);  // |d| = m 2^k, m in [0.5, 1)
    const double ulp = std::ldexp(1.0, std::max(k, -125) - 8);
    r = std::nearbyint(d / ulp) * ulp;
    if (std::fabs(r) >= std::ldexp(1.0, 128)) r = std::copysign(INFINITY, d);
  }
  const float f = static_cast<float>(r);  // exact: r has at most 8 significant bits
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if (std::signbit(d)) bits |= 0x80000000u;  // -0 stays -0
  EXPECT_EQ(bits & 0xffffu, 0u) << "the reference itself: " << x;
  return static_cast<uint16_t>(bits >> 16);
}

TEST_P(BackendOps, F32ToBf16) {
  const int64_t n = 1003;
  Vec x = random_vec(n, 81, -3, 3);
  const uint32_t special[] = {0x3f808000u,  // a tie, even below: rounds down
                              0x3f818000u,  // a tie, odd below: rounds up
                              0x7f7fffffu,  // largest float: overflows to Inf
                              0x7fc00001u,  // quiet NaN with payload
                              0xff800001u,  // signalling NaN, negative
                              0x7f800000u,  // Inf
                              0x80000000u,  // -0
                              0x00000001u,  // smallest subnormal
                              0x0000ffffu};
  for (size_t i = 0; i < std::size(special); ++i) std::memcpy(&x[i], &special[i], 4);
  std::vector<uint16_t> zeros(n, 0);
  auto d_x = buf("in", x);
  auto d_out = buf("out", zeros);
  be_->f32_to_bf16(d_out->get(), d_x->get(), n);
  const std::vector<uint16_t> got = d_out->read();
  auto d_r = buf("x", x);
  be_->round_to_bf16(d_r->get(), n);
  const Vec rounded = d_r->read();
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t want = f32_to_bf16(x[i]);
    ASSERT_EQ(got[i], want) << "f32_to_bf16 element " << i << " of " << n;
    if (std::isnan(x[i])) {  // a quiet NaN of the same sign
      EXPECT_EQ(got[i] & 0x7fc0, 0x7fc0) << "element " << i;
      EXPECT_EQ(got[i] >> 15, uint16_t(std::signbit(x[i]))) << "element " << i;
    } else {
      ASSERT_EQ(got[i], bf16_by_arithmetic(x[i]))
          << "f32_to_bf16 element " << i << " of " << n << " (" << x[i] << ") vs arithmetic";
    }
    uint32_t bits;
    std::memcpy(&bits, &rounded[i], 4);
    ASSERT_EQ(bits, uint32_t(want) << 16) << "round_to_bf16 element " << i << " of " << n;
  }
  EXPECT_EQ(got[0], 0x3f80);
  EXPECT_EQ(got[1], 0x3f82);
  EXPECT_EQ(got[2], 0x7f80);
}

// The device-memory count the trainer reports: every alloc until its free, the peak kept.
TEST_P(BackendOps, DeviceMemoryUseCountsAllocations) {
  const DeviceMemoryUse before = be_->device_memory_use();
  void* a = be_->alloc(1 << 20);
  void* b = be_->alloc(3000);
  const DeviceMemoryUse mid = be_->device_memory_use();
  EXPECT_GE(mid.in_use - before.in_use, size_t(1 << 20) + 3000);
  EXPECT_LE(mid.in_use - before.in_use, size_t(1 << 20) + 3000 + 2 * 65536) << "rounding only";
  EXPECT_GE(mid.peak, mid.in_use);
  be_->free(b);
  be_->free(a);
  const DeviceMemoryUse after = be_->device_memory_use();
  EXPECT_EQ(after.in_use, before.in_use);
  EXPECT_EQ(after.peak, mid.peak);
}

TEST_P(BackendOps, AsyncCopiesThroughPinnedMemory) {
  const int64_t n = 4099;
  const Vec x = random_vec(n, 60);
  auto d_src = buf("src", x);
  auto d_dst = out("dst", n);
  auto* pinned = static_cast<float*>(be_->alloc_pinned(n * sizeof(float)));
  ASSERT_NE(pinned, nullptr);
  be_->scale_inplace(d_src->get(), n, 2.0f);  // compute before the offload must be seen
  be_->copy_to_host_async(pinned, d_src->get(), n * sizeof(float));
  be_->synchronize_copies();
  Vec want = x;
  for (auto& e : want) e *= 2.0f;
  EXPECT_CLOSE(Vec(pinned, pinned + n), want, Tol({0, 0}), "offload");
  for (int64_t i = 0; i < n; ++i) pinned[i] += 1.0f;
  be_->copy_to_device_async(d_dst->get(), pinned, n * sizeof(float));
  be_->wait_copies();
  be_->scale_inplace(d_dst->get(), n, 0.5f);  // compute after wait_copies sees the prefetch
  for (auto& e : want) e = (e + 1.0f) * 0.5f;
  EXPECT_CLOSE(d_dst->read(), want, Tol({0, 0}), "prefetch");
  be_->synchronize_copies();
  be_->free_pinned(pinned);
}

// The sums of an op profile by name (depth 0: Backend calls; 1: work inside them).
std::map<std::string, OpTime> by_name(const std::vector<OpTime>& rows, int depth) {
  std::map<std::string, OpTime> m;
  for (const OpTime& r : rows) {
    EXPECT_TRUE(std::isfinite(r.ms) && r.ms >= 0) << r.name << ": " << r.ms << " ms";
    if (r.depth == depth) m[r.name] = r;
  }
  return m;
}
double total_ms(const std::map<std::string, OpTime>& m) {
  double t = 0;
  for (const auto& [name, r] : m) t += r.ms;
  return t;
}

TEST(OpProfile, SumsByNameAndDepthAndShowsTheTimeOutsideTheOps) {
  OpTimes t;
  t.add("gemm", 1, 2.0);
  t.add("linear_forward", 0, 3.0);
  t.add("rmsnorm_forward", 0, 4.0);
  t.add("linear_forward", 0, 2.5);
  t.add("gemm", 1, 1.0);
  const std::vector<OpTime> rows = t.take();
  ASSERT_EQ(rows.size(), 3u);
  EXPECT_EQ(rows[0].name, "linear_forward");  // depth 0 first, the longest first
  EXPECT_EQ(rows[0].calls, 2);
  EXPECT_DOUBLE_EQ(rows[0].ms, 5.5);
  EXPECT_EQ(rows[1].name, "rmsnorm_forward");
  EXPECT_EQ(rows[2].name, "gemm");
  EXPECT_EQ(rows[2].depth, 1);
  EXPECT_DOUBLE_EQ(rows[2].ms, 3.0);
  EXPECT_TRUE(t.take().empty());
  const std::string table = format_op_profile(rows, 10.0);
  EXPECT_NE(table.find("linear_forward"), std::string::npos) << table;
  EXPECT_NE(table.find("55.0%"), std::string::npos) << table;
  EXPECT_LT(table.find("inside the ops above"), table.find("gemm")) << table;
  // 10 ms of wall time, 9.5 in depth-0 ops (the nested gemm time is not added again).
  const size_t outside = table.find("(outside the ops)");
  ASSERT_NE(outside, std::string::npos) << table;
  const std::string last = table.substr(outside);
  EXPECT_NE(last.find(" 0.500 "), std::string::npos) << last;
  EXPECT_NE(last.find(" 5.0%"), std::string::npos) << last;
}

// Backend::set_op_profiling: every call made while it is on is counted once, under its op's
// name; take_op_profile clears the sums; nothing is counted while it is off. The CUDA backend
// also times the cuBLAS products inside the calls (two per LoRA forward), within their callers'
// time.
TEST_P(BackendOps, OpProfileCountsEveryCallWhileOn) {
  const int64_t N = 37, IN = 48, OUT = 29;
  LoraCall c;
  c.R = 5;
  c.scale = 0.5f;
  auto d_x = buf("inp", random_vec(N * IN, 80));
  auto d_w = buf("weight", random_vec(OUT * IN, 81));
  auto d_a = buf("a", random_vec(c.R * IN, 82));
  auto d_b = buf("b", random_vec(OUT * c.R, 83));
  auto d_y = out("out", N * OUT);
  auto d_t = out("t", N * c.R);
  auto linear = [&] {
    be_->linear_forward(d_y->get(), d_x->get(), d_w->get(), nullptr, N, IN, OUT);
  };
  auto lora = [&] {
    be_->lora_forward(d_y->get(), d_t->get(), nullptr, d_x->get(), d_a->get(), d_b->get(), N, IN,
                      OUT, c);
  };
  linear();
  EXPECT_TRUE(be_->take_op_profile().empty()) << "counted while off";
  be_->set_op_profiling(true);
  linear();
  lora();
  linear();
  be_->scale_inplace(d_y->get(), N * OUT, 0.5f);
  const std::vector<OpTime> rows = be_->take_op_profile();
  const auto ops = by_name(rows, 0);
  ASSERT_EQ(ops.size(), 3u) << "linear_forward, lora_forward, scale_inplace";
  EXPECT_EQ(ops.at("linear_forward").calls, 2);
  EXPECT_EQ(ops.at("lora_forward").calls, 1);
  EXPECT_EQ(ops.at("scale_inplace").calls, 1);
  const auto inside = by_name(rows, 1);
  if (cpu()) {
    EXPECT_TRUE(inside.empty());
  } else {
    ASSERT_EQ(inside.size(), 1u);
    EXPECT_EQ(inside.at("cuBLAS GEMM (f32)").calls, 4) << "one per linear, two per LoRA";
    EXPECT_LE(total_ms(inside), total_ms(ops) + 1e-3) << "nested spans lie inside their ops";
  }
  EXPECT_TRUE(be_->take_op_profile().empty()) << "take clears the sums";
  be_->set_op_profiling(false);
  lora();
  EXPECT_TRUE(be_->take_op_profile().empty()) << "counted after profiling was turned off";
}

INSTANTIATE_TEST_SUITE_P(Backends, BackendOps, ::testing::Values("cpu", "cpu-guarded", "cuda"),
                         [](const ::testing::TestParamInfo<std::string>& i) {
                           return i.param == "cpu-guarded" ? std::string("cpu_guarded") : i.param;
                         });

// bf16 GEMM mode of the CUDA backend: inputs rounded to bf16 (relative error 2^-9 each), f32
// accumulation; compared with the f32 CPU op with a tolerance scaled by sqrt(K).
TEST(CudaBackend, Bf16GemmMode) {
  std::string reason;
  auto be = make_cuda_backend(&reason, GemmPrecision::kBf16);
  LT_CUDA_OR_SKIP(be, reason);
  const int64_t N = 65, IN = 96, OUT = 33;
  const Vec x = random_vec(N * IN, 70), w = random_vec(OUT * IN, 71);
  Vec y(N * OUT);
  linear_forward(y.data(), x.data(), w.data(), nullptr, N, IN, OUT);
  DeviceBuffer<float> d_x(*be, "inp", x), d_w(*be, "weight", w), d_y(*be, "out", N * OUT);
  be->linear_forward(d_y.get(), d_x.get(), d_w.get(), nullptr, N, IN, OUT);
  EXPECT_TRUE(all_close(d_y.read().data(), y.data(), N * OUT, 8e-3 * std::sqrt(double(IN)), 1e-2,
                        "bf16 linear_forward"));
  // A bf16 weight is multiplied as it is: the same products as the f32 weight it widens to,
  // and the expansion buffer is never written.
  std::vector<uint16_t> w16(OUT * IN);
  Vec wide(OUT * IN);
  for (int64_t i = 0; i < OUT * IN; ++i) wide[i] = bf16_to_f32(w16[i] = f32_to_bf16(w[i]));
  const Vec dy = random_vec(N * OUT, 72), sentinel(OUT * IN, 7.0f);
  DeviceBuffer<uint16_t> d_w16(*be, "weight16", w16);
  DeviceBuffer<float> d_wide(*be, "wide", wide), d_e(*be, "expand", sentinel),
      d_y16(*be, "out16", N * OUT), d_dy(*be, "dout", dy), d_dx(*be, "dinp", N * IN),
      d_dx16(*be, "dinp16", N * IN);
  be->linear_forward(d_y.get(), d_x.get(), d_wide.get(), nullptr, N, IN, OUT);
  be->linear_forward_bf16w(d_y16.get(), d_x.get(), d_w16.get(), nullptr, N, IN, OUT, d_e.get(),
                           OUT);
  EXPECT_TRUE(all_close(d_y16.read().data(), d_y.read().data(), N * OUT, 1e-5, 1e-5,
                        "bf16-weight linear_forward vs the widened weight"));
  be->linear_backward(d_dx.get(), nullptr, nullptr, d_dy.get(), nullptr, d_wide.get(), N, IN, OUT,
                      Accumulate::kNo);
  be->linear_backward_bf16w(d_dx16.get(), nullptr, d_dy.get(), d_w16.get(), N, IN, OUT,
                            Accumulate::kNo, d_e.get(), OUT);
  EXPECT_TRUE(all_close(d_dx16.read().data(), d_dx.read().data(), N * IN, 1e-5, 1e-5,
                        "bf16-weight linear_backward vs the widened weight"));
  EXPECT_EQ(d_e.read(), sentinel) << "the bf16 path widened the weight";
}

// With bf16 GEMMs the profile splits a linear layer into the staging of its f32 inputs (both
// operands of an f32 weight, only the activations of a bf16 weight) and the cuBLAS product.
TEST(CudaBackend, OpProfileSeparatesBf16StagingFromTheProducts) {
  std::string reason;
  auto be = make_cuda_backend(&reason, GemmPrecision::kBf16);
  LT_CUDA_OR_SKIP(be, reason);
  const int64_t N = 65, IN = 96, OUT = 33;
  DeviceBuffer<float> d_x(*be, "inp", random_vec(N * IN, 84)),
      d_w(*be, "weight", random_vec(OUT * IN, 85)), d_y(*be, "out", N * OUT),
      d_e(*be, "expand", OUT * IN);
  DeviceBuffer<uint16_t> d_w16(*be, "weight16", std::vector<uint16_t>(size_t(OUT * IN), 0x3f80));
  be->set_op_profiling(true);
  be->linear_forward(d_y.get(), d_x.get(), d_w.get(), nullptr, N, IN, OUT);
  be->linear_forward_bf16w(d_y.get(), d_x.get(), d_w16.get(), nullptr, N, IN, OUT, d_e.get(), OUT);
  const std::vector<OpTime> rows = be->take_op_profile();
  be->set_op_profiling(false);
  const auto ops = by_name(rows, 0), inside = by_name(rows, 1);
  ASSERT_EQ(ops.size(), 2u);
  ASSERT_EQ(inside.size(), 2u);
  EXPECT_EQ(inside.at("bf16 staging of GEMM inputs").calls, 3) << "2 for f32 weights, 1 for bf16";
  EXPECT_EQ(inside.at("cuBLAS GEMM (bf16 inputs)").calls, 2);
  EXPECT_LE(total_ms(inside), total_ms(ops) + 1e-3);
}

// Backend::hold_gemm_input: while x is held, the bf16 GEMMs that read it (a bf16-weight linear
// layer and a LoRA adapter's A, as LlamaModel::project) multiply one rounding of it, made at its
// first use, and give the same bits as staging it per GEMM; after the release it is staged again.
// Backends without bf16 GEMMs hold nothing.
TEST(CudaBackend, HeldGemmInputIsRoundedOnceWithTheSameProducts) {
  std::string reason;
  auto be = make_cuda_backend(&reason, GemmPrecision::kBf16);
  LT_CUDA_OR_SKIP(be, reason);
  const int64_t N = 65, IN = 96, OUT = 33;
  LoraCall c;
  c.R = 4;
  c.scale = 2.0f;
  const Vec w = random_vec(OUT * IN, 86);
  std::vector<uint16_t> w16(w.size());
  for (size_t i = 0; i < w.size(); ++i) w16[i] = f32_to_bf16(w[i]);
  DeviceBuffer<float> d_x(*be, "inp", random_vec(N * IN, 87)),
      d_a(*be, "a", random_vec(c.R * IN, 88)), d_b(*be, "b", random_vec(OUT * c.R, 89)),
      d_t(*be, "t", N * c.R), d_e(*be, "expand", 1), d_y(*be, "out", N * OUT);
  DeviceBuffer<uint16_t> d_w16(*be, "weight16", w16);
  // out = x W^T + LoRA; the profile's count of staged GEMM inputs.
  auto project = [&] {
    be->set_op_profiling(true);
    be->linear_forward_bf16w(d_y.get(), d_x.get(), d_w16.get(), nullptr, N, IN, OUT, d_e.get(), 1);
    be->lora_forward(d_y.get(), d_t.get(), nullptr, d_x.get(), d_a.get(), d_b.get(), N, IN, OUT, c);
    const auto inside = by_name(be->take_op_profile(), 1);
    be->set_op_profiling(false);
    return inside.at("bf16 staging of GEMM inputs").calls;
  };
  EXPECT_EQ(project(), 5) << "x twice, the adapter's a, t and b";
  const Vec staged = d_y.read();
  ASSERT_TRUE(be->hold_gemm_input(d_x.get(), N, IN));
  EXPECT_EQ(project(), 4) << "x once";
  EXPECT_EQ(d_y.read(), staged) << "the held rounding changed the products";
  EXPECT_EQ(project(), 3) << "x already rounded";
  be->release_gemm_input(d_x.get());
  EXPECT_EQ(project(), 5) << "released: staged again";
  EXPECT_EQ(d_y.read(), staged);
  // Bound to a workspace that planned no held inputs: nothing is held (nor allocated).
  DeviceBuffer<float> op_ws(*be, "op workspace", 1 << 20);
  be->bind_workspace(op_ws.get(), size_t(4) << 20, nullptr, 0, nullptr, 0);
  EXPECT_FALSE(be->hold_gemm_input(d_x.get(), N, IN)) << "a hold outside the plan";
  EXPECT_EQ(project(), 5);
  auto f32 = make_cuda_backend(&reason, GemmPrecision::kF32);
  EXPECT_FALSE(f32->hold_gemm_input(d_x.get(), N, IN)) << "f32 GEMMs round nothing";
  EXPECT_FALSE(make_cpu_backend()->hold_gemm_input(d_x.get(), N, IN));
}

// bf16 GEMMs whose staged operands pass the GEMM workspace run block by block: bound to a small
// workspace, the CUDA backend's linear layers and LM head match the same backend unblocked (one
// cuBLAS call each), the split dimension being M (tokens), N (vocabulary) or K (weight
// gradients), with f32 (staged) and bf16 (in place) weights.
TEST(CudaBackend, Bf16GemmsRunInBlocksWithinTheWorkspace) {
  std::string reason;
  auto whole = make_cuda_backend(&reason, GemmPrecision::kBf16);
  LT_CUDA_OR_SKIP(whole, reason);
  auto blocked = make_cuda_backend(&reason, GemmPrecision::kBf16);
  ASSERT_TRUE(blocked) << reason;
  const size_t gemm_bytes = 24 << 10;  // 12288 bf16 values: every product below is split
  DeviceBuffer<float> op_ws(*blocked, "op workspace", 1 << 20);
  DeviceBuffer<uint16_t> gemm_ws(*blocked, "gemm workspace", int64_t(gemm_bytes / 2));
  blocked->bind_workspace(op_ws.get(), size_t(1) << 22, gemm_ws.get(), gemm_bytes, nullptr, 0);
  const int64_t N = 515, IN = 200, OUT = 97;  // not multiples of 64
  const Vec x = random_vec(N * IN, 80), w = random_vec(OUT * IN, 81), dy = random_vec(N * OUT, 82);
  std::vector<uint16_t> w16(OUT * IN);
  for (int64_t i = 0; i < OUT * IN; ++i) w16[i] = f32_to_bf16(w[i]);
  struct Result {
    Vec y, y16, dx, dw, dx16;
  };
  auto run = [&](Backend& be) {
    DeviceBuffer<float> d_x(be, "inp", x), d_w(be, "weight", w), d_dy(be, "dout", dy),
        d_y(be, "out", N * OUT), d_y16(be, "out16", N * OUT), d_dx(be, "dinp", N * IN),
        d_dw(be, "dweight", Vec(OUT * IN, 0.0f)), d_dx16(be, "dinp16", N * IN),
        d_e(be, "expand", OUT * IN);
    DeviceBuffer<uint16_t> d_w16(be, "weight16", w16);
    be.linear_forward(d_y.get(), d_x.get(), d_w.get(), nullptr, N, IN, OUT);
    be.linear_backward(d_dx.get(), d_dw.get(), nullptr, d_dy.get(), d_x.get(), d_w.get(), N, IN,
                       OUT, Accumulate::kNo);
    be.linear_forward_bf16w(d_y16.get(), d_x.get(), d_w16.get(), nullptr, N, IN, OUT, d_e.get(),
                            OUT);
    be.linear_backward_bf16w(d_dx16.get(), nullptr, d_dy.get(), d_w16.get(), N, IN, OUT,
                             Accumulate::kNo, d_e.get(), OUT);
    return Result{d_y.read(), d_y16.read(), d_dx.read(), d_dw.read(), d_dx16.read()};
  };
  const Result a = run(*whole), b = run(*blocked);
  // Blocks of K sum their partial products in f32 outside cuBLAS: the same products, another
  // order of f32 additions.
  const double tol = 1e-6 * double(N);
  EXPECT_TRUE(all_close(b.y, a.y, 1e-5, 1e-5, "forward (rows in blocks)"));
  EXPECT_TRUE(all_close(b.y16, a.y16, 1e-5, 1e-5, "bf16-weight forward (rows in blocks)"));
  EXPECT_TRUE(all_close(b.dx, a.dx, 1e-5, 1e-5, "dinp (rows in blocks)"));
  EXPECT_TRUE(all_close(b.dx16, a.dx16, 1e-5, 1e-5, "bf16-weight dinp (rows in blocks)"));
  EXPECT_TRUE(all_close(b.dw, a.dw, tol, 1e-5, "dweight (tokens in blocks)"));
  // The LM head: logits in vocabulary blocks, dhidden and dweight summed over blocks.
  const int64_t T = 70, D = 48, V = 1031;
  const Vec h = random_vec(T * D, 83, -2, 2), wv = random_vec(V * D, 84);
  const Ids t = random_ids(T, V, 85);
  auto head = [&](Backend& be, Vec* dh, Vec* dw) {
    DeviceBuffer<float> d_h(be, "hidden", h), d_w(be, "weight", wv), d_dh(be, "dhidden", T * D),
        d_dw(be, "dweight", Vec(V * D, 0.0f)), d_s(be, "scratch", 32 * V);
    DeviceBuffer<int32_t> d_t(be, "targets", t);
    const double loss = be.lm_head_cross_entropy(d_dh.get(), d_dw.get(), d_h.get(), d_w.get(),
                                                 d_t.get(), T, D, V, 32, 1.0f / T, d_s.get());
    *dh = d_dh.read(), *dw = d_dw.read();
    return loss;
  };
  Vec dh_a, dw_a, dh_b, dw_b;
  const double la = head(*whole, &dh_a, &dw_a), lb = head(*blocked, &dh_b, &dw_b);
  EXPECT_NEAR(lb, la, 1e-5 * std::fabs(la));
  EXPECT_TRUE(all_close(dh_b, dh_a, 1e-6 * V, 1e-5, "LM head dhidden (vocabulary in blocks)"));
  EXPECT_TRUE(all_close(dw_b, dw_a, 1e-6 * T, 1e-5, "LM head dweight"));
  // Only the two workspace buffers are live: the bound backend allocated no scratch of its own.
  EXPECT_EQ(blocked->device_memory_use().in_use,
            (size_t(1) << 22) + gemm_bytes + 4 * DeviceBuffer<float>::kGuardBytes);
}

// The blocks a bf16 GEMM runs in: one when it fits, else the largest staged dimension halved
// (multiples of 64) until the staged operands fit: tokens for projections, the vocabulary for
// the LM head, K for weight gradients; a bf16 weight in place does not count.
TEST(GemmBlocks, SplitTheLargestStagedDimensionUntilTheOperandsFit) {
  const size_t mib = 1 << 20;
  auto fits = [](const GemmBlocks& b, bool stage_b, size_t limit) {
    return gemm_stage_bytes(b.m, b.n, b.k, stage_b) <= limit;
  };
  GemmBlocks b = gemm_blocks(512, 4096, 4096, true, kCudaGemmScratchCap);
  EXPECT_EQ(b.m, 512);  // fits: one block
  EXPECT_EQ(b.n, 4096);
  EXPECT_EQ(b.k, 4096);
  b = gemm_blocks(131072, 4096, 4096, true, 64 * mib);  // q_proj forward over 128K tokens
  EXPECT_TRUE(fits(b, true, 64 * mib));
  EXPECT_EQ(b.n, 4096);
  EXPECT_EQ(b.k, 4096);
  EXPECT_EQ(b.m % 64, 0);
  EXPECT_GE(b.m, 2048) << "no smaller than it has to be";
  b = gemm_blocks(4096, 4096, 131072, true, 64 * mib);  // its weight gradient: K = tokens
  EXPECT_TRUE(fits(b, true, 64 * mib));
  EXPECT_EQ(b.m, 4096);
  EXPECT_EQ(b.n, 4096);
  EXPECT_LT(b.k, 131072);
  b = gemm_blocks(2048, 128256, 4096, true, kCudaGemmScratchCap);  // LM head logits
  EXPECT_TRUE(fits(b, true, kCudaGemmScratchCap));
  EXPECT_EQ(b.m, 2048);
  EXPECT_EQ(b.k, 4096);
  EXPECT_LT(b.n, 128256);
  b = gemm_blocks(2048, 128256, 4096, false, 64 * mib);  // a bf16 weight: only A is staged
  EXPECT_EQ(b.m, 2048);
  EXPECT_EQ(b.n, 128256);
  EXPECT_EQ(b.k, 4096);
  for (uint64_t seed = 1; seed < 200; ++seed) {  // any shape and limit: blocks fit and tile
    std::mt19937_64 g(seed);
    const int64_t M = 1 + int64_t(g() % 5000), N = 1 + int64_t(g() % 5000);
    const int64_t K = 1 + int64_t(g() % 5000);
    const bool stage_b = g() % 2;
    const size_t limit = 258 + g() % (8 * mib);
    const GemmBlocks c = gemm_blocks(M, N, K, stage_b, limit);
    SCOPED_TRACE(::testing::Message() << M << "x" << N << "x" << K << " limit " << limit);
    EXPECT_TRUE(fits(c, stage_b, limit)) << c.m << " " << c.n << " " << c.k;
    EXPECT_TRUE(c.m >= 1 && c.m <= M && c.n >= 1 && c.n <= N && c.k >= 1 && c.k <= K);
    if (gemm_stage_bytes(M, N, K, stage_b) <= limit) {
      EXPECT_TRUE(c.m == M && c.n == N && c.k == K) << "a product that fits is one block";
    }
  }
}

// Which GPU a rank takes: its local rank from the launcher's environment, first variable set wins.
TEST(BackendChoice, LocalRankFromTheLaunchersEnvironment) {
  const char* vars[] = {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID",
                        "MV2_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "LOCAL_RANK"};
  std::vector<std::pair<std::string, std::string>> saved;
  for (const char* v : vars) {
    if (const char* x = std::getenv(v)) saved.emplace_back(v, x);
    unsetenv(v);
  }
  EXPECT_EQ(local_rank_from_env(), 0) << "no launcher";
  setenv("LOCAL_RANK", "5", 1);
  EXPECT_EQ(local_rank_from_env(), 5) << "torchrun";
  setenv("SLURM_LOCALID", "3", 1);
  EXPECT_EQ(local_rank_from_env(), 3) << "srun before LOCAL_RANK";
  setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1", 1);
  EXPECT_EQ(local_rank_from_env(), 1) << "Open MPI first";
  setenv("OMPI_COMM_WORLD_LOCAL_RANK", "x1", 1);
  try {
    local_rank_from_env();
    ADD_FAILURE() << "a malformed local rank was accepted";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("OMPI_COMM_WORLD_LOCAL_RANK='x1'"), std::string::npos)
        << e.what();
  }
  for (const char* v : vars) unsetenv(v);
  for (const auto& [k, v] : saved) setenv(k.c_str(), v.c_str(), 1);
}

// --device auto: CUDA when it was built and a GPU is present, else the CPU; unknown names fail
// with the allowed list.
TEST(BackendChoice, AutoFallsBackToTheCpu) {
  std::string reason;
  const bool gpu = make_cuda_backend(&reason) != nullptr;
  EXPECT_EQ(make_backend("auto")->name(), gpu ? "cuda" : "cpu") << reason;
  EXPECT_EQ(make_backend("auto", true)->name(), gpu ? "cuda" : "cpu");
  try {
    make_backend("tpu");
    ADD_FAILURE() << "an unknown device was accepted";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("auto, cpu, cuda, cpu-guarded"), std::string::npos)
        << e.what();
  }
  if (!gpu) {
    try {
      make_backend("cuda");
      ADD_FAILURE() << "--device cuda without a GPU was accepted";
    } catch (const UserError& e) {
      EXPECT_NE(std::string(e.what()).find("--device cuda"), std::string::npos) << e.what();
    }
  }
}

}  // namespace
}  // namespace lt
