// Loading the CUDA module (see cuda_module.h).
#include "backend/cuda_module.h"

#include <dlfcn.h>
#include <fmt/format.h>

#include <cstdlib>
#include <filesystem>
#include <mutex>

namespace lt {

bool cuda_module_built() {
#ifdef LONGTUNE_CUDA_MODULE
  return true;
#else
  return false;
#endif
}

std::string cuda_module_path() {
  if (const char* env = std::getenv("LONGTUNE_CUDA_MODULE"); env && *env) return env;
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&cuda_module_path), &info) && info.dli_fname)
    return (std::filesystem::path(info.dli_fname).parent_path() / kCudaModuleFile).string();
  return kCudaModuleFile;  // the loader's search path
}

namespace {

// The driver's view, without the runtime or any library of the toolkit: is a GPU visible?
bool driver_sees_a_gpu(std::string* reason) {
  void* cuda = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);  // kept for the process
  if (!cuda) {
    *reason = "no CUDA driver on this machine (libcuda.so.1 does not load)";
    return false;
  }
  using InitFn = int (*)(unsigned);
  using CountFn = int (*)(int*);
  auto init = reinterpret_cast<InitFn>(dlsym(cuda, "cuInit"));
  auto count = reinterpret_cast<CountFn>(dlsym(cuda, "cuDeviceGetCount"));
  if (!init || !count) {
    *reason = "libcuda.so.1 has no cuInit / cuDeviceGetCount";
    return false;
  }
  int n = 0;
  if (const int rc = init(0); rc != 0) {
    *reason = fmt::format("no usable CUDA device (cuInit returned {}{})", rc,
                          rc == 100 ? ": no device is visible" : "");
    return false;
  }
  if (count(&n) != 0 || n == 0) {
    *reason = "no CUDA device is visible";
    return false;
  }
  return true;
}

struct Loader {
  std::mutex mu;
  bool probed = false;
  std::string probe_reason, load_reason;
  const CudaModule* module = nullptr;
  bool emulated = false;  // the module exports kCudaEmulatorEntry: no driver needed

  const CudaModule* load() {  // once loaded, for good; a failure is tried again next time
    if (module) return module;
    const std::string path = cuda_module_path();
    void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);  // every symbol resolved now
    if (!h) {
      const char* e = dlerror();
      load_reason = fmt::format("the CUDA module {} does not load: {}", path, e ? e : "?");
      return nullptr;
    }
    using EntryFn = const CudaModule* (*)();
    auto entry = reinterpret_cast<EntryFn>(dlsym(h, kCudaModuleEntry));
    const CudaModule* m = entry ? entry() : nullptr;
    if (!m || m->abi != kCudaModuleAbi || !m->make_backend) {
      load_reason = fmt::format("{} is not a CUDA module of this longtune (entry {}, abi {})", path,
                                entry ? "found" : "missing", m ? m->abi : -1);
      return nullptr;
    }
    module = m;
    emulated = dlsym(h, kCudaEmulatorEntry) != nullptr;
    return module;
  }
};

}  // namespace

const CudaModule* cuda_module(std::string* reason, bool probe_driver) {
  std::string dummy;
  if (!reason) reason = &dummy;
  const char* named = std::getenv("LONGTUNE_CUDA_MODULE");
  const bool explicit_module = named && *named;
  if (!cuda_module_built() && !explicit_module) {
    *reason = "this longtune was built without the CUDA backend";
    return nullptr;
  }
  static Loader loader;
  std::lock_guard<std::mutex> lock(loader.mu);
  // A module named by $LONGTUNE_CUDA_MODULE is loaded first: the CPU emulator of
  // tests/cuda_emu runs without a driver. Any other module needs the driver to see a GPU.
  if (explicit_module) {
    if (!loader.load()) {
      *reason = loader.load_reason;
      return nullptr;
    }
    if (loader.emulated) return loader.module;
  }
  if (probe_driver) {
    if (!loader.probed) {
      loader.probed = true;
      driver_sees_a_gpu(&loader.probe_reason);
    }
    if (!loader.probe_reason.empty()) {
      *reason = loader.probe_reason;
      return nullptr;
    }
  }
  const CudaModule* m = loader.load();
  if (!m) *reason = loader.load_reason;
  return m;
}

std::unique_ptr<Backend> make_cuda_backend(std::string* reason, GemmPrecision gemm) {
  const CudaModule* m = cuda_module(reason);
  return m ? m->make_backend(reason, gemm) : nullptr;
}

}  // namespace lt
