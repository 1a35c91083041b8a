// libFuzzer target: the safetensors header parser and its offset validation.
#include "fuzz_entries.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  lt::fuzz::safetensors_one(data, size);
  return 0;
}
