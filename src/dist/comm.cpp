// Communicator implementations: the local world of one process and MPI (with a watchdog that
// aborts the job when a collective hangs, e.g. because another rank died or is stuck).
#include "dist/comm.h"

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <numeric>
#include <thread>

#include "backend/cuda_module.h"
#include "core/check.h"
#include "core/error.h"

#ifdef LONGTUNE_HAVE_MPI
#define OMPI_SKIP_MPICXX 1  // the C API only (the C++ bindings need their own library)
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>
#endif

namespace lt {

std::unique_ptr<CommRequest> Communicator::isend_bf16(const uint16_t*, size_t, int dst, int) {
  LT_CHECK(false, "bf16 point to point to rank {} on a {} communicator (host MPI only)", dst,
           backend());
  return nullptr;
}

void Communicator::recv_bf16(uint16_t*, size_t, int src, int) {
  LT_CHECK(false, "bf16 point to point from rank {} on a {} communicator (host MPI only)", src,
           backend());
}

namespace {

int64_t sum_counts(const std::vector<int64_t>& counts) {
  return std::accumulate(counts.begin(), counts.end(), int64_t{0});
}

class LocalCommunicator final : public Communicator {
 public:
  explicit LocalCommunicator(std::string name) { name_ = std::move(name); }
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string_view backend() const override { return "local"; }
  void allreduce_sum(float*, size_t) override {}
  void allreduce_sum(double*, size_t) override {}
  void allreduce_sum(int64_t*, size_t) override {}
  void reduce_scatter_sum(float* recv, const float* send,
                          const std::vector<int64_t>& counts) override {
    LT_CHECK(counts.size() == 1);
    if (recv != send) std::memmove(recv, send, counts[0] * sizeof(float));
  }
  void allgather(float* recv, const float* send, const std::vector<int64_t>& counts) override {
    LT_CHECK(counts.size() == 1);
    if (send && recv != send) std::memmove(recv, send, counts[0] * sizeof(float));
  }
  std::unique_ptr<CommRequest> allgather_async(float* recv, const float* send,
                                               const std::vector<int64_t>& counts) override {
    allgather(recv, send, counts);
    struct Done final : CommRequest {
      void wait() override {}
    };
    return std::make_unique<Done>();
  }
  void alltoall(float* recv, const float* send, size_t n) override {
    if (recv != send) std::memmove(recv, send, n * sizeof(float));
  }
  void send(const float*, size_t, int dst, int) override {
    LT_CHECK(false, "send to rank {} in a world of one", dst);
  }
  void recv(float*, size_t, int src, int) override {
    LT_CHECK(false, "recv from rank {} in a world of one", src);
  }
  std::unique_ptr<CommRequest> isend(const float*, size_t, int dst, int) override {
    LT_CHECK(false, "isend to rank {} in a world of one", dst);
    return nullptr;
  }
  std::unique_ptr<CommRequest> irecv(float*, size_t, int src, int) override {
    LT_CHECK(false, "irecv from rank {} in a world of one", src);
    return nullptr;
  }
  void broadcast(void*, size_t, int root) override { LT_CHECK(root == 0); }
  void barrier() override {}
  std::unique_ptr<Communicator> split(int, int, std::string name) override {
    return std::make_unique<LocalCommunicator>(std::move(name));
  }
};

}  // namespace

std::unique_ptr<Communicator> make_local_communicator(std::string name) {
  return std::make_unique<LocalCommunicator>(std::move(name));
}

bool launched_by_mpi() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "SLURM_STEP_NUM_TASKS"})
    if (std::getenv(v)) return true;
  return false;
}

#ifdef LONGTUNE_HAVE_MPI

namespace {

// One thread per process watching the collective in flight: when it runs past the timeout the
// job is aborted with a message naming the call, its communicator and this rank.
class Watchdog {
 public:
  Watchdog(double timeout_seconds, int world_rank)
      : timeout_(timeout_seconds), rank_(world_rank), thread_([this] { run(); }) {}
  ~Watchdog() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  void begin(const char* op, const std::string& comm) {
    std::lock_guard<std::mutex> lock(mu_);
    op_ = op;
    comm_ = comm;
    start_ = Clock::now();
    active_ = true;
  }
  void end() {
    std::lock_guard<std::mutex> lock(mu_);
    active_ = false;
  }

 private:
  using Clock = std::chrono::steady_clock;
  void run() {
    std::unique_lock<std::mutex> lock(mu_);
    while (!stop_) {
      cv_.wait_for(lock, std::chrono::milliseconds(100));
      if (stop_ || !active_) continue;
      const double secs = std::chrono::duration<double>(Clock::now() - start_).count();
      if (secs <= timeout_) continue;
      std::fprintf(stderr,
                   "longtune: error: rank %d: %s on communicator '%s' did not finish within %.0f s "
                   "(--dist_timeout): another rank died or hangs; aborting the job\n",
                   rank_, op_, comm_.c_str(), timeout_);
      std::fflush(stderr);
      MPI_Abort(MPI_COMM_WORLD, 3);
      std::_Exit(3);  // MPI_Abort does not return; this is the fallback
    }
  }
  const double timeout_;
  const int rank_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false, active_ = false;
  const char* op_ = "";
  std::string comm_;
  Clock::time_point start_;
  std::thread thread_;  // last: starts after the fields above exist
};

// The MPI library for this process: initialised once, finalised when the last communicator
// (which all hold this session) goes away.
class MpiSession {
 public:
  explicit MpiSession(double timeout_seconds) {
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (!initialized) {
      int provided = 0;
      // MPI_Abort may be called from the watchdog thread while the main thread is inside MPI.
      MPI_Init_thread(nullptr, nullptr, MPI_THREAD_MULTIPLE, &provided);
      owns_ = true;
    }
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    int rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    watchdog_ = std::make_unique<Watchdog>(timeout_seconds, rank);
  }
  ~MpiSession() {
    watchdog_.reset();
    if (owns_) MPI_Finalize();
  }
  Watchdog& watchdog() { return *watchdog_; }

 private:
  bool owns_ = false;
  std::unique_ptr<Watchdog> watchdog_;
};

void mpi_check(int rc, const char* what, const std::string& comm) {
  if (rc == MPI_SUCCESS) [[likely]]
    return;
  char msg[MPI_MAX_ERROR_STRING] = {};
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  LT_CHECK(false, "{} on communicator '{}' failed: {}", what, comm, msg);
}

// Counts and displacements as MPI's int arrays (a bucket never reaches 2^31 elements).
struct IntCounts {
  std::vector<int> counts, displs;
  explicit IntCounts(const std::vector<int64_t>& c) {
    int64_t at = 0;
    for (int64_t n : c) {
      LT_CHECK(n >= 0 && n < INT32_MAX && at < INT32_MAX, "count {} at {} too large for MPI", n,
               at);
      counts.push_back(static_cast<int>(n));
      displs.push_back(static_cast<int>(at));
      at += n;
    }
  }
};

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator(std::shared_ptr<MpiSession> session, MPI_Comm comm, bool owns, std::string name)
      : session_(std::move(session)), comm_(comm), owns_(owns) {
    name_ = std::move(name);
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  ~MpiCommunicator() override {
    if (owns_) MPI_Comm_free(&comm_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string_view backend() const override { return "mpi"; }

  void allreduce_sum(float* data, size_t n) override { allreduce(data, n, MPI_FLOAT, 4); }
  void allreduce_sum(double* data, size_t n) override { allreduce(data, n, MPI_DOUBLE, 8); }
  void allreduce_sum(int64_t* data, size_t n) override { allreduce(data, n, MPI_INT64_T, 8); }

  void reduce_scatter_sum(float* recv, const float* send,
                          const std::vector<int64_t>& counts) override {
    LT_CHECK(static_cast<int>(counts.size()) == size_);
    if (size_ == 1) {  // a group of one (a pipeline stage without replicas): nothing to send
      if (recv != send) std::memmove(recv, send, counts[0] * sizeof(float));
      return;
    }
    IntCounts c(counts);
    stats_.reduce_scatter_bytes += sum_counts(counts) * 4;
    ++stats_.calls;
    Watch w(*this, "reduce_scatter");
    mpi_check(MPI_Reduce_scatter(send, recv, c.counts.data(), MPI_FLOAT, MPI_SUM, comm_),
              "MPI_Reduce_scatter", name_);
  }
  void allgather(float* recv, const float* send, const std::vector<int64_t>& counts) override {
    LT_CHECK(static_cast<int>(counts.size()) == size_);
    if (size_ == 1) {
      if (send && recv != send) std::memmove(recv, send, counts[0] * sizeof(float));
      return;
    }
    IntCounts c(counts);
    stats_.allgather_bytes += sum_counts(counts) * 4;
    ++stats_.calls;
    Watch w(*this, "allgather");
    mpi_check(MPI_Allgatherv(send ? send : MPI_IN_PLACE, send ? c.counts[rank_] : 0, MPI_FLOAT,
                             recv, c.counts.data(), c.displs.data(), MPI_FLOAT, comm_),
              "MPI_Allgatherv", name_);
  }
  std::unique_ptr<CommRequest> allgather_async(float* recv, const float* send,
                                               const std::vector<int64_t>& counts) override {
    LT_CHECK(static_cast<int>(counts.size()) == size_);
    auto r = std::make_unique<Request>(this, counts);
    stats_.allgather_bytes += sum_counts(counts) * 4;
    ++stats_.calls;
    mpi_check(
        MPI_Iallgatherv(send ? send : MPI_IN_PLACE, send ? r->c.counts[rank_] : 0, MPI_FLOAT, recv,
                        r->c.counts.data(), r->c.displs.data(), MPI_FLOAT, comm_, &r->request),
        "MPI_Iallgatherv", name_);
    return r;
  }
  void alltoall(float* recv, const float* send, size_t n) override {
    LT_CHECK(n < INT32_MAX);
    stats_.alltoall_bytes += n * size_ * 4;
    ++stats_.calls;
    Watch w(*this, "alltoall");
    mpi_check(MPI_Alltoall(send, static_cast<int>(n), MPI_FLOAT, recv, static_cast<int>(n),
                           MPI_FLOAT, comm_),
              "MPI_Alltoall", name_);
  }
  void send(const float* data, size_t n, int dst, int tag) override {
    LT_CHECK(n < INT32_MAX);
    stats_.p2p_bytes += n * 4;
    ++stats_.calls;
    Watch w(*this, "send");
    mpi_check(MPI_Send(data, static_cast<int>(n), MPI_FLOAT, dst, tag, comm_), "MPI_Send", name_);
  }
  void recv(float* data, size_t n, int src, int tag) override {
    LT_CHECK(n < INT32_MAX);
    ++stats_.calls;
    Watch w(*this, "recv");
    mpi_check(MPI_Recv(data, static_cast<int>(n), MPI_FLOAT, src, tag, comm_, MPI_STATUS_IGNORE),
              "MPI_Recv", name_);
  }
  std::unique_ptr<CommRequest> isend(const float* data, size_t n, int dst, int tag) override {
    LT_CHECK(n < INT32_MAX);
    stats_.p2p_bytes += n * 4;
    ++stats_.calls;
    auto r = std::make_unique<P2pRequest>(this, "isend");
    mpi_check(MPI_Isend(data, static_cast<int>(n), MPI_FLOAT, dst, tag, comm_, &r->request),
              "MPI_Isend", name_);
    return r;
  }
  std::unique_ptr<CommRequest> irecv(float* data, size_t n, int src, int tag) override {
    LT_CHECK(n < INT32_MAX);
    ++stats_.calls;
    auto r = std::make_unique<P2pRequest>(this, "irecv");
    mpi_check(MPI_Irecv(data, static_cast<int>(n), MPI_FLOAT, src, tag, comm_, &r->request),
              "MPI_Irecv", name_);
    return r;
  }
  std::unique_ptr<CommRequest> isend_bf16(const uint16_t* data, size_t n, int dst,
                                          int tag) override {
    LT_CHECK(n < INT32_MAX);
    stats_.p2p_bytes += n * 2;
    ++stats_.calls;
    auto r = std::make_unique<P2pRequest>(this, "isend");
    mpi_check(MPI_Isend(data, static_cast<int>(n), MPI_UINT16_T, dst, tag, comm_, &r->request),
              "MPI_Isend", name_);
    return r;
  }
  void recv_bf16(uint16_t* data, size_t n, int src, int tag) override {
    LT_CHECK(n < INT32_MAX);
    ++stats_.calls;
    Watch w(*this, "recv");
    mpi_check(MPI_Recv(data, static_cast<int>(n), MPI_UINT16_T, src, tag, comm_, MPI_STATUS_IGNORE),
              "MPI_Recv", name_);
  }
  void broadcast(void* data, size_t bytes, int root) override {
    stats_.broadcast_bytes += bytes;
    ++stats_.calls;
    Watch w(*this, "broadcast");
    for (size_t at = 0; at < bytes; at += kChunk) {
      const int n = static_cast<int>(std::min(kChunk, bytes - at));
      mpi_check(MPI_Bcast(static_cast<char*>(data) + at, n, MPI_BYTE, root, comm_), "MPI_Bcast",
                name_);
    }
  }
  void barrier() override {
    ++stats_.calls;
    Watch w(*this, "barrier");
    mpi_check(MPI_Barrier(comm_), "MPI_Barrier", name_);
  }
  std::unique_ptr<Communicator> split(int color, int key, std::string name) override {
    MPI_Comm sub;
    {
      Watch w(*this, "split");
      mpi_check(MPI_Comm_split(comm_, color, key, &sub), "MPI_Comm_split", name_);
    }
    return std::make_unique<MpiCommunicator>(session_, sub, true, std::move(name));
  }

 private:
  static constexpr size_t kChunk = size_t{1} << 30;  // elements (or bytes) per MPI call
  // Scoped watchdog registration of one blocking call.
  struct Watch {
    Watch(MpiCommunicator& c, const char* op) : dog(c.session_->watchdog()) {
      dog.begin(op, c.name_);
    }
    ~Watch() { dog.end(); }
    Watchdog& dog;
  };
  struct Request final : CommRequest {
    Request(MpiCommunicator* owner, const std::vector<int64_t>& counts) : comm(owner), c(counts) {}
    ~Request() override {
      if (request != MPI_REQUEST_NULL) wait();
    }
    void wait() override {
      Watch w(*comm, "allgather (prefetch)");
      mpi_check(MPI_Wait(&request, MPI_STATUS_IGNORE), "MPI_Wait", comm->name_);
    }
    MpiCommunicator* comm;
    IntCounts c;
    MPI_Request request = MPI_REQUEST_NULL;
  };
  struct P2pRequest final : CommRequest {
    P2pRequest(MpiCommunicator* owner, const char* what) : comm(owner), op(what) {}
    ~P2pRequest() override {
      if (request != MPI_REQUEST_NULL) wait();
    }
    void wait() override {
      if (request == MPI_REQUEST_NULL) return;
      Watch w(*comm, op);
      mpi_check(MPI_Wait(&request, MPI_STATUS_IGNORE), "MPI_Wait", comm->name_);
    }
    MpiCommunicator* comm;
    const char* op;
    MPI_Request request = MPI_REQUEST_NULL;
  };
  void allreduce(void* data, size_t n, MPI_Datatype type, size_t elem) {
    if (size_ == 1) return;
    stats_.allreduce_bytes += n * elem;
    ++stats_.calls;
    Watch w(*this, "allreduce");
    for (size_t at = 0; at < n; at += kChunk) {
      const int m = static_cast<int>(std::min(kChunk, n - at));
      mpi_check(MPI_Allreduce(MPI_IN_PLACE, static_cast<char*>(data) + at * elem, m, type, MPI_SUM,
                              comm_),
                "MPI_Allreduce", name_);
    }
  }

  std::shared_ptr<MpiSession> session_;
  MPI_Comm comm_;
  bool owns_;
  int rank_ = 0, size_ = 1;
};

}  // namespace

std::unique_ptr<Communicator> init_world(const WorldOptions& options) {
  if (!launched_by_mpi()) return make_local_communicator();
  if (!(options.timeout_seconds > 0))
    fail("--dist_timeout must be > 0 seconds (got {})", options.timeout_seconds);
  auto session = std::make_shared<MpiSession>(options.timeout_seconds);
  return std::make_unique<MpiCommunicator>(std::move(session), MPI_COMM_WORLD, false, "world");
}

#else  // !LONGTUNE_HAVE_MPI

std::unique_ptr<Communicator> init_world(const WorldOptions&) {
  if (launched_by_mpi()) {
    const char* n = std::getenv("OMPI_COMM_WORLD_SIZE");
    if (!n) n = std::getenv("PMI_SIZE");
    if (n && std::atoi(n) > 1)
      fail(
          "launched by an MPI launcher with {} processes, but longtune was built without MPI "
          "(rebuild with -DLONGTUNE_MPI=ON and an MPI library installed)",
          n);
  }
  return make_local_communicator();
}

#endif

std::unique_ptr<Communicator> make_nccl_communicator(Communicator& group, double timeout_seconds,
                                                     std::string* reason) {
  const CudaModule* m = cuda_module(reason);
  if (m && !m->make_nccl) {
    if (reason) *reason = "the CUDA module was built without NCCL";
    return nullptr;
  }
  return m ? m->make_nccl(group, timeout_seconds, reason) : nullptr;
}

}  // namespace lt
