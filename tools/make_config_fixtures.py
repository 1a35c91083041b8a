#!/usr/bin/env python3
# Writes tests/fixtures/configs/<name>.json (config.json texts as transformers saves them, plus
# hand-written legacy 4.x-style ones) and <name>.expected.json: what transformers reads from each
# (sizes, head_dim, rope parameters, tie, per-layer sliding window, dtype).
# Run with the project venv: /work/venv/bin/python tools/make_config_fixtures.py
import json
import os
import tempfile

import torch
from transformers import AutoConfig, LlamaConfig, MistralConfig, Qwen2Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests/fixtures/configs")


def saved(config, arch, dtype):
    config.architectures = [arch]
    config.dtype = dtype
    with tempfile.TemporaryDirectory() as d:
        config.save_pretrained(d)
        return json.load(open(os.path.join(d, "config.json")))


def expected(cfg_dict):
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg_dict, f)
        c = AutoConfig.from_pretrained(d)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    windows = []
    for i in range(c.num_hidden_layers):
        if c.model_type == "mistral":
            windows.append(c.sliding_window or 0)
        elif c.model_type == "qwen2":
            sliding = c.layer_types[i] == "sliding_attention"
            windows.append(c.sliding_window if sliding and c.sliding_window else 0)
        else:
            windows.append(0)
    dtype = c.dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return {
        "model_type": c.model_type,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": head_dim,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_parameters": c.rope_parameters,
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": getattr(c, "attention_bias", False),
        "mlp_bias": getattr(c, "mlp_bias", False),
        "layer_windows": windows,
        "dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
    }


def main():
    configs = {}
    configs["llama_v5_llama3_rope"] = saved(LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=131072,
        rms_norm_eps=1e-5, tie_word_embeddings=True, attention_bias=False, mlp_bias=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}),
        "LlamaForCausalLM", torch.bfloat16)
    configs["mistral_v5"] = saved(MistralConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=64,
        max_position_embeddings=32768, rope_parameters={"rope_type": "default",
                                                        "rope_theta": 1000000.0}),
        "MistralForCausalLM", torch.float16)
    configs["qwen2_v5_sliding"] = saved(Qwen2Config(
        vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
        sliding_window=16, max_window_layers=2, tie_word_embeddings=True,
        rope_parameters={"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                         "original_max_position_embeddings": 32768}),
        "Qwen2ForCausalLM", torch.bfloat16)
    # transformers 4.x spelling (rope_theta/rope_scaling at top level, torch_dtype), modelled on
    # meta-llama/Llama-3.2-1B's config.json with smaller sizes.
    configs["llama_legacy_4x"] = {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 16, "hidden_act": "silu",
        "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 256,
        "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
        "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 512}
    # Mistral-7B-v0.1 style, 4.x spelling: sliding_window int, linear scaling with legacy "type".
    configs["mistral_legacy_4x"] = {
        "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02,
        "intermediate_size": 224, "max_position_embeddings": 32768, "model_type": "mistral",
        "num_attention_heads": 8, "num_hidden_layers": 2, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": None,
        "rope_scaling": {"type": "linear", "factor": 2.0},
        "tie_word_embeddings": False, "torch_dtype": "float32", "use_cache": True,
        "vocab_size": 400}
    # Qwen2-0.5B style: use_sliding_window false (no window anywhere), no layer_types.
    configs["qwen2_legacy_4x"] = {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 56,
        "initializer_range": 0.02, "intermediate_size": 128, "max_position_embeddings": 32768,
        "max_window_layers": 1, "model_type": "qwen2", "num_attention_heads": 7,
        "num_hidden_layers": 3, "num_key_value_heads": 1, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "transformers_version": "4.40.1", "use_cache": True,
        "use_sliding_window": False, "vocab_size": 600}
    # Qwen2 with the window on and no layer_types: layers >= max_window_layers slide.
    q = dict(configs["qwen2_legacy_4x"])
    q.update({"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1})
    configs["qwen2_legacy_sliding"] = q
    for name, cfg in configs.items():
        with open(os.path.join(OUT, name + ".json"), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")
        with open(os.path.join(OUT, name + ".expected.json"), "w") as f:
            json.dump(expected(cfg), f, indent=2, sort_keys=True)
            f.write("\n")
        print("wrote", name)


if __name__ == "__main__":
    main()
