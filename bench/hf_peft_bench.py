#!/usr/bin/env python3
"""Baseline for longtune's GPU benchmarks: transformers + PEFT LoRA (r=16 on every linear of the
layers) with gradient checkpointing on a Llama-3-8B-shaped model with random bf16 weights,
batch 1, at several sequence lengths: tokens/s of forward + backward + AdamW step, peak GPU
memory, MFU with the FLOP count longtune uses (plan/planner.cpp training_flops: PaLM's 6 N T
plus 6 L T^2 H*HD attention), and, with --longest, the longest sequence that fits (doubling, then
bisection to --granularity tokens). No network: the model is built from a config.
Usage: hf_peft_bench.py [--tokens 4096,16384,32768] [--layers 32] [--iters 3]
[--peak_tflops 989] [--attn sdpa|flash_attention_2|eager] [--longest] [--granularity 1024]
[--max_tokens 4194304]
[--device cuda|cpu] [--shape 8b|tiny]   (a smoke test of this script on a CPU:
--device cpu --shape tiny --tokens 64,128 --longest --max_tokens 1024)"""
import argparse
import sys
import time

SHAPES = {"8b": dict(D=4096, F=14336, V=128256, H=32, KVH=8, HD=128),
          "tiny": dict(D=64, F=160, V=512, H=4, KVH=2, HD=16)}
D, F, V, H, KVH, HD = SHAPES["8b"].values()


def training_flops(layers, tokens):
    qd, kvd = H * HD, KVH * HD
    per_layer = D * qd * 2 + D * kvd * 2 + 3 * D * F
    matmul = layers * per_layer + V * D
    return 6.0 * matmul * tokens + 6.0 * tokens * tokens * layers * qd


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="4096,16384,32768")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--peak_tflops", type=float, default=989.0)
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--longest", action="store_true")
    ap.add_argument("--granularity", type=int, default=1024)
    ap.add_argument("--max_tokens", type=int, default=1 << 22)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    args = ap.parse_args()
    global D, F, V, H, KVH, HD
    D, F, V, H, KVH, HD = SHAPES[args.shape].values()
    try:
        import torch
        import transformers
        import peft
    except ImportError as e:
        print(f"hf_peft_bench: skipped: {e}")
        return 0
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("hf_peft_bench: skipped: torch sees no CUDA device")
        return 0
    dev = torch.device(args.device)
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=args.layers,
        num_attention_heads=H, num_key_value_heads=KVH, head_dim=HD,
        max_position_embeddings=1 << 24, rope_theta=500000.0, rms_norm_eps=1e-5)
    cfg._attn_implementation = args.attn
    torch.manual_seed(0)
    t0 = time.time()
    with dev:
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
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"hf_peft_bench: transformers {transformers.__version__}, peft {peft.__version__}, "
          f"torch {torch.__version__}, {name}, attention {args.attn}; {total/1e9:.2f}B params, "
          f"{trainable/1e6:.1f}M trainable (LoRA r=16), built in {time.time()-t0:.1f} s")
    print(f"{'tokens':>8} {'step_s':>10} {'tok/s':>10} {'MFU':>7} {'peak_GiB':>10}")

    def step(T, iters):
        """Seconds per step at T tokens (None when it does not fit) and the peak GiB."""
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        ids = torch.randint(0, V, (1, T), device=dev)
        t = time.time()
        try:
            for it in range(iters + 1):  # iteration 0 warms up (and is timed when iters is 0)
                if it == 1:
                    if cuda:
                        torch.cuda.synchronize()
                    t = time.time()
                out = model(input_ids=ids, labels=ids)
                loss = out.loss.detach().item()
                out.loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                del out
            if cuda:
                torch.cuda.synchronize()
        except torch.cuda.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            return None, None
        if loss != loss:  # validate: a finite loss
            raise SystemExit(f"hf_peft_bench: NaN loss at {T} tokens")
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        return (time.time() - t) / max(iters, 1), peak

    def report(T, s, peak):
        if s is None:
            print(f"{T:>8} {'OOM':>10}")
        else:
            mfu = training_flops(args.layers, T) / s / (args.peak_tflops * 1e12)
            print(f"{T:>8} {s:>10.3f} {T/s:>10.0f} {100*mfu:>6.1f}% {peak:>10.2f}")
        sys.stdout.flush()

    lengths = [int(t) for t in args.tokens.split(",")]
    for T in lengths:
        report(T, *step(T, args.iters))
    if args.longest:  # one step per probe: fits or not
        lo, hi = 0, max(lengths)
        while step(hi, 0)[0] is not None:
            lo, hi = hi, hi * 2
            if hi > args.max_tokens:
                print(f"hf_peft_bench: {lo} tokens fit; not probed beyond --max_tokens "
                      f"{args.max_tokens}")
                return 0
        while hi - lo > args.granularity:
            mid = (lo + hi) // 2 // args.granularity * args.granularity
            if mid <= lo:
                break
            if step(mid, 0)[0] is not None:
                lo = mid
            else:
                hi = mid
        print(f"hf_peft_bench: longest sequence that fits: {lo} tokens "
              f"(granularity {args.granularity})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
