#!/usr/bin/env python3
"""transformers loads a longtune-written model folder and reproduces longtune's logits.

Usage: check_hf_roundtrip.py MODEL_DIR [MODEL_DIR ...]
Each MODEL_DIR is a folder written by longtune (init, train, merge, convert; one file or sharded,
any dtype) holding longtune_logits.safetensors, written by
  longtune generate --model_name_or_path MODEL_DIR --prompt_ids 1,2,3 \
      --dump_logits MODEL_DIR/longtune_logits.safetensors
(an f32 tensor "logits" (P, V) and the prompt ids in its metadata). The folder is loaded with
AutoModelForCausalLM.from_pretrained in float32 (bf16/f16 weights widen exactly), with no missing,
unexpected or mismatched tensors allowed, and its logits on the same ids are compared.
Exit 0 when every folder matches within the tolerance.
"""
import json
import sys

import numpy as np
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

# Both sides compute in f32 with different summation orders: 1e-4 relative to the largest logit.
REL_TOL = 1e-4


def saved_dtype(model_dir):
    with open(f"{model_dir}/config.json") as f:
        c = json.load(f)
    return c.get("dtype", c.get("torch_dtype", "?"))


def check(model_dir):
    with safe_open(f"{model_dir}/longtune_logits.safetensors", framework="np") as f:
        ids = json.loads(f.metadata()["input_ids"])
        ref = f.get_tensor("logits").astype(np.float64)
    model, info = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, output_loading_info=True)
    problems = {k: v for k, v in info.items() if k != "error_msgs" and v} if info else {}
    if info and info.get("error_msgs"):
        problems["error_msgs"] = info["error_msgs"]
    model.eval()
    with torch.no_grad():
        got = model(torch.tensor([ids])).logits[0].double().numpy()
    if got.shape != ref.shape:
        print(f"FAIL {model_dir}: logits shape {got.shape}, longtune wrote {ref.shape}")
        return False, float("inf")
    diff = np.abs(got - ref)
    worst = np.unravel_index(np.argmax(diff), diff.shape)
    tol = REL_TOL * max(1.0, float(np.abs(ref).max()))
    ok = diff.max() <= tol and not problems
    print(f"{'ok  ' if ok else 'FAIL'} {model_dir}: {type(model).__name__}, "
          f"saved as {saved_dtype(model_dir)}, "
          f"{len(ids)} ids, max |logit diff| {diff.max():.3e} at {tuple(int(i) for i in worst)} "
          f"(transformers {got[worst]:.6f}, longtune {ref[worst]:.6f}; tol {tol:.1e})"
          + (f"; loading problems: {problems}" if problems else ""))
    return ok, float(diff.max())


def main():
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    results = [check(d) for d in sys.argv[1:]]
    print(f"max |logit diff| over {len(results)} folders: {max(r[1] for r in results):.3e}")
    return 0 if all(r[0] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
