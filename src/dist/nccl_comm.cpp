// The NCCL communicator (see comm.h): float collectives and point-to-point calls on device
// buffers over NCCL, everything on host memory over the group it was bootstrapped on. Built only
// with the CUDA backend and NCCL, into the CUDA module (backend/cuda_module.h), which exports
// make_nccl_in_module; make_nccl_communicator (comm.cpp) reaches it through the module.
//
// Ordering: the CUDA backend runs its ops on its own non-blocking streams, which this file does
// not see, so every call first waits for the whole device (cudaDeviceSynchronize), then enqueues
// the NCCL operation on this communicator's stream and waits for it, polling so that a call that
// does not finish within the timeout aborts the communicator and the job (a dead or hung rank).
// Simple and safe; overlapping NCCL with compute needs the backend's stream here (later work).
#include <cuda_runtime.h>
#include <fmt/format.h>
#include <nccl.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <thread>

#include "core/check.h"
#include "core/error.h"
#include "dist/comm.h"

namespace lt {
namespace {

#define LT_NCCL_CHECK(call)                                                                      \
  do {                                                                                           \
    const ncclResult_t lt_nccl_rc = (call);                                                      \
    LT_CHECK(lt_nccl_rc == ncclSuccess, "{} failed: {}", #call, ncclGetErrorString(lt_nccl_rc)); \
  } while (0)

#define LT_NCCL_CUDA_CHECK(call)                                                                 \
  do {                                                                                           \
    const cudaError_t lt_cuda_rc = (call);                                                       \
    LT_CHECK(lt_cuda_rc == cudaSuccess, "{} failed: {}", #call, cudaGetErrorString(lt_cuda_rc)); \
  } while (0)

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(Communicator& group, std::unique_ptr<Communicator> owned, double timeout)
      : group_(group), owned_(std::move(owned)), timeout_(timeout) {
    name_ = group_.name() + ".nccl";
    ncclUniqueId id{};
    if (group_.rank() == 0) LT_NCCL_CHECK(ncclGetUniqueId(&id));
    group_.broadcast(&id, sizeof id, 0);
    LT_NCCL_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    LT_NCCL_CHECK(ncclCommInitRank(&comm_, group_.size(), id, group_.rank()));
  }
  ~NcclCommunicator() override {
    if (comm_) (void)ncclCommDestroy(comm_);
    if (stream_) (void)cudaStreamDestroy(stream_);
  }
  int rank() const override { return group_.rank(); }
  int size() const override { return group_.size(); }
  std::string_view backend() const override { return "nccl"; }
  bool device_memory() const override { return true; }

  void allreduce_sum(float* data, size_t n) override {
    count(stats_.allreduce_bytes, n * 4);
    run("allreduce",
        [&] { LT_NCCL_CHECK(ncclAllReduce(data, data, n, ncclFloat, ncclSum, comm_, stream_)); });
  }
  void allreduce_sum(double* data, size_t n) override { group_.allreduce_sum(data, n); }
  void allreduce_sum(int64_t* data, size_t n) override { group_.allreduce_sum(data, n); }

  void reduce_scatter_sum(float* recv, const float* send,
                          const std::vector<int64_t>& counts) override {
    LT_CHECK(int(counts.size()) == size());
    count(stats_.reduce_scatter_bytes, sum(counts) * 4);
    run("reduce_scatter", [&] {
      if (equal(counts)) {
        LT_NCCL_CHECK(
            ncclReduceScatter(send, recv, size_t(counts[0]), ncclFloat, ncclSum, comm_, stream_));
        return;
      }
      // Uneven parts (ZeRO's last shard): one reduce to each owner, grouped.
      LT_NCCL_CHECK(ncclGroupStart());
      int64_t at = 0;
      for (int r = 0; r < size(); ++r) {
        if (counts[r] > 0)
          LT_NCCL_CHECK(ncclReduce(send + at, recv, size_t(counts[r]), ncclFloat, ncclSum, r, comm_,
                                   stream_));
        at += counts[r];
      }
      LT_NCCL_CHECK(ncclGroupEnd());
    });
  }
  void allgather(float* recv, const float* send, const std::vector<int64_t>& counts) override {
    LT_CHECK(int(counts.size()) == size());
    count(stats_.allgather_bytes, sum(counts) * 4);
    std::vector<int64_t> displ(counts.size(), 0);
    std::partial_sum(counts.begin(), counts.end() - 1, displ.begin() + 1);
    const float* mine = send ? send : recv + displ[rank()];
    run("allgather", [&] {
      if (equal(counts)) {
        LT_NCCL_CHECK(ncclAllGather(mine, recv, size_t(counts[0]), ncclFloat, comm_, stream_));
        return;
      }
      LT_NCCL_CHECK(ncclGroupStart());
      for (int r = 0; r < size(); ++r)
        if (counts[r] > 0)
          LT_NCCL_CHECK(ncclBroadcast(r == rank() ? mine : nullptr, recv + displ[r],
                                      size_t(counts[r]), ncclFloat, r, comm_, stream_));
      LT_NCCL_CHECK(ncclGroupEnd());
    });
  }
  std::unique_ptr<CommRequest> allgather_async(float* recv, const float* send,
                                               const std::vector<int64_t>& counts) override {
    allgather(recv, send, counts);  // completed here (see the ordering note at the top)
    return std::make_unique<Done>();
  }
  void alltoall(float* recv, const float* send, size_t n) override {
    count(stats_.alltoall_bytes, n * size_t(size()) * 4);
    run("alltoall", [&] {
      LT_NCCL_CHECK(ncclGroupStart());
      for (int r = 0; r < size(); ++r) {
        LT_NCCL_CHECK(ncclSend(send + r * n, n, ncclFloat, r, comm_, stream_));
        LT_NCCL_CHECK(ncclRecv(recv + r * n, n, ncclFloat, r, comm_, stream_));
      }
      LT_NCCL_CHECK(ncclGroupEnd());
    });
  }
  void send(const float* data, size_t n, int dst, int) override {
    count(stats_.p2p_bytes, n * 4);
    run("send", [&] { LT_NCCL_CHECK(ncclSend(data, n, ncclFloat, dst, comm_, stream_)); });
  }
  void recv(float* data, size_t n, int src, int) override {
    ++stats_.calls;
    run("recv", [&] { LT_NCCL_CHECK(ncclRecv(data, n, ncclFloat, src, comm_, stream_)); });
  }
  // NCCL matches point-to-point calls by order, not by tag; the pipeline's messages between two
  // ranks follow one order on both sides. Completed at once (NCCL's ops block the stream until
  // the peer joins, so a later wait could not reorder them anyway).
  std::unique_ptr<CommRequest> isend(const float* data, size_t n, int dst, int tag) override {
    send(data, n, dst, tag);
    return std::make_unique<Done>();
  }
  std::unique_ptr<CommRequest> irecv(float* data, size_t n, int src, int tag) override {
    recv(data, n, src, tag);
    return std::make_unique<Done>();
  }
  void broadcast(void* data, size_t bytes, int root) override {
    group_.broadcast(data, bytes, root);  // host memory
  }
  void barrier() override { group_.barrier(); }
  std::unique_ptr<Communicator> split(int color, int key, std::string name) override {
    auto sub = group_.split(color, key, std::move(name));
    Communicator& ref = *sub;
    return std::make_unique<NcclCommunicator>(ref, std::move(sub), timeout_);
  }

 private:
  struct Done final : CommRequest {
    void wait() override {}
  };
  static int64_t sum(const std::vector<int64_t>& c) {
    return std::accumulate(c.begin(), c.end(), int64_t{0});
  }
  static bool equal(const std::vector<int64_t>& c) {
    for (int64_t x : c)
      if (x != c[0]) return false;
    return true;
  }
  void count(uint64_t& field, uint64_t bytes) {
    field += bytes;
    ++stats_.calls;
  }
  template <typename F>
  void run(const char* op, F&& enqueue) {
    LT_NCCL_CUDA_CHECK(cudaDeviceSynchronize());
    enqueue();
    const auto start = std::chrono::steady_clock::now();
    for (;;) {
      const cudaError_t q = cudaStreamQuery(stream_);
      if (q == cudaSuccess) break;
      LT_CHECK(q == cudaErrorNotReady, "NCCL {} on '{}': {}", op, name_, cudaGetErrorString(q));
      ncclResult_t async = ncclSuccess;
      LT_NCCL_CHECK(ncclCommGetAsyncError(comm_, &async));
      const double secs =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (async != ncclSuccess || secs > timeout_) {
        std::fprintf(
            stderr,
            "longtune: error: rank %d: NCCL %s on communicator '%s' %s; aborting the "
            "job\n",
            rank(), op, name_.c_str(),
            async != ncclSuccess
                ? ncclGetErrorString(async)
                : fmt::format("did not finish within {:.0f} s (--dist_timeout)", timeout_).c_str());
        std::fflush(stderr);
        (void)ncclCommAbort(comm_);
        comm_ = nullptr;
        std::_Exit(3);
      }
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

  Communicator& group_;
  std::unique_ptr<Communicator> owned_;  // the sub-group of a split (group_ refers to it)
  double timeout_;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_in_module(Communicator& group, double timeout_seconds,
                                                  std::string* reason) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    (void)cudaGetLastError();
    if (reason) *reason = "no CUDA device is present";
    return nullptr;
  }
  return std::make_unique<NcclCommunicator>(group, nullptr, timeout_seconds);
}

}  // namespace lt
