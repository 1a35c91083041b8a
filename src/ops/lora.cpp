// CPU LoRA forward/backward on BLAS (see lora.h).
#include "ops/lora.h"

#include "core/check.h"
#include "ops/linear.h"

namespace lt {

namespace {
// xd (N,IN) = dropout(inp) with the mask of c.
void apply_dropout(float* xd, const float* inp, int64_t N, int64_t IN, const LoraCall& c) {
#pragma omp parallel for schedule(static) if (N * IN > (1 << 15))
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < IN; ++j)
      xd[n * IN + j] = inp[n * IN + j] * lora_dropout_factor(c.seed, c.row0 + n, j, IN, c.dropout);
}
}  // namespace

void lora_forward(float* out, float* t, float* xd, const float* inp, const float* a, const float* b,
                  int64_t N, int64_t IN, int64_t OUT, const LoraCall& c) {
  LT_CHECK(c.R > 0 && N >= 0, "lora_forward R={} N={}", c.R, N);
  const float* x = inp;
  if (c.dropout > 0) {
    apply_dropout(xd, inp, N, IN, c);
    x = xd;
  }
  gemm(t, x, a, N, c.R, IN, false, true, 1.0f, 0.0f);        // t (N,R) = x @ a^T
  gemm(out, t, b, N, OUT, c.R, false, true, c.scale, 1.0f);  // out += scale * t @ b^T
}

void lora_backward(float* dinp, float* da, float* db, float* t, float* u, float* xd, float* dxd,
                   const float* dout, const float* inp, const float* a, const float* b, int64_t N,
                   int64_t IN, int64_t OUT, const LoraCall& c) {
  const float* x = inp;
  if (c.dropout > 0 && (da || db)) {
    apply_dropout(xd, inp, N, IN, c);
    x = xd;
  }
  gemm(u, dout, b, N, c.R, OUT, false, false, 1.0f, 0.0f);  // u (N,R) = dout @ b
  if (db) {
    gemm(t, x, a, N, c.R, IN, false, true, 1.0f, 0.0f);          // t = x @ a^T
    gemm(db, dout, t, OUT, c.R, N, true, false, c.scale, 1.0f);  // db += scale dout^T t
  }
  if (da) gemm(da, u, x, c.R, IN, N, true, false, c.scale, 1.0f);  // da += scale u^T x
  if (!dinp) return;
  if (c.dropout <= 0) {
    gemm(dinp, u, a, N, IN, c.R, false, false, c.scale, 1.0f);  // dinp += scale u @ a
    return;
  }
  gemm(dxd, u, a, N, IN, c.R, false, false, c.scale, 0.0f);
#pragma omp parallel for schedule(static) if (N * IN > (1 << 15))
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < IN; ++j)
      dinp[n * IN + j] +=
          dxd[n * IN + j] * lora_dropout_factor(c.seed, c.row0 + n, j, IN, c.dropout);
}

}  // namespace lt
