#!/usr/bin/env python3
"""PyTorch eager baseline for bench_train: the same model folder, tokens, threads and step
(forward, loss, backward, AdamW) with transformers' LlamaForCausalLM in float32.

usage: torch_train.py MODEL_DIR SEQ [steps=3] [--threads N] [--attn sdpa|eager] [--ckpt]
Prints one JSON line like bench_train. Run each sequence length in a fresh process so that the
peak RSS (getrusage) belongs to that length alone.
"""
import argparse
import json
import resource
import time

import torch
from transformers import AutoModelForCausalLM


def bench_tokens(T, V):
    # The same generator as bench_train.cpp's bench_row (64-bit LCG, bits 33+).
    x, out = 12345, []
    for _ in range(T):
        x = (x * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        out.append((x >> 33) % V)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("seq", type=int)
    p.add_argument("steps", type=int, nargs="?", default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--ckpt", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32,
                                                 attn_implementation=a.attn)
    model.config.use_cache = False
    if a.ckpt:
        model.gradient_checkpointing_enable()
    model.train()
    ids = torch.tensor([bench_tokens(a.seq, model.config.vocab_size)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.item()

    first = step()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    secs = (time.perf_counter() - t0) / a.steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"impl": "pytorch", "settings": a.attn + ("+ckpt" if a.ckpt else ""),
                      "seq": a.seq, "threads": a.threads, "loss": round(first, 6),
                      "step_s": round(secs, 4), "tokens_per_s": round(a.seq / secs, 1),
                      "peak_bytes": peak, "torch": torch.__version__}), flush=True)


if __name__ == "__main__":
    main()
