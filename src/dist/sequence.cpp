// Sequence-parallel layouts, shards and the all-to-all (see sequence.h).
#include "dist/sequence.h"

#include <algorithm>

#include "core/check.h"

namespace lt {

namespace {
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
}  // namespace

SequenceLayout sequence_layout(int64_t tokens, int64_t degree, int64_t chunk) {
  LT_CHECK(tokens >= 0 && degree >= 1 && chunk >= 0 && chunk % degree == 0,
           "sequence of {} tokens over {} ranks, chunk {}", tokens, degree, chunk);
  SequenceLayout s;
  s.degree = degree;
  const int64_t n = std::max<int64_t>(tokens, 1);
  s.chunks = chunk > 0 ? ceil_div(n, chunk) : 1;
  s.chunk_tokens = ceil_div(ceil_div(n, s.chunks), degree) * degree;
  return s;
}

int64_t sequence_max_local_tokens(int64_t max_tokens, int64_t degree, int64_t chunk) {
  // u c = u * ceil(ceil(N/u) / P) <= (N + u P - 1) / P, so ceil(N/P) + u - 1 bounds it.
  const int64_t n = std::max<int64_t>(max_tokens, 1);
  const int64_t u = chunk > 0 ? ceil_div(n, chunk) : 1;
  return ceil_div(n, degree) + u - 1;
}

MicroBatch sequence_shard(const MicroBatch& mb, int64_t degree, int64_t rank, int64_t chunk) {
  LT_CHECK(rank >= 0 && rank < degree);
  const SequenceLayout lay = sequence_layout(mb.num_tokens(), degree, chunk);
  const int64_t N = mb.num_tokens(), S = lay.padded_tokens(), c = lay.local_per_chunk();
  // The whole padded sequence: document ids (padding: a document of its own), the original
  // row of every token (padding: row `rows`) and each row's RoPE length.
  const int64_t rows = mb.row_start.empty() ? 0 : int64_t(mb.row_start.size()) - 1;
  int32_t pad_doc = 0;
  for (int32_t d : mb.docs) pad_doc = std::max(pad_doc, d + 1);
  std::vector<int32_t> row_of(S, int32_t(rows)), rope_len(rows + 1, 1);
  for (int64_t r = 0; r < rows; ++r) {
    int32_t mx = 0;
    for (int64_t t = mb.row_start[r]; t < mb.row_start[r + 1]; ++t) {
      row_of[t] = int32_t(r);
      mx = std::max(mx, mb.pos[t]);
    }
    rope_len[r] = mb.rope_len.empty() ? mx + 1 : mb.rope_len[r];
  }
  MicroBatch out;
  out.seq_docs.resize(S);
  for (int64_t g = 0; g < S; ++g) out.seq_docs[g] = g < N ? mb.docs[g] : pad_doc;
  out.seq_chunks = lay.chunks;
  out.seq_row0 = rank * c;
  const int64_t n = lay.local_tokens();
  out.ids.resize(n);
  out.pos.resize(n);
  out.docs.resize(n);
  out.targets.resize(n);
  int32_t prev_row = -1;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t g = (t / c) * lay.chunk_tokens + rank * c + t % c;
    const bool real = g < N;
    out.ids[t] = real ? mb.ids[g] : 0;
    out.pos[t] = real ? mb.pos[g] : 0;
    out.docs[t] = out.seq_docs[g];
    out.targets[t] = real ? mb.targets[g] : kIgnoreIndex;
    // A local row is a run of tokens of the same original row (RoPE scaling is per row).
    if (row_of[g] != prev_row) {
      out.row_start.push_back(t);
      out.rope_len.push_back(rope_len[row_of[g]]);
      prev_row = row_of[g];
    }
  }
  out.row_start.push_back(n);
  return out;
}

CommSequenceExchange::CommSequenceExchange(Communicator& comm, Backend& backend)
    : comm_(comm), be_(backend) {}

CommSequenceExchange::~CommSequenceExchange() {
  be_.free_pinned(host_send_);
  be_.free_pinned(host_recv_);
}

void CommSequenceExchange::alltoall(float* recv, const float* send, size_t n) {
  const size_t total = n * size_t(comm_.size());
  if (be_.host_addressable() || comm_.device_memory()) return comm_.alltoall(recv, send, n);
  if (total > host_floats_) {  // staging grows to the largest exchange, once
    be_.free_pinned(host_send_);
    be_.free_pinned(host_recv_);
    host_send_ = static_cast<float*>(be_.alloc_pinned(total * 4));
    host_recv_ = static_cast<float*>(be_.alloc_pinned(total * 4));
    host_floats_ = total;
  }
  be_.copy_to_host(host_send_, send, total * 4);
  comm_.alltoall(host_recv_, host_send_, n);
  be_.copy_to_device(recv, host_recv_, total * 4);
}

}  // namespace lt
