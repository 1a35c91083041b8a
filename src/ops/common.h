// Shared vocabulary of the ops. Dimension names used in every shape comment:
//   B batch, T sequence, N = B*T rows, D hidden, H query heads, KVH key/value heads,
//   HD head dim, F MLP width, V vocabulary, L layers.
// All CPU op tensors are contiguous row-major f32 unless a comment says otherwise.
#pragma once
#include <cstdint>

namespace lt {

// Whether a backward op overwrites a gradient buffer or adds into it.
enum class Accumulate { kNo, kYes };

// Labels equal to this are ignored by the loss (PyTorch's ignore_index).
inline constexpr int32_t kIgnoreIndex = -100;

}  // namespace lt
