#!/usr/bin/env python3
"""Markdown table of benchmark JSON lines (bench_train, torch_train.py), each longtune row
compared with the PyTorch row of the same sequence length; exits 1 when their initial losses
differ (the two would not be computing the same thing)."""
import json
import sys


def main(path):
    rows = [json.loads(l) for l in open(path) if l.startswith("{")]
    ref = {r["seq"]: r for r in rows if r["impl"] == "pytorch"}
    print("| impl | settings | seq | tokens/s | step s | peak RSS MiB | MFU | loss | vs PyTorch |")
    print("|---|---|---|---|---|---|---|---|---|")
    bad = False
    for r in rows:
        p = ref.get(r["seq"])
        cmp = ""
        if p and r["impl"] != "pytorch":
            cmp = f'{r["tokens_per_s"] / p["tokens_per_s"]:.2f}x'
            if abs(r["loss"] - p["loss"]) > 1e-3 * abs(p["loss"]):
                bad = True
                cmp += " LOSS MISMATCH"
        mfu = f'{r["mfu"]:.2f}' if "mfu" in r else ""
        print(f'| {r["impl"]} | {r["settings"]} | {r["seq"]} | {r["tokens_per_s"]:.0f} | '
              f'{r["step_s"]:.3f} | {r["peak_bytes"] / 2**20:.0f} | {mfu} | {r["loss"]:.4f} | {cmp} |')
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
