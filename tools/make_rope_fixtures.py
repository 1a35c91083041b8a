#!/usr/bin/env python3
# Writes tests/fixtures/rope/rope_cases.json: for each config (rope type and parameters), the
# inv_freq and attention_scaling that transformers' rotary embedding uses after one forward pass
# over positions 0..seq_len-1 (so "dynamic" goes through dynamic_rope_update as in training).
# Run with the project venv: /work/venv/bin/python tools/make_rope_fixtures.py
import json
import os

import torch
import transformers
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def base(head_dim, theta=10000.0, max_pos=2048, heads=4, explicit_head_dim=False):
    d = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": head_dim * heads,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "vocab_size": 128,
        "max_position_embeddings": max_pos,
        "rms_norm_eps": 1e-5,
    }
    if explicit_head_dim:
        # head_dim not equal to hidden/heads: transformers must use the explicit one.
        d["hidden_size"] = 32
        d["head_dim"] = head_dim
    return d, theta


def v5(head_dim, params, **kw):
    d, theta = base(head_dim, **kw)
    d["rope_parameters"] = dict(rope_theta=theta, **params)
    return d


def legacy(head_dim, scaling, **kw):
    d, theta = base(head_dim, **kw)
    d["rope_theta"] = theta
    if scaling is not None:
        d["rope_scaling"] = scaling
    return d


CASES = [
    ("default_hd64", v5(64, {"rope_type": "default"}), 16),
    ("default_hd12_theta5e5_explicit_head_dim",
     v5(12, {"rope_type": "default"}, theta=500000.0, explicit_head_dim=True), 16),
    ("default_legacy_no_scaling", legacy(64, None, theta=1000000.0), 16),
    ("linear_f2_hd64", v5(64, {"rope_type": "linear", "factor": 2.0}), 16),
    ("linear_f4_hd12_legacy_type", legacy(12, {"type": "linear", "factor": 4.0}), 16),
    ("dynamic_f2_hd64_below", v5(64, {"rope_type": "dynamic", "factor": 2.0}), 1000),
    ("dynamic_f2_hd64_at_max", v5(64, {"rope_type": "dynamic", "factor": 2.0}), 2048),
    ("dynamic_f2_hd64_above", v5(64, {"rope_type": "dynamic", "factor": 2.0}), 5000),
    ("dynamic_f3_hd12_above_legacy",
     legacy(12, {"type": "dynamic", "factor": 3.0}, theta=500000.0, max_pos=1024), 9000),
    ("llama3_hd64_real",
     v5(64, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 8192}, theta=500000.0, max_pos=131072), 16),
    ("llama3_hd12_small_context_legacy",
     legacy(12, {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
            theta=10000.0, max_pos=256), 16),
    ("yarn_f4_hd64",
     v5(64, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
        max_pos=16384), 16),
    ("yarn_f8_hd12_attention_factor",
     v5(12, {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 512,
             "attention_factor": 1.5}, theta=500000.0, max_pos=4096), 16),
    ("yarn_f4_hd64_no_truncate",
     v5(64, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096,
             "truncate": False}, max_pos=16384), 16),
    ("yarn_f16_hd64_mscale_betas",
     v5(64, {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 2048,
             "mscale": 1.0, "mscale_all_dim": 0.707, "beta_fast": 16, "beta_slow": 2},
        theta=1000000.0, max_pos=32768), 16),
    ("yarn_f4_hd12_legacy_no_original",
     legacy(12, {"type": "yarn", "factor": 4.0}, max_pos=1024), 16),
]


def main():
    out = []
    for name, cfg, seq_len in CASES:
        config = LlamaConfig.from_dict(json.loads(json.dumps(cfg)))
        rope = LlamaRotaryEmbedding(config)
        x = torch.zeros(1, seq_len, 4)
        pos = torch.arange(seq_len)[None]
        rope(x, pos)  # runs dynamic_rope_update for "dynamic"
        out.append({
            "name": name,
            "config": cfg,
            "seq_len": seq_len,
            "inv_freq": [float(v) for v in rope.inv_freq.tolist()],
            "attention_scaling": float(rope.attention_scaling),
        })
    path = os.path.join(ROOT, "tests/fixtures/rope/rope_cases.json")
    with open(path, "w") as f:
        json.dump({"transformers_version": transformers.__version__, "torch_version":
                   torch.__version__, "cases": out}, f, indent=1)
    print(f"wrote {len(out)} cases to {path}")


if __name__ == "__main__":
    main()
