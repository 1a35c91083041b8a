// LoRA dropout's keep-mask: a counter-based hash of (seed, token row, column), so backward
// regenerates exactly the mask of forward. One definition for the host and the CUDA kernels, so a
// GPU run drops exactly the elements a CPU run drops.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define LT_HOST_DEVICE __host__ __device__
#else
#define LT_HOST_DEVICE
#endif

namespace lt {

// splitmix64 finaliser: a good 64-bit mix for counter-based random numbers.
LT_HOST_DEVICE inline uint64_t lora_mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Keep-mask value of element (row, col): 0 or 1/(1-p) (inverted dropout as torch.nn.Dropout).
LT_HOST_DEVICE inline float lora_dropout_factor(uint64_t seed, int64_t row, int64_t col, int64_t IN,
                                                float p) {
  if (p <= 0) return 1.0f;
  const uint64_t h = lora_mix64(seed ^ lora_mix64(uint64_t(row) * uint64_t(IN) + uint64_t(col)));
  const float u = float(h >> 40) * (1.0f / 16777216.0f);  // 24 random bits in [0, 1)
  return u < p ? 0.0f : 1.0f / (1.0f - p);
}

}  // namespace lt
