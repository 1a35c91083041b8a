// The CUDA runtime stand-in of emu_runtime.h: the emulated device, its memory, streams and
// events (see the header for the model).
#include "emu_runtime.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <string>

namespace lt::cuda_emu {
namespace {

constexpr size_t kAlign = 256;                    // cudaMalloc's alignment
constexpr size_t kMemPitch = 4096;                // the emulated device's memPitch
constexpr int kSms = 2;                           // streaming multiprocessors
constexpr size_t kStaticLaunchShared = 48 << 10;  // dynamic shared memory without opt-in

struct Op {
  const char* what;
  std::function<void()> run;
};

struct Stream {
  int id = 0;
  std::deque<Op> queue;
  uint64_t issued = 0, done = 0;  // operations put on it, and run
  bool running = false;           // an operation of it is running (its waits may recurse)
};

// When a timing event's record ran on its stream (the host clock: emulated kernels take the
// time the CPU takes to run them).
struct Stamp {
  bool done = false;
  std::chrono::steady_clock::time_point at;
};

struct Event {
  Stream* stream = nullptr;      // the stream of the last record (null: complete)
  uint64_t pos = 0;              // complete once stream->done >= pos
  bool timing = false;           // created without cudaEventDisableTiming
  std::shared_ptr<Stamp> stamp;  // the last record's, for cudaEventElapsedTime
};

struct Runtime {
  std::recursive_mutex mu;
  StreamPolicy policy = StreamPolicy::kLazy;
  std::deque<Stream> streams;  // never freed: a destroyed stream's waits stay valid
  std::set<Stream*> live_streams;
  std::set<Event*> events;
  std::map<uintptr_t, size_t> device;                          // every device range: begin -> bytes
  std::map<void*, std::unique_ptr<GuardedBytes>> allocations;  // cudaMalloc(Async)'s
  std::map<uintptr_t, size_t> pinned;                          // cudaMallocHost's
  size_t used = 0;                                             // device bytes allocated
  uint64_t host_waits = 0;  // times the host waited for a stream (longtune_cuda_emu_host_waits)
  int device_access = 0;    // stream operations running: cudaMalloc'd memory is accessible
  std::map<const void*, int> max_dynamic_shared;  // cudaFuncSetAttribute
  cudaError_t last = cudaSuccess;

  Runtime() {
    if (const char* env = std::getenv("LONGTUNE_CUDA_EMU_STREAMS"); env && *env) {
      const std::string v = env;
      if (v == "eager") {
        policy = StreamPolicy::kEager;
      } else if (v == "lazy-others-first") {
        policy = StreamPolicy::kLazyOthersFirst;
      } else if (v != "lazy") {
        std::fprintf(stderr,
                     "cuda_emu: LONGTUNE_CUDA_EMU_STREAMS=%s: allowed: lazy, lazy-others-first, "
                     "eager\n",
                     env);
        std::abort();
      }
    }
  }
};

// Never destroyed: static objects of the tests release device memory at exit.
Runtime& rt() {
  static auto* r = new Runtime;
  return *r;
}

// The emulated device's memory: LONGTUNE_CUDA_EMU_MEMORY bytes (read at every use, so that a
// test can shrink the device between runs), default 4 GiB.
size_t device_bytes() {
  const char* env = std::getenv("LONGTUNE_CUDA_EMU_MEMORY");
  if (!env || !*env) return size_t(4) << 30;
  char* end = nullptr;
  const unsigned long long v = std::strtoull(env, &end, 10);
  if (*end || v == 0) {
    std::fprintf(stderr, "cuda_emu: LONGTUNE_CUDA_EMU_MEMORY=%s: a number of bytes > 0\n", env);
    std::abort();
  }
  return size_t(v);
}

// Bytes not allocated (0 once a shrunk device holds more than it has).
size_t free_bytes() {
  const size_t total = device_bytes();
  return total > rt().used ? total - rt().used : 0;
}

// cudaMalloc'd memory is inaccessible to the host (PROT_NONE) except while stream operations
// (kernels, copies, memsets, cuBLAS) run: a host dereference of a device pointer faults, as on
// a GPU, and the fault handler names it (host_access_fault).
class DeviceAccess {
 public:
  DeviceAccess() {
    if (rt().device_access++ == 0) set(true);
  }
  ~DeviceAccess() {
    if (--rt().device_access == 0) set(false);
  }
  DeviceAccess(const DeviceAccess&) = delete;
  DeviceAccess& operator=(const DeviceAccess&) = delete;

 private:
  static void set(bool on) {
    for (auto& [p, memory] : rt().allocations) memory->set_accessible(on);
  }
};

cudaError_t error(cudaError_t e, const std::string& why) {
  std::fprintf(stderr, "cuda_emu: %s\n", why.c_str());
  rt().last = e;
  return e;
}

// Runs stream s's operations until `upto` of them have run.
void run_until(Stream& s, uint64_t upto) {
  DeviceAccess access;
  while (s.done < upto) {
    if (s.running)
      throw EmulationError("cuda_emu: stream " + std::to_string(s.id) +
                           " waits on itself through an event: the streams deadlock");
    Op op = std::move(s.queue.front());
    s.queue.pop_front();
    ++s.done;
    s.running = true;
    try {
      op.run();
    } catch (const EmulationError& e) {
      s.running = false;
      throw EmulationError(std::string(e.what()) + " (" + op.what + ", operation " +
                           std::to_string(s.done) + " of stream " + std::to_string(s.id) + ")");
    }
    s.running = false;
  }
}

// The host needs stream s to have run `upto` operations: under kLazyOthersFirst every other
// stream runs all it can first (work the GPU may well have done before s's).
void force(Stream& s, uint64_t upto) {
  ++rt().host_waits;
  if (rt().policy == StreamPolicy::kLazyOthersFirst)
    for (Stream* other : rt().live_streams)
      if (other != &s) run_until(*other, other->issued);
  run_until(s, upto);
}

void synchronize_all() {
  for (Stream* s : rt().live_streams) run_until(*s, s->issued);
}

Stream* stream_of(cudaStream_t s) { return reinterpret_cast<Stream*>(s); }

bool known(cudaStream_t s) { return !s || rt().live_streams.count(stream_of(s)); }

bool inside(const std::map<uintptr_t, size_t>& ranges, uintptr_t p, size_t bytes) {
  auto it = ranges.upper_bound(p);
  if (it == ranges.begin()) return false;
  --it;
  return p >= it->first && p + bytes <= it->first + it->second;
}

bool overlaps(const std::map<uintptr_t, size_t>& ranges, uintptr_t p, size_t bytes) {
  auto it = ranges.lower_bound(p + bytes);
  if (it == ranges.begin()) return false;
  --it;
  return it->first + it->second > p;
}

// Checks kind against where dst and src lie; '?' on a mismatch (with a message printed).
bool check_kind(const char* call, void* dst, const void* src, size_t dst_span, size_t src_span,
                cudaMemcpyKind kind, char& wd, char& ws) {
  wd = detail::where(dst, dst_span);
  ws = detail::where(src, src_span);
  const auto is_host = [](char w) { return w == 'h' || w == 'p'; };
  bool ok = wd != '?' && ws != '?';
  switch (kind) {
    case cudaMemcpyHostToDevice:
      ok &= wd == 'd' && is_host(ws);
      break;
    case cudaMemcpyDeviceToHost:
      ok &= ws == 'd' && is_host(wd);
      break;
    case cudaMemcpyDeviceToDevice:
      ok &= wd == 'd' && ws == 'd';
      break;
    case cudaMemcpyHostToHost:
      ok &= is_host(wd) && is_host(ws);
      break;
    case cudaMemcpyDefault:
      break;
  }
  if (!ok) {
    const auto name = [](char w) {
      return w == 'd'   ? "device memory"
             : w == 'p' ? "pinned host memory"
             : w == 'h' ? "pageable host memory"
                        : "partly device memory";
    };
    error(cudaErrorInvalidValue, std::string(call) + ": kind " + std::to_string(int(kind)) +
                                     " with the destination in " + name(wd) +
                                     " and the source in " + name(ws));
  }
  return ok;
}

// A copy of `rows` rows of `width` bytes: enqueued; a pageable source is staged when issued and
// a pageable destination waits for the stream (as CUDA's copies with pageable memory do).
cudaError_t copy_rows(const char* call, void* dst, size_t dpitch, const void* src, size_t spitch,
                      size_t width, size_t rows, cudaMemcpyKind kind, cudaStream_t stream) {
  if (!known(stream)) return error(cudaErrorInvalidResourceHandle, std::string(call) + ": stream");
  if (width == 0 || rows == 0) return cudaSuccess;
  char wd, ws;
  if (!check_kind(call, dst, src, dpitch * (rows - 1) + width, spitch * (rows - 1) + width, kind,
                  wd, ws))
    return cudaErrorInvalidValue;
  auto* d = static_cast<unsigned char*>(dst);
  const auto* s = static_cast<const unsigned char*>(src);
  const auto copy = [=](const unsigned char* from) {
    for (size_t r = 0; r < rows; ++r) std::memmove(d + r * dpitch, from + r * spitch, width);
  };
  if (ws == 'h' && wd != 'h') {
    auto staged = std::make_shared<std::vector<unsigned char>>(s, s + spitch * (rows - 1) + width);
    enqueue(stream, call, [copy, staged] { copy(staged->data()); });
  } else if (wd == 'h') {
    if (stream) force(*stream_of(stream), stream_of(stream)->issued);
    DeviceAccess access;
    copy(s);
  } else {
    enqueue(stream, call, [copy, s] { copy(s); });
  }
  return cudaSuccess;
}

void* allocate(size_t bytes) {
  detail::install_fault_handler();
  auto memory = std::make_unique<GuardedBytes>((bytes + kAlign - 1) / kAlign * kAlign);
  void* p = memory->data();
  std::memset(p, 0xff, bytes);  // NaN: a read before the first write shows
  memory->set_accessible(rt().device_access > 0);
  rt().used += bytes;
  rt().allocations.emplace(p, std::move(memory));
  return p;
}

void release(void* p) {
  DeviceAccess access;
  auto it = rt().allocations.find(p);
  if (!it->second->canary_intact())
    throw EmulationError("cuda_emu: a store before the start of a device allocation");
  rt().allocations.erase(it);
}

}  // namespace

void set_stream_policy(StreamPolicy policy) {
  std::lock_guard lock(rt().mu);
  synchronize_all();
  rt().policy = policy;
}

void enqueue(cudaStream_t stream, const char* what, std::function<void()> op) {
  std::lock_guard lock(rt().mu);
  if (!stream) {
    DeviceAccess access;
    op();
    return;
  }
  Stream& s = *stream_of(stream);
  s.queue.push_back({what, std::move(op)});
  ++s.issued;
  if (rt().policy == StreamPolicy::kEager) run_until(s, s.issued);
}

namespace {

// LONGTUNE_CUDA_EMU_SCHEDULE, when set.
std::optional<Schedule> env_schedule() {
  const char* env = std::getenv("LONGTUNE_CUDA_EMU_SCHEDULE");
  if (!env || !*env) return std::nullopt;
  const std::string v = env;
  if (v == "in-order") return Schedule::kInOrder;
  if (v == "reversed") return Schedule::kReversed;
  if (v == "interleaved") return Schedule::kInterleaved;
  std::fprintf(stderr,
               "cuda_emu: LONGTUNE_CUDA_EMU_SCHEDULE=%s: allowed: in-order, reversed, "
               "interleaved\n",
               env);
  std::abort();
}

}  // namespace

void launch_on(cudaStream_t stream, const char* kernel, const void* func, dim3 grid, dim3 block,
               size_t shared_bytes, std::function<void()> body) {
  std::lock_guard lock(rt().mu);
  if (!known(stream)) throw EmulationError(std::string("cuda_emu: ") + kernel + " on a bad stream");
  if (shared_bytes > kStaticLaunchShared) {
    auto it = rt().max_dynamic_shared.find(func);
    const int allowed = it == rt().max_dynamic_shared.end() ? 0 : it->second;
    if (size_t(allowed) < shared_bytes)
      throw EmulationError("cuda_emu: " + std::string(kernel) + " launched with " +
                           std::to_string(shared_bytes) +
                           " bytes of dynamic shared memory, over 48 KiB, but "
                           "cudaFuncAttributeMaxDynamicSharedMemorySize is " +
                           std::to_string(allowed));
  }
  const std::optional<Schedule> schedule = env_schedule();
  enqueue(stream, kernel, [=] {
    if (schedule) set_schedule(*schedule);
    launch(kernel, grid, block, shared_bytes, body);
  });
}

namespace detail {

cudaError_t func_set_attribute(const void* func, cudaFuncAttribute attr, int value) {
  std::lock_guard lock(rt().mu);
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      size_t(value) > kMaxSharedBytes)
    return error(cudaErrorInvalidValue, "cudaFuncSetAttribute: attribute " +
                                            std::to_string(int(attr)) + " value " +
                                            std::to_string(value));
  rt().max_dynamic_shared[func] = value;
  return cudaSuccess;
}

char where(const void* p, size_t bytes) {
  std::lock_guard lock(rt().mu);
  const auto a = reinterpret_cast<uintptr_t>(p);
  if (inside(rt().device, a, bytes)) return 'd';
  if (overlaps(rt().device, a, bytes)) return '?';
  return inside(rt().pinned, a, bytes) ? 'p' : 'h';
}

const char* host_access_fault(const void* addr) {
  // In a signal handler, after a fault: no lock (the faulting thread may hold it).
  if (rt().device_access > 0) return nullptr;
  for (const auto& [p, memory] : rt().allocations)
    if (memory->contains(addr))
      return "cuda_emu: the host touched device memory (a cudaMalloc allocation) outside any "
             "stream operation: on a GPU this dereferences a device pointer on the host\n";
  return nullptr;
}

void note_device_memory(const void* p, size_t bytes, bool add) {
  std::lock_guard lock(rt().mu);
  if (add) {
    rt().device[reinterpret_cast<uintptr_t>(p)] = bytes;
  } else {
    rt().device.erase(reinterpret_cast<uintptr_t>(p));
  }
}

}  // namespace detail
}  // namespace lt::cuda_emu

// ---- The runtime API --------------------------------------------------------------------------

using lt::cuda_emu::rt;
using Lock = std::lock_guard<std::recursive_mutex>;

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument (cuda_emu)";
    case cudaErrorMemoryAllocation:
      return "out of memory (cuda_emu)";
    case cudaErrorInvalidPitchValue:
      return "invalid pitch argument (cuda_emu)";
    case cudaErrorInvalidDevice:
      return "invalid device ordinal (cuda_emu)";
    case cudaErrorInvalidResourceHandle:
      return "invalid resource handle (cuda_emu)";
    case cudaErrorNotReady:
      return "device not ready (cuda_emu)";
  }
  return "unknown error (cuda_emu)";
}

cudaError_t cudaGetLastError() {
  Lock lock(rt().mu);
  const cudaError_t e = rt().last;
  rt().last = cudaSuccess;
  return e;
}

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  return device == 0 ? cudaSuccess : lt::cuda_emu::error(cudaErrorInvalidDevice, "cudaSetDevice");
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (device != 0) return lt::cuda_emu::error(cudaErrorInvalidDevice, "cudaGetDeviceProperties");
  *prop = {};
  std::snprintf(prop->name, sizeof prop->name,
                "cuda_emu (a compute capability 8.0 GPU on the CPU)");
  prop->totalGlobalMem = lt::cuda_emu::device_bytes();
  prop->memPitch = lt::cuda_emu::kMemPitch;
  prop->multiProcessorCount = lt::cuda_emu::kSms;
  prop->sharedMemPerBlockOptin = lt::cuda_emu::kMaxSharedBytes;
  prop->major = 8;
  prop->minor = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0 || attr != cudaDevAttrComputeCapabilityMajor)
    return lt::cuda_emu::error(cudaErrorInvalidValue, "cudaDeviceGetAttribute");
  *value = 8;
  return cudaSuccess;
}

cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
  Lock lock(rt().mu);
  *total_bytes = lt::cuda_emu::device_bytes();
  *free_bytes = lt::cuda_emu::free_bytes();
  return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize() {
  Lock lock(rt().mu);
  lt::cuda_emu::synchronize_all();
  return cudaSuccess;
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned flags) {
  Lock lock(rt().mu);
  if (flags != cudaStreamNonBlocking)  // the legacy stream's implicit waits are not emulated
    return lt::cuda_emu::error(cudaErrorInvalidValue,
                               "cudaStreamCreateWithFlags: flags " + std::to_string(flags));
  auto& s = rt().streams.emplace_back();
  s.id = int(rt().streams.size());
  rt().live_streams.insert(&s);
  *stream = reinterpret_cast<cudaStream_t>(&s);
  return cudaSuccess;
}

cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  Lock lock(rt().mu);
  if (!stream || !lt::cuda_emu::known(stream))
    return lt::cuda_emu::error(cudaErrorInvalidResourceHandle, "cudaStreamDestroy");
  auto* s = lt::cuda_emu::stream_of(stream);
  lt::cuda_emu::run_until(*s, s->issued);  // CUDA finishes its work first
  rt().live_streams.erase(s);
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  Lock lock(rt().mu);
  if (!lt::cuda_emu::known(stream))
    return lt::cuda_emu::error(cudaErrorInvalidResourceHandle, "cudaStreamSynchronize");
  if (stream) {
    auto* s = lt::cuda_emu::stream_of(stream);
    lt::cuda_emu::force(*s, s->issued);
  }
  return cudaSuccess;
}

cudaError_t cudaStreamQuery(cudaStream_t stream) { return cudaStreamSynchronize(stream); }

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned flags) {
  Lock lock(rt().mu);
  if (flags != cudaEventDisableTiming && flags != cudaEventDefault)
    return lt::cuda_emu::error(cudaErrorInvalidValue,
                               "cudaEventCreateWithFlags: flags " + std::to_string(flags));
  auto* e = new lt::cuda_emu::Event;
  e->timing = flags == cudaEventDefault;
  rt().events.insert(e);
  *event = reinterpret_cast<cudaEvent_t>(e);
  return cudaSuccess;
}

cudaError_t cudaEventDestroy(cudaEvent_t event) {
  Lock lock(rt().mu);
  auto* e = reinterpret_cast<lt::cuda_emu::Event*>(event);
  if (!rt().events.erase(e))
    return lt::cuda_emu::error(cudaErrorInvalidResourceHandle, "cudaEventDestroy");
  delete e;
  return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  Lock lock(rt().mu);
  auto* e = reinterpret_cast<lt::cuda_emu::Event*>(event);
  if (!rt().events.count(e) || !lt::cuda_emu::known(stream))
    return lt::cuda_emu::error(cudaErrorInvalidResourceHandle, "cudaEventRecord");
  e->stream = lt::cuda_emu::stream_of(stream);
  e->pos = e->stream ? e->stream->issued : 0;
  if (e->timing) {  // the stream's clock when it gets here
    auto stamp = std::make_shared<lt::cuda_emu::Stamp>();
    e->stamp = stamp;
    lt::cuda_emu::enqueue(stream, "cudaEventRecord", [stamp] {
      stamp->at = std::chrono::steady_clock::now();
      stamp->done = true;
    });
  }
  return cudaSuccess;
}

cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
  Lock lock(rt().mu);
  auto* a = reinterpret_cast<lt::cuda_emu::Event*>(start);
  auto* b = reinterpret_cast<lt::cuda_emu::Event*>(end);
  if (!rt().events.count(a) || !rt().events.count(b) || !a->timing || !b->timing)
    return lt::cuda_emu::error(cudaErrorInvalidResourceHandle, "cudaEventElapsedTime");
  if (!a->stamp || !b->stamp || !a->stamp->done || !b->stamp->done)
    return lt::cuda_emu::error(cudaErrorNotReady, "cudaEventElapsedTime: not yet recorded");
  *ms = std::chrono::duration<float, std::milli>(b->stamp->at - a->stamp->at).count();
  return cudaSuccess;
}

cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned flags) {
  Lock lock(rt().mu);
  auto* e = reinterpret_cast<lt::cuda_emu::Event*>(event);
  if (!rt().events.count(e) || !lt::cuda_emu::known(stream) || flags != 0)
    return lt::cuda_emu::error(cudaErrorInvalidResourceHandle, "cudaStreamWaitEvent");
  if (!e->stream) return cudaSuccess;  // never recorded, or on the null stream: complete
  lt::cuda_emu::Stream* source = e->stream;
  const uint64_t pos = e->pos;  // the record current now (a later record does not count)
  lt::cuda_emu::enqueue(stream, "cudaStreamWaitEvent",
                        [source, pos] { lt::cuda_emu::run_until(*source, pos); });
  return cudaSuccess;
}

cudaError_t cudaMalloc(void** p, size_t bytes) {
  Lock lock(rt().mu);
  *p = nullptr;
  if (bytes > lt::cuda_emu::free_bytes())
    return lt::cuda_emu::error(cudaErrorMemoryAllocation,
                               "cudaMalloc of " + std::to_string(bytes) + " bytes: " +
                                   std::to_string(lt::cuda_emu::free_bytes()) + " free");
  if (bytes) *p = lt::cuda_emu::allocate(bytes);
  return cudaSuccess;
}

cudaError_t cudaFree(void* p) {
  Lock lock(rt().mu);
  if (!p) return cudaSuccess;
  lt::cuda_emu::synchronize_all();  // cudaFree synchronizes the device
  if (!rt().allocations.count(p))
    return lt::cuda_emu::error(cudaErrorInvalidValue,
                               "cudaFree of memory cudaMalloc did not return");
  lt::cuda_emu::release(p);
  return cudaSuccess;
}

cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t stream) {
  Lock lock(rt().mu);
  if (!lt::cuda_emu::known(stream))
    return lt::cuda_emu::error(cudaErrorInvalidResourceHandle, "cudaMallocAsync");
  return cudaMalloc(p, bytes);  // usable by the stream's later work (and, here, at once)
}

cudaError_t cudaFreeAsync(void* p, cudaStream_t stream) {
  Lock lock(rt().mu);
  if (!lt::cuda_emu::known(stream) || !rt().allocations.count(p))
    return lt::cuda_emu::error(cudaErrorInvalidValue, "cudaFreeAsync");
  // Released once the stream's earlier work has run (its pending kernels may still use it).
  lt::cuda_emu::enqueue(stream, "cudaFreeAsync", [p] { lt::cuda_emu::release(p); });
  return cudaSuccess;
}

cudaError_t cudaMallocHost(void** p, size_t bytes) {
  Lock lock(rt().mu);
  *p = nullptr;
  if (bytes == 0) return cudaSuccess;
  if (posix_memalign(p, 4096, bytes) != 0)
    return lt::cuda_emu::error(cudaErrorMemoryAllocation, "cudaMallocHost");
  std::memset(*p, 0xff, bytes);
  rt().pinned[reinterpret_cast<uintptr_t>(*p)] = bytes;
  return cudaSuccess;
}

cudaError_t cudaFreeHost(void* p) {
  Lock lock(rt().mu);
  if (!p) return cudaSuccess;
  lt::cuda_emu::synchronize_all();  // as cudaFree
  if (!rt().pinned.erase(reinterpret_cast<uintptr_t>(p)))
    return lt::cuda_emu::error(cudaErrorInvalidValue,
                               "cudaFreeHost of memory cudaMallocHost did "
                               "not return");
  std::free(p);
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t stream) {
  Lock lock(rt().mu);
  return lt::cuda_emu::copy_rows("cudaMemcpyAsync", dst, bytes, src, bytes, bytes, 1, kind, stream);
}

cudaError_t cudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src, size_t spitch,
                              size_t width, size_t height, cudaMemcpyKind kind,
                              cudaStream_t stream) {
  Lock lock(rt().mu);
  if (width > dpitch || width > spitch || dpitch > lt::cuda_emu::kMemPitch ||
      spitch > lt::cuda_emu::kMemPitch)
    return lt::cuda_emu::error(cudaErrorInvalidPitchValue,
                               "cudaMemcpy2DAsync: width " + std::to_string(width) + ", pitches " +
                                   std::to_string(dpitch) + " and " + std::to_string(spitch) +
                                   " (memPitch " + std::to_string(lt::cuda_emu::kMemPitch) + ")");
  return lt::cuda_emu::copy_rows("cudaMemcpy2DAsync", dst, dpitch, src, spitch, width, height, kind,
                                 stream);
}

cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t stream) {
  Lock lock(rt().mu);
  if (!lt::cuda_emu::known(stream))
    return lt::cuda_emu::error(cudaErrorInvalidResourceHandle, "cudaMemsetAsync");
  if (bytes == 0) return cudaSuccess;
  if (lt::cuda_emu::detail::where(p, bytes) != 'd')
    return lt::cuda_emu::error(
        cudaErrorInvalidValue,
        "cudaMemsetAsync of " + std::to_string(bytes) + " bytes not inside one device allocation");
  lt::cuda_emu::enqueue(stream, "cudaMemsetAsync",
                        [p, value, bytes] { std::memset(p, value, bytes); });
  return cudaSuccess;
}

// backend/cuda_module.h's kCudaEmulatorEntry: the module built on this runtime needs no driver.
extern "C" __attribute__((visibility("default"))) int longtune_cuda_emulator() { return 1; }

// How many times the host has waited for a stream (cudaStreamSynchronize, a copy to pageable
// memory): on a GPU each wait drains the queue, so test_train_emu bounds them per step.
extern "C" __attribute__((visibility("default"))) uint64_t longtune_cuda_emu_host_waits() {
  std::lock_guard lock(rt().mu);
  return rt().host_waits;
}
