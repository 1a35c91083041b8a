// The Llama-family decoder (Llama, Mistral, Qwen2): explicit per-layer forward and backward
// over one micro-batch whose rows are concatenated into N tokens (documents never attend to
// one another), with mini-sequence MLP / LM head and per-layer activation checkpointing.
#pragma once
#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "core/memory.h"
#include "model/config.h"
#include "model/lora.h"
#include "model/params.h"

namespace lt {

// How the memory-saving techniques are set for a run.
struct RunSettings {
  int64_t max_tokens = 0;      // N: the most tokens of one micro-batch (rows concatenated)
  int64_t mlp_chunks = 1;      // M: the MLP runs over ceil(N/M)-token chunks (1 = whole)
  int64_t lm_head_chunks = 1;  // the LM head + loss runs over ceil(N/M)-token chunks
  bool checkpointing = false;  // keep only each layer's input; recompute in backward
  // Layer inputs live in a memory-mapped file (dir below) and leave resident memory between
  // their forward use and their backward use; the next one is prefetched (needs checkpointing).
  bool offload_checkpoints = false;
  std::string offload_dir;
  bool flash_attention = true;  // tiled attention; false = plain O(T^2) attention
  // The residual stream rounded to bf16 at every layer boundary (the embedding output and each
  // layer's output), as a bf16 model carries it (--bf16 True); gradients pass straight through.
  // With checkpointing the layer inputs are then kept in bf16: half the bytes, on the device or
  // offloaded.
  bool bf16_residual = false;
  // Selective recomputation (--recompute_granularity selective, Megatron-LM's name): with
  // checkpointing, every layer's attention output and log-sum-exp are kept from the forward, so
  // the backward's recompute runs no attention forward (norms, projections and the MLP are
  // recomputed as before). Costs (N, heads x head dim + heads) f32 per layer. Nothing without
  // checkpointing; not with the sequence path.
  bool keep_attention = false;
  bool train = true;  // false: no gradients, no backward buffers (eval, generate)
  LoraSpec lora;      // LoRA adapters / QLoRA NF4 base (lora.enabled = false: full)
  // LoRA dropout: the dropped-out input and its gradient are buffers of this many rows of the
  // widest projection input, and a projection's adapter runs over row blocks that fit them (its
  // masks are keyed by token, so the same elements drop).
  int64_t lora_dropout_rows = 4096;
  // Parameters and gradients are not allocated by the model: a LayerWeightsProvider supplies
  // their views layer by layer (ZeRO-2/3, src/dist/zero.h).
  bool external_params = false;

  // ---- Parallel layouts (src/dist) ----
  // Pipeline stage: this model holds decoder layers [layer_begin, layer_end) (-1: to the last);
  // the stage with layer 0 also holds the embedding, the stage with the last layer the final
  // norm and the LM head (and, with tied embeddings, its own copy of the embedding).
  int64_t layer_begin = 0, layer_end = -1;
  // Micro-batches in flight at once (a 1F1B pipeline stage: up to stages - stage): each slot has
  // its own tokens and layer inputs (and activations when nothing is recomputed).
  int64_t micro_slots = 1;
  // Sequence parallel (DeepSpeed-Ulysses) degree: max_tokens is then this rank's share of a
  // sequence, and attention runs on every token for H/P heads between two all-to-alls (through
  // a SequenceExchange). 1 = off.
  int64_t sp_degree = 1;
  // FPDT: the most tokens of the whole sequence in one attention chunk (a multiple of
  // sp_degree); q/k/v/out of every chunk live in pinned host memory and attention runs chunk
  // pair by chunk pair with online softmax. 0 = off (one chunk, device-resident).
  int64_t seq_chunk = 0;

  int64_t num_layers(const ModelConfig& c) const {
    return (layer_end < 0 ? c.num_hidden_layers : layer_end) - layer_begin;
  }
  bool sequence_path() const { return sp_degree > 1 || seq_chunk > 0; }
};

// The all-to-all of sequence parallelism, on device buffers (src/dist/sequence.h provides it
// over a communicator). Block j of send goes to rank j of the group; block j of recv came from
// rank j; n floats per block.
class SequenceExchange {
 public:
  virtual ~SequenceExchange() = default;
  virtual int degree() const = 0;
  virtual int rank() const = 0;
  virtual void alltoall(float* recv, const float* send, size_t n) = 0;
};

// Supplies parameter (and gradient) views when they are not all resident in the model (ZeRO-2/3
// over MPI). The model asks for a unit's views just before it runs it and hands them back right
// after; unit l is decoder layer l, unit kOuter everything else (embedding, final norm, LM head)
// held for the whole pass. For kBackward the gradient views are valid too, zeroed on acquire and
// accumulated (+=) by the model until release.
class LayerWeightsProvider {
 public:
  enum class Pass { kForward, kBackward };
  static constexpr int64_t kOuter = -1;
  virtual ~LayerWeightsProvider() = default;
  // Fills w (and g for kBackward) for the unit; views stay valid until release(unit, pass).
  virtual void acquire(int64_t unit, Pass pass, ModelWeights* w, ModelWeights* g) = 0;
  virtual void release(int64_t unit, Pass pass) = 0;
};

// One frozen base weight stored packed: a projection in NF4 (QLoRA, ops/nf4.h) or bf16 (LoRA
// with --bf16 True), the embedding and LM head in bf16 (LoRA/QLoRA with --bf16 True); device
// pointers into the "weights_packed" arena. Widened to f32 (a projection one weight at a time,
// the LM head a block of rows at a time) or multiplied as bf16 (CUDA's bf16 GEMMs).
enum class PackedFormat { kNf4, kBf16 };
struct PackedWeight {
  std::string name;  // Hugging Face name of the (OUT,IN) weight
  PackedFormat format = PackedFormat::kNf4;
  int64_t numel = 0;
  uint8_t* packed = nullptr;      // NF4 codes (ceil(numel/2)) or bf16 values (2 numel bytes)
  uint8_t* absmax_q = nullptr;    // NF4: (ceil(numel/64))
  float* absmax_scale = nullptr;  // NF4: (ceil(numel/64/256))
  float absmax_offset = 0;        // NF4: host value
};

// One micro-batch: its rows concatenated. Row r spans [row_start[r], row_start[r+1]).
struct MicroBatch {
  std::vector<int32_t> ids;        // (N) token ids
  std::vector<int32_t> pos;        // (N) position ids (restart at each document)
  std::vector<int32_t> docs;       // (N) global document index: attention never crosses it
  std::vector<int32_t> targets;    // (N) next-token label (labels shifted within each row)
  std::vector<int64_t> row_start;  // (rows + 1)
  // Sequence-parallel share (src/dist/sequence.h): these N tokens are seq_chunks equal runs of
  // a padded sequence of seq_docs.size() tokens (run i of rank r is chunk i's r-th part);
  // seq_docs are its document ids, rope_len the RoPE length of each row (its longest position
  // + 1 in the whole sequence). Empty for an ordinary micro-batch.
  std::vector<int32_t> seq_docs;
  int64_t seq_chunks = 1;
  std::vector<int32_t> rope_len;  // (rows) or empty
  int64_t seq_row0 = 0;           // LoRA dropout rows: the first token's index in the sequence
  int64_t num_tokens() const { return static_cast<int64_t>(ids.size()); }
  int64_t num_targets() const;  // labelled targets (!= kIgnoreIndex)
};

// Receives every buffer the model needs: the planner sums them, the allocator binds them.
class BufferBinder {
 public:
  virtual ~BufferBinder() = default;
  virtual float* take(const std::string& name, size_t count, MemCategory category,
                      const std::string& arena) = 0;
  // A byte buffer (NF4 storage); by default a float buffer of at least that size.
  virtual void* take_bytes(const std::string& name, size_t bytes, MemCategory category,
                           const std::string& arena) {
    return take(name, (bytes + 3) / 4, category, arena);
  }
};

class LlamaModel {
 public:
  // A frozen bf16 LM head is widened (where a backend widens) this many vocabulary rows at a time.
  static constexpr int64_t kHeadExpandRows = 4096;
  LlamaModel(const ModelConfig& config, Backend& backend, const RunSettings& settings);
  ~LlamaModel();

  // Adds this model's buffers (weights, grads, activations, scratch) to a memory plan.
  static void plan(const ModelConfig& config, const RunSettings& settings, MemoryPlan* plan);

  const ModelConfig& config() const { return config_; }
  Backend& backend() { return be_; }
  const ParamTable& table() const { return table_; }
  const RunSettings& settings() const { return settings_; }
  float* params() { return params_; }  // (table().total_numel()) f32; null with external_params
  float* grads() { return grads_; }    // same layout; null when !settings.train, LoRA or external
  // Required before any pass when settings.external_params (not owned).
  void set_weights_provider(LayerWeightsProvider* p) { provider_ = p; }
  const ModelWeights& weights() const { return w_; }

  // What the optimizer updates: every table tensor (full fine-tune), or the LoRA A/B tensors
  // followed by the base tensors that also train (embed, norms). Empty when !settings.train.
  const std::vector<TrainableTensor>& trainable() const { return trainable_; }
  // The parameter table of a model of these settings (its stage's tensors, less NF4 weights).
  static ParamTable param_table(const ModelConfig& config, const RunSettings& settings);
  // trainable() of a model of these settings without the pointers (name, numel, decay), in
  // the same order: how a checkpoint lays out the optimizer moments.
  static std::vector<TrainableTensor> trainable_layout(const ModelConfig& config,
                                                       const RunSettings& settings);
  // Sum of trainable()'s numel (aligned) for a configuration (sizes the optimizer before the
  // model exists).
  static int64_t trainable_numel(const ModelConfig& config, const RunSettings& settings);
  // Zeroes every trainable gradient (the start of a step).
  void zero_grads();
  // LoRA: the adapter tensors (A then B of every target), one f32 block of table layout.
  const LoraTable& lora_table() const { return lora_table_; }
  float* lora_params() { return lora_params_; }
  float* lora_grads() { return lora_grads_; }
  // QLoRA / bf16 LoRA: the packed frozen base weights (fill with pack_base_weight).
  const std::vector<PackedWeight>& packed_weights() const { return packed_; }
  // Packs w (host, numel f32) into packed_weights()[i] (NF4 quantization or bf16 rounding).
  void pack_base_weight(size_t i, const float* w);
  // True when `name` is stored packed (NF4 or bf16) under this spec; its format.
  static bool is_packed(const LoraSpec& s, const std::string& name);
  static PackedFormat packed_format(const LoraSpec& s, const std::string& name);
  // True when base tensor `name` trains under this LoRA spec (modules_to_save).
  static bool base_trains(const LoraSpec& s, const std::string& name);
  // True when base tensor `name` belongs to the pipeline stage of these settings.
  static bool in_stage(const ModelConfig& c, const RunSettings& s, const std::string& name);

  // Forward + backward of one micro-batch. Parameter gradients are accumulated (+=) with
  // grad_scale applied (1 / labelled tokens of the whole effective batch). Returns the sum of
  // token cross-entropy over the micro-batch's labelled targets.
  double forward_backward(const MicroBatch& mb, float grad_scale);
  // Forward only: the loss sum (no gradients).
  double forward_loss(const MicroBatch& mb);
  // Forward only: logits (N,V) of every token.
  void forward_logits(const MicroBatch& mb, float* logits);

  // ---- Pipeline stages (src/dist/pipeline.h): the same computation piece by piece, with up
  // to settings.micro_slots micro-batches in flight. Pointers are device pointers (N,D).
  bool first_stage() const { return layer_begin_ == 0; }
  bool last_stage() const { return layer_end_ == config_.num_hidden_layers; }
  int64_t layer_begin() const { return layer_begin_; }
  int64_t layer_end() const { return layer_end_; }
  // Forward of this stage's layers for mb in `slot`: from the embedding on the first stage,
  // else from `input` (the previous stage's output).
  // `training`: a pass whose backward follows (LoRA dropout on); else forward only.
  void stage_forward(const MicroBatch& mb, int64_t slot, const float* input, bool training);
  // The slot's output (not on the last stage), valid until the slot's backward starts.
  const float* stage_output(int64_t slot);
  // Last stage: final norm, LM head and loss, then the backward of its layers (and of the
  // embedding on a single stage). Returns the loss sum of the slot's micro-batch.
  double stage_loss_backward(int64_t slot, float grad_scale);
  // Last stage, forward only: the loss sum of the slot's micro-batch.
  double stage_loss(int64_t slot);
  // Backward of this stage's layers from dL/d(output) (the next stage's input gradient).
  void stage_backward(int64_t slot, const float* dout);
  // dL/d(input) of the last backward (not on the first stage), valid until the next backward.
  const float* stage_input_grad();
  // Sequence parallel: the exchange between the ranks that share a sequence (required when
  // settings.sp_degree > 1; not owned).
  void set_sequence_exchange(SequenceExchange* x) { sp_ = x; }

  // Debug hook: when set, called with every named intermediate (name, data, count).
  using DumpHook = void (*)(void* user, const std::string& name, const float* data, size_t n);
  void set_dump_hook(DumpHook hook, void* user) { dump_ = hook, dump_user_ = user; }

 private:
  struct LayerActs;
  struct Work;
  struct Slot;
  struct SeqWork;
  // One projection of a layer as the forward and backward see it (see project()).
  struct LinearSlot {
    Proj proj = Proj::kQ;
    int64_t in = 0, out = 0;
    const float* weight = nullptr;                       // (OUT,IN) f32; null when packed
    int64_t packed = -1;                                 // index into packed_ when packed
    const float* bias = nullptr;                         // (OUT) or null
    float *grad_weight = nullptr, *grad_bias = nullptr;  // null when frozen
    const float *lora_a = nullptr, *lora_b = nullptr;    // (R,IN), (OUT,R); null: no adapter
    float *grad_a = nullptr, *grad_b = nullptr;
  };
  struct Bound {
    float* params = nullptr;
    float* grads = nullptr;
    std::map<std::string, float*> base_grads;  // LoRA: gradients of base tensors that train
    float* lora_params = nullptr;
    float* lora_grads = nullptr;
    std::vector<PackedWeight> packed;
    std::vector<std::unique_ptr<Slot>> slots;
    std::unique_ptr<LayerActs> shared_acts;  // with checkpointing: one set for every layer
    std::unique_ptr<Work> work;
    std::unique_ptr<SeqWork> seq;  // sequence path only
  };
  // The one list of buffers: a sizing binder turns it into the plan, an arena binder binds it.
  static void declare_buffers(const ModelConfig& c, const RunSettings& s, BufferBinder& b,
                              Bound* out);
  // The residual stream at the input of layer l (l_end: the stage's output) of the current
  // slot, or of slot sl.
  float* res(int64_t l);
  float* res_of(const Slot& sl, int64_t l) const;
  void prepare(const MicroBatch& mb, int64_t slot, bool training);
  void forward_layers(const float* input);
  void backward_layers();
  enum class Pass { kForward, kRecompute };
  void layer_forward(int64_t l, LayerActs& a, Pass pass);
  void layer_backward(int64_t l, LayerActs& a, float* dres);
  // DeepSpeed-Ulysses attention: q/k/v projections and RoPE, all-to-all to whole sequences of
  // H/P heads, attention, all-to-all back into a.attn_out; its backward (from dattn, dL/d(out),
  // through dq, both (N, H*HD)) into k.dnorm.
  void seq_attention_forward(int64_t l, LayerActs& a);
  void seq_attention_backward(int64_t l, LayerActs& a, float* dattn, float* dq);
  // FPDT: a whole layer's forward (kRecompute: up to the stored attention output) and backward,
  // chunk by chunk over the sequence.
  void fpdt_forward(int64_t l, LayerActs& a, Pass pass);
  void fpdt_backward(int64_t l, LayerActs& a, float* dres);
  // Rows of a local (c, width) tensor -> one chunk of the whole sequence in head layout
  // (c * P, width / P), and back.
  void to_heads(float* dst, const float* src, int64_t c, int64_t width);
  void from_heads(float* dst, const float* src, int64_t c, int64_t width);
  // FPDT's host store: chunk i (n floats per chunk) read into the device buffer `stage` (an
  // asynchronous copy: wait_copies() before use), and written from a device buffer.
  const float* fetch_chunk(const float* store, int64_t i, int64_t n, float* stage);
  void put_chunk(float* store, int64_t i, int64_t n, const float* dev);
  // out (n,OUT) = inp (n,IN) W^T + b [+ LoRA]; row0 = inp's first token (dropout masks).
  void project(float* out, const float* inp, const LinearSlot& s, int64_t n, int64_t l,
               int64_t row0);
  // dinp (n,IN) overwritten or accumulated per acc (LoRA's share always added); weight, bias
  // and LoRA gradients accumulated (+=) where they exist.
  void project_backward(float* dinp, const LinearSlot& s, const float* dout, const float* inp,
                        int64_t n, int64_t l, int64_t row0, Accumulate acc);
  // The projections that share an input (n, hidden): q, k and v of the normed layer input,
  // gate and up of the MLP's; backward, dinp is overwritten with their input gradients summed.
  // The input is held for their GEMMs (Backend::hold_gemm_input: one bf16 rounding on CUDA).
  using Slots = std::array<LinearSlot, kNumProj>;
  void project_qkv(float* q, float* k, float* v, const float* inp, const Slots& sl, int64_t n,
                   int64_t l, int64_t row0);
  void project_qkv_backward(float* dinp, const float* dq, const float* dk, const float* dv,
                            const float* inp, const Slots& sl, int64_t n, int64_t l, int64_t row0);
  void project_gate_up(float* gate, float* up, const float* inp, const Slots& sl, int64_t n,
                       int64_t l, int64_t row0);
  void project_gate_up_backward(float* dinp, const float* dgate, const float* dup, const float* inp,
                                const Slots& sl, int64_t n, int64_t l, int64_t row0);
  const float* base_weight(const LinearSlot& s);
  // The projection's frozen bf16 weight (LoRA with --bf16 True), else null.
  const uint16_t* bf16_weight(const LinearSlot& s) const;
  LoraCall lora_call(int64_t l, Proj p, int64_t row0) const;
  void build_slots();
  void build_layer_slots(int64_t l);  // lin_[l] from w_.layers[l] and g_.layers[l]
  // Rows per LoRA call of projection s over n rows (dropout: what its buffers hold).
  int64_t lora_rows(const LinearSlot& s, int64_t n) const;
  // Fused LM head + loss over n rows from h (dnorm null: loss only; else dL/dh into dnorm and
  // the head's gradient accumulated when it trains), on the f32 or the bf16 head.
  double head_loss(float* dnorm, const float* h, const int32_t* targets, int64_t n, int64_t chunk,
                   float grad_scale);
  LayerActs& acts_for(int64_t l);
  Slot& slot() { return *slots_[cur_]; }
  const Slot& slot() const { return *slots_[cur_]; }
  // Staged checkpoints (no-ops unless training with offload or bf16 checkpoints): res(l) kept
  // in its store (forward), fetched back (backward, a layer ahead), made ready in its staging
  // buffer (backward, at its layer).
  void checkpoint_out(int64_t l);
  void checkpoint_in(int64_t l);
  void checkpoint_ready(int64_t l);
  // Copies between an offloaded store and a device buffer (asynchronous; piecewise with pages
  // released on a file-backed store, reading `next` ahead).
  void offload_copy(void* store, void* dev, size_t bytes, bool out, void* next);
  // Checkpoints kept in bf16 (training, checkpointing and RunSettings::bf16_residual).
  static bool bf16_checkpoints(const RunSettings& s);
  static bool keeps_attention(const RunSettings& s);
  // Pieces in which a file-backed checkpoint store is written and read (whole pages).
  static constexpr size_t kOffloadPiece = size_t(2) << 20;
  void dump(const std::string& name, const float* data, size_t n) const;
  // LayerWeightsProvider calls (no-ops without a provider).
  void acquire(int64_t unit, LayerWeightsProvider::Pass pass);
  void release(int64_t unit, LayerWeightsProvider::Pass pass);

  ModelConfig config_;
  Backend& be_;
  RunSettings settings_;
  ParamTable table_;
  std::map<std::string, Arena> arenas_;
  Arena* offload_arena_ = nullptr;  // arenas_["offload"] when checkpoints are offloaded
  float* params_ = nullptr;
  float* grads_ = nullptr;
  ModelWeights w_, g_;
  std::map<std::string, float*> base_grads_;
  LoraTable lora_table_;
  float* lora_params_ = nullptr;
  float* lora_grads_ = nullptr;
  std::vector<PackedWeight> packed_;
  const uint16_t *embed16_ = nullptr, *head16_ = nullptr;  // packed bf16 embedding / LM head
  std::vector<std::array<LinearSlot, kNumProj>> lin_;      // (L) x 7 (this stage's layers set)
  std::vector<TrainableTensor> trainable_;
  uint64_t micro_batches_done_ = 0;  // keys the LoRA dropout masks
  bool dropout_on_ = false;          // only while training (PEFT: train mode)
  int64_t layer_begin_ = 0, layer_end_ = 0;
  std::vector<std::unique_ptr<Slot>> slots_;
  std::unique_ptr<LayerActs> shared_acts_;
  std::unique_ptr<Work> work_;
  std::unique_ptr<SeqWork> seq_;
  SequenceExchange* sp_ = nullptr;
  int64_t cur_ = 0;            // the slot being run
  int64_t last_forward_ = -1;  // the slot whose forward ran last (its final norm is in Work)
  int64_t n_ = 0;              // tokens of the current slot's micro-batch
  DumpHook dump_ = nullptr;
  void* dump_user_ = nullptr;
  LayerWeightsProvider* provider_ = nullptr;
};

}  // namespace lt
