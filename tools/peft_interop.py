#!/usr/bin/env python3
"""LoRA interop with Hugging Face PEFT, both directions.

Fixture mode (default): for each case, PEFT (peft 0.21, transformers 5.23) puts a LoRA adapter on
a tiny fixture model, trains it 3 AdamW steps, saves it (adapter_config.json +
adapter_model.safetensors, float32) under tests/fixtures/lora/<case>/, and records in
expected.safetensors, computed in float64 from the saved float32 adapter:
  logits            (T0, V)   row 0 of micro-batch 0
  loss_sum          ()        summed token cross-entropy of micro-batch 0 (HF shifted labels)
  num_items         ()        labelled targets of micro-batch 0
  grad.<name>       gradient of loss_sum / num_items for every tensor of the saved adapter
tests/test_lora.cpp loads the adapter into longtune and must reproduce logits and gradients.

tests/fixtures/lora/nf4.safetensors holds an NF4 reference for the QLoRA test (independent numpy version of bitsandbytes' quantize_4bit with nf4,
blocksize 64, compress_statistics=True): per 64-block absmax, nearest NF4 code of w/absmax,
two codes per byte (first in the high nibble); absmax mean-centred, then 8-bit blockwise
dynamic quantization (create_dynamic_map(signed=True)) in blocks of 256.

Check mode: `peft_interop.py --check DIR` loads the adapter in DIR (written by longtune) on its
base model (adapter_config.json base_model_name_or_path) with PEFT and compares the logits with
DIR/longtune_logits.safetensors (tensors input_ids (T) and logits (T, V), f32; a tensor
nf4_base marks a QLoRA adapter, whose base projections are then NF4 round-tripped with the
reference quantizer first; bf16_base one trained over a bf16 base (projections, embedding, LM head), which torch then
rounds to bfloat16 and back). Exit 1 on a mismatch.
"""
import argparse
import json
import os
import shutil
import sys

import numpy as np
import torch
from safetensors.numpy import save_file, load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(ROOT, "tests", "fixtures", "models")
OUT = os.path.join(ROOT, "tests", "fixtures", "lora")

CASES = {
    # every projection, embed and norms also trained (LongLoRA's "embed,norm")
    "llama_gqa_all": dict(base="llama_gqa", r=4, alpha=8, rslora=False,
                          targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                   "up_proj", "down_proj"],
                          modules_to_save=["embed_tokens", "norm"]),
    # Qwen2 with q/k/v biases (frozen), rsLoRA scaling, a subset of projections
    "qwen2_bias_rslora": dict(base="qwen2_bias", r=3, alpha=6, rslora=True,
                              targets=["q_proj", "v_proj", "down_proj"], modules_to_save=None),
}


def load_base(name, dtype=torch.float64):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(os.path.join(MODELS, name), dtype=torch.float32)
    return m.to(dtype)


def micro_batches(base):
    with open(os.path.join(MODELS, base, "batch.json")) as f:
        return json.load(f)["micro_batches"]


def loss_sum(model, rows):
    """Summed token CE over rows (each row its own sequence) and the labelled-target count."""
    total, items = 0.0, 0
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        labels = torch.tensor([row["labels"]])
        logits = model(input_ids=ids).logits[0]
        tgt = labels[0, 1:]
        ce = torch.nn.functional.cross_entropy(logits[:-1], tgt, ignore_index=-100,
                                               reduction="sum")
        total = total + ce
        items += int((tgt != -100).sum())
    return total, items


def make_case(name, spec):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(1234)
    model = load_base(spec["base"])
    cfg = LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=0.0,
                     target_modules=spec["targets"], use_rslora=spec["rslora"],
                     modules_to_save=spec["modules_to_save"], task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-2, weight_decay=0.0)
    mbs = micro_batches(spec["base"])
    for step in range(3):  # move B away from zero so every gradient is informative
        opt.zero_grad()
        s, n = loss_sum(model, mbs[step])
        (s / n).backward()
        opt.step()
    out = os.path.join(OUT, name)
    shutil.rmtree(out, ignore_errors=True)
    model = model.float()
    model.save_pretrained(out)
    if os.path.exists(os.path.join(out, "README.md")):
        os.remove(os.path.join(out, "README.md"))
    # Reference computations in float64 from exactly the saved float32 adapter.
    with open(os.path.join(out, "adapter_config.json")) as f:
        acfg = json.load(f)
    acfg["base_model_name_or_path"] = "tests/fixtures/models/" + spec["base"]
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(acfg, f, indent=2, sort_keys=True)
    model = model.double()
    model.zero_grad()
    s, n = loss_sum(model, mbs[0])
    (s / n).backward()
    exp = {"loss_sum": np.array(s.item(), dtype=np.float64),
           "num_items": np.array(n, dtype=np.float64)}
    with torch.no_grad():
        ids = torch.tensor([mbs[0][0]["input_ids"]])
        exp["logits"] = model(input_ids=ids).logits[0].numpy().astype(np.float64)
    saved = load_file(os.path.join(out, "adapter_model.safetensors"))
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = pname.replace(".default", "").replace(".modules_to_save", "")
        assert key in saved, key
        exp["grad." + key] = p.grad.numpy().astype(np.float64)
    save_file(exp, os.path.join(out, "expected.safetensors"))
    print(f"{name}: loss {s.item() / n:.6f}, {len(saved)} adapter tensors -> {out}")


# ---- NF4 reference (bitsandbytes' algorithm, written independently in numpy) ----
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], dtype=np.float32)


def dynamic_map():
    data = []
    for i in range(7):
        bounds = np.linspace(0.1, 1.0, 2 ** i + 1)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += list(10.0 ** (i - 6) * means) + list(-(10.0 ** (i - 6)) * means)
    data += [0.0, 1.0]
    assert len(data) == 256
    return np.sort(np.array(data, dtype=np.float32))


def nearest(code, x):
    return np.abs(x[..., None].astype(np.float64) - code[None, :].astype(np.float64)).argmin(-1)


def nf4_quantize(w):
    n = w.size
    blocks = -(-n // 64)
    pad = np.zeros(blocks * 64, np.float32)
    pad[:n] = w
    b = pad.reshape(blocks, 64)
    absmax = np.abs(b).max(1).astype(np.float32)
    inv = np.where(absmax > 0, 1.0 / np.where(absmax > 0, absmax, 1), 0).astype(np.float32)
    q = nearest(NF4, b * inv[:, None]).reshape(-1).astype(np.uint8)
    packed = (q[0::2] << 4 | q[1::2]).astype(np.uint8)[: (n + 1) // 2]
    offset = np.float32(absmax.astype(np.float64).mean())
    centred = absmax - offset
    dyn = dynamic_map()
    sb = -(-blocks // 256)
    scales = np.zeros(sb, np.float32)
    aq = np.zeros(blocks, np.uint8)
    for c in range(sb):
        seg = centred[c * 256:(c + 1) * 256]
        m = np.float32(np.abs(seg).max())
        scales[c] = m
        aq[c * 256:(c + 1) * 256] = nearest(dyn, seg * (np.float32(1) / m if m > 0 else 0))
    return packed, aq, scales, offset


def nf4_dequantize(packed, aq, scales, offset, n):
    dyn = dynamic_map()
    codes = np.stack([packed >> 4, packed & 15], 1).reshape(-1)[:n]
    absmax = dyn[aq] * scales[np.arange(aq.size) // 256] + offset
    return NF4[codes] * absmax[np.arange(n) // 64]


def nf4_case():
    rng = np.random.default_rng(7)
    n = 64 * 260 + 37  # two absmax scale blocks and a partial last block
    w = (rng.standard_normal(n) * 0.05).astype(np.float32)
    w[5] = 0.9  # an outlier block
    packed, aq, scales, offset = nf4_quantize(w)
    deq = nf4_dequantize(packed, aq, scales, offset, n)
    return {"nf4.w": w, "nf4.packed": packed, "nf4.absmax_q": aq, "nf4.absmax_scale": scales,
            "nf4.absmax_offset": np.array([offset], np.float32),
            "nf4.dequantized": deq.astype(np.float32)}


def check(directory):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    with open(os.path.join(directory, "adapter_config.json")) as f:
        base = json.load(f)["base_model_name_or_path"]
    if not os.path.isabs(base):
        base = os.path.join(ROOT, base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    ref = load_file(os.path.join(directory, "longtune_logits.safetensors"))
    if "nf4_base" in ref:  # QLoRA: the adapter was trained on NF4 projections; use them too
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("_proj.weight"):
                    w = p.detach().numpy().reshape(-1)
                    packed, aq, scales, offset = nf4_quantize(w)
                    deq = nf4_dequantize(packed, aq, scales, offset, w.size).astype(np.float32)
                    p.copy_(torch.from_numpy(deq.reshape(p.shape)))
    if "bf16_base" in ref:  # LoRA with --bf16 True: the frozen base as torch rounds it
        with torch.no_grad():  # (projections, embedding, LM head; a trained embedding is saved)
            for name, p in model.named_parameters():
                if name.endswith(("_proj.weight", "embed_tokens.weight", "lm_head.weight")):
                    p.copy_(p.to(torch.bfloat16).to(torch.float32))
    model = PeftModel.from_pretrained(model.double(), directory).double().eval()
    ids = torch.tensor(ref["input_ids"].astype(np.int64))[None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].numpy()
    got = ref["logits"].astype(np.float64)
    err = np.abs(logits - got)
    worst = np.unravel_index(err.argmax(), err.shape)
    tol = 1e-4 + 1e-4 * np.abs(logits)
    ok = bool((err <= tol).all())
    print(f"{directory}: max |PEFT - longtune| = {err.max():.3g} at {worst} "
          f"(PEFT {logits[worst]:.6f}, longtune {got[worst]:.6f}) -> {'OK' if ok else 'MISMATCH'}")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", nargs="+", help="adapter folders written by longtune")
    a = ap.parse_args()
    if a.check:
        results = [check(d) for d in a.check]
        sys.exit(0 if all(results) else 1)
    os.makedirs(OUT, exist_ok=True)
    for name, spec in CASES.items():
        make_case(name, spec)
    save_file(nf4_case(), os.path.join(OUT, "nf4.safetensors"))


if __name__ == "__main__":
    main()
