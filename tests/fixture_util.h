// Helpers shared by the golden-file tests: tensors of an expected.safetensors file as f32, and a
// comparison that names the worst element (tests/reference.h's all_close).
#pragma once
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "core/dtype.h"
#include "io/safetensors.h"
#include "reference.h"

namespace lt::test {

inline std::vector<float> tensor_f32(const SafetensorsFile& f, const std::string& name) {
  const TensorInfo* t = f.find(name);
  EXPECT_NE(t, nullptr) << f.path() << " has no tensor " << name;
  if (!t) return {};
  std::vector<float> v(t->numel());
  convert_to_f32(v.data(), t->data, t->dtype, v.size());
  return v;
}

// Fails (without stopping the test) when |got - want| > atol + rtol * |want| anywhere.
inline void expect_close(const std::string& what, const float* got, const float* want, size_t n,
                         double atol, double rtol) {
  EXPECT_TRUE(all_close(got, want, static_cast<int64_t>(n), atol, rtol, what));
}

}  // namespace lt::test
