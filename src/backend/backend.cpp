// Default implementations of the optional Backend ops (kept out of backend.h so that the header
// stays free of formatting code that nvcc cannot compile).
#include "backend/backend.h"

#include "core/check.h"

namespace lt {

void Backend::lora_forward(float*, float*, float*, const float*, const float*, const float*,
                           int64_t, int64_t, int64_t, const LoraCall&) {
  LT_CHECK(false, "backend {} has no lora_forward", name());
}

void Backend::lora_backward(float*, float*, float*, float*, float*, float*, float*, const float*,
                            const float*, const float*, const float*, int64_t, int64_t, int64_t,
                            const LoraCall&) {
  LT_CHECK(false, "backend {} has no lora_backward", name());
}

void Backend::nf4_dequantize(float*, const uint8_t*, const uint8_t*, const float*, float,
                             int64_t) {
  LT_CHECK(false, "backend {} has no nf4_dequantize", name());
}

}  // namespace lt
