// Communicators for multi-process training: the Communicator interface (collectives, point to
// point, sub-groups), the trivial world of one process, and the MPI world started by init_world.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "backend/backend.h"

namespace lt {

// Bytes this process handed to each kind of operation (payload sizes, f32 = 4 bytes), and the
// number of calls: the communication benchmarks compare these with the theory.
struct CommStats {
  uint64_t allreduce_bytes = 0, reduce_scatter_bytes = 0, allgather_bytes = 0;
  uint64_t alltoall_bytes = 0, p2p_bytes = 0, broadcast_bytes = 0;
  uint64_t calls = 0;
  uint64_t total_bytes() const {
    return allreduce_bytes + reduce_scatter_bytes + allgather_bytes + alltoall_bytes + p2p_bytes +
           broadcast_bytes;
  }
};

// A started nonblocking operation; wait() blocks (under the watchdog) until it completes.
class CommRequest {
 public:
  virtual ~CommRequest() = default;
  virtual void wait() = 0;
};

// A group of ranks. Counts are in elements; every rank of the group must make the same calls in
// the same order. Failures of the transport abort the job (a rank cannot recover alone), and a
// call that does not finish within the timeout aborts the job with a message naming it.
class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string_view backend() const = 0;  // "local", "mpi", "nccl"
  // True when float collectives and point-to-point calls take device pointers (NCCL); else
  // they take host memory (MPI, local).
  virtual bool device_memory() const { return false; }
  const std::string& name() const { return name_; }
  const CommStats& stats() const { return stats_; }
  void reset_stats() { stats_ = {}; }

  // data (n) = sum over the group of every rank's data (n), in place.
  virtual void allreduce_sum(float* data, size_t n) = 0;
  virtual void allreduce_sum(double* data, size_t n) = 0;
  virtual void allreduce_sum(int64_t* data, size_t n) = 0;
  // send (sum of counts) is summed over the group; rank r receives the elements
  // [counts[0] + ... + counts[r-1], + counts[r]) of the sum into recv (counts[r]) (overwritten).
  virtual void reduce_scatter_sum(float* recv, const float* send,
                                  const std::vector<int64_t>& counts) = 0;
  // recv (sum of counts) = every rank's send (counts[r]) concatenated in rank order. send ==
  // nullptr: in place, this rank's part already sits at its position in recv.
  virtual void allgather(float* recv, const float* send, const std::vector<int64_t>& counts) = 0;
  // allgather started now, completed by the request's wait() (ZeRO-3 prefetch).
  virtual std::unique_ptr<CommRequest> allgather_async(float* recv, const float* send,
                                                       const std::vector<int64_t>& counts) = 0;
  // send (size * n): block j goes to rank j; recv (size * n): block j came from rank j.
  virtual void alltoall(float* recv, const float* send, size_t n) = 0;
  virtual void send(const float* data, size_t n, int dst, int tag) = 0;
  virtual void recv(float* data, size_t n, int src, int tag) = 0;
  // Nonblocking point to point: the buffer must stay valid (and, for isend, unchanged) until
  // wait() returns. Messages between two ranks with the same tag arrive in the order sent.
  virtual std::unique_ptr<CommRequest> isend(const float* data, size_t n, int dst, int tag) = 0;
  virtual std::unique_ptr<CommRequest> irecv(float* data, size_t n, int src, int tag) = 0;
  // The same for n 16-bit values in host memory (the bf16 residual stream between pipeline
  // stages: half the bytes). Host communicators (MPI); the others refuse with their name.
  virtual std::unique_ptr<CommRequest> isend_bf16(const uint16_t* data, size_t n, int dst, int tag);
  virtual void recv_bf16(uint16_t* data, size_t n, int src, int tag);
  // bytes at data on root are copied to every rank.
  virtual void broadcast(void* data, size_t bytes, int root) = 0;
  virtual void barrier() = 0;
  // Ranks passing the same color form a new group, ordered by key (then by rank here).
  virtual std::unique_ptr<Communicator> split(int color, int key, std::string name) = 0;

 protected:
  std::string name_ = "world";
  CommStats stats_;
};

// The world of one process: every collective is a copy (or nothing).
std::unique_ptr<Communicator> make_local_communicator(std::string name = "world");

// How init_world starts the world.
struct WorldOptions {
  double timeout_seconds = 600;  // a collective running longer aborts the whole job
};

// True when this process was started by an MPI launcher (mpirun / mpiexec / srun): it looks for
// OMPI_COMM_WORLD_SIZE, PMI_SIZE, PMIX_RANK or SLURM_STEP_NUM_TASKS in the environment.
bool launched_by_mpi();
// The world: MPI_COMM_WORLD when launched by MPI (MPI_Init_thread is called here and
// MPI_Finalize when the last communicator of that world is destroyed), else the local world of
// one. UserError when launched by MPI but longtune was built without it.
std::unique_ptr<Communicator> init_world(const WorldOptions& options);

// Float collectives and point-to-point calls on device buffers of `be` over a host
// communicator (MPI), staged through host memory; the rest as `host` does it
// (src/dist/staged_comm.cpp). The fallback of a device backend without NCCL.
std::unique_ptr<Communicator> make_staged_communicator(Communicator& host, Backend& be);

// The NCCL communicator over the ranks of `group` (src/dist/nccl_comm.cpp, built with CUDA and
// NCCL): bootstrapped over it (its rank 0 creates the ncclUniqueId and broadcasts it); float
// collectives and point-to-point calls take device pointers, the rest (doubles, int64, bytes,
// barrier, split) go over `group`. Null with `reason` set when NCCL was not built.
std::unique_ptr<Communicator> make_nccl_communicator(Communicator& group, double timeout_seconds,
                                                     std::string* reason);

}  // namespace lt
