#!/usr/bin/env python3
# Writes tests/fixtures/safetensors/tiny.safetensors with the Python safetensors library (F32,
# BF16, F16, F64 and I64 tensors plus metadata) and tiny.expected.json with every value as f32.
# With `--check FILE` instead reads FILE (written by longtune) with safetensors and torch and
# prints each tensor, to confirm that the Python side accepts our output.
# Run with the project venv: /work/venv/bin/python tools/make_safetensors_fixtures.py
import json
import os
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests/fixtures/safetensors")


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--check":
        with safe_open(sys.argv[2], framework="pt") as f:
            print("metadata", f.metadata())
            for k in f.keys():
                t = f.get_tensor(k)
                print(k, t.dtype, list(t.shape), t.float().flatten()[:4].tolist())
        return
    g = torch.Generator().manual_seed(0)
    tensors = {
        "model.embed_tokens.weight": torch.randn(5, 3, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(4, 3, generator=g).bfloat16(),
        "model.layers.0.mlp.up_proj.weight": torch.randn(2, 3, 2, generator=g).half(),
        "scalar_f64": torch.tensor(3.25, dtype=torch.float64),
        "positions": torch.arange(7, dtype=torch.int64),
        "empty": torch.zeros(0, 4),
    }
    path = os.path.join(OUT, "tiny.safetensors")
    save_file(tensors, path, metadata={"format": "pt", "note": "made by make_safetensors_fixtures"})
    expected = {}
    for k, t in tensors.items():
        expected[k] = {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape),
                       "values": [float(v) for v in t.double().flatten().tolist()]}
    with open(os.path.join(OUT, "tiny.expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
    print("wrote", path, os.path.getsize(path), "bytes")


if __name__ == "__main__":
    main()
