// The CUDA flash attention of src/backend/cuda/attention.cu, kernels and launchers, run on the
// CPU by the emulator of emu.h (tools/emulate_cuda_kernel.py --launchers turns the .cu file into
// attention_emu.cpp at build time), against a double-precision reference under each of the
// emulator's schedules: forward out and lse, backward dq, dk and dv, and the merge of two partial
// results. The shapes are those of the op-conformance suite (tests/test_backend_ops.cpp), more head
// dims, layouts and masks, and a few random ones (fixed seed); the tolerance is the suite's for
// CUDA attention. Last, the emulator's own checks (mma.sync, votes, shuffles, barriers, error
// reports).
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "cuda_emu_kernels.h"
#include "reference.h"

namespace lt {
namespace {

using cuda_emu::DeviceArray;
using cuda_emu::Schedule;
using test::all_close;
using test::random_vec;
using test::Vec;
using DVec = std::vector<double>;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------------------
// attention.cu's launchers, as cuda_backend.cpp calls them: on the null stream (each launch runs
// when issued), dvec in scratch of exactly the size the backward asks for (emu_scratch.cpp).

cuda::Context& emu_context() {
  static cuda::Scratch scratch{"attention emu"};
  static cuda::Context ctx = [] {
    cuda::Context c;
    c.scratch = &scratch;
    c.max_shared_bytes = cuda_emu::kMaxSharedBytes;
    return c;
  }();
  return ctx;
}

// ---------------------------------------------------------------------------------------------
// Double-precision reference, written from the formulas (FlashAttention-2, arXiv 2307.08691).

// Key j visible from query i (positions in the whole sequence) under AttentionShape's mask.
bool visible(const AttentionShape& s, int64_t b, int64_t i, int64_t j) {
  if (j > i || (s.window > 0 && i - j >= s.window)) return false;
  return !s.doc_ids || s.doc_ids[b * s.T + i] == s.doc_ids[b * s.T + j];
}

// out (B,TQ,H,HD), lse (B,H,TQ); q (B,TQ,H,HD), k and v (B,TK,KVH,HD). A row that sees no key:
// out 0, lse -inf.
void reference_forward(DVec& out, DVec& lse, const Vec& q, const Vec& k, const Vec& v,
                       const AttentionShape& s) {
  const int64_t TQ = s.q_rows(), TK = s.k_rows(), H = s.H, KVH = s.KVH, HD = s.HD, G = H / KVH;
  out.assign(size_t(s.B * TQ * H * HD), 0.0);
  lse.assign(size_t(s.B * H * TQ), 0.0);
  DVec scores(static_cast<size_t>(TK));
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = s.q_begin; i < s.q_begin + TQ; ++i) {
        const int64_t row = ((b * TQ + i - s.q_begin) * H + h) * HD;
        double mx = -INFINITY;
        for (int64_t j = s.k_begin; j < s.k_begin + TK; ++j) {
          double& sc = scores[size_t(j - s.k_begin)];
          sc = -INFINITY;
          if (!visible(s, b, i, j)) continue;
          const int64_t krow = ((b * TK + j - s.k_begin) * KVH + h / G) * HD;
          double dot = 0;
          for (int64_t d = 0; d < HD; ++d) dot += double(q[row + d]) * k[krow + d];
          sc = dot * s.scale;
          mx = std::max(mx, sc);
        }
        double sum = 0;
        for (int64_t j = s.k_begin; j < s.k_begin + TK && mx > -INFINITY; ++j) {
          const double p = std::exp(scores[size_t(j - s.k_begin)] - mx);
          const int64_t krow = ((b * TK + j - s.k_begin) * KVH + h / G) * HD;
          sum += p;
          for (int64_t d = 0; d < HD; ++d) out[row + d] += p * v[krow + d];
        }
        for (int64_t d = 0; d < HD && sum > 0; ++d) out[row + d] /= sum;
        lse[(b * H + h) * TQ + i - s.q_begin] = sum > 0 ? mx + std::log(sum) : -INFINITY;
      }
}

// dq (B,TQ,H,HD), dk and dv (B,TK,KVH,HD), overwritten, from the given out and lse (a block's
// final ones): P = exp(S scale - lse), dV = P^T dO, dS = P (dP - D) scale with dP = dO V^T and
// D = rowsum(dO * O), dQ = dS K, dK = dS^T Q.
void reference_backward(DVec& dq, DVec& dk, DVec& dv, const Vec& dout, const Vec& out,
                        const Vec& lse, const Vec& q, const Vec& k, const Vec& v,
                        const AttentionShape& s) {
  const int64_t TQ = s.q_rows(), TK = s.k_rows(), H = s.H, KVH = s.KVH, HD = s.HD, G = H / KVH;
  dq.assign(size_t(s.B * TQ * H * HD), 0.0);
  dk.assign(size_t(s.B * TK * KVH * HD), 0.0);
  dv.assign(size_t(s.B * TK * KVH * HD), 0.0);
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = s.q_begin; i < s.q_begin + TQ; ++i) {
        const int64_t row = ((b * TQ + i - s.q_begin) * H + h) * HD;
        const double L = lse[(b * H + h) * TQ + i - s.q_begin];
        if (L == -INFINITY) continue;  // a row that sees nothing
        double D = 0;
        for (int64_t d = 0; d < HD; ++d) D += double(dout[row + d]) * out[row + d];
        for (int64_t j = s.k_begin; j < s.k_begin + TK; ++j) {
          if (!visible(s, b, i, j)) continue;
          const int64_t krow = ((b * TK + j - s.k_begin) * KVH + h / G) * HD;
          double score = 0, dp = 0;
          for (int64_t d = 0; d < HD; ++d) {
            score += double(q[row + d]) * k[krow + d];
            dp += double(dout[row + d]) * v[krow + d];
          }
          const double p = std::exp(score * s.scale - L), ds = p * (dp - D) * s.scale;
          for (int64_t d = 0; d < HD; ++d) {
            dq[row + d] += ds * k[krow + d];
            dk[krow + d] += ds * q[row + d];
            dv[krow + d] += p * dout[row + d];
          }
        }
      }
}

// The op-conformance suite's tolerance for CUDA attention (bf16 operands, f32 accumulation):
// |got - want| <= 2.5e-2 scale + 2e-2 |want|, scale max |want| (kMaxAbs) or 1 (kOne, for the
// lse); NaN and inf exact.
enum class Scale { kMaxAbs, kOne };
testing::AssertionResult attention_close(const Vec& got, const DVec& want, Scale scale,
                                         const std::string& what) {
  double s = 1;
  if (scale == Scale::kMaxAbs) {
    s = 0;
    for (double w : want)
      if (std::isfinite(w)) s = std::max(s, std::fabs(w));
  }
  return all_close(got, want, 2.5e-2 * s, 2e-2, what);
}

// ---------------------------------------------------------------------------------------------
// Cases

enum class Docs {
  kNone,
  kContiguous,   // n_docs runs per row, ids b * 10 + t * n_docs / T (packed documents)
  kInterleaved,  // runs of 11 tokens cycling through n_docs ids: documents resume later
};

struct AttnCase {
  std::string name;
  int64_t B, T, H, KVH, HD, window;
  Docs docs;
  int64_t n_docs;
  // A block (FPDT's chunk pairs): queries [q_begin, q_begin + Tq) against keys [k_begin,
  // k_begin + Tk); Tq = Tk = 0: the whole sequence.
  int64_t q_begin = 0, Tq = 0, k_begin = 0, Tk = 0;
};

std::ostream& operator<<(std::ostream& os, const AttnCase& c) {
  static const char* const kDocs[] = {"none", "contiguous", "interleaved"};
  os << c.name << ": B=" << c.B << " T=" << c.T << " H=" << c.H << " KVH=" << c.KVH
     << " HD=" << c.HD << " window=" << c.window << " docs=" << kDocs[int(c.docs)] << "/"
     << c.n_docs;
  if (c.Tq || c.Tk)
    os << " q [" << c.q_begin << ", +" << c.Tq << ") k [" << c.k_begin << ", +" << c.Tk << ")";
  return os;
}

std::vector<AttnCase> fixed_cases() {
  using enum Docs;
  return {
      // tests/test_backend_ops.cpp, Attention
      {"gqa_hd24", 2, 77, 4, 2, 24, 0, kNone, 0},                   // HD padded to 32, partial tile
      {"window_mqa_hd64", 1, 130, 3, 1, 64, 33, kNone, 0},          // window across tile edges
      {"docs_hd40", 2, 100, 2, 2, 40, 0, kContiguous, 3},           // packed documents
      {"docs_window_hd128", 1, 65, 2, 1, 128, 20, kContiguous, 2},  // both masks, HD 128
      {"tiny_hd8", 1, 7, 1, 1, 8, 0, kNone, 0},                     // one partial tile
      // tests/test_backend_ops.cpp, AttentionBlocksAndMerge
      {"block_later_queries", 1, 200, 4, 2, 24, 0, kNone, 0, 130, 70, 0, 65},
      {"block_diagonal_docs", 1, 200, 4, 2, 24, 0, kContiguous, 3, 64, 66, 64, 66},
      {"block_window", 1, 150, 2, 1, 64, 40, kNone, 0, 100, 50, 50, 50},
      {"block_nothing_visible", 1, 90, 2, 2, 8, 0, kNone, 0, 0, 45, 45, 45},
      // More: head dims 1, 5, 80, 96, 128; GQA 4; interleaved documents; odd block offsets
      {"gqa4_hd80", 1, 129, 4, 1, 80, 0, kNone, 0},
      {"window_interleaved_hd96", 2, 70, 2, 1, 96, 17, kInterleaved, 3},
      {"hd5", 1, 33, 2, 2, 5, 0, kNone, 0},
      {"hd1_window_docs", 1, 191, 2, 2, 1, 64, kContiguous, 4},
      {"block_odd_offsets_docs", 1, 300, 2, 1, 16, 0, kContiguous, 5, 97, 150, 13, 170},
      {"block_interleaved_hd128", 1, 150, 2, 2, 128, 0, kInterleaved, 2, 70, 80, 0, 140},
  };
}

// Random shapes, blocks, windows and documents (the seed is fixed: the same cases every run).
std::vector<AttnCase> random_cases(int n) {
  std::mt19937 rng(99);
  const int64_t head_dims[] = {1, 5, 8, 16, 24, 32, 33, 40, 63, 64, 65, 80, 96, 127, 128};
  std::vector<AttnCase> cases;
  for (int i = 0; i < n; ++i) {
    AttnCase c{"random" + std::to_string(i), 0, 0, 0, 0, 0, 0, Docs::kNone, 0};
    c.B = 1 + rng() % 2;
    c.T = 1 + rng() % 260;
    c.KVH = 1 + rng() % 2;
    c.H = c.KVH * (1 + rng() % 3);
    c.HD = head_dims[rng() % std::size(head_dims)];
    c.window = rng() % 3 == 0 ? int64_t(1 + rng() % 90) : 0;
    const int docs = int(rng() % 5) - 2;
    c.docs = docs > 0 ? Docs::kContiguous : docs < 0 ? Docs::kInterleaved : Docs::kNone;
    c.n_docs = std::abs(docs);
    if (rng() % 2) {
      c.q_begin = rng() % c.T;
      c.Tq = 1 + rng() % (c.T - c.q_begin);
      c.k_begin = rng() % c.T;
      c.Tk = 1 + rng() % (c.T - c.k_begin);
    }
    cases.push_back(c);
  }
  return cases;
}

std::vector<AttnCase> all_cases() {
  std::vector<AttnCase> cases = fixed_cases();
  for (AttnCase& c : random_cases(10)) cases.push_back(std::move(c));
  return cases;
}

std::vector<int32_t> doc_ids(const AttnCase& c) {
  std::vector<int32_t> ids(size_t(c.B * c.T));
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t t = 0; t < c.T; ++t)
      ids[size_t(b * c.T + t)] = c.docs == Docs::kContiguous ? int32_t(b * 10 + t * c.n_docs / c.T)
                                                             : int32_t(t / 11 % c.n_docs);
  return ids;
}

// ---------------------------------------------------------------------------------------------
// Tests

class AttentionEmu : public testing::TestWithParam<std::tuple<Schedule, AttnCase>> {};

TEST_P(AttentionEmu, ForwardBackward) {
  const auto& [schedule, c] = GetParam();
  cuda_emu::set_schedule(schedule);
  std::ostringstream label;
  label << cuda_emu::schedule_name(schedule) << " " << c;
  const bool block = c.Tq || c.Tk;
  const int64_t TQ = c.Tq ? c.Tq : c.T, TK = c.Tk ? c.Tk : c.T;
  const int64_t nq = c.B * TQ * c.H * c.HD, nk = c.B * TK * c.KVH * c.HD, nl = c.B * c.H * TQ;
  // The conformance suite's data (its seeds, q and k in [-2, 2), v and dout in [-1, 1)).
  const uint64_t seed = block ? 31 : 21;
  const Vec q = random_vec(nq, seed, -2, 2), k = random_vec(nk, seed + 1, -2, 2),
            v = random_vec(nk, seed + 2), dout = random_vec(nq, seed + 3);
  DeviceArray<float> d_q(q), d_k(k), d_v(v), d_dout(dout);
  DeviceArray<int32_t> d_docs(c.docs == Docs::kNone ? std::vector<int32_t>() : doc_ids(c));
  AttentionShape s;
  s.B = c.B, s.T = c.T, s.H = c.H, s.KVH = c.KVH, s.HD = c.HD, s.window = c.window;
  s.scale = float(1.0 / std::sqrt(double(c.HD)));
  s.q_begin = c.q_begin, s.Tq = c.Tq, s.k_begin = c.k_begin, s.Tk = c.Tk;
  if (c.docs != Docs::kNone) s.doc_ids = d_docs.data();
  for (auto* input : {&d_q, &d_k, &d_v, &d_dout}) input->make_read_only();
  d_docs.make_read_only();

  // Forward; outputs start as NaN, so an element the kernel skips is caught.
  DeviceArray<float> d_out(nq, kNaN), d_lse(nl, kNaN);
  cuda::attention_forward(emu_context(), d_out.data(), d_lse.data(), d_q.data(), d_k.data(),
                          d_v.data(), s);
  DVec want_out, want_lse;
  reference_forward(want_out, want_lse, q, k, v, s);
  auto check = [&](const DeviceArray<float>& got, const DVec& want, Scale scale, const char* what) {
    EXPECT_TRUE(attention_close(got.to_vector(), want, scale, label.str() + ": " + what));
    EXPECT_TRUE(got.canary_intact()) << label.str() << ": a store before the start of " << what;
  };
  check(d_out, want_out, Scale::kMaxAbs, "forward out (B,TQ,H,HD)");
  check(d_lse, want_lse, Scale::kOne, "forward lse (B,H,TQ)");

  // Backward from the reference's out and lse, so that only the backward is judged. A block's
  // backward takes the final (merged) lse: the conformance suite shifts it by 0.25; rows that
  // see no key keep -inf.
  Vec out(want_out.begin(), want_out.end()), lse(want_lse.begin(), want_lse.end());
  if (block)
    for (float& x : lse) x = std::isfinite(x) ? x + 0.25f : x;
  DeviceArray<float> d_out_ref(out), d_lse_ref(lse);
  d_out_ref.make_read_only();
  d_lse_ref.make_read_only();
  DVec want_dq, want_dk, want_dv;
  reference_backward(want_dq, want_dk, want_dv, dout, out, lse, q, k, v, s);
  // Every backward variant: B operands read down the row-major tiles (the default) or from
  // transposed copies; dQ with atomics (the default) or by the deterministic query-tile kernel.
  for (const bool deterministic : {false, true})
    for (const bool transposed : {false, true}) {
      SCOPED_TRACE(std::string(transposed ? "transposed tiles" : "row-major tiles only") +
                   (deterministic ? ", deterministic dQ kernel" : ", dQ with atomics"));
      cuda::Context ctx = emu_context();
      ctx.attention_transposed_tiles = transposed;
      ctx.deterministic = deterministic;
      DeviceArray<float> d_dq(nq, kNaN), d_dk(nk, kNaN), d_dv(nk, kNaN);
      cuda::attention_backward(ctx, d_dq.data(), d_dk.data(), d_dv.data(), d_dout.data(),
                               d_out_ref.data(), d_lse_ref.data(), d_q.data(), d_k.data(),
                               d_v.data(), s);
      check(d_dq, want_dq, Scale::kMaxAbs, "backward dq (B,TQ,H,HD)");
      check(d_dk, want_dk, Scale::kMaxAbs, "backward dk (B,TK,KVH,HD)");
      check(d_dv, want_dv, Scale::kMaxAbs, "backward dv (B,TK,KVH,HD)");
    }
}

std::string case_test_name(const testing::TestParamInfo<AttentionEmu::ParamType>& info) {
  return std::string(cuda_emu::schedule_name(std::get<0>(info.param))) + "_" +
         std::get<1>(info.param).name;
}

INSTANTIATE_TEST_SUITE_P(Schedules, AttentionEmu,
                         testing::Combine(testing::ValuesIn(cuda_emu::kSchedules),
                                          testing::ValuesIn(all_cases())),
                         case_test_name);

// The order in which blocks run (in order, reversed, and the interleaved warps) stands in for a
// GPU's varying block timing. dQ rows summed by atomics over five key tiles change in their last
// bits when the blocks run in the other order (this shows the test can tell); the deterministic
// backward gives the same bits under every schedule, for every output.
TEST(AttentionEmuDeterminism, DeterministicBackwardIsBitIdenticalWhateverTheBlockOrder) {
  AttentionShape s;
  s.B = 1, s.T = 300, s.H = 4, s.KVH = 2, s.HD = 64;
  s.scale = float(1.0 / std::sqrt(double(s.HD)));
  const int64_t nq = s.T * s.H * s.HD, nk = s.T * s.KVH * s.HD;
  const Vec q = random_vec(nq, 41, -2, 2), k = random_vec(nk, 42, -2, 2), v = random_vec(nk, 43),
            dout = random_vec(nq, 44);
  DVec want_out, want_lse;
  reference_forward(want_out, want_lse, q, k, v, s);
  const Vec out(want_out.begin(), want_out.end()), lse(want_lse.begin(), want_lse.end());
  DeviceArray<float> d_q(q), d_k(k), d_v(v), d_dout(dout), d_out(out), d_lse(lse);
  struct Grads {
    Vec dq, dk, dv;
  };
  const auto backward = [&](Schedule schedule, bool deterministic) {
    cuda_emu::set_schedule(schedule);
    cuda::Context ctx = emu_context();
    ctx.deterministic = deterministic;
    DeviceArray<float> d_dq(nq, kNaN), d_dk(nk, kNaN), d_dv(nk, kNaN);
    cuda::attention_backward(ctx, d_dq.data(), d_dk.data(), d_dv.data(), d_dout.data(),
                             d_out.data(), d_lse.data(), d_q.data(), d_k.data(), d_v.data(), s);
    cuda_emu::set_schedule(Schedule::kInOrder);
    return Grads{d_dq.to_vector(), d_dk.to_vector(), d_dv.to_vector()};
  };
  const auto differing = [](const Vec& a, const Vec& b) {
    int64_t n = 0;
    for (size_t i = 0; i < a.size(); ++i)
      n += std::bit_cast<uint32_t>(a[i]) != std::bit_cast<uint32_t>(b[i]);
    return n;
  };
  const Grads atomics_in_order = backward(Schedule::kInOrder, false);
  const Grads atomics_reversed = backward(Schedule::kReversed, false);
  EXPECT_GT(differing(atomics_in_order.dq, atomics_reversed.dq), 0)
      << "dQ by atomics gave the same bits in both block orders: the test cannot tell";
  const Grads first = backward(Schedule::kInOrder, true);
  for (Schedule schedule : cuda_emu::kSchedules) {
    const Grads g = backward(schedule, true);
    EXPECT_EQ(differing(g.dq, first.dq), 0) << schedule << ": dq";
    EXPECT_EQ(differing(g.dk, first.dk), 0) << schedule << ": dk";
    EXPECT_EQ(differing(g.dv, first.dv), 0) << schedule << ": dv";
  }
  // dK and dV have one owner in both backwards: the same kernel code, the same bits.
  EXPECT_EQ(differing(first.dk, atomics_in_order.dk), 0);
  EXPECT_EQ(differing(first.dv, atomics_in_order.dv), 0);
}

class AttentionMergeEmu : public testing::TestWithParam<Schedule> {};

// As the conformance suite's merge: rows - 3 has an empty first partial (lse -inf), rows - 2 an
// empty second one, rows - 1 a NaN lse; the rest are ordinary.
TEST_P(AttentionMergeEmu, Merge) {
  cuda_emu::set_schedule(GetParam());
  struct MergeCase {
    int64_t rows, H, HD;
  };
  for (const MergeCase& c : {MergeCase{6, 3, 5}, MergeCase{5, 2, 80}}) {
    const int64_t rows = c.rows, H = c.H, HD = c.HD, n = rows * H * HD;
    std::ostringstream label;
    label << cuda_emu::schedule_name(GetParam()) << " merge rows=" << rows << " H=" << H
          << " HD=" << HD;
    const Vec a = random_vec(n, 35), b = random_vec(n, 36);
    Vec la = random_vec(H * rows, 37, -3, 3), lb = random_vec(H * rows, 38, -3, 3);
    for (int64_t h = 0; h < H; ++h) {
      la[h * rows + rows - 3] = -kInf;
      lb[h * rows + rows - 2] = -kInf;
      lb[h * rows + rows - 1] = kNaN;
    }
    // out, out_b (rows,H,HD); lse, lse_b (H,rows). With m = log(e^la + e^lb) (NaN if either is):
    // out = e^(la - m) out + e^(lb - m) out_b, lse = m; unchanged where lb = -inf.
    DVec want(a.begin(), a.end()), want_l(la.begin(), la.end());
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t h = 0; h < H; ++h) {
        const double l1 = la[h * rows + i], l2 = lb[h * rows + i];
        if (l2 == -INFINITY) continue;
        const double mx = std::max(l1, l2);
        const double m = std::isnan(l1) || std::isnan(l2)
                             ? NAN
                             : mx + std::log(std::exp(l1 - mx) + std::exp(l2 - mx));
        const double w1 = l1 == -INFINITY ? 0 : std::exp(l1 - m), w2 = std::exp(l2 - m);
        for (int64_t d = 0; d < HD; ++d) {
          const int64_t x = (i * H + h) * HD + d;
          want[x] = w1 * a[x] + w2 * b[x];
        }
        want_l[h * rows + i] = m;
      }
    DeviceArray<float> d_a(a), d_la(la), d_b(b), d_lb(lb);
    d_b.make_read_only();
    d_lb.make_read_only();
    cuda::attention_merge(emu_context(), d_a.data(), d_la.data(), d_b.data(), d_lb.data(), rows, H,
                          HD);
    // The conformance suite's elementwise tolerance for CUDA (libm vs CUDA math, a few ulp).
    EXPECT_TRUE(all_close(d_a.to_vector(), want, 1e-6, 4e-6, label.str() + ": out (rows,H,HD)"));
    EXPECT_TRUE(all_close(d_la.to_vector(), want_l, 1e-6, 4e-6, label.str() + ": lse (H,rows)"));
    EXPECT_TRUE(d_a.canary_intact() && d_la.canary_intact()) << label.str();
  }
}

INSTANTIATE_TEST_SUITE_P(Schedules, AttentionMergeEmu, testing::ValuesIn(cuda_emu::kSchedules),
                         [](const testing::TestParamInfo<Schedule>& info) {
                           return std::string(cuda_emu::schedule_name(info.param));
                         });

// ---------------------------------------------------------------------------------------------
// The emulator itself, on tiny kernels: what the attention tests rely on.

uint32_t pack_bf16_pair(float lo, float hi) {
  return uint32_t(__float2bfloat16_rn(lo).bits) | uint32_t(__float2bfloat16_rn(hi).bits) << 16;
}

// mma.sync against a plain product, fragments loaded per the PTX ISA's tables for m16n8k16; two
// products in a row with different data (the lanes' operand exchange is double-buffered).
TEST(CudaEmu, MmaMatchesProduct) {
  float A[2][16][16], B[2][16][8], C[16][8], D[2][16][8];
  std::mt19937 rng(5);
  for (int m = 0; m < 2; ++m)
    for (int i = 0; i < 16; ++i)
      for (int k = 0; k < 16; ++k) {
        A[m][i][k] = float(int(rng() % 17) - 8) / 8;  // exact in bf16, exact sums in f32
        if (k < 8) B[m][i][k] = float(int(rng() % 17) - 8) / 4;
        if (k < 8 && m == 0) C[i][k] = float(int(rng() % 9) - 4);
      }
  cuda_emu::launch("mma_test", dim3(1), dim3(32), 0, [&] {
    const int g = int(threadIdx.x) / 4, t = int(threadIdx.x) % 4;
    for (int m = 0; m < 2; ++m) {
      uint32_t a[4];
      for (int i = 0; i < 4; ++i) {  // row g + 8 (i & 1), columns 2t + 8 (i >> 1) + {0, 1}
        const int row = g + 8 * (i & 1), col = 2 * t + 8 * (i >> 1);
        a[i] = pack_bf16_pair(A[m][row][col], A[m][row][col + 1]);
      }
      const uint32_t b0 = pack_bf16_pair(B[m][2 * t][g], B[m][2 * t + 1][g]);
      const uint32_t b1 = pack_bf16_pair(B[m][2 * t + 8][g], B[m][2 * t + 9][g]);
      float d[4] = {C[g][2 * t], C[g][2 * t + 1], C[g + 8][2 * t], C[g + 8][2 * t + 1]};
      cuda_emu::mma_m16n8k16_bf16(d, a, b0, b1);
      for (int e = 0; e < 4; ++e) D[m][g + 8 * (e >> 1)][2 * t + (e & 1)] = d[e];
    }
  });
  for (int m = 0; m < 2; ++m)
    for (int i = 0; i < 16; ++i)
      for (int n = 0; n < 8; ++n) {
        float want = C[i][n];
        for (int k = 0; k < 16; ++k) want += A[m][i][k] * B[m][k][n];
        EXPECT_EQ(D[m][i][n], want) << "product " << m << " (" << i << ", " << n << ")";
      }
}

// __syncthreads_or votes and the butterfly warp_sum of common.cuh (shuffles) in 4 warps.
TEST(CudaEmu, VotesAndShuffles) {
  for (Schedule schedule : cuda_emu::kSchedules) {
    cuda_emu::set_schedule(schedule);
    std::vector<int> votes(128 * 3);
    std::vector<float> sums(128);
    cuda_emu::launch("vote_test", dim3(1), dim3(128), 0, [&] {
      const int i = int(threadIdx.x);
      votes[i * 3 + 0] = __syncthreads_or(0);
      votes[i * 3 + 1] = __syncthreads_or(i == 77);
      votes[i * 3 + 2] = __syncthreads_or(0);
      sums[i] = cuda::warp_sum(float(i));
    });
    for (int i = 0; i < 128; ++i) {
      EXPECT_EQ(votes[i * 3 + 0], 0) << schedule << " thread " << i;
      EXPECT_EQ(votes[i * 3 + 1], 1) << schedule << " thread " << i;
      EXPECT_EQ(votes[i * 3 + 2], 0) << schedule << " thread " << i;
      const int w = i / 32;
      EXPECT_EQ(sums[i], float(32 * 32 * w + 496)) << schedule << " thread " << i;
    }
  }
}

// A kernel that reads another warp's shared-memory writes without a barrier gets garbage under
// at least one schedule; with the barrier, under none.
TEST(CudaEmu, MissingBarrierShows) {
  for (bool barrier : {false, true}) {
    int wrong_schedules = 0;
    for (Schedule schedule : cuda_emu::kSchedules) {
      cuda_emu::set_schedule(schedule);
      std::vector<float> got(128);
      cuda_emu::launch("barrier_test", dim3(1), dim3(128), 128 * 4, [&] {
        auto* s = reinterpret_cast<float*>(cuda_emu::dynamic_shared());
        const int i = int(threadIdx.x);
        s[i] = float(i);
        if (barrier) __syncthreads();
        got[i] = s[(i + 32) % 128];
      });
      bool wrong = false;
      for (int i = 0; i < 128; ++i) wrong |= got[i] != float((i + 32) % 128);
      wrong_schedules += wrong;
    }
    EXPECT_EQ(wrong_schedules > 0, !barrier) << (barrier ? "with" : "without") << " barrier";
  }
}

TEST(CudaEmu, ReportsBrokenSynchronisation) {
  cuda_emu::set_schedule(Schedule::kInOrder);
  auto run = [](const std::function<void()>& body) {
    cuda_emu::launch("sync_test", dim3(1), dim3(64), 0, body);
  };
  // Half a warp at __syncwarp, the other half at __syncthreads: neither completes.
  EXPECT_THROW(run([] {
                 if (threadIdx.x % 32 < 16) {
                   __syncwarp();
                 } else {
                   __syncthreads();
                 }
               }),
               cuda_emu::EmulationError);
  // Lanes of one warp at different collectives.
  EXPECT_THROW(run([] {
                 if (threadIdx.x % 32 < 16) {
                   __syncwarp();
                 } else {
                   (void)__shfl_xor_sync(0xffffffffu, 1.0f, 1);
                 }
               }),
               cuda_emu::EmulationError);
  // mma.sync.aligned needs the whole warp.
  EXPECT_THROW(run([] {
                 if (threadIdx.x % 32 >= 16) return;
                 float d[4] = {};
                 const uint32_t a[4] = {};
                 cuda_emu::mma_m16n8k16_bf16(d, a, 0, 0);
               }),
               cuda_emu::EmulationError);
  // A shuffle from a lane that exited before it.
  EXPECT_THROW(run([] {
                 if (threadIdx.x % 32 == 1) return;
                 (void)__shfl_xor_sync(0xffffffffu, 1.0f, 1);
               }),
               cuda_emu::EmulationError);
  // __syncthreads and __syncthreads_or at one barrier.
  EXPECT_THROW(run([] {
                 if (threadIdx.x < 32) {
                   __syncthreads();
                 } else {
                   (void)__syncthreads_or(1);
                 }
               }),
               cuda_emu::EmulationError);
}

TEST(CudaEmuDeathTest, GuardPageNamesTheThread) {
  DeviceArray<float> a(100, 1.0f);
  EXPECT_DEATH(cuda_emu::launch("overrun_test", dim3(2), dim3(64), 0,
                                [&] {
                                  volatile float x = a.data()[blockIdx.x * 64 + threadIdx.x];
                                  (void)x;
                                }),
               "overrun_test, block \\(1,0,0\\), thread 36: invalid access .*past the end of a "
               "DeviceArray");
}

}  // namespace
}  // namespace lt
