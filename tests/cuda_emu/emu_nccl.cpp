// The NCCL stand-in of emu_nccl.h, over MPI (the ranks' own MPI world).
#include "emu_nccl.h"

#include <mpi.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <vector>

struct ncclComm {
  MPI_Comm mpi = MPI_COMM_NULL;
  int rank = 0, size = 0;
};

namespace {

// One call's MPI operations, started (nonblocking) when its stream reaches it; its host copies
// of send buffers live in `staged` until the requests complete.
struct Call {
  std::function<void(std::vector<MPI_Request>&, std::vector<std::vector<float>>&)> start;
  cudaStream_t stream;
};

int group_depth = 0;
std::vector<Call> grouped;  // the calls since the outermost ncclGroupStart

void run_calls(const std::vector<Call>& calls) {
  std::vector<MPI_Request> requests;
  std::vector<std::vector<float>> staged;
  staged.reserve(calls.size() * 2);
  for (const Call& c : calls) c.start(requests, staged);
  MPI_Waitall(int(requests.size()), requests.data(), MPI_STATUSES_IGNORE);
}

ncclResult_t submit(Call call) {
  if (group_depth > 0) {
    grouped.push_back(std::move(call));
    return ncclSuccess;
  }
  auto calls = std::make_shared<std::vector<Call>>(1, call);
  lt::cuda_emu::enqueue(call.stream, "nccl", [calls] { run_calls(*calls); });
  return ncclSuccess;
}

bool valid(ncclComm_t comm, ncclDataType_t type) {
  return comm && comm->mpi != MPI_COMM_NULL && type == ncclFloat;
}

// A host copy of count floats at p (the send buffer may be the receive buffer).
const float* stage(std::vector<std::vector<float>>& staged, const void* p, size_t count) {
  const auto* f = static_cast<const float*>(p);
  staged.emplace_back(f, f + count);
  return staged.back().data();
}

}  // namespace

const char* ncclGetErrorString(ncclResult_t result) {
  switch (result) {
    case ncclSuccess:
      return "no error (emulated NCCL)";
    case ncclSystemError:
      return "system error: MPI is not initialized (emulated NCCL)";
    case ncclInvalidArgument:
      return "invalid argument (emulated NCCL: float sums only)";
    case ncclInvalidUsage:
      return "invalid usage (emulated NCCL)";
  }
  return "unknown (emulated NCCL)";
}

ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
  std::memset(id->internal, 0, sizeof id->internal);
  std::random_device rd;
  const uint64_t v = (uint64_t(rd()) << 32) ^ rd();
  std::memcpy(id->internal, &v, sizeof v);
  return ncclSuccess;
}

ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) return ncclSystemError;
  uint64_t v = 0;
  std::memcpy(&v, id.internal, sizeof v);
  auto c = std::make_unique<ncclComm>();
  // Every rank of the world calls this once per communicator, in the same order (see the header):
  // the ranks holding the same id form the communicator, ordered by their rank in it.
  MPI_Comm_split(MPI_COMM_WORLD, int(v & 0x3fffffff), rank, &c->mpi);
  MPI_Comm_rank(c->mpi, &c->rank);
  MPI_Comm_size(c->mpi, &c->size);
  if (c->size != nranks || c->rank != rank) {
    std::fprintf(stderr, "emulated NCCL: communicator of %d ranks, %d expected (rank %d, %d)\n",
                 c->size, nranks, c->rank, rank);
    MPI_Comm_free(&c->mpi);
    return ncclInvalidUsage;
  }
  *comm = c.release();
  return ncclSuccess;
}

ncclResult_t ncclCommDestroy(ncclComm_t comm) {
  if (!comm) return ncclInvalidArgument;
  if (comm->mpi != MPI_COMM_NULL) {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Comm_free(&comm->mpi);
  }
  delete comm;
  return ncclSuccess;
}

ncclResult_t ncclCommAbort(ncclComm_t comm) { return ncclCommDestroy(comm); }

ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* async_error) {
  if (!comm) return ncclInvalidArgument;
  *async_error = ncclSuccess;
  return ncclSuccess;
}

ncclResult_t ncclGroupStart() {
  ++group_depth;
  return ncclSuccess;
}

ncclResult_t ncclGroupEnd() {
  if (group_depth == 0) return ncclInvalidUsage;
  if (--group_depth > 0 || grouped.empty()) return ncclSuccess;
  auto calls = std::make_shared<std::vector<Call>>(std::move(grouped));
  grouped.clear();
  for (const Call& c : *calls)
    if (c.stream != calls->front().stream) return ncclInvalidUsage;  // one stream per group here
  lt::cuda_emu::enqueue(calls->front().stream, "nccl group", [calls] { run_calls(*calls); });
  return ncclSuccess;
}

ncclResult_t ncclAllReduce(const void* send, void* recv, size_t count, ncclDataType_t type,
                           ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream) {
  if (!valid(comm, type) || op != ncclSum) return ncclInvalidArgument;
  return submit({[=](auto& requests, auto& staged) {
                   requests.emplace_back();
                   MPI_Iallreduce(stage(staged, send, count), recv, int(count), MPI_FLOAT, MPI_SUM,
                                  comm->mpi, &requests.back());
                 },
                 stream});
}

ncclResult_t ncclReduceScatter(const void* send, void* recv, size_t recv_count, ncclDataType_t type,
                               ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream) {
  if (!valid(comm, type) || op != ncclSum) return ncclInvalidArgument;
  return submit({[=](auto& requests, auto& staged) {
                   requests.emplace_back();
                   MPI_Ireduce_scatter_block(stage(staged, send, recv_count * comm->size), recv,
                                             int(recv_count), MPI_FLOAT, MPI_SUM, comm->mpi,
                                             &requests.back());
                 },
                 stream});
}

ncclResult_t ncclReduce(const void* send, void* recv, size_t count, ncclDataType_t type,
                        ncclRedOp_t op, int root, ncclComm_t comm, cudaStream_t stream) {
  if (!valid(comm, type) || op != ncclSum || root < 0 || root >= comm->size)
    return ncclInvalidArgument;
  return submit({[=](auto& requests, auto& staged) {
                   requests.emplace_back();
                   MPI_Ireduce(stage(staged, send, count), comm->rank == root ? recv : nullptr,
                               int(count), MPI_FLOAT, MPI_SUM, root, comm->mpi, &requests.back());
                 },
                 stream});
}

ncclResult_t ncclAllGather(const void* send, void* recv, size_t send_count, ncclDataType_t type,
                           ncclComm_t comm, cudaStream_t stream) {
  if (!valid(comm, type)) return ncclInvalidArgument;
  return submit({[=](auto& requests, auto& staged) {
                   requests.emplace_back();
                   MPI_Iallgather(stage(staged, send, send_count), int(send_count), MPI_FLOAT, recv,
                                  int(send_count), MPI_FLOAT, comm->mpi, &requests.back());
                 },
                 stream});
}

ncclResult_t ncclBroadcast(const void* send, void* recv, size_t count, ncclDataType_t type,
                           int root, ncclComm_t comm, cudaStream_t stream) {
  if (!valid(comm, type) || root < 0 || root >= comm->size) return ncclInvalidArgument;
  return submit({[=](auto& requests, auto&) {
                   if (comm->rank == root && send != recv) std::memmove(recv, send, count * 4);
                   requests.emplace_back();
                   MPI_Ibcast(recv, int(count), MPI_FLOAT, root, comm->mpi, &requests.back());
                 },
                 stream});
}

ncclResult_t ncclSend(const void* send, size_t count, ncclDataType_t type, int peer,
                      ncclComm_t comm, cudaStream_t stream) {
  if (!valid(comm, type) || peer < 0 || peer >= comm->size) return ncclInvalidArgument;
  return submit({[=](auto& requests, auto& staged) {
                   requests.emplace_back();
                   MPI_Isend(stage(staged, send, count), int(count), MPI_FLOAT, peer, 0, comm->mpi,
                             &requests.back());
                 },
                 stream});
}

ncclResult_t ncclRecv(void* recv, size_t count, ncclDataType_t type, int peer, ncclComm_t comm,
                      cudaStream_t stream) {
  if (!valid(comm, type) || peer < 0 || peer >= comm->size) return ncclInvalidArgument;
  return submit({[=](auto& requests, auto&) {
                   requests.emplace_back();
                   MPI_Irecv(recv, int(count), MPI_FLOAT, peer, 0, comm->mpi, &requests.back());
                 },
                 stream});
}
