// libFuzzer target: tokenizer.json loading + encode/decode, and encode/decode of arbitrary text
// with the real GPT-2 and Llama-2 tokenizers (see fuzz_entries.h for the input layout).
#include "fuzz_entries.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  lt::fuzz::tokenizer_one(data, size);
  return 0;
}
