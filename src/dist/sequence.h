// Sequence parallelism (DeepSpeed-Ulysses, Jacobs et al. 2023, arXiv 2309.14509; FPDT, Yao et
// al. 2024, arXiv 2408.16978): how a micro-batch's tokens are padded and dealt out to the P
// ranks of a sequence group, and the all-to-all the model runs around attention.
//
// The sequence of N tokens is cut into `chunks` chunks of Ce tokens (Ce a multiple of P; one
// chunk without FPDT) and padded to S = chunks x Ce with tokens of their own document and no
// label (they see only one another and add nothing to the loss or any gradient). Rank r holds
// the r-th Ce / P tokens of every chunk, so that after the all-to-all each chunk is a contiguous
// range of the sequence for H / P heads (FPDT's interleaving).
#pragma once
#include <cstdint>
#include <vector>

#include "backend/backend.h"
#include "dist/comm.h"
#include "model/llama.h"

namespace lt {

struct SequenceLayout {
  int64_t degree = 1;                                                  // P
  int64_t chunks = 1;                                                  // u
  int64_t chunk_tokens = 0;                                            // Ce (a multiple of P)
  int64_t local_per_chunk() const { return chunk_tokens / degree; }    // c
  int64_t local_tokens() const { return chunks * local_per_chunk(); }  // u x c
  int64_t padded_tokens() const { return chunks * chunk_tokens; }      // S
};

// The layout of a sequence of `tokens` (>= 0) over `degree` ranks with FPDT chunks of at most
// `chunk` tokens (0: one chunk).
SequenceLayout sequence_layout(int64_t tokens, int64_t degree, int64_t chunk);
// The most local tokens of any sequence of at most max_tokens tokens (the model's max_tokens).
int64_t sequence_max_local_tokens(int64_t max_tokens, int64_t degree, int64_t chunk);
// Rank `rank`'s share of mb (which may be empty), with seq_docs, seq_chunks and rope_len set.
MicroBatch sequence_shard(const MicroBatch& mb, int64_t degree, int64_t rank, int64_t chunk);

// The model's all-to-all over a communicator. Device buffers go to the communicator directly
// when it can read them (a host-addressable backend, or a device communicator such as NCCL),
// else through pinned host staging buffers.
class CommSequenceExchange final : public SequenceExchange {
 public:
  CommSequenceExchange(Communicator& comm, Backend& backend);
  ~CommSequenceExchange() override;
  int degree() const override { return comm_.size(); }
  int rank() const override { return comm_.rank(); }
  void alltoall(float* recv, const float* send, size_t n) override;

 private:
  Communicator& comm_;
  Backend& be_;
  float *host_send_ = nullptr, *host_recv_ = nullptr;
  size_t host_floats_ = 0;
};

}  // namespace lt
