// LoRA / QLoRA tests: PEFT-written adapters (tools/peft_interop.py) give the same logits and
// gradients in longtune; NF4 against an independent numpy reference and its error bound; the
// LoRA op against double references and finite differences (with dropout); frozen-base memory;
// merge; adapters written by longtune (checked by PEFT in tools/interop.sh); bad input.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "backend/backend.h"
#include "cli/commands.h"
#include "core/dtype.h"
#include "core/error.h"
#include "fixture_util.h"
#include "io/safetensors.h"
#include "model/adapter_io.h"
#include "model/llama.h"
#include "model/model_io.h"
#include "ops/lora.h"
#include "ops/nf4.h"
#include "train/batching.h"
#include "train/trainer.h"

namespace lt {
namespace {

using test::expect_close;
using test::tensor_f32;

namespace fs = std::filesystem;
const fs::path kRoot = fs::path(LT_SOURCE_DIR);
const fs::path kModels = kRoot / "tests/fixtures/models";
const fs::path kLora = kRoot / "tests/fixtures/lora";

template <typename T>
std::vector<T> tensor_raw(const SafetensorsFile& f, const std::string& name) {
  const TensorInfo* t = f.find(name);
  EXPECT_NE(t, nullptr) << f.path() << " has no tensor " << name;
  if (!t) return {};
  const T* p = static_cast<const T*>(t->data);
  return std::vector<T>(p, p + t->nbytes / sizeof(T));
}

// Micro-batch m of a fixture model's batch.json.
std::vector<Example> batch_rows(const std::string& base, size_t m) {
  const auto batch = nlohmann::json::parse(std::ifstream(kModels / base / "batch.json"));
  std::vector<Example> rows;
  for (const auto& row : batch.at("micro_batches").at(m)) {
    Example e;
    e.input_ids = row.at("input_ids").get<std::vector<int32_t>>();
    e.labels = row.at("labels").get<std::vector<int32_t>>();
    rows.push_back(e);
  }
  return rows;
}

MicroBatch micro(const std::vector<Example>& rows) {
  std::vector<const Example*> p;
  for (const auto& r : rows) p.push_back(&r);
  return make_micro_batch(p);
}

std::string base_of(const fs::path& adapter_dir) {
  const auto j = nlohmann::json::parse(std::ifstream(adapter_dir / "adapter_config.json"));
  return fs::path(j.at("base_model_name_or_path").get<std::string>()).filename();
}

// A model with a PEFT fixture adapter loaded.
struct Loaded {
  std::unique_ptr<Backend> backend = make_cpu_backend();
  ModelConfig config;
  std::unique_ptr<LlamaModel> model;
};
void load_case(const fs::path& adapter, RunSettings rs, Loaded* out) {
  const fs::path base = kModels / base_of(adapter);
  out->config = load_model_config(base / "config.json");
  rs.lora = read_adapter_config(adapter, out->config, rs.lora);
  out->model = std::make_unique<LlamaModel>(out->config, *out->backend, rs);
  load_base_weights(CheckpointReader(base), *out->model);
  load_adapter(adapter, *out->model);
}

// ---------------------------------------------------------------------------------------------
// PEFT -> longtune: identical logits, loss and gradients of every adapter tensor.
// ---------------------------------------------------------------------------------------------
class PeftAdapter : public ::testing::TestWithParam<std::string> {};

TEST_P(PeftAdapter, LogitsLossAndGradientsMatchPeft) {
  const fs::path dir = kLora / GetParam();
  auto expected = SafetensorsFile::open(dir / "expected.safetensors");
  const auto rows = batch_rows(base_of(dir), 0);
  const MicroBatch mb = micro(rows);
  RunSettings rs;
  rs.max_tokens = mb.num_tokens();
  rs.lora.dropout = 0;
  Loaded L;
  load_case(dir, rs, &L);
  LlamaModel& m = *L.model;
  ASSERT_TRUE(m.settings().lora.enabled);
  EXPECT_EQ(m.grads(), nullptr) << "LoRA must not allocate base gradients";

  const MicroBatch first = micro({rows[0]});
  std::vector<float> logits(first.num_tokens() * L.config.vocab_size);
  m.forward_logits(first, logits.data());
  const auto want_logits = tensor_f32(*expected, "logits");
  ASSERT_EQ(want_logits.size(), logits.size());
  expect_close("logits", logits.data(), want_logits.data(), logits.size(), 1e-4, 1e-4);

  const double items = tensor_f32(*expected, "num_items")[0];
  ASSERT_EQ(mb.num_targets(), static_cast<int64_t>(items));
  m.zero_grads();
  const double loss = m.forward_backward(mb, 1.0f / static_cast<float>(items));
  const double want_loss = tensor_f32(*expected, "loss_sum")[0];
  EXPECT_NEAR(loss, want_loss, 1e-4 * std::fabs(want_loss));

  size_t checked = 0;
  for (const auto& t : m.trainable()) {
    const auto want = tensor_f32(
        *expected, "grad." + (t.name.starts_with("base_model.") ? t.name : peft_name(t.name)));
    ASSERT_EQ(want.size(), static_cast<size_t>(t.numel)) << t.name;
    expect_close("grad " + t.name, t.grad, want.data(), want.size(), 2e-6, 2e-4);
    ++checked;
  }
  size_t want_count = 0;
  for (const auto& t : expected->tensors()) want_count += t.name.starts_with("grad.");
  EXPECT_EQ(checked, want_count) << "longtune trains a different set of tensors than PEFT";
}

// The memory-saving paths (mini-sequence MLP, checkpointing) give the same LoRA gradients.
TEST_P(PeftAdapter, MemoryPathsAreExactWithLora) {
  const fs::path dir = kLora / GetParam();
  const MicroBatch mb = micro(batch_rows(base_of(dir), 1));
  RunSettings plain;
  plain.max_tokens = mb.num_tokens();
  plain.lora.dropout = 0;
  RunSettings saving = plain;
  saving.mlp_chunks = 3;
  saving.lm_head_chunks = 2;
  saving.checkpointing = true;
  Loaded a, b;
  load_case(dir, plain, &a);
  load_case(dir, saving, &b);
  a.model->zero_grads();
  b.model->zero_grads();
  const float scale = 1.0f / static_cast<float>(mb.num_targets());
  EXPECT_NEAR(a.model->forward_backward(mb, scale), b.model->forward_backward(mb, scale), 1e-4);
  ASSERT_EQ(a.model->trainable().size(), b.model->trainable().size());
  for (size_t i = 0; i < a.model->trainable().size(); ++i) {
    const auto& ta = a.model->trainable()[i];
    expect_close(ta.name, b.model->trainable()[i].grad, ta.grad, ta.numel, 1e-6, 1e-4);
  }
}

std::vector<std::string> adapter_cases() { return {"llama_gqa_all", "qwen2_bias_rslora"}; }
INSTANTIATE_TEST_SUITE_P(Peft, PeftAdapter, ::testing::ValuesIn(adapter_cases()),
                         [](const auto& info) { return info.param; });

// ---------------------------------------------------------------------------------------------
// NF4
// ---------------------------------------------------------------------------------------------
TEST(Nf4, MatchesReferenceQuantizer) {
  auto ref = SafetensorsFile::open(kLora / "nf4.safetensors");
  const auto w = tensor_f32(*ref, "nf4.w");
  const int64_t n = static_cast<int64_t>(w.size());
  const Nf4Sizes z = nf4_sizes(n);
  ASSERT_GT(z.blocks, kNf4AbsmaxBlock) << "the fixture must span two absmax scale blocks";
  std::vector<uint8_t> packed(z.packed_bytes), aq(z.blocks);
  std::vector<float> scale(z.scale_blocks), deq(n);
  float offset = 0;
  nf4_quantize(packed.data(), aq.data(), scale.data(), &offset, w.data(), n);
  const auto want_packed = tensor_raw<uint8_t>(*ref, "nf4.packed");
  const auto want_aq = tensor_raw<uint8_t>(*ref, "nf4.absmax_q");
  ASSERT_EQ(want_packed.size(), packed.size());
  ASSERT_EQ(want_aq.size(), aq.size());
  int64_t diff_packed = 0, diff_aq = 0;
  for (size_t i = 0; i < packed.size(); ++i) diff_packed += packed[i] != want_packed[i];
  for (size_t i = 0; i < aq.size(); ++i) diff_aq += aq[i] != want_aq[i];
  // Codes may differ only where a value sits on a rounding midpoint (f32 vs f64 distances).
  EXPECT_LE(diff_packed, 2) << "NF4 codes differ from the reference in " << diff_packed << " bytes";
  EXPECT_LE(diff_aq, 1) << "absmax codes differ from the reference in " << diff_aq << " blocks";
  EXPECT_NEAR(offset, tensor_f32(*ref, "nf4.absmax_offset")[0], 1e-7);
  const auto want_scale = tensor_f32(*ref, "nf4.absmax_scale");
  expect_close("absmax_scale", scale.data(), want_scale.data(), scale.size(), 0, 1e-6);
  nf4_dequantize(deq.data(), packed.data(), aq.data(), scale.data(), offset, n);
  const auto want_deq = tensor_f32(*ref, "nf4.dequantized");
  expect_close("dequantized", deq.data(), want_deq.data(), deq.size(), 1e-6, 1e-5);
}

TEST(Nf4, RoundTripWithinTheCodeBound) {
  const auto& code = nf4_code();
  float max_gap = 0;
  for (size_t i = 0; i + 1 < code.size(); ++i) max_gap = std::max(max_gap, code[i + 1] - code[i]);
  for (int64_t n : {64, 1000, 64 * 513 + 5}) {
    std::mt19937_64 rng(n);
    std::normal_distribution<float> dist(0.0f, 0.02f);
    std::vector<float> w(n), deq(n);
    for (auto& x : w) x = dist(rng);
    w[n / 3] = 0.5f;  // an outlier: its block's step is coarse, others stay fine
    const Nf4Sizes z = nf4_sizes(n);
    std::vector<uint8_t> packed(z.packed_bytes), aq(z.blocks);
    std::vector<float> scale(z.scale_blocks);
    float offset = 0;
    nf4_quantize(packed.data(), aq.data(), scale.data(), &offset, w.data(), n);
    nf4_dequantize(deq.data(), packed.data(), aq.data(), scale.data(), offset, n);
    const auto& dyn = dynamic_map_code();
    double worst = -1;
    int64_t wi = 0;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t b = i / kNf4Block;
      float absmax = 0;
      for (int64_t j = b * kNf4Block; j < std::min(n, (b + 1) * kNf4Block); ++j)
        absmax = std::max(absmax, std::fabs(w[j]));
      const float absmax_deq = dyn[aq[b]] * scale[b / kNf4AbsmaxBlock] + offset;
      // |w - c q| <= |w/a - c| a + |c| |a - q|, |w/a - c| <= max_gap / 2, |c| <= 1.
      const double bound = 0.5 * max_gap * absmax + std::fabs(absmax - absmax_deq) + 1e-7;
      const double excess = std::fabs(double(w[i]) - deq[i]) - bound;
      if (excess > worst) worst = excess, wi = i;
    }
    EXPECT_LE(worst, 0) << "n=" << n << ": element " << wi << " w " << w[wi] << " deq " << deq[wi];
    // The double quantization of the scales is itself small: within 1% of the largest absmax.
    float top = 0, worst_scale = 0;
    for (float x : w) top = std::max(top, std::fabs(x));
    for (int64_t b = 0; b < z.blocks; ++b) {
      float absmax = 0;
      for (int64_t j = b * kNf4Block; j < std::min(n, (b + 1) * kNf4Block); ++j)
        absmax = std::max(absmax, std::fabs(w[j]));
      worst_scale = std::max(
          worst_scale, std::fabs(absmax - (dyn[aq[b]] * scale[b / kNf4AbsmaxBlock] + offset)));
    }
    EXPECT_LE(worst_scale, 0.01f * top) << "n=" << n;
  }
}

// ---------------------------------------------------------------------------------------------
// The LoRA op: double reference and finite differences, with dropout.
// ---------------------------------------------------------------------------------------------
TEST(LoraOp, ForwardMatchesDoubleReferenceAndBackwardMatchesFiniteDifferences) {
  const int64_t N = 5, IN = 7, OUT = 6, R = 3;
  std::mt19937_64 rng(3);
  std::uniform_real_distribution<float> u(-1, 1);
  auto rnd = [&](int64_t n) {
    std::vector<float> v(n);
    for (auto& x : v) x = u(rng);
    return v;
  };
  auto x = rnd(N * IN), a = rnd(R * IN), b = rnd(OUT * R), g = rnd(N * OUT);
  for (float p : {0.0f, 0.3f}) {
    LoraCall c{R, 1.7f, p, 99, 11};
    std::vector<float> out(N * OUT, 0.0f), t(N * R), uu(N * R), xd(N * IN), dxd(N * IN);
    lora_forward(out.data(), t.data(), xd.data(), x.data(), a.data(), b.data(), N, IN, OUT, c);
    // Double reference.
    int64_t dropped = 0;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t o = 0; o < OUT; ++o) {
        double s = 0;
        for (int64_t r = 0; r < R; ++r) {
          double tr = 0;
          for (int64_t i = 0; i < IN; ++i) {
            const float f = lora_dropout_factor(c.seed, c.row0 + n, i, IN, p);
            if (o == 0 && r == 0) dropped += f == 0;
            tr += double(x[n * IN + i]) * f * a[r * IN + i];
          }
          s += tr * b[o * R + r];
        }
        EXPECT_NEAR(out[n * OUT + o], c.scale * s, 1e-5) << "p=" << p << " n=" << n << " o=" << o;
      }
    if (p > 0)
      EXPECT_GT(dropped, 0) << "dropout never dropped anything";
    else
      EXPECT_EQ(dropped, 0);
    // Backward against central differences of L = sum(g * out).
    std::vector<float> dx(N * IN, 0.0f), da(R * IN, 0.0f), db(OUT * R, 0.0f);
    lora_backward(dx.data(), da.data(), db.data(), t.data(), uu.data(), xd.data(), dxd.data(),
                  g.data(), x.data(), a.data(), b.data(), N, IN, OUT, c);
    auto loss = [&]() {
      std::vector<float> o(N * OUT, 0.0f);
      lora_forward(o.data(), t.data(), xd.data(), x.data(), a.data(), b.data(), N, IN, OUT, c);
      double s = 0;
      for (int64_t i = 0; i < N * OUT; ++i) s += double(o[i]) * g[i];
      return s;
    };
    auto fd_check = [&](std::vector<float>& v, const std::vector<float>& grad, const char* what) {
      for (size_t i = 0; i < v.size(); ++i) {
        const float keep = v[i];
        v[i] = keep + 1e-2f;
        const double lp = loss();
        v[i] = keep - 1e-2f;
        const double lm = loss();
        v[i] = keep;
        EXPECT_NEAR(grad[i], (lp - lm) / 2e-2, 2e-3 + 2e-3 * std::fabs(grad[i]))
            << what << "[" << i << "] p=" << p;
      }
    };
    fd_check(x, dx, "dinp");
    fd_check(a, da, "da");
    fd_check(b, db, "db");
  }
}

// ---------------------------------------------------------------------------------------------
// Memory: frozen base without gradients, NF4 at about half a byte per parameter.
// ---------------------------------------------------------------------------------------------
ModelConfig mid_config() {
  ModelConfig c = load_model_config(kModels / "llama_gqa/config.json");
  c.hidden_size = 256;
  c.intermediate_size = 704;
  c.num_attention_heads = 8;
  c.num_key_value_heads = 4;
  c.head_dim = 32;
  c.vocab_size = 512;
  return c;
}

TEST(LoraMemory, PlanShowsFrozenBaseAndNf4) {
  const ModelConfig c = mid_config();
  RunSettings full;
  full.max_tokens = 64;
  RunSettings lora = full;
  lora.lora.enabled = true;
  lora.lora.r = 8;
  lora.lora.alpha = 16;
  lora.lora.targets.fill(true);
  RunSettings qlora = lora;
  qlora.lora.quantize_4bit = true;
  MemoryPlan pf, pl, pq;
  LlamaModel::plan(c, full, &pf);
  LlamaModel::plan(c, lora, &pl);
  LlamaModel::plan(c, qlora, &pq);
  const ParamTable table(c);
  const LoraTable lt(c, lora.lora);
  EXPECT_EQ(pf.category_bytes(MemCategory::kGradients), size_t(table.total_numel()) * 4);
  // LoRA: the only gradients are the adapter's.
  EXPECT_EQ(pl.category_bytes(MemCategory::kGradients), size_t(lt.total_numel()) * 4);
  EXPECT_EQ(LlamaModel::trainable_numel(c, lora), lt.total_numel());
  // QLoRA: projections in NF4.
  int64_t quantized = 0;
  for (const auto& p : table.params())
    quantized += LlamaModel::is_packed(qlora.lora, p.name) ? p.numel : 0;
  const double nf4_per_param = double(pq.arena_bytes("weights_packed")) / double(quantized);
  EXPECT_GT(nf4_per_param, 0.5);
  EXPECT_LT(nf4_per_param, 0.53);
  EXPECT_EQ(pq.arena_bytes("weights") + size_t(quantized) * 4, pl.arena_bytes("weights"));
  // Dropout's buffers hold one row block (lora_dropout_rows) of the widest projection input
  // (F), not every token's.
  auto buffer = [](const MemoryPlan& p, const std::string& name) {
    for (const auto& b : p.buffers())
      if (b.name == name) return b.bytes;
    return size_t(0);
  };
  RunSettings dropped = lora;
  dropped.lora.dropout = 0.1;
  dropped.max_tokens = 4096;
  MemoryPlan whole;
  LlamaModel::plan(c, dropped, &whole);
  const size_t D = c.hidden_size, F = c.intermediate_size, QD = c.num_attention_heads * c.head_dim;
  EXPECT_EQ(buffer(whole, "lora.dropout_x"), 4096 * std::max({D, QD, F}) * 4);
  dropped.mlp_chunks = 64;
  dropped.lora_dropout_rows = 512;
  MemoryPlan chunked;
  LlamaModel::plan(c, dropped, &chunked);
  EXPECT_EQ(buffer(chunked, "lora.dropout_x"), 512 * std::max({D, QD, F}) * 4);
  EXPECT_EQ(buffer(chunked, "lora.dropout_dx"), buffer(chunked, "lora.dropout_x"));
  // LoRA with --bf16 True: the same projections at exactly 2 bytes per value.
  RunSettings bf16 = lora;
  bf16.lora.base_bf16 = true;
  MemoryPlan pb;
  LlamaModel::plan(c, bf16, &pb);
  EXPECT_EQ(pb.arena_bytes("weights_packed"), size_t(quantized) * 2);
  EXPECT_EQ(pb.arena_bytes("weights") + size_t(quantized) * 4, pl.arena_bytes("weights"));
  // With the frozen embedding and LM head in bf16 too: 2 bytes each, out of the f32 block, and
  // the head widened at most kHeadExpandRows rows at a time.
  const size_t VD = size_t(c.vocab_size) * c.hidden_size;
  RunSettings io = bf16;
  io.lora.embed_bf16 = true;
  MemoryPlan pe;
  LlamaModel::plan(c, io, &pe);
  EXPECT_EQ(pe.arena_bytes("weights_packed"), size_t(quantized) * 2 + 2 * VD * 2);
  EXPECT_EQ(pe.arena_bytes("weights") + 2 * VD * 4, pb.arena_bytes("weights"));
  EXPECT_EQ(
      buffer(pe, "lm_head.expand"),
      size_t(std::min<int64_t>(c.vocab_size, LlamaModel::kHeadExpandRows)) * c.hidden_size * 4);
  io.lora.train_embed = true;  // a trained embedding stays f32 (and trains)
  MemoryPlan pt;
  LlamaModel::plan(c, io, &pt);
  EXPECT_EQ(pt.arena_bytes("weights_packed"), size_t(quantized) * 2 + VD * 2);
}

// LoRA over a bf16 base gives exactly what LoRA gives over f32 weights rounded to bf16 (the
// projections widen each weight back to f32 before the same GEMM; the embedding widens its
// rows; the LM head, one block of rows here, widens before the same GEMMs): loss, adapter
// gradients and logits bit for bit; and the stored values are the round-to-nearest-even bf16
// of the file's. With --bf16 True the frozen embedding and LM head are bf16 as well (a tied
// head is the embedding: qwen2_bias).
void expect_bf16_base_equals_rounded(const std::string& adapter, bool projections, bool embed_head,
                                     size_t packed) {
  SCOPED_TRACE(adapter + (projections ? " projections" : "") + (embed_head ? " embed/head" : ""));
  const fs::path dir = kLora / adapter;
  const std::string base = base_of(dir);
  const MicroBatch mb = micro(batch_rows(base, 0));
  RunSettings rs;
  rs.max_tokens = mb.num_tokens();
  rs.lora.dropout = 0.1;  // masks too: same rows, same elements
  RunSettings rb = rs;    // r, alpha and targets come from the adapter folder
  rb.lora.base_bf16 = projections;
  rb.lora.embed_bf16 = embed_head;
  Loaded b, f;
  load_case(dir, rb, &b);
  load_case(dir, rs, &f);
  ASSERT_EQ(b.model->packed_weights().size(), packed);
  if (projections) {
    EXPECT_EQ(b.model->table().find("model.layers.0.self_attn.q_proj.weight"), nullptr);
  }
  if (embed_head) {  // the head (a tied one is the embedding) is packed, never in the f32 block
    EXPECT_EQ(b.model->table().find(b.config.tie_word_embeddings ? "model.embed_tokens.weight"
                                                                 : "lm_head.weight"),
              nullptr);
  }
  const CheckpointReader reader(kModels / base);
  const ParamTable full(b.config);
  for (const auto& w : b.model->packed_weights()) {
    ASSERT_EQ(w.format, PackedFormat::kBf16);
    std::vector<float> orig(w.numel);
    reader.read_f32(w.name, full.find(w.name)->shape, orig.data());
    const auto* stored = reinterpret_cast<const uint16_t*>(w.packed);
    for (int64_t i = 0; i < w.numel; ++i) {
      ASSERT_EQ(stored[i], f32_to_bf16(orig[i])) << w.name << "[" << i << "]";
      orig[i] = bf16_to_f32(stored[i]);
    }
    const ParamInfo* p = f.model->table().find(w.name);
    ASSERT_NE(p, nullptr);
    std::memcpy(f.model->params() + p->offset, orig.data(), orig.size() * 4);
  }
  const float scale = 1.0f / static_cast<float>(mb.num_targets());
  b.model->zero_grads();
  f.model->zero_grads();
  EXPECT_EQ(b.model->forward_backward(mb, scale), f.model->forward_backward(mb, scale));
  ASSERT_EQ(b.model->trainable().size(), f.model->trainable().size());
  for (size_t i = 0; i < f.model->trainable().size(); ++i) {
    const auto& t = f.model->trainable()[i];
    expect_close("bf16 base " + t.name, b.model->trainable()[i].grad, t.grad, t.numel, 0, 0);
  }
  const MicroBatch first = micro({batch_rows(base, 0)[0]});
  std::vector<float> lb(first.num_tokens() * b.config.vocab_size), lf(lb.size());
  b.model->forward_logits(first, lb.data());
  f.model->forward_logits(first, lf.data());
  EXPECT_EQ(lb, lf);
}

TEST(Bf16Base, EqualsLoraOnRoundedWeights) {
  expect_bf16_base_equals_rounded("llama_gqa_all", true, false, 14);
  // llama_gqa_all trains the embedding (modules_to_save): only the LM head is packed too.
  expect_bf16_base_equals_rounded("llama_gqa_all", true, true, 15);
  expect_bf16_base_equals_rounded("llama_gqa_all", false, true, 1);      // QLoRA's setting
  expect_bf16_base_equals_rounded("qwen2_bias_rslora", true, true, 15);  // tied: one tensor
}

// LoRA dropout over row blocks (lora_dropout_rows: the buffers hold that many rows) drops the
// same elements as one call over every row (masks are keyed by token): the same loss and
// adapter gradients up to the order of the blocks' f32 sums.
TEST(LoraDropout, RowBlocksDropTheSameElements) {
  const fs::path dir = kLora / "llama_gqa_all";
  const MicroBatch mb = micro(batch_rows("llama_gqa", 0));
  RunSettings whole;
  whole.max_tokens = mb.num_tokens();
  whole.lora.dropout = 0.2;
  whole.lora_dropout_rows = 1 << 20;
  RunSettings blocks = whole;
  blocks.lora_dropout_rows = 5;  // not a divisor of the token count
  ASSERT_NE(mb.num_tokens() % 5, 0);
  Loaded a, b;
  load_case(dir, whole, &a);
  load_case(dir, blocks, &b);
  RunSettings off = whole;
  off.lora.dropout = 0;
  Loaded z;
  load_case(dir, off, &z);
  const float scale = 1.0f / static_cast<float>(mb.num_targets());
  a.model->zero_grads();
  b.model->zero_grads();
  z.model->zero_grads();
  const double la = a.model->forward_backward(mb, scale), lb = b.model->forward_backward(mb, scale);
  const double lz = z.model->forward_backward(mb, scale);
  EXPECT_NEAR(lb, la, 1e-6 * std::fabs(la));
  EXPECT_GT(std::fabs(la - lz), 1e-4) << "dropout changed nothing: the check could not fail";
  for (size_t i = 0; i < a.model->trainable().size(); ++i) {
    const auto& t = a.model->trainable()[i];
    expect_close("dropout in row blocks " + t.name, b.model->trainable()[i].grad, t.grad, t.numel,
                 1e-6, 1e-4);
  }
}

// QLoRA gives what LoRA gives on the dequantized base weights.
TEST(QLora, EqualsLoraOnDequantizedWeights) {
  const fs::path dir = kLora / "llama_gqa_all";
  const MicroBatch mb = micro(batch_rows("llama_gqa", 0));
  RunSettings rs;
  rs.max_tokens = mb.num_tokens();
  rs.lora.dropout = 0;
  RunSettings rq = rs;
  rq.lora.quantize_4bit = true;
  Loaded q, f;
  load_case(dir, rq, &q);
  load_case(dir, rs, &f);
  ASSERT_EQ(q.model->packed_weights().size(), 14u);
  // Replace f's f32 projection weights by the dequantized NF4 ones.
  for (const auto& w : q.model->packed_weights()) {
    const ParamInfo* p = f.model->table().find(w.name);
    ASSERT_NE(p, nullptr);
    nf4_dequantize(f.model->params() + p->offset, w.packed, w.absmax_q, w.absmax_scale,
                   w.absmax_offset, w.numel);
  }
  const float scale = 1.0f / static_cast<float>(mb.num_targets());
  q.model->zero_grads();
  f.model->zero_grads();
  EXPECT_NEAR(q.model->forward_backward(mb, scale), f.model->forward_backward(mb, scale), 1e-5);
  for (size_t i = 0; i < f.model->trainable().size(); ++i) {
    const auto& t = f.model->trainable()[i];
    expect_close("qlora " + t.name, q.model->trainable()[i].grad, t.grad, t.numel, 1e-7, 1e-5);
  }
  // And the NF4 model stays close to the f32 one (the quantization error is small).
  Loaded exact;
  load_case(dir, rs, &exact);
  const MicroBatch first = micro({batch_rows("llama_gqa", 0)[0]});
  std::vector<float> lq(first.num_tokens() * q.config.vocab_size), le(lq.size());
  q.model->forward_logits(first, lq.data());
  exact.model->forward_logits(first, le.data());
  // Relative L2 error of the logits: NF4 keeps ~3 bits of each weight, so it is not small on a
  // random tiny model, but it is far from a broken quantizer (which gives about 1).
  double num = 0, den = 0;
  for (size_t i = 0; i < lq.size(); ++i)
    num += std::pow(lq[i] - le[i], 2), den += std::pow(le[i], 2);
  std::printf("QLoRA vs f32 base: relative logits error %.4f (information)\n",
              std::sqrt(num / den));
  // Per weight, NF4's relative RMS error on Gaussian-like weights is about 0.1 (a broken
  // quantizer gives about 1).
  const CheckpointReader reader(kModels / "llama_gqa");
  const ParamTable full(q.config);
  for (const auto& w : q.model->packed_weights()) {
    std::vector<float> orig(w.numel), deq(w.numel);
    reader.read_f32(w.name, full.find(w.name)->shape, orig.data());
    nf4_dequantize(deq.data(), w.packed, w.absmax_q, w.absmax_scale, w.absmax_offset, w.numel);
    double e = 0, o = 0;
    for (int64_t i = 0; i < w.numel; ++i)
      e += std::pow(deq[i] - orig[i], 2), o += std::pow(orig[i], 2);
    EXPECT_LT(std::sqrt(e / o), 0.12) << w.name;
  }
}

// ---------------------------------------------------------------------------------------------
// Merge: the merged model's logits are the LoRA model's logits.
// ---------------------------------------------------------------------------------------------
TEST(LoraMerge, MergedModelEqualsAdapterModel) {
  const fs::path out = fs::temp_directory_path() / fmt::format("lt_merge_{}", ::getpid());
  fs::remove_all(out);
  const fs::path adapter = kLora / "llama_gqa_all";
  const std::string base = (kModels / "llama_gqa").string();
  std::vector<std::string> args = {
      "merge",          "--model_name_or_path", base,        "--adapter_name_or_path",
      adapter.string(), "--output_dir",         out.string()};
  std::vector<char*> argv;
  for (auto& s : args) argv.push_back(s.data());
  ASSERT_EQ(cmd_merge(static_cast<int>(argv.size()), argv.data()), 0);

  const MicroBatch first = micro({batch_rows("llama_gqa", 0)[0]});
  RunSettings rs;
  rs.max_tokens = first.num_tokens();
  rs.train = false;
  Loaded L;
  load_case(adapter, rs, &L);
  std::vector<float> want(first.num_tokens() * L.config.vocab_size), got(want.size());
  L.model->forward_logits(first, want.data());
  auto be = make_cpu_backend();
  RunSettings plain;
  plain.max_tokens = first.num_tokens();
  plain.train = false;
  LlamaModel merged(load_model_config(out / "config.json"), *be, plain);
  load_weights(CheckpointReader(out), merged.table(), merged.params());
  merged.forward_logits(first, got.data());
  expect_close("merged logits", got.data(), want.data(), got.size(), 1e-4, 1e-4);
  fs::remove_all(out);
}

// ---------------------------------------------------------------------------------------------
// longtune -> PEFT: train, save the adapter and the logits; reload gives the same logits;
// tools/interop.sh then loads the folder with PEFT (LT_INTEROP_OUT names where it goes).
// ---------------------------------------------------------------------------------------------
TEST(LoraAdapter, TrainSaveReloadAndWriteInteropFolder) {
  const char* env = std::getenv("LT_INTEROP_OUT");
  const fs::path root =
      env ? fs::path(env) : fs::temp_directory_path() / fmt::format("lt_interop_{}", ::getpid());
  struct Case {
    std::string name, base, targets;
    bool embed_norm, rslora, nf4, bf16 = false;
  };
  for (const Case& cs :
       {Case{"llama_embed_norm", "llama_gqa", "all-linear", true, false, false},
        Case{"qwen2_qv", "qwen2_bias", "q_proj,v_proj,o_proj", false, true, false},
        Case{"llama_qlora", "llama_gqa", "q_proj,k_proj,v_proj,up_proj", false, false, true},
        Case{"llama_bf16_base", "llama_gqa", "all-linear", false, false, false, true}}) {
    SCOPED_TRACE(cs.name);
    const fs::path base = kModels / cs.base, dir = root / cs.name;
    fs::remove_all(dir);
    const ModelConfig config = load_model_config(base / "config.json");
    LoraOptions o;
    o.use_peft_lora = true;
    o.r = 4;
    o.alpha = 8;
    o.dropout = 0.1;
    o.target_modules = cs.targets;
    o.use_rslora = cs.rslora;
    o.trainable_params = cs.embed_norm ? "embed,norm" : "";
    o.load_in_4bit = cs.nf4;
    std::vector<MicroBatch> mbs;
    std::vector<std::vector<Example>> rows = {batch_rows(cs.base, 0), batch_rows(cs.base, 1)};
    int64_t max_tokens = 0;
    for (auto& r : rows)
      mbs.push_back(micro(r)), max_tokens = std::max(max_tokens, mbs.back().num_tokens());
    RunSettings rs;
    rs.max_tokens = max_tokens;
    rs.lora = resolve_lora(o, 5);
    rs.lora.base_bf16 = cs.bf16;
    rs.lora.embed_bf16 = cs.bf16;  // as train --bf16 True: the frozen embedding and head too
    auto be = make_cpu_backend();
    LlamaModel m(config, *be, rs);
    load_base_weights(CheckpointReader(base), m);
    init_lora_weights(m.lora_table(), 5, m.lora_params());
    OptimizerSettings opt;
    opt.learning_rate = 2e-2;
    AdamW adam(m.trainable(), *be, opt);
    ScheduleSettings sched{ScheduleType::kConstant, 0, 2};
    std::vector<float> before(m.lora_table().total_numel());
    std::copy(m.lora_params(), m.lora_params() + before.size(), before.begin());
    for (int64_t s = 0; s < 2; ++s) {
      const StepResult r = train_step(m, adam, opt, sched, {mbs[s]}, s);
      EXPECT_TRUE(std::isfinite(r.loss) && r.grad_norm > 0);
    }
    double moved = 0;
    for (size_t i = 0; i < before.size(); ++i) moved += std::fabs(m.lora_params()[i] - before[i]);
    EXPECT_GT(moved, 0) << "training did not change the adapter";

    save_adapter(dir, m, base.string());
    const MicroBatch first = micro({rows[0][0]});
    std::vector<float> logits(first.num_tokens() * config.vocab_size), again(logits.size());
    m.forward_logits(first, logits.data());
    // The safetensors writer converts from f32, so the ids travel as exact small f32 values.
    std::vector<float> ids(first.ids.begin(), first.ids.end());
    const float flag = 1.0f;  // tells the checker the base projections were NF4 / bf16
    std::vector<TensorToSave> out = {
        {"logits", {first.num_tokens(), config.vocab_size}, logits.data()},
        {"input_ids", {first.num_tokens()}, ids.data()}};
    if (cs.nf4) out.push_back({"nf4_base", {1}, &flag});
    if (cs.bf16) out.push_back({"bf16_base", {1}, &flag});
    write_safetensors(dir / "longtune_logits.safetensors", out, DType::kF32);
    // Reload into a fresh model: the same logits.
    RunSettings rr = rs;
    rr.train = false;
    rr.lora = read_adapter_config(dir, config, rs.lora);
    EXPECT_EQ(rr.lora.r, 4);
    EXPECT_EQ(rr.lora.targets, rs.lora.targets);
    EXPECT_EQ(rr.lora.rslora, cs.rslora);
    LlamaModel m2(config, *be, rr);
    load_base_weights(CheckpointReader(base), m2);
    load_adapter(dir, m2);
    m2.forward_logits(first, again.data());
    expect_close("reloaded logits", again.data(), logits.data(), logits.size(), 0, 0);
  }
  if (!env) fs::remove_all(root);
}

// ---------------------------------------------------------------------------------------------
// Bad input: clear UserErrors, nothing overwritten.
// ---------------------------------------------------------------------------------------------
template <typename F>
std::string user_error(F&& f) {
  try {
    f();
  } catch (const UserError& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(LoraErrors, FlagsAreValidated) {
  LoraOptions o;
  o.use_peft_lora = true;
  o.r = 0;
  EXPECT_NE(user_error([&] { resolve_lora(o, 1); }).find("--lora_r"), std::string::npos);
  o.r = 4;
  o.target_modules = "q_proj,qkv_proj";
  const std::string msg = user_error([&] { resolve_lora(o, 1); });
  EXPECT_NE(msg.find("qkv_proj"), std::string::npos) << msg;
  EXPECT_NE(msg.find("--lora_target_modules"), std::string::npos) << msg;
  o.target_modules = "all-linear";
  o.trainable_params = "embed,lm_head";
  EXPECT_NE(user_error([&] { resolve_lora(o, 1); }).find("--trainable_params"), std::string::npos);
  o.trainable_params = "";
  o.dropout = 1.0;
  EXPECT_NE(user_error([&] { resolve_lora(o, 1); }).find("--lora_dropout"), std::string::npos);
}

TEST(LoraErrors, AdapterForAnotherBaseAndCorruptFiles) {
  const fs::path adapter = kLora / "llama_gqa_all";
  // Another base: llama_head_dim has other projection shapes.
  const ModelConfig other = load_model_config(kModels / "llama_head_dim/config.json");
  RunSettings rs;
  rs.max_tokens = 8;
  rs.lora = read_adapter_config(adapter, other, rs.lora);
  auto be = make_cpu_backend();
  LlamaModel m(other, *be, rs);
  std::vector<float> lora_before(m.lora_params(), m.lora_params() + m.lora_table().total_numel());
  const std::string msg = user_error([&] { load_adapter(adapter, m); });
  EXPECT_NE(msg.find("adapter_model.safetensors"), std::string::npos) << msg;
  EXPECT_NE(msg.find("shape"), std::string::npos) << msg;
  EXPECT_TRUE(std::equal(lora_before.begin(), lora_before.end(), m.lora_params()))
      << "a failed load changed the adapter";

  // Corrupt copies: truncated weights, bad JSON, DoRA, unknown target.
  const fs::path tmp = fs::temp_directory_path() / fmt::format("lt_bad_adapter_{}", ::getpid());
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  fs::copy(adapter, tmp, fs::copy_options::recursive);
  const ModelConfig base = load_model_config(kModels / "llama_gqa/config.json");
  {
    std::string bytes(fs::file_size(adapter / "adapter_model.safetensors") / 2, '\0');
    std::ifstream(adapter / "adapter_model.safetensors", std::ios::binary)
        .read(bytes.data(), bytes.size());
    std::ofstream(tmp / "adapter_model.safetensors", std::ios::binary | std::ios::trunc) << bytes;
    RunSettings r2;
    r2.max_tokens = 8;
    r2.lora = read_adapter_config(tmp, base, r2.lora);
    LlamaModel m2(base, *be, r2);
    const std::string e = user_error([&] { load_adapter(tmp, m2); });
    EXPECT_NE(e.find("adapter_model.safetensors"), std::string::npos) << e;
  }
  auto with_config = [&](const std::function<void(nlohmann::json&)>& edit) {
    auto j = nlohmann::json::parse(std::ifstream(adapter / "adapter_config.json"));
    edit(j);
    std::ofstream(tmp / "adapter_config.json", std::ios::trunc) << j.dump();
    return user_error([&] { read_adapter_config(tmp, base, LoraSpec{}); });
  };
  EXPECT_NE(with_config([](auto& j) { j["use_dora"] = true; }).find("use_dora"), std::string::npos);
  EXPECT_NE(with_config([](auto& j) {
              j["target_modules"] = {"q_proj", "fc1"};
            }).find("fc1"),
            std::string::npos);
  EXPECT_NE(with_config([](auto& j) { j["r"] = -2; }).find("'r'"), std::string::npos);
  std::ofstream(tmp / "adapter_config.json", std::ios::trunc) << "{ not json";
  EXPECT_NE(
      user_error([&] { read_adapter_config(tmp, base, LoraSpec{}); }).find("adapter_config.json"),
      std::string::npos);

  // merge with a bad adapter writes nothing.
  const fs::path out = tmp / "merged";
  std::vector<std::string> args = {"merge",
                                   "--model_name_or_path",
                                   (kModels / "llama_head_dim").string(),
                                   "--adapter_name_or_path",
                                   adapter.string(),
                                   "--output_dir",
                                   out.string()};
  std::vector<char*> argv;
  for (auto& s : args) argv.push_back(s.data());
  const std::string me = user_error([&] { cmd_merge(static_cast<int>(argv.size()), argv.data()); });
  EXPECT_NE(me.find("adapter_model.safetensors"), std::string::npos) << me;
  EXPECT_FALSE(fs::exists(out)) << "merge wrote output for a bad adapter";
  fs::remove_all(tmp);
}

}  // namespace
}  // namespace lt
