// Default implementations of the optional Backend ops (kept out of backend.h so that the header
// stays free of formatting code that nvcc cannot compile).
#include "backend/backend.h"

#include <algorithm>
#include <charconv>
#include <cstdlib>
#include <cstring>

#include "core/check.h"
#include "core/error.h"

namespace lt {

int local_rank_from_env() {
  for (const char* var : {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID",
                          "MV2_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "LOCAL_RANK"}) {
    const char* v = std::getenv(var);
    if (!v || !*v) continue;
    int r = -1;
    const char* end = v + std::strlen(v);
    const auto [p, ec] = std::from_chars(v, end, r);
    if (ec != std::errc() || p != end || r < 0)
      fail("environment variable {}='{}' is not a local rank (a non-negative integer)", var, v);
    return r;
  }
  return 0;
}

size_t gemm_stage_bytes(int64_t m, int64_t n, int64_t k, bool stage_b) {
  return (size_t(m * k) * 2 + 255) / 256 * 256 + (stage_b ? size_t(k * n) * 2 : 0);
}

GemmBlocks gemm_blocks(int64_t M, int64_t N, int64_t K, bool stage_b, size_t limit) {
  auto halve = [](int64_t x) {
    const int64_t h = (x + 1) / 2;
    return h > 64 ? (h + 63) / 64 * 64 : h;
  };
  GemmBlocks b{M, N, K};
  while (gemm_stage_bytes(b.m, b.n, b.k, stage_b) > limit) {
    if (stage_b && b.n >= b.m && b.n >= b.k && b.n > 1)
      b.n = halve(b.n);
    else if (b.m >= b.k && b.m > 1)
      b.m = halve(b.m);
    else if (b.k > 1)
      b.k = halve(b.k);
    else
      break;  // one element each: the limit is below 258 bytes
  }
  return b;
}

BackendWorkspace cuda_workspace_needs(const WorkspaceShape& s, bool bf16_gemms,
                                      size_t reduce_bytes) {
  auto align = [](size_t b) { return (b + 255) / 256 * 256; };
  const size_t N = size_t(s.tokens), D = size_t(s.hidden), F = size_t(s.intermediate);
  const size_t V = size_t(s.vocab), Q = size_t(std::max(s.q_dim, s.hidden));
  const size_t KV = size_t(s.kv_dim), r = size_t(s.lora_rank);
  const size_t m = size_t(s.mlp_rows), lm = size_t(s.lm_rows);
  BackendWorkspace w;
  // Every ctx.scratch request (cuda_scratch), for the run's largest calls.
  w.op_bytes = align(std::max(
      {cuda_scratch::attention_backward(s.tokens * s.heads), cuda_scratch::cross_entropy(s.tokens),
       cuda_scratch::column_partials(s.tokens, s.hidden, 8),
       cuda_scratch::column_partials(s.tokens, std::max(s.q_dim, s.hidden), 8), reduce_bytes}));
  if (!bf16_gemms) return w;
  // bf16 GEMMs stage op(A) (M,K) and op(B) (K,N) rounded, A 256-aligned: the largest product of
  // each kind, LoRA's included (its rank is below every other dimension).
  auto gemm = [](size_t M, size_t Nn, size_t K) {
    return gemm_stage_bytes(int64_t(M), int64_t(Nn), int64_t(K), true);
  };
  const size_t proj = std::max({gemm(N, Q, D), gemm(N, D, Q), gemm(Q, D, N), gemm(N, KV, D),
                                gemm(KV, D, N), gemm(N, r, std::max(D, F)), gemm(r, D, N)});
  const size_t mlp = std::max({gemm(m, F, D), gemm(m, D, F), gemm(F, D, m), gemm(D, F, m)});
  const size_t head = std::max({gemm(lm, V, D), gemm(lm, D, V), gemm(V, D, lm)});
  w.gemm_bytes = std::min(kCudaGemmScratchCap, align(std::max({proj, mlp, head})));
  // Held GEMM inputs (Backend::hold_gemm_input): at most an input and an output gradient at a
  // time: a layer's attn_in or attn_out with a projection's gradient (N rows), or an MLP chunk's
  // input with its gate/up gradient or h (mlp_rows rows). A pair that passes the cap holds one
  // input; inputs past it are not held (their GEMMs round them each time).
  auto fit = [&](size_t rows, size_t a, size_t b) -> size_t {
    const size_t pair = align(rows * a * 2) + align(rows * b * 2);
    const size_t one = align(rows * std::max(a, b) * 2);
    return pair <= kCudaHeldInputCap ? pair : one <= kCudaHeldInputCap ? one : 0;
  };
  w.held_bytes = std::max(fit(N, D, Q), fit(m, D, F));
  return w;
}

void Backend::lora_forward(float*, float*, float*, const float*, const float*, const float*,
                           int64_t, int64_t, int64_t, const LoraCall&) {
  LT_CHECK(false, "backend {} has no lora_forward", name());
}

void Backend::lora_backward(float*, float*, float*, float*, float*, float*, float*, const float*,
                            const float*, const float*, const float*, int64_t, int64_t, int64_t,
                            const LoraCall&) {
  LT_CHECK(false, "backend {} has no lora_backward", name());
}

void Backend::nf4_dequantize(float*, const uint8_t*, const uint8_t*, const float*, float, int64_t) {
  LT_CHECK(false, "backend {} has no nf4_dequantize", name());
}

double Backend::sum_squares_many(const std::vector<SquaresPart>& parts) {
  double total = 0;
  for (const SquaresPart& p : parts) total += sum_squares(p.x, p.n);
  return total;
}

}  // namespace lt
