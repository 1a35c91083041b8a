// libFuzzer target: the JSON / JSONL / txt dataset loader with every format, template, packing
// and truncation setting (see fuzz_entries.h for the input layout).
#include "fuzz_entries.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::filesystem::path dir =
      std::filesystem::exists("/dev/shm") ? "/dev/shm" : std::filesystem::temp_directory_path();
  lt::fuzz::dataset_one(data, size, dir);
  return 0;
}
