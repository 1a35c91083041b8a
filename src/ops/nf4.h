// NF4 4-bit weight storage as bitsandbytes stores QLoRA weights (Dettmers et al. 2023,
// arXiv 2305.14314): blocks of 64 values scaled by their absolute maximum and rounded to the
// nearest of 16 NormalFloat code values; the f32 block absmax values are double-quantized
// (mean subtracted, then 8-bit dynamic-map codes in blocks of 256 with one f32 scale each).
#pragma once
#include <array>
#include <cstdint>

namespace lt {

inline constexpr int64_t kNf4Block = 64;         // values per absmax block
inline constexpr int64_t kNf4AbsmaxBlock = 256;  // absmax values per second-level block

// bitsandbytes' NF4 code table (quantiles of N(0,1) scaled to [-1, 1], with an exact 0).
const std::array<float, 16>& nf4_code();
// bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(signed=True)), sorted ascending;
// it codes the mean-centred absmax values.
const std::array<float, 256>& dynamic_map_code();

// Sizes of the quantized form of n values.
struct Nf4Sizes {
  int64_t packed_bytes;  // ceil(n/2): two codes per byte, element 2i in the high nibble
  int64_t blocks;        // ceil(n/64): absmax codes, one byte each
  int64_t scale_blocks;  // ceil(blocks/256): f32 scales of the absmax codes
};
Nf4Sizes nf4_sizes(int64_t n);
// Bytes of the whole quantized form (packed + absmax codes + scales + offset).
int64_t nf4_bytes(int64_t n);

// Quantizes w (n) into packed (ceil(n/2)), absmax_q (ceil(n/64)), absmax_scale (ceil(n/64/256))
// and *absmax_offset (the mean of the block absmax values). A trailing partial block is padded
// with zeros (bitsandbytes does the same).
void nf4_quantize(uint8_t* packed, uint8_t* absmax_q, float* absmax_scale, float* absmax_offset,
                  const float* w, int64_t n);
// out (n) = code[nibble] * (dyn[absmax_q[b]] * absmax_scale[b / 256] + absmax_offset) with
// b = index / 64: the weight as the forward and backward passes see it.
void nf4_dequantize(float* out, const uint8_t* packed, const uint8_t* absmax_q,
                    const float* absmax_scale, float absmax_offset, int64_t n);

}  // namespace lt
