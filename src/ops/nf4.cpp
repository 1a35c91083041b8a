// NF4 quantization and dequantization (CPU reference; see nf4.h for the layout).
#include "ops/nf4.h"

// absmax = dyn * scale + offset rounds twice, as bitsandbytes and the CUDA kernel
// (src/backend/cuda/nf4.cu) do: GCC must not contract it into one fused multiply-add.
#pragma GCC optimize("fp-contract=off")

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/check.h"

namespace lt {

const std::array<float, 16>& nf4_code() {
  // bitsandbytes/functional.py get_4bit_type("nf4") and csrc dDequantizeNF4.
  static const std::array<float, 16> code = {-1.0f,
                                             -0.6961928009986877f,
                                             -0.5250730514526367f,
                                             -0.39491748809814453f,
                                             -0.28444138169288635f,
                                             -0.18477343022823334f,
                                             -0.09105003625154495f,
                                             0.0f,
                                             0.07958029955625534f,
                                             0.16093020141124725f,
                                             0.24611230194568634f,
                                             0.33791524171829224f,
                                             0.44070982933044434f,
                                             0.5626170039176941f,
                                             0.7229568362236023f,
                                             1.0f};
  return code;
}

const std::array<float, 256>& dynamic_map_code() {
  // create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): for exponent i in 0..6,
  // 2^i fraction values (midpoints of linspace(0.1, 1, 2^i + 1)) times 10^(i-6), both signs,
  // plus 0 and 1; sorted.
  static const std::array<float, 256> code = [] {
    std::vector<float> data;
    for (int i = 0; i < 7; ++i) {
      const int items = (1 << i) + 1;
      std::vector<float> bounds(items);
      const float step = (1.0f - 0.1f) / float(items - 1);
      for (int j = 0; j < items; ++j) bounds[j] = 0.1f + step * float(j);
      bounds[items - 1] = 1.0f;
      for (int j = 0; j + 1 < items; ++j) {
        const float mean = (bounds[j] + bounds[j + 1]) / 2.0f;
        const float v = float(std::pow(10.0, double(i - 6)) * double(mean));
        data.push_back(v);
        data.push_back(-v);
      }
    }
    data.push_back(0.0f);
    data.push_back(1.0f);
    LT_CHECK(data.size() == 256);
    std::sort(data.begin(), data.end());
    std::array<float, 256> out{};
    std::copy(data.begin(), data.end(), out.begin());
    return out;
  }();
  return code;
}

namespace {

// Index of the code value nearest to x (codes sorted ascending).
template <size_t K>
uint8_t nearest(const std::array<float, K>& code, float x) {
  const auto it = std::lower_bound(code.begin(), code.end(), x);
  if (it == code.begin()) return 0;
  if (it == code.end()) return uint8_t(K - 1);
  const size_t hi = size_t(it - code.begin()), lo = hi - 1;
  return uint8_t((x - code[lo]) <= (code[hi] - x) ? lo : hi);
}

}  // namespace

Nf4Sizes nf4_sizes(int64_t n) {
  const int64_t blocks = (n + kNf4Block - 1) / kNf4Block;
  return {(n + 1) / 2, blocks, (blocks + kNf4AbsmaxBlock - 1) / kNf4AbsmaxBlock};
}

int64_t nf4_bytes(int64_t n) {
  const Nf4Sizes s = nf4_sizes(n);
  return s.packed_bytes + s.blocks + 4 * s.scale_blocks + 4;
}

void nf4_quantize(uint8_t* packed, uint8_t* absmax_q, float* absmax_scale, float* absmax_offset,
                  const float* w, int64_t n) {
  LT_CHECK(n > 0);
  const Nf4Sizes s = nf4_sizes(n);
  const auto& code = nf4_code();
  std::vector<float> absmax(s.blocks);
  for (int64_t b = 0; b < s.blocks; ++b) {
    const int64_t i0 = b * kNf4Block, i1 = std::min(n, i0 + kNf4Block);
    float m = 0;
    for (int64_t i = i0; i < i1; ++i) m = std::max(m, std::fabs(w[i]));
    absmax[b] = m;
    const float inv = m > 0 ? 1.0f / m : 0.0f;  // bitsandbytes multiplies by 1/absmax
    for (int64_t i = i0; i < i0 + kNf4Block; i += 2) {
      const float x0 = i < n ? w[i] * inv : 0.0f, x1 = i + 1 < n ? w[i + 1] * inv : 0.0f;
      const uint8_t byte = uint8_t(nearest(code, x0) << 4 | nearest(code, x1));
      if (i / 2 < s.packed_bytes) packed[i / 2] = byte;
    }
  }
  // Double quantization (bitsandbytes quantize_4bit with compress_statistics): subtract the mean,
  // then blockwise 8-bit dynamic quantization of the centred absmax values.
  double sum = 0;
  for (float a : absmax) sum += a;
  const float offset = float(sum / double(s.blocks));
  *absmax_offset = offset;
  const auto& dyn = dynamic_map_code();
  for (int64_t c = 0; c < s.scale_blocks; ++c) {
    const int64_t b0 = c * kNf4AbsmaxBlock, b1 = std::min(s.blocks, b0 + kNf4AbsmaxBlock);
    float m = 0;
    for (int64_t b = b0; b < b1; ++b) m = std::max(m, std::fabs(absmax[b] - offset));
    absmax_scale[c] = m;
    const float inv = m > 0 ? 1.0f / m : 0.0f;
    for (int64_t b = b0; b < b1; ++b) absmax_q[b] = nearest(dyn, (absmax[b] - offset) * inv);
  }
}

void nf4_dequantize(float* out, const uint8_t* packed, const uint8_t* absmax_q,
                    const float* absmax_scale, float absmax_offset, int64_t n) {
  const auto& code = nf4_code();
  const auto& dyn = dynamic_map_code();
  const int64_t blocks = (n + kNf4Block - 1) / kNf4Block;
#pragma omp parallel for schedule(static) if (n > (1 << 16))
  for (int64_t b = 0; b < blocks; ++b) {
    const float absmax = dyn[absmax_q[b]] * absmax_scale[b / kNf4AbsmaxBlock] + absmax_offset;
    const int64_t i0 = b * kNf4Block, i1 = std::min(n, i0 + kNf4Block);
    for (int64_t i = i0; i < i1; ++i) {
      const uint8_t byte = packed[i / 2];
      out[i] = code[(i % 2 == 0) ? (byte >> 4) : (byte & 15)] * absmax;
    }
  }
}

}  // namespace lt
