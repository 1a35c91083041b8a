// Core utilities: dtype conversions and the memory plan / arenas.
#include <gtest/gtest.h>

#include <cmath>

#include "core/dtype.h"
#include "core/memory.h"

namespace lt {

TEST(DType, Bf16RoundTripAndRounding) {
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.0f)), 1.0f);
  // 1 + 2^-8 is exactly half way between two bf16 values: rounds to even (1.0).
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.0f + 1.0f / 256)), 1.0f);
  // 1 + 3*2^-8 rounds up to 1 + 2^-6.
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.0f + 3.0f / 256)), 1.0f + 1.0f / 64);
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(NAN))));
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(-INFINITY)), -INFINITY);
}

TEST(DType, F16RoundTrip) {
  const float cases[] = {0.0f, 1.0f, -2.5f, 65504.0f, 6.103515625e-05f, 5.960464477539063e-08f};
  for (float c : cases) EXPECT_EQ(f16_to_f32(f32_to_f16(c)), c) << c;
  EXPECT_EQ(f16_to_f32(f32_to_f16(1e6f)), INFINITY);
  EXPECT_EQ(f16_to_f32(f32_to_f16(1.0f + 1.0f / 4096)), 1.0f);  // below half ulp
}

TEST(MemoryPlan, SumsByCategoryAndArena) {
  MemoryPlan plan;
  plan.add("w", 100, MemCategory::kWeights, "params");
  plan.add("g", 64, MemCategory::kGradients, "grads");
  plan.add("w2", 1, MemCategory::kWeights, "params");
  EXPECT_EQ(plan.arena_bytes("params"), 128u + 64u);
  EXPECT_EQ(plan.category_bytes(MemCategory::kGradients), 64u);
  EXPECT_EQ(plan.total_bytes(), 256u);
}

TEST(Arena, TakesInOrderWithinCapacity) {
  Arena a("test", 256);
  float* x = a.take<float>("x", 10);
  float* y = a.take<float>("y", 10);
  EXPECT_EQ(reinterpret_cast<char*>(y) - reinterpret_cast<char*>(x), 64);
  EXPECT_EQ(a.used(), 128u);
  EXPECT_DEATH(a.take<float>("too_big", 64), "buffer 'too_big'");
}

}  // namespace lt
