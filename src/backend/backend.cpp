// Default implementations of the optional Backend ops (kept out of backend.h so that the header
// stays free of formatting code that nvcc cannot compile).
#include "backend/backend.h"

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

void Backend::linear_forward_bf16w(float* out, const float* inp, const uint16_t* weight,
                                   const float* bias, int64_t N, int64_t IN, int64_t OUT,
                                   float* expand) {
  bf16_to_f32(expand, weight, OUT * IN);
  linear_forward(out, inp, expand, bias, N, IN, OUT);
}

void Backend::linear_backward_bf16w(float* dinp, float* dbias, const float* dout,
                                    const uint16_t* weight, int64_t N, int64_t IN, int64_t OUT,
                                    Accumulate acc, float* expand) {
  bf16_to_f32(expand, weight, OUT * IN);
  linear_backward(dinp, nullptr, dbias, dout, nullptr, expand, N, IN, OUT, acc);
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

}  // namespace lt
