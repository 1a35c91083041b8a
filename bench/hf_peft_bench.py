#!/usr/bin/env python3
"""Baseline for bench_gpu: transformers + PEFT LoRA (r=16 on every linear of the layers) with
gradient checkpointing on a Llama-3-8B-shaped model with random bf16 weights, batch 1, at several
sequence lengths: tokens/s of forward + backward + AdamW step, and peak GPU memory. No network:
the model is built from a config. Usage: hf_peft_bench.py [--tokens 4096,16384,32768]
[--layers 32] [--iters 3] [--peak_tflops 989]"""
import argparse
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="4096,16384,32768")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--peak_tflops", type=float, default=989.0)
    args = ap.parse_args()
    try:
        import torch
        import transformers
        import peft
    except ImportError as e:
        print(f"hf_peft_bench: skipped: {e}")
        return 0
    if not torch.cuda.is_available():
        print("hf_peft_bench: skipped: torch sees no CUDA device")
        return 0
    cfg = transformers.LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=args.layers, num_attention_heads=32, num_key_value_heads=8,
        max_position_embeddings=32768, rope_theta=500000.0, rms_norm_eps=1e-5)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    t0 = time.time()
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        model = transformers.LlamaForCausalLM(cfg)
        torch.set_default_dtype(torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                           "up_proj", "down_proj"])
    model = peft.get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    print(f"hf_peft_bench: transformers {transformers.__version__}, peft {peft.__version__}, "
          f"torch {torch.__version__}, {torch.cuda.get_device_name()}; {total/1e9:.2f}B params, "
          f"{trainable/1e6:.1f}M trainable (LoRA r=16), built in {time.time()-t0:.1f} s")
    print(f"{'tokens':>8} {'step_s':>10} {'tok/s':>10} {'MFU':>7} {'peak_GiB':>10}")
    # FLOPs with checkpointing: forward twice + backward (input grads only for frozen weights:
    # 2 per param per token, LoRA weight grads negligible): 2 + 2 + 2 = 6 per param per token
    # for the layers' frozen GEMMs' useful work counted as in bench_gpu (6 N T) for comparison.
    D, F, V, QD, KVD, L = 4096, 14336, 128256, 4096, 1024, args.layers
    layer_params = D * (QD + 2 * KVD) + QD * D + 3 * D * F
    for T in [int(t) for t in args.tokens.split(",")]:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        ids = torch.randint(0, V, (1, T), device="cuda")
        try:
            for it in range(args.iters + 1):
                if it == 1:
                    torch.cuda.synchronize()
                    t0 = time.time()
                out = model(input_ids=ids, labels=ids)
                out.loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
        except torch.cuda.OutOfMemoryError:
            print(f"{T:>8} {'OOM':>10}")
            continue
        step = (time.time() - t0) / args.iters
        flops = L * (6.0 * layer_params * T + 3.5 * 2.0 * T * T * QD) + 6.0 * V * D * T
        mfu = flops / step / (args.peak_tflops * 1e12)
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"{T:>8} {step:>10.3f} {T/step:>10.0f} {100*mfu:>6.1f}% {peak:>10.2f}")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
