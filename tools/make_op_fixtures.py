#!/usr/bin/env python3
"""Golden values for tests/test_ops.cpp from the real libraries (torch, transformers).

Writes tests/fixtures/ops/ops.json:
  adamw:          torch.optim.AdamW, 5 steps, weight decay, foreach=False and the default
  cross_entropy:  F.cross_entropy(h @ W^T, y, reduction='sum', ignore_index=-100), its grads
  rmsnorm:        transformers LlamaRMSNorm output
  rope:           transformers LlamaRotaryEmbedding cos/sin and apply_rotary_pos_emb
Run: /work/venv/bin/python tools/make_op_fixtures.py   (from the repo root)
"""
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from transformers.models.llama.modeling_llama import (LlamaConfig, LlamaRMSNorm,
                                                      LlamaRotaryEmbedding,
                                                      apply_rotary_pos_emb)

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "ops",
                   "ops.json")


def f32(x):
    """A python float exactly equal to the f32 nearest to x (what the C++ side will hold)."""
    return float(np.float32(x))


def flat(t):
    return t.detach().to(torch.float32).reshape(-1).tolist()


def adamw_case(foreach, n=37, steps=5, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, wd=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    lr, b1, b2, eps, wd = f32(lr), f32(betas[0]), f32(betas[1]), f32(eps), f32(wd)
    p0 = torch.randn(n, generator=g, dtype=torch.float32)
    grads = [torch.randn(n, generator=g, dtype=torch.float32) * (0.1 + k) for k in range(steps)]
    p = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, foreach=foreach)
    params, ms, vs = [], [], []
    for k in range(steps):
        p.grad = grads[k].clone()
        opt.step()
        st = opt.state[p]
        params.append(flat(p))
        ms.append(flat(st["exp_avg"]))
        vs.append(flat(st["exp_avg_sq"]))
    return {"foreach": foreach, "lr": lr, "beta1": b1, "beta2": b2, "eps": eps,
            "weight_decay": wd, "param0": flat(p0), "grads": [flat(x) for x in grads],
            "params": params, "exp_avg": ms, "exp_avg_sq": vs}


def cross_entropy_case(N=11, D=6, V=13, seed=1):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).requires_grad_()
    W = (torch.randn(V, D, generator=g) * 0.7).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    y[[0, 4, 5]] = -100
    loss = F.cross_entropy(h @ W.t(), y, reduction="sum", ignore_index=-100)
    loss.backward()
    return {"N": N, "D": D, "V": V, "hidden": flat(h), "weight": flat(W), "targets": y.tolist(),
            "loss": float(loss.detach()), "dhidden": flat(h.grad), "dweight": flat(W.grad)}


def rmsnorm_case(N=5, D=10, eps=1e-6, seed=2):
    g = torch.Generator().manual_seed(seed)
    norm = LlamaRMSNorm(D, eps=eps)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(D, generator=g))
    x = torch.randn(N, D, generator=g) * torch.tensor([1e-3, 0.1, 1.0, 10.0, 300.0])[:, None]
    y = norm(x)
    return {"N": N, "D": D, "eps": eps, "input": flat(x), "weight": flat(norm.weight),
            "output": flat(y)}


def rope_case(seed=3):
    g = torch.Generator().manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=131072, rope_theta=500000.0)
    rot = LlamaRotaryEmbedding(cfg)
    pos = torch.tensor([[0, 1, 7, 100, 4097, 131071]])
    H, HD = 4, 16
    q = torch.randn(1, H, pos.shape[1], HD, generator=g)  # (B,H,T,HD), transformers' layout
    cos, sin = rot(q, pos)
    q_rot, _ = apply_rotary_pos_emb(q, q, cos, sin)
    return {"H": H, "HD": HD, "positions": pos[0].tolist(), "inv_freq": flat(rot.inv_freq),
            "attention_scaling": float(rot.attention_scaling),
            "cos": flat(cos[0, :, : HD // 2]), "sin": flat(sin[0, :, : HD // 2]),
            # (N,H,HD) as longtune stores it
            "input": flat(q[0].transpose(0, 1)), "output": flat(q_rot[0].transpose(0, 1))}


def main():
    torch.manual_seed(0)
    data = {
        "generator": f"tools/make_op_fixtures.py, torch {torch.__version__}, "
                     f"transformers {transformers.__version__}",
        "adamw": [adamw_case(False), adamw_case(None),
                  adamw_case(False, betas=(0.3, 0.95), wd=0.0, lr=3e-3, seed=5)],
        "cross_entropy": cross_entropy_case(),
        "rmsnorm": rmsnorm_case(),
        "rope": rope_case(),
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(data, f)
    print("wrote", os.path.normpath(OUT), os.path.getsize(OUT), "bytes")


if __name__ == "__main__":
    main()
