#!/usr/bin/env python3
"""Reads a longtune TensorBoard run folder with the real `tensorboard` package and checks it
against output_dir/metrics.jsonl: every train/loss, train/learning_rate, train/grad_norm and
eval/loss scalar must be there at the same step (to float32 precision).

usage: check_tensorboard.py OUTPUT_DIR   (exit 0 = ok, 1 = mismatch, 77 = tensorboard missing)
"""
import glob
import json
import os
import sys

try:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
except ImportError:
    print("SKIP: the tensorboard package is not installed (pip install tensorboard)")
    sys.exit(77)

import numpy as np


def main():
    out = sys.argv[1]
    runs = sorted(glob.glob(os.path.join(out, "runs", "*")))
    if not runs:
        print(f"FAIL: no run folder under {out}/runs")
        return 1
    acc = EventAccumulator(runs[-1])
    acc.Reload()
    tags = acc.Tags()["scalars"]
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    checks = 0
    for key, tag in [("loss", "train/loss"), ("learning_rate", "train/learning_rate"),
                     ("grad_norm", "train/grad_norm"), ("eval_loss", "eval/loss")]:
        want = {r["step"]: r[key] for r in records if key in r}
        if not want:
            continue
        if tag not in tags:
            print(f"FAIL: tag {tag} missing; tags: {tags}")
            return 1
        got = {e.step: e.value for e in acc.Scalars(tag)}
        for step, v in want.items():
            if step not in got or got[step] != np.float32(v):
                print(f"FAIL: {tag} at step {step}: tensorboard {got.get(step)} vs metrics {v}")
                return 1
            checks += 1
    import tensorboard
    print(f"ok: {checks} scalars of {runs[-1]} read by tensorboard {tensorboard.__version__} "
          f"match metrics.jsonl")
    return 0 if checks > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
