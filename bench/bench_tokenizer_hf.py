#!/usr/bin/env python3
"""Single-thread encode throughput (MB/s) of HF `tokenizers` on the same Alpaca documents as
bench/bench_tokenizer.cpp, after validating ids against the committed corpora.
Run from the repo root: /work/venv/bin/python bench/bench_tokenizer_hf.py"""
import os

os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import json  # noqa: E402
import time  # noqa: E402

import tokenizers  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

SHARED = os.path.join("..", "shared", "data")


def alpaca_documents():
    docs = []
    for name in ("fastchat_alpaca_data_cleaned_1000.json", "llamafactory_alpaca_en_demo.json",
                 "llamafactory_alpaca_zh_demo.json"):
        with open(os.path.join(SHARED, "instructions", name), encoding="utf-8") as f:
            for r in json.load(f):
                docs.append(r.get("instruction", "") + "\n" + r.get("input", "") + "\n" +
                            r.get("output", ""))
    return docs


def main():
    docs = alpaca_documents()
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    print(f"documents: {len(docs)}, {nbytes / 1e6:.2f} MB (tokenizers {tokenizers.__version__})")
    for name in ("gpt2", "llama2"):
        path = os.path.join(SHARED, "tokenizers", name, "tokenizer.json")
        tok = Tokenizer.from_file(path)
        with open(f"tests/fixtures/tokenizer/corpus_{name}.json", encoding="utf-8") as f:
            cases = json.load(f)["cases"]
        bad = sum(tok.encode(c["text"], add_special_tokens=True).ids != c.get("ids_special", c["ids"])
                  for c in cases)
        if bad:
            print(f"{name}: {bad} validation mismatches, not timing")
            continue
        tok = Tokenizer.from_file(path)  # fresh word cache for pass 1
        rates = []
        for _ in range(3):
            t0 = time.perf_counter()
            n_ids = 0
            for d in docs:
                n_ids += len(tok.encode(d, add_special_tokens=False).ids)
            rates.append(nbytes / 1e6 / (time.perf_counter() - t0))
        print(f"{name:7s} hf tokenizers: {n_ids} ids; MB/s pass1 {rates[0]:.2f}, "
              f"pass2 {rates[1]:.2f}, pass3 {rates[2]:.2f}")


if __name__ == "__main__":
    main()
