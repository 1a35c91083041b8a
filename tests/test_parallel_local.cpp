// The parallel layouts inside one process: sequence shards (every token exactly once, padding
// inert), FPDT's chunked attention on one rank, DeepSpeed-Ulysses and FPDT over P ranks run as
// threads exchanging through shared memory, and pipeline stages with micro-batches in flight.
// Each gives the loss and every gradient of the plain one-process model.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <omp.h>

#include <barrier>
#include <cmath>
#include <cstring>
#include <map>
#include <random>
#include <thread>

#include "backend/backend.h"
#include "dist/sequence.h"
#include "model/llama.h"
#include "model/presets.h"
#include "train/batching.h"

namespace lt {
namespace {

ModelConfig config(int64_t heads, int64_t kv_heads, int64_t window, bool tied) {
  nlohmann::json j = {{"architectures", {window ? "MistralForCausalLM" : "LlamaForCausalLM"}},
                      {"model_type", window ? "mistral" : "llama"},
                      {"hidden_size", 32},
                      {"intermediate_size", 40},
                      {"num_hidden_layers", 3},
                      {"num_attention_heads", heads},
                      {"num_key_value_heads", kv_heads},
                      {"head_dim", 8},
                      {"vocab_size", 37},
                      {"max_position_embeddings", 256},
                      {"rms_norm_eps", 1e-5},
                      {"rope_theta", 10000.0},
                      {"tie_word_embeddings", tied}};
  if (window) j["sliding_window"] = window;
  return parse_model_config(j, "parallel test config");
}

// Rows of random lengths; some labels ignored; packed two or three rows per micro-batch.
std::vector<Example> rows(int64_t n, int64_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<Example> out(n);
  for (auto& e : out) {
    const int64_t len = 5 + int64_t(rng() % 40);
    for (int64_t t = 0; t < len; ++t) e.input_ids.push_back(int32_t(rng() % vocab));
    e.labels = e.input_ids;
    for (int64_t t = 0; t < len; ++t)
      if (rng() % 5 == 0) e.labels[t] = kIgnoreIndex;
  }
  return out;
}

std::vector<MicroBatch> batches(const std::vector<Example>& r, size_t per_batch) {
  std::vector<MicroBatch> out;
  for (size_t i = 0; i < r.size(); i += per_batch) {
    std::vector<const Example*> ptrs;
    for (size_t j = i; j < std::min(r.size(), i + per_batch); ++j) ptrs.push_back(&r[j]);
    out.push_back(make_micro_batch(ptrs));
  }
  return out;
}

using Named = std::map<std::string, std::vector<float>>;

// Loss sum and gradients (by Hugging Face name) of a model over micro-batches, each scaled by
// 1 / the labelled tokens of all of them (one optimizer step).
struct Result {
  double loss = 0;
  Named grads;
};

// Base weights by Hugging Face name, LoRA adapters (when the model has them) by PEFT name.
void load(LlamaModel& m, const Named& weights) {
  Backend& be = m.backend();
  for (const auto& p : m.table().params())
    be.copy_to_device(m.params() + p.offset, weights.at(p.name).data(), p.numel * 4);
  for (const auto& t : m.lora_table().tensors())
    be.copy_to_device(m.lora_params() + t.offset, weights.at(t.name).data(), t.numel * 4);
}

// The trainable tensors' gradients: the base's (full fine-tuning) or the adapters' (LoRA).
Named grads_of(LlamaModel& m) {
  Named g;
  Backend& be = m.backend();
  if (m.grads())
    for (const auto& p : m.table().params()) g[p.name] = be.download(m.grads() + p.offset, p.numel);
  for (const auto& t : m.lora_table().tensors())
    g[t.name] = be.download(m.lora_grads() + t.offset, t.numel);
  return g;
}

int64_t targets(const std::vector<MicroBatch>& mbs) {
  int64_t n = 0;
  for (const auto& mb : mbs) n += mb.num_targets();
  return n;
}

// LoRA r=4 on every projection with dropout p (PEFT's lora_dropout): the masks are keyed by each
// token's index in the whole sequence, so every layout drops the same elements.
LoraSpec lora_spec(double p) {
  LoraOptions o;
  o.use_peft_lora = true;
  o.r = 4;
  o.target_modules = "all-linear";
  o.dropout = p;
  return resolve_lora(o, 11);
}

// Random base weights and, with `lora`, random adapters (B too, so every path of the masks
// reaches a gradient).
Named random_weights(const ModelConfig& c, const LoraSpec& lora = {}) {
  const ParamTable t(c);
  std::vector<float> block(t.total_numel());
  init_random_weights(t, block.data(), 0.25, 5);
  Named w;
  for (const auto& p : t.params())
    w[p.name].assign(block.begin() + p.offset, block.begin() + p.offset + p.numel);
  if (lora.enabled) {
    std::mt19937 rng(17);
    std::uniform_real_distribution<float> u(-0.3f, 0.3f);
    const LoraTable table(c, lora);
    for (const auto& a : table.tensors()) {
      auto& v = w[a.name];
      v.resize(a.numel);
      for (float& x : v) x = u(rng);
    }
  }
  return w;
}

Result reference(const ModelConfig& c, const Named& w, const std::vector<MicroBatch>& mbs,
                 const LoraSpec& lora = {}) {
  auto be = make_cpu_backend();
  RunSettings rs;
  rs.lora = lora;
  for (const auto& mb : mbs) rs.max_tokens = std::max(rs.max_tokens, mb.num_tokens());
  LlamaModel m(c, *be, rs);
  load(m, w);
  m.zero_grads();
  Result r;
  const float scale = 1.0f / float(targets(mbs));
  for (const auto& mb : mbs) r.loss += m.forward_backward(mb, scale);
  r.grads = grads_of(m);
  return r;
}

void expect_same(const Result& want, const Result& got, double tol, const std::string& what) {
  EXPECT_NEAR(got.loss, want.loss, tol * std::fabs(want.loss)) << what << ": loss sum";
  double scale = 0;
  for (const auto& [n, g] : want.grads)
    for (float x : g) scale = std::max(scale, double(std::fabs(x)));
  double worst = 0;
  std::string at;
  for (const auto& [n, g] : want.grads) {
    ASSERT_TRUE(got.grads.count(n)) << what << ": no gradient for " << n;
    const auto& h = got.grads.at(n);
    ASSERT_EQ(h.size(), g.size()) << n;
    for (size_t i = 0; i < g.size(); ++i) {
      const double d = std::fabs(double(g[i]) - double(h[i]));
      if (d > worst) worst = d, at = fmt::format("{}[{}]: {} vs {}", n, i, h[i], g[i]);
    }
  }
  EXPECT_LE(worst, tol * scale) << what << ": worst gradient element " << at << " (max |g| "
                                << scale << ")";
}

// ---- Shards ---------------------------------------------------------------------------------

TEST(SequenceShard, EveryTokenOnceInFpdtOrderPaddingInert) {
  const auto r = rows(3, 37, 1);
  const MicroBatch mb = batches(r, 3)[0];
  const int64_t N = mb.num_tokens();
  for (int64_t P : {1, 2, 3, 4}) {
    for (int64_t chunk : {int64_t(0), 4 * P, 12 * P}) {
      SCOPED_TRACE(fmt::format("P {} chunk {}", P, chunk));
      const SequenceLayout lay = sequence_layout(N, P, chunk);
      EXPECT_GE(lay.padded_tokens(), N);
      EXPECT_LT(lay.padded_tokens(), N + lay.chunks * P);  // less than P of padding a chunk
      EXPECT_EQ(lay.chunk_tokens % P, 0);
      if (chunk) {
        EXPECT_LE(lay.chunk_tokens, chunk);
      }
      EXPECT_LE(lay.local_tokens(), sequence_max_local_tokens(N, P, chunk));
      std::vector<int> seen(lay.padded_tokens(), 0);
      for (int64_t rank = 0; rank < P; ++rank) {
        const MicroBatch s = sequence_shard(mb, P, rank, chunk);
        ASSERT_EQ(s.num_tokens(), lay.local_tokens());
        ASSERT_EQ(int64_t(s.seq_docs.size()), lay.padded_tokens());
        EXPECT_EQ(s.seq_chunks, lay.chunks);
        const int64_t c = lay.local_per_chunk();
        for (int64_t t = 0; t < s.num_tokens(); ++t) {
          // Chunk i's c tokens of rank r are the chunk's r-th part.
          const int64_t g = (t / c) * lay.chunk_tokens + rank * c + t % c;
          ++seen[g];
          if (g < N) {
            EXPECT_EQ(s.ids[t], mb.ids[g]);
            EXPECT_EQ(s.pos[t], mb.pos[g]);
            EXPECT_EQ(s.targets[t], mb.targets[g]);
          } else {
            EXPECT_EQ(s.targets[t], kIgnoreIndex) << "padding carries no label";
          }
          EXPECT_EQ(s.docs[t], s.seq_docs[g]);
        }
        int64_t labels = 0;
        for (int32_t y : s.targets) labels += y != kIgnoreIndex;
        EXPECT_LE(labels, mb.num_targets());
        ASSERT_EQ(s.rope_len.size() + 1, s.row_start.size());
      }
      for (int64_t g = 0; g < lay.padded_tokens(); ++g) ASSERT_EQ(seen[g], 1) << "token " << g;
      // Padding is a document of its own: no real token shares it.
      const MicroBatch s0 = sequence_shard(mb, P, 0, chunk);
      for (int64_t g = N; g < lay.padded_tokens(); ++g)
        for (int64_t t = 0; t < N; ++t) ASSERT_NE(s0.seq_docs[g], mb.docs[t]);
    }
  }
  // An empty micro-batch still gives every rank a token (no label).
  const MicroBatch empty;
  const MicroBatch e = sequence_shard(empty, 2, 1, 0);
  EXPECT_EQ(e.num_tokens(), 1);
  EXPECT_EQ(e.targets[0], kIgnoreIndex);
}

// ---- Sequence parallel over threads --------------------------------------------------------

// An all-to-all between threads: each posts its send buffer, then reads its blocks.
class ThreadGroup {
 public:
  explicit ThreadGroup(int n) : n_(n), bar_(n), sends_(n) {}
  void alltoall(int rank, float* recv, const float* send, size_t count) {
    sends_[rank] = send;
    bar_.arrive_and_wait();
    for (int j = 0; j < n_; ++j) std::memcpy(recv + j * count, sends_[j] + rank * count, count * 4);
    bar_.arrive_and_wait();  // nobody reuses its send buffer before every rank has read it
  }
  int size() const { return n_; }

 private:
  int n_;
  std::barrier<> bar_;
  std::vector<const float*> sends_;
};

class ThreadExchange final : public SequenceExchange {
 public:
  ThreadExchange(ThreadGroup& g, int rank) : g_(g), rank_(rank) {}
  int degree() const override { return g_.size(); }
  int rank() const override { return rank_; }
  void alltoall(float* recv, const float* send, size_t n) override {
    g_.alltoall(rank_, recv, send, n);
  }

 private:
  ThreadGroup& g_;
  int rank_;
};

struct SpCase {
  int64_t heads, kv_heads, window, P, chunk;
  bool checkpointing;
  int64_t mini_sequence;
  double lora_dropout = -1;  // >= 0: LoRA with this dropout
  LoraSpec lora() const { return lora_dropout >= 0 ? lora_spec(lora_dropout) : LoraSpec{}; }
  std::string name() const {
    return fmt::format("H{}_KVH{}_w{}_P{}_chunk{}{}_ms{}{}", heads, kv_heads, window, P, chunk,
                       checkpointing ? "_ckpt" : "", mini_sequence,
                       lora_dropout >= 0 ? "_lora_dropout" : "");
  }
};

// P ranks (threads), each with its shard of every micro-batch; gradients summed over ranks.
Result sequence_parallel(const ModelConfig& c, const Named& w, const std::vector<MicroBatch>& mbs,
                         const SpCase& k) {
  int64_t max_tokens = 0;
  for (const auto& mb : mbs) max_tokens = std::max(max_tokens, mb.num_tokens());
  ThreadGroup group(int(k.P));
  std::vector<Result> per_rank(k.P);
  const float scale = 1.0f / float(targets(mbs));
  std::vector<std::thread> threads;
  for (int r = 0; r < k.P; ++r)
    threads.emplace_back([&, r] {
      omp_set_num_threads(1);
      auto be = make_cpu_backend();
      RunSettings rs;
      rs.max_tokens = sequence_max_local_tokens(max_tokens, k.P, k.chunk);
      rs.sp_degree = k.P;
      rs.seq_chunk = k.chunk;
      rs.checkpointing = k.checkpointing;
      rs.mlp_chunks = rs.lm_head_chunks = k.mini_sequence;
      rs.lora = k.lora();
      LlamaModel m(c, *be, rs);
      ThreadExchange x(group, r);
      m.set_sequence_exchange(&x);
      load(m, w);
      m.zero_grads();
      for (const auto& mb : mbs)
        per_rank[r].loss += m.forward_backward(sequence_shard(mb, k.P, r, k.chunk), scale);
      per_rank[r].grads = grads_of(m);
    });
  for (auto& t : threads) t.join();
  Result sum = per_rank[0];
  for (int r = 1; r < k.P; ++r) {
    sum.loss += per_rank[r].loss;
    for (auto& [n, g] : sum.grads)
      for (size_t i = 0; i < g.size(); ++i) g[i] += per_rank[r].grads[n][i];
  }
  return sum;
}

void PrintTo(const SpCase& k, std::ostream* os) { *os << k.name(); }

class SequenceParallel : public ::testing::TestWithParam<SpCase> {};

TEST_P(SequenceParallel, SameLossAndGradientsAsOneRank) {
  const SpCase k = GetParam();
  const ModelConfig c = config(k.heads, k.kv_heads, k.window, false);
  const Named w = random_weights(c, k.lora());
  const auto r = rows(7, c.vocab_size, 3);
  const auto mbs = batches(r, 3);  // packed rows: documents never attend to one another
  const Result want = reference(c, w, mbs, k.lora());
  expect_same(want, sequence_parallel(c, w, mbs, k), 2e-5, k.name());
}

INSTANTIATE_TEST_SUITE_P(
    Layouts, SequenceParallel,
    ::testing::Values(SpCase{4, 2, 0, 1, 16, false, 1},        // FPDT on one rank: chunks only
                      SpCase{4, 2, 0, 2, 0, false, 1},         // Ulysses, GQA
                      SpCase{4, 2, 0, 2, 0, true, 3},          // + checkpointing, mini-sequence
                      SpCase{4, 2, 11, 2, 0, false, 1},        // sliding window
                      SpCase{4, 2, 0, 2, 16, false, 1},        // FPDT over 2 ranks
                      SpCase{4, 2, 11, 2, 12, true, 2},        // FPDT, window, checkpointing
                      SpCase{4, 2, 0, 1, 8, true, 4},          // many chunks, MLP sub-chunks
                      SpCase{4, 2, 7, 2, 8, false, 5},         // FPDT, window, no recompute
                      SpCase{4, 4, 0, 4, 0, false, 1},         // Ulysses over 4
                      SpCase{4, 4, 0, 4, 24, false, 1},        // FPDT over 4
                      SpCase{4, 2, 0, 2, 0, false, 2, 0.3},    // Ulysses, LoRA with dropout
                      SpCase{4, 2, 0, 2, 8, true, 3, 0.3},     // FPDT chunks, LoRA with dropout
                      SpCase{4, 4, 0, 4, 24, false, 2, 0.3}),  // FPDT over 4, LoRA dropout
    [](const auto& info) { return info.param.name(); });

// ---- Pipeline stages -----------------------------------------------------------------------

// Stages [0, 1) and [1, 3) with micro-batches in flight in 1F1B order (forward 0, forward 1,
// then backward 0, forward 2, backward 1, ...): the union of the stages' gradients equals the
// whole model's (tied embeddings: the two copies' gradients add up to the one tensor's).
// With `offload` on the guarded device backend: checkpoints staged out and back in per slot,
// the copies deferred to the last moment the Backend contract allows.
void expect_pipeline_matches(bool tied, bool checkpointing, bool offload = false) {
  const ModelConfig c = config(4, 2, 0, tied);
  const Named w = random_weights(c);
  const auto r = rows(8, c.vocab_size, 9);
  const auto mbs = batches(r, 2);
  const Result want = reference(c, w, mbs);
  int64_t max_tokens = 0;
  for (const auto& mb : mbs) max_tokens = std::max(max_tokens, mb.num_tokens());
  auto be = make_backend(offload ? "cpu-guarded" : "cpu");
  RunSettings s0, s1;
  s0.max_tokens = s1.max_tokens = max_tokens;
  s0.checkpointing = s1.checkpointing = checkpointing;
  s0.offload_checkpoints = s1.offload_checkpoints = offload;
  s0.offload_dir = s1.offload_dir = "/tmp";
  s0.layer_end = 1, s0.micro_slots = 2;
  s1.layer_begin = 1;
  LlamaModel a(c, *be, s0), b(c, *be, s1);
  EXPECT_TRUE(a.first_stage() && !a.last_stage() && !b.first_stage() && b.last_stage());
  EXPECT_EQ(a.table().find("model.norm.weight"), nullptr);
  EXPECT_EQ(b.table().find("model.layers.0.self_attn.q_proj.weight"), nullptr);
  load(a, w);
  load(b, w);
  a.zero_grads();
  b.zero_grads();
  const float scale = 1.0f / float(targets(mbs));
  Result got;
  auto backward = [&](size_t i) {
    const int64_t slot = int64_t(i % 2);
    b.stage_forward(mbs[i], 0, a.stage_output(slot), true);
    got.loss += b.stage_loss_backward(0, scale);
    a.stage_backward(slot, b.stage_input_grad());
  };
  a.stage_forward(mbs[0], 0, nullptr, true);
  for (size_t i = 0; i < mbs.size(); ++i) {
    if (i + 1 < mbs.size()) a.stage_forward(mbs[i + 1], int64_t((i + 1) % 2), nullptr, true);
    backward(i);
  }
  for (LlamaModel* m : {&a, &b})
    for (auto& [n, g] : grads_of(*m)) {
      auto& dst = got.grads[n];
      if (dst.empty()) dst.assign(g.size(), 0.0f);
      for (size_t i = 0; i < g.size(); ++i) dst[i] += g[i];
    }
  expect_same(want, got, 2e-6,
              fmt::format("pipeline{}{}", tied ? ", tied embeddings" : "",
                          offload ? ", offload on the guarded backend" : ""));
}

TEST(PipelineStages, TwoStagesTwoSlotsMatchOneModel) { expect_pipeline_matches(false, false); }
TEST(PipelineStages, TiedEmbeddingsAndCheckpointing) { expect_pipeline_matches(true, true); }
TEST(PipelineStages, CheckpointOffloadOnTheDeviceBackend) {
  expect_pipeline_matches(false, true, true);
}

}  // namespace
}  // namespace lt
