#!/usr/bin/env python3
"""Golden values for --bf16 True's residual stream (RunSettings::bf16_residual).

transformers' LlamaForCausalLM on the llama_gqa fixture model, in float32 with eager attention,
with the hidden state rounded to bfloat16 (round to nearest even) wherever it crosses a layer
boundary: the input of every decoder layer (the embedding output, then each layer's output) and
the input of the final norm. The rounding is straight-through: h + (bf16(h) - h).detach(), so
gradients pass it unchanged. Also the same model without rounding, as the control the test uses
to show the rounding matters.

Writes tests/fixtures/models/llama_gqa/bf16_residual.safetensors: for "bf16" and "f32", the loss
(the sum of the token losses of every row of batch.json) and the gradient of that sum for every
parameter.
usage: python tools/make_bf16_residual_fixture.py   (torch + transformers + safetensors)
"""
import json
import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SRC = os.path.join(ROOT, "tests/fixtures/models/llama_gqa")
OUT = os.path.join(SRC, "bf16_residual.safetensors")


def bf16_straight_through(h):
    return h + (h.to(torch.bfloat16).to(h.dtype) - h).detach()


def run(rounding):
    model = LlamaForCausalLM.from_pretrained(SRC, attn_implementation="eager",
                                             dtype=torch.float32)
    stored = load_file(os.path.join(SRC, "model.safetensors"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, stored[name]), f"{name} not loaded bit-exactly"
    model.train()  # dropout is 0
    hooks = []
    if rounding:
        def pre(module, args, kwargs):
            if "hidden_states" in kwargs:
                kwargs["hidden_states"] = bf16_straight_through(kwargs["hidden_states"])
            else:
                args = (bf16_straight_through(args[0]),) + tuple(args[1:])
            return args, kwargs
        for layer in model.model.layers:
            hooks.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(model.model.norm.register_forward_pre_hook(pre, with_kwargs=True))
    batch = json.load(open(os.path.join(SRC, "batch.json")))
    model.zero_grad()
    total = torch.zeros((), dtype=torch.float64)
    for mb in batch["micro_batches"]:
        for row in mb:
            ids = torch.tensor([row["input_ids"]])
            logits = model(input_ids=ids, use_cache=False).logits[0]
            loss = F.cross_entropy(logits[:-1], torch.tensor(row["labels"][1:]),
                                   ignore_index=-100, reduction="sum")
            loss.backward()
            total += loss.detach().double()
    for h in hooks:
        h.remove()
    out = {"loss": total.reshape(1).float()}
    for name, p in model.named_parameters():
        out["grad." + name] = p.grad.detach().clone().contiguous()
    return out


def main():
    tensors = {}
    for tag, rounding in (("bf16", True), ("f32", False)):
        for k, v in run(rounding).items():
            tensors[f"{tag}.{k}"] = v
    d = max((tensors["bf16." + k[4:]] - tensors[k]).abs().max().item()
            for k in tensors if k.startswith("f32.grad."))
    assert d > 0, "the rounding changed nothing"
    save_file(tensors, OUT)
    print(f"loss bf16 {tensors['bf16.loss'].item():.6f}  f32 {tensors['f32.loss'].item():.6f}; "
          f"largest gradient difference {d:.3g}")


if __name__ == "__main__":
    main()
