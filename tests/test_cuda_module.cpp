// The CUDA module (backend/cuda_module.h): a CPU run never maps cuBLAS or NCCL, the module that
// was built loads with every symbol resolved (so a module that would fail to load on a GPU
// machine fails here first), and a module that does not load is reported by path.
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <string>

#include "backend/backend.h"
#include "backend/cuda_module.h"

namespace lt {
namespace {

std::string mapped_libraries() {
  std::ifstream f("/proc/self/maps");
  return std::string(std::istreambuf_iterator<char>(f), {});
}

// ctest runs these with no GPU visible (CUDA_VISIBLE_DEVICES empty), as every CPU test.
TEST(CudaModule, CpuRunsNeverMapCublasOrNccl) {
  auto be = make_backend("auto");
  EXPECT_EQ(be->name(), "cpu");
  std::string reason;
  EXPECT_EQ(make_cuda_backend(&reason), nullptr);
  EXPECT_FALSE(reason.empty());
  std::printf("no CUDA backend: %s\n", reason.c_str());
  const std::string maps = mapped_libraries();
  EXPECT_EQ(maps.find("libcublas"), std::string::npos) << "cuBLAS mapped by a CPU run";
  EXPECT_EQ(maps.find("libnccl"), std::string::npos) << "NCCL mapped by a CPU run";
}

TEST(CudaModule, AModuleThatDoesNotLoadIsNamed) {
  setenv("LONGTUNE_CUDA_MODULE", "/nonexistent/liblongtune_cuda.so", 1);
  std::string reason;
  EXPECT_EQ(cuda_module(&reason, false), nullptr);
  if (cuda_module_built())
    EXPECT_NE(reason.find("/nonexistent/liblongtune_cuda.so"), std::string::npos) << reason;
  else
    EXPECT_NE(reason.find("without the CUDA backend"), std::string::npos) << reason;
  unsetenv("LONGTUNE_CUDA_MODULE");
}

TEST(CudaModule, LoadsWithEverySymbolResolved) {
  std::string reason;
  const CudaModule* m = cuda_module(&reason, /*probe_driver=*/false);
  if (!cuda_module_built()) {
    EXPECT_EQ(m, nullptr);
    EXPECT_NE(reason.find("without the CUDA backend"), std::string::npos) << reason;
    return;
  }
  ASSERT_NE(m, nullptr) << reason;
  EXPECT_EQ(m->abi, kCudaModuleAbi);
  // No GPU visible: the module's own check says so instead of failing.
  EXPECT_EQ(m->make_backend(&reason, GemmPrecision::kBf16), nullptr);
  EXPECT_FALSE(reason.empty());
  std::printf("module %s loaded; backend: %s\n", cuda_module_path().c_str(), reason.c_str());
  EXPECT_NE(mapped_libraries().find("libcublas"), std::string::npos);
}

}  // namespace
}  // namespace lt
