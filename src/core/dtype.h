// Storage dtypes and conversions. Compute on the CPU backend is f32; bf16/f16 are storage formats.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace lt {

enum class DType { kF32, kF64, kBF16, kF16, kI64, kI32, kI16, kI8, kU8, kBool };

size_t dtype_size(DType t);
// Safetensors spelling: "F32", "BF16", ...; returns false for an unknown name.
bool dtype_from_string(std::string_view s, DType* out);
std::string_view dtype_name(DType t);

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// Round to nearest even, as torch does; NaN stays NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
// A float storage dtype from its user spelling: f32/float32, bf16/bfloat16, f16/float16.
// UserError names `flag` and the allowed values otherwise.
DType parse_float_dtype(const std::string& s, const std::string& flag);

float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);

// Convert n elements of src (dtype t) to f32.
void convert_to_f32(float* dst, const void* src, DType t, size_t n);
// Convert n f32 elements to dtype t (kF32, kBF16, kF16, kF64).
void convert_from_f32(void* dst, const float* src, DType t, size_t n);

}  // namespace lt
