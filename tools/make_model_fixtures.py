#!/usr/bin/env python3
"""Golden files for longtune's model tests: tiny random Llama/Mistral/Qwen2 models, their logits,
losses, every gradient and several HF-Trainer-style AdamW steps, all computed by transformers in
float64.

Usage:  /work/venv/bin/python tools/make_model_fixtures.py --out tests/fixtures/models [--only CASE]
(transformers 5.23, torch 2.15, CPU only; deterministic: every case has a fixed seed.)

FORMAT (a contract with the C++ tests; one folder tests/fixtures/models/<case>/ per case)
  config.json, model.safetensors
      model.save_pretrained() of the INITIAL weights, untouched (f32; bf16 for qwen2_bias).
      Tied embeddings: model.safetensors has no lm_head.weight.
  batch.json
      {"micro_batches_per_step": G, "steps": S,
       "micro_batches": [ [ {"input_ids": [..], "labels": [..], "position_ids": [..]?}, ...R rows ],
                          ... S*G micro-batches in training order ]}
      Rows of one micro-batch have different lengths; each row is run on its own (batch size 1,
      no padding; proved equal to right padding + attention_mask by a self-check).
      position_ids is present only in the packed case (then it must be passed to the model).
  case.json
      arch, hyper-parameters (learning_rate, weight_decay, adam_beta1/2, adam_epsilon,
      max_grad_norm, lr_scheduler_type, warmup_steps, max_steps, gradient_accumulation_steps),
      decay / no_decay parameter names, clipped (per step), notes.
  expected.safetensors (all F32)
      logits            (T, V)   step 0, micro-batch 0, row 0 (packed case: the packed row)
      rope_inv_freq     (HD/2,)  inv_freq transformers used for that row (after dynamic update)
      loss_sum          (S*G, R) sum over the row of CE(logits[:-1], labels[1:]), ignore -100
      num_items         (S,)     count of labels[..., 1:] != -100 over all rows of the step's G
                                 micro-batches (HF Trainer's num_items_in_batch)
      lr                (S,)     scheduler.get_last_lr() used by optimizer.step() of each step
      grad_norm         (S,)     total L2 norm of all gradients before clipping
      grad.<hf name>    accumulated gradient of step 0 (before clipping), every parameter
      final.<hf name>   every parameter after S optimizer steps
      <hf name> is the name in model.safetensors; tied models have only model.embed_tokens.weight
      (its gradient holds both the embedding and the lm_head contributions).

TRAINING RECIPE (HF Trainer semantics, float64 from the stored f32/bf16 weights)
  for each step s: num_items = sum over the G micro-batches' rows of (labels[1:] != -100)
    for each micro-batch, for each row: loss_sum = CE_sum(model(ids[, pos]).logits[:-1], labels[1:])
      (loss_sum / num_items).backward()              # gradients accumulate across the step
    grad_norm = clip_grad_norm_(params, max_grad_norm)   # coef = min(1, max / (norm + 1e-6))
    lr = scheduler.get_last_lr(); AdamW.step(); scheduler.step(); zero_grad()
  AdamW = torch.optim.AdamW(foreach=False), step t = 1, 2, ...: p *= 1 - lr*wd; m = b1*m + (1-b1)*g;
  v = b2*v + (1-b2)*g^2; p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps).
  Param groups as HF Trainer: names from Trainer.get_decay_parameter_names (no bias, no *norm*)
  get weight_decay, the rest 0.
  Scheduler: transformers.get_scheduler(type, opt, num_warmup_steps, num_training_steps=S).

FLOAT64 REFERENCE
  Stock transformers keeps two things in float32 even for a float64 model: the eager softmax
  (softmax(..., dtype=float32)) and the RoPE tables (pos*inv_freq, cos, sin). This script swaps in
  float64 versions of both (eager_attention_f64, rope_forward_f64; inv_freq itself is still the
  f32 value transformers computes, i.e. the golden files use f32-rounded inv_freq, stored as
  rope_inv_freq) and asserts that stock transformers agrees within 1e-5 relative (notes).

TRANSFORMERS BEHAVIOUR THE C++ ENGINE MUST MATCH (checked in 5.23, see notes in case.json)
  * dynamic RoPE: seq_len = max(position_ids) + 1 of the current forward; if seq_len >
    max_position_embeddings, base' = base * ((factor*seq_len/mpe) - (factor-1))^(dim/(dim-2)).
    transformers keeps that state across calls (it only grows, and resets below mpe); this
    script resets the rotary module before every forward so each row depends only on itself.
  * Mistral sliding_window w: query i sees keys j with i - w < j <= i (w keys, itself included).
  * Packed rows (position_ids restarting at 0, no attention_mask) are masked per document, but
    only when the forward has no KV cache: config.use_cache=True (the default) silently turns
    the document mask off, so every forward here passes use_cache=False.
  * yarn multiplies cos and sin by attention_factor = 0.1*ln(factor) + 1.
"""

import argparse
import copy
import json
import os
import shutil
import types

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import transformers
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM, Trainer, get_scheduler)
from transformers.modeling_rope_utils import dynamic_rope_update
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral
from transformers.models.qwen2 import modeling_qwen2

ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}

BASE_CONFIG = dict(
    vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    rms_norm_eps=1e-5, initializer_range=0.2, tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)

# max_grad_norm may be overridden per case (case["max_grad_norm"])
HYPER = dict(weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8,
             max_grad_norm=0.5)

# name, arch, config overrides, lr, scheduler, warmup, saved dtype, row lengths, extra
CASES = [
    dict(name="llama_gqa", arch="llama", config={}, lr=1e-3, sched="constant", warmup=1,
         trainer_check=True),
    dict(name="llama_tied_mha", arch="llama",
         config=dict(tie_word_embeddings=True, num_key_value_heads=4),
         lr=3e-3, sched="constant_with_warmup", warmup=1),
    dict(name="llama_head_dim", arch="llama",
         config=dict(head_dim=12, attention_bias=True, mlp_bias=True),
         lr=1e-3, sched="linear", warmup=1, trainer_check=True),
    dict(name="mistral_swa", arch="mistral", config=dict(sliding_window=5),
         lr=3e-3, sched="cosine", warmup=1, min_len=6),
    dict(name="qwen2_bias", arch="qwen2", config=dict(tie_word_embeddings=True),
         lr=1e-3, sched="constant", warmup=2, dtype=torch.bfloat16, trainer_check=True),
    dict(name="rope_linear", arch="llama",
         config=dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
         lr=3e-3, sched="constant_with_warmup", warmup=2),
    dict(name="rope_dynamic", arch="llama",
         config=dict(max_position_embeddings=16,
                     rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                      "rope_theta": 10000.0}),
         lr=1e-3, sched="linear", warmup=2,
         # the logits row (step 0, mb 0, row 0) has 24 tokens; lengths straddle 16
         lengths=[(24, 11), (14, 20), (18, 9), (23, 16), (12, 17), (24, 15)]),
    dict(name="rope_llama3", arch="llama",
         config=dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 16,
                                      "rope_theta": 10000.0}),
         lr=3e-3, sched="cosine", warmup=2, min_len=10, max_len=24),
    dict(name="rope_yarn", arch="llama",
         config=dict(rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                      "original_max_position_embeddings": 16,
                                      "rope_theta": 10000.0}),
         lr=1e-3, sched="constant", warmup=1, min_len=10, max_len=24,
         max_grad_norm=10.0),  # the one case whose steps are NOT clipped
    # constant lr so step 1 sees changed weights (a warmup would make step 0's lr 0)
    dict(name="llama_packed", arch="llama", config={}, lr=3e-3, sched="constant", warmup=1,
         packed=(5, 7, 6)),
]


# ---- float64 everywhere: stock transformers runs softmax and RoPE in float32 ----
STOCK_EAGER = {mod: mod.eager_attention_forward
               for mod in (modeling_llama, modeling_mistral, modeling_qwen2)}


def eager_attention_f64(module, query, key, value, attention_mask, scaling, dropout=0.0,
                        **kwargs):
    """transformers' eager_attention_forward with the softmax kept in the query dtype."""
    key_states = modeling_llama.repeat_kv(key, module.num_key_value_groups)
    value_states = modeling_llama.repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = torch.softmax(attn_weights, dim=-1)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states).transpose(1, 2).contiguous()
    return attn_output, attn_weights


@torch.no_grad()
def rope_forward_f64(self, x, position_ids):
    """LlamaRotaryEmbedding.forward with angles, cos and sin in float64 (inv_freq as stored)."""
    freqs = position_ids[..., None].double() * self.inv_freq.double()
    emb = torch.cat((freqs, freqs), dim=-1)
    return ((emb.cos() * self.attention_scaling).to(x.dtype),
            (emb.sin() * self.attention_scaling).to(x.dtype))


def use_exact_f64(model, enabled):
    """Switch between stock transformers (f32 softmax and RoPE) and the exact float64 path."""
    for mod, stock in STOCK_EAGER.items():
        mod.eager_attention_forward = eager_attention_f64 if enabled else stock
    rotary = model.model.rotary_emb
    if enabled:
        rotary.forward = types.MethodType(dynamic_rope_update(rope_forward_f64), rotary)
    elif "forward" in rotary.__dict__:
        del rotary.forward


def log(msg):
    print(msg, flush=True)


def build_initial_model(case, seed):
    """Random tiny model; norms 1 + 0.1*randn and biases 0.1*randn so both matter."""
    config_cls, model_cls = ARCHS[case["arch"]]
    kwargs = copy.deepcopy(BASE_CONFIG)
    kwargs.update(copy.deepcopy(case["config"]))
    config = config_cls(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn_like(param))
    return model.to(case.get("dtype", torch.float32))


def load_reference_model(case, folder):
    """The saved weights, loaded back by transformers and upcast to float64."""
    _, model_cls = ARCHS[case["arch"]]
    model = model_cls.from_pretrained(folder, attn_implementation="eager",
                                      dtype=case.get("dtype", torch.float32))
    stored = load_file(os.path.join(folder, "model.safetensors"))
    state = model.state_dict()
    for name, tensor in stored.items():
        assert torch.equal(state[name], tensor), f"{name} not loaded bit-exactly"
    model = model.double()
    model.train()
    use_exact_f64(model, True)  # dropout is 0; the mode only matters for parity with the Trainer
    return model


def reset_rope(model):
    """Undo dynamic-RoPE state so each forward depends only on its own position_ids."""
    rotary = model.model.rotary_emb
    rotary.inv_freq = rotary.original_inv_freq.clone()
    rotary.max_seq_len_cached = rotary.original_max_seq_len


def forward_row(model, row):
    """Logits (T, V) of one row run alone (batch size 1, no padding)."""
    reset_rope(model)
    ids = torch.tensor([row["input_ids"]])
    kwargs = {}
    if "position_ids" in row:
        kwargs["position_ids"] = torch.tensor([row["position_ids"]])
    # use_cache=False: with a cache, transformers skips packed-sequence masking (see notes)
    return model(input_ids=ids, use_cache=False, **kwargs).logits[0]


def row_loss_sum(logits, labels):
    return F.cross_entropy(logits[:-1], torch.tensor(labels[1:]), ignore_index=-100,
                           reduction="sum")


def make_batch(case, gen):
    """S*G micro-batches of R rows; labels = ids with row start and a few positions at -100."""
    if "packed" in case:
        ids, pos, doc, labels = [], [], [], []
        for k, length in enumerate(case["packed"]):
            doc_ids = torch.randint(0, 97, (length,), generator=gen).tolist()
            ids += doc_ids
            pos += list(range(length))
            doc += [k] * length
            labels += [-100] + doc_ids[1:]  # DataCollatorWithFlattening: no cross-doc target
        row = {"input_ids": ids, "labels": labels, "position_ids": pos}
        return 1, 2, [[row], [row]], doc
    G, S = 2, 3
    if "lengths" in case:
        lengths = case["lengths"]
    else:
        lo, hi = case.get("min_len", 6), case.get("max_len", 16)
        lengths = []
        for _ in range(S * G):
            a, b = torch.randperm(hi - lo + 1, generator=gen)[:2].tolist()
            lengths.append((lo + a, lo + b))
    micro_batches = []
    for pair in lengths:
        rows = []
        for length in pair:
            ids = torch.randint(0, 97, (length,), generator=gen).tolist()
            labels = list(ids)
            labels[0] = -100
            for p in torch.randperm(length - 1, generator=gen)[:2].tolist():
                labels[1 + p] = -100
            rows.append({"input_ids": ids, "labels": labels})
        micro_batches.append(rows)
    return G, S, micro_batches, None


def max_abs_diff(a, b):
    return (a - b).abs().max().item()


def check_padding_equivalence(model, rows):
    """Rows run alone == rows right-padded together with attention_mask (real tokens)."""
    T = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, :len(r["input_ids"])] = 1
    with torch.no_grad():
        reset_rope(model)
        padded = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        worst = 0.0
        for i, r in enumerate(rows):
            alone = forward_row(model, r)
            worst = max(worst, max_abs_diff(alone, padded[i, :len(r["input_ids"])]))
    return worst


def check_with_trainer(case, folder, micro_batches, G, S, final):
    """Run the real transformers.Trainer on the same data (right padding, sequential sampler)
    and return the worst |param - final| (its loss casts logits to f32, so ~1e-7 agreement)."""
    import tempfile
    from transformers import TrainingArguments
    model = load_reference_model(case, folder)
    rows = [r for mb in micro_batches for r in mb]
    R = len(micro_batches[0])

    def collate(features):
        T = max(len(f["input_ids"]) for f in features)
        batch = {"input_ids": torch.zeros(len(features), T, dtype=torch.long),
                 "attention_mask": torch.zeros(len(features), T, dtype=torch.long),
                 "labels": torch.full((len(features), T), -100, dtype=torch.long)}
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            batch["input_ids"][i, :n] = torch.tensor(f["input_ids"])
            batch["attention_mask"][i, :n] = 1
            batch["labels"][i, :n] = torch.tensor(f["labels"])
        return batch

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=R, gradient_accumulation_steps=G,
            max_steps=S, learning_rate=case["lr"], weight_decay=HYPER["weight_decay"],
            adam_beta1=HYPER["adam_beta1"], adam_beta2=HYPER["adam_beta2"],
            adam_epsilon=HYPER["adam_epsilon"], max_grad_norm=HYPER["max_grad_norm"],
            lr_scheduler_type=case["sched"], warmup_steps=case["warmup"], optim="adamw_torch",
            train_sampling_strategy="sequential", use_cpu=True, report_to="none",
            save_strategy="no", logging_strategy="no", remove_unused_columns=False,
            dataloader_num_workers=0, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
        trainer.train()
    return max(max_abs_diff(p.detach(), final[n]) for n, p in model.named_parameters())


def run_case(case, index, out_dir):
    global HYPER
    HYPER = dict(HYPER, max_grad_norm=case.get("max_grad_norm", 0.5))
    name = case["name"]
    folder = os.path.join(out_dir, name)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    seed = 1234 + 101 * index
    notes = []

    initial = build_initial_model(case, seed)
    initial.save_pretrained(folder, safe_serialization=True)
    model = load_reference_model(case, folder)
    config = model.config
    tied = config.tie_word_embeddings
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight

    gen = torch.Generator().manual_seed(seed + 7)
    G, S, micro_batches, doc_ids = make_batch(case, gen)
    with open(os.path.join(folder, "batch.json"), "w") as f:
        json.dump({"micro_batches_per_step": G, "steps": S, "micro_batches": micro_batches}, f)

    # ---- self-checks (fail loudly) ----
    first_row = micro_batches[0][0]
    with torch.no_grad():
        use_exact_f64(model, False)
        stock = forward_row(model, first_row)
        use_exact_f64(model, True)
        exact = forward_row(model, first_row)
    d_stock = max_abs_diff(stock, exact)
    assert d_stock < 1e-5 * exact.abs().max().item(), f"stock vs exact f64 differ by {d_stock}"
    notes.append(f"stock transformers in float64 (f32 softmax and RoPE) vs this script's exact "
                 f"float64 path: logits differ by {d_stock:.2g} (max |logit| "
                 f"{exact.abs().max().item():.3g})")
    with torch.no_grad():
        logits0 = forward_row(model, first_row)
    rope_inv_freq = model.model.rotary_emb.inv_freq.clone()
    if "packed" not in case and name != "rope_dynamic":
        worst = check_padding_equivalence(model, micro_batches[0])
        assert worst < 1e-10, f"{name}: padded vs alone differ by {worst}"
        notes.append(f"rows alone == right-padded batch with attention_mask (max diff {worst:.1e})")
    if name == "mistral_swa":
        with torch.no_grad():
            config.sliding_window = None
            full = forward_row(model, first_row)
            config.sliding_window = case["config"]["sliding_window"]
            again = forward_row(model, first_row)
        d = max_abs_diff(full, logits0)
        assert d > 1e-3, f"sliding window inactive (diff {d})"
        assert max_abs_diff(again, logits0) == 0.0
        # the first `window` positions see the same keys either way
        w = case["config"]["sliding_window"]
        assert max_abs_diff(full[:w], logits0[:w]) < 1e-12
        notes.append(f"sliding window active: logits differ from sliding_window=None by {d:.3g} "
                     f"(and are identical on the first {w} positions)")
    if name == "rope_dynamic":
        plain_cfg = copy.deepcopy(config)
        plain_cfg.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        plain = LlamaForCausalLM(plain_cfg).double()
        plain.load_state_dict(model.state_dict())
        plain.train()
        use_exact_f64(plain, True)
        with torch.no_grad():
            d_long = max_abs_diff(forward_row(plain, first_row), logits0)
            short = next(r for mb in micro_batches for r in mb
                         if len(r["input_ids"]) <= config.max_position_embeddings)
            d_short = max_abs_diff(forward_row(plain, short), forward_row(model, short))
        assert d_long > 1e-3, f"dynamic rope inactive at 24 tokens (diff {d_long})"
        assert d_short < 1e-12, f"dynamic rope changed a short row (diff {d_short})"
        # batching a short row with a long one changes the short row's rope (per-forward seq_len)
        d_batch = check_padding_equivalence(model, micro_batches[0])
        assert d_batch > 1e-3, "expected batch-dependent dynamic rope"
        # transformers' state persists: a long forward leaves scaled inv_freq for a later row
        # between mpe and that length
        with torch.no_grad():
            mid = next(r for mb in micro_batches for r in mb
                       if config.max_position_embeddings < len(r["input_ids"]) < 24)
            fresh = forward_row(model, mid)
            model(input_ids=torch.tensor([first_row["input_ids"]]))  # 24 tokens, grows state
            stale = model(input_ids=torch.tensor([mid["input_ids"]]), use_cache=False).logits[0]
        d_state = max_abs_diff(fresh, stale)
        notes.append(
            "dynamic rope: seq_len = max(position_ids)+1 of each forward; every row was run alone "
            "after resetting rotary_emb (inv_freq = original, max_seq_len_cached = mpe). "
            f"Logits at 24 tokens differ from default rope by {d_long:.3g}; rows <= 16 tokens "
            f"equal default rope (diff {d_short:.1e}). Right-padding the first micro-batch "
            f"together changes the short row by {d_batch:.3g} (batch max length sets seq_len), and "
            f"transformers' persistent state changes a {len(mid['input_ids'])}-token row by "
            f"{d_state:.3g} after a 24-token forward: both are avoided here.")
    if "packed" in case:
        with torch.no_grad():
            pieces = []
            for k in range(len(case["packed"])):
                sel = [i for i, d in enumerate(doc_ids) if d == k]
                doc_row = {"input_ids": [first_row["input_ids"][i] for i in sel]}
                pieces.append(forward_row(model, doc_row))
            separate = torch.cat(pieces)
            unmasked = model(input_ids=torch.tensor([first_row["input_ids"]]),
                             position_ids=torch.tensor([first_row["position_ids"]]),
                             attention_mask=torch.ones(1, len(doc_ids), dtype=torch.long),
                             use_cache=False).logits[0]
            with_cache = model(input_ids=torch.tensor([first_row["input_ids"]]),
                               position_ids=torch.tensor([first_row["position_ids"]])).logits[0]
        d = max_abs_diff(separate, logits0)
        assert d < 1e-10, f"packed row != per-document runs ({d})"
        d_unmasked = max_abs_diff(unmasked, logits0)
        d_cache = max_abs_diff(with_cache, logits0)
        notes.append(
            f"packed: transformers masks across documents when position_ids restart and "
            f"attention_mask is None (masking_utils.find_packed_sequence_indices); equals "
            f"per-document runs within {d:.1e}. Passing an all-ones attention_mask disables the "
            f"detection (logits then differ by {d_unmasked:.3g}). SURPRISE: so does the default "
            f"config.use_cache=True, even in train mode and with labels: the forward builds a "
            f"DynamicCache and create_causal_mask only looks for packing when past_key_values is "
            f"None (logits differ by {d_cache:.3g}); every forward here passes use_cache=False. "
            f"Labels of each document's first "
            f"token are -100 (DataCollatorWithFlattening), so no target crosses a document.")

    # cross-check our loss against the model's own loss with num_items_in_batch
    rows0 = [r for mb in micro_batches[:G] for r in mb]
    items0 = sum(sum(1 for l in r["labels"][1:] if l != -100) for r in rows0)
    with torch.no_grad():
        reset_rope(model)
        kw = {"position_ids": torch.tensor([first_row["position_ids"]])} \
            if "position_ids" in first_row else {}
        hf_loss = model(input_ids=torch.tensor([first_row["input_ids"]]), use_cache=False,
                        labels=torch.tensor([first_row["labels"]]),
                        num_items_in_batch=torch.tensor(items0), **kw).loss
    ours = row_loss_sum(logits0, first_row["labels"]) / items0
    # ForCausalLMLoss casts logits to float32 (logits.float()), hence the loose tolerance
    assert abs(hf_loss.item() - ours.item()) < 1e-6 * abs(ours.item()), \
        (hf_loss.item(), ours.item())

    # ---- training (HF Trainer semantics) ----
    named = list(model.named_parameters())  # tied weight appears once, as embed_tokens
    decay_names = set(Trainer.get_decay_parameter_names(None, model))
    groups = [
        {"params": [p for n, p in named if n in decay_names],
         "weight_decay": HYPER["weight_decay"]},
        {"params": [p for n, p in named if n not in decay_names], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=case["lr"],
                                  betas=(HYPER["adam_beta1"], HYPER["adam_beta2"]),
                                  eps=HYPER["adam_epsilon"], foreach=False)
    scheduler = get_scheduler(case["sched"], optimizer, num_warmup_steps=case["warmup"],
                              num_training_steps=S)
    loss_sums, num_items_list, lrs, grad_norms, clipped = [], [], [], [], []
    grads0 = None
    for step in range(S):
        step_mbs = micro_batches[step * G:(step + 1) * G]
        num_items = sum(sum(1 for l in r["labels"][1:] if l != -100) for mb in step_mbs for r in mb)
        num_items_list.append(num_items)
        for mb in step_mbs:
            sums = []
            for row in mb:
                loss_sum = row_loss_sum(forward_row(model, row), row["labels"])
                (loss_sum / num_items).backward()
                sums.append(loss_sum.item())
            loss_sums.append(sums)
        if step == 0:
            grads0 = {n: p.grad.detach().clone() for n, p in named}
        grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in named], HYPER["max_grad_norm"])
        grad_norms.append(grad_norm.item())
        clipped.append(bool(grad_norm.item() > HYPER["max_grad_norm"]))
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    if case.get("trainer_check"):
        final = {n: p.detach().clone() for n, p in named}
        d_trainer = check_with_trainer(case, folder, micro_batches, G, S, final)
        assert d_trainer < 1e-5, f"transformers.Trainer disagrees by {d_trainer}"
        notes.append(f"real transformers.Trainer (right padding, sequential sampler, adamw_torch) "
                     f"reaches the same final parameters within {d_trainer:.1g} (its loss casts "
                     f"logits to f32)")

    # ---- outputs ----
    f32 = lambda t: torch.as_tensor(t, dtype=torch.float64).to(torch.float32).contiguous()
    expected = {
        "logits": f32(logits0.detach()),
        "rope_inv_freq": f32(rope_inv_freq),
        "loss_sum": f32(loss_sums),
        "num_items": f32(num_items_list),
        "lr": f32(lrs),
        "grad_norm": f32(grad_norms),
    }
    stored_names = set(load_file(os.path.join(folder, "model.safetensors")).keys())
    assert stored_names == {n for n, _ in named}, (stored_names ^ {n for n, _ in named})
    for n, p in named:
        expected[f"grad.{n}"] = f32(grads0[n])
        expected[f"final.{n}"] = f32(p.detach())
    save_file(expected, os.path.join(folder, "expected.safetensors"))

    info = {
        "arch": type(model).__name__,
        "saved_dtype": str(case.get("dtype", torch.float32)).replace("torch.", ""),
        "reference_dtype": "float64",
        "seed": seed,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "learning_rate": case["lr"],
        **HYPER,
        "lr_scheduler_type": case["sched"],
        "warmup_steps": case["warmup"],
        "max_steps": S,
        "gradient_accumulation_steps": G,
        "rows_per_micro_batch": len(micro_batches[0]),
        "tied_embeddings": tied,
        "decay_parameters": sorted(n for n, _ in named if n in decay_names),
        "no_decay_parameters": sorted(n for n, _ in named if n not in decay_names),
        "grad_norm": grad_norms,
        "clipped": clipped,
        "clip_coefficient": "min(1, max_grad_norm / (grad_norm + 1e-6))",
        "run": ("each row run alone (batch size 1, no padding, attention_mask None); "
                "rotary_emb reset before every forward"),
        "notes": notes,
    }
    if doc_ids is not None:
        info["doc_ids"] = doc_ids
    with open(os.path.join(folder, "case.json"), "w") as f:
        json.dump(info, f, indent=1)
        f.write("\n")
    size = sum(os.path.getsize(os.path.join(folder, x)) for x in os.listdir(folder))
    log(f"{name:16s} {size / 1024:6.0f} KB  grad_norm {['%.3g' % g for g in grad_norms]} "
        f"clipped {clipped} lr {['%.2g' % x for x in lrs]}")
    return size


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder (tests/fixtures/models)")
    parser.add_argument("--only", default=None, help="generate one case only")
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    for index, case in enumerate(CASES):
        if args.only is None or args.only == case["name"]:
            run_case(case, index, args.out)


if __name__ == "__main__":
    main()
