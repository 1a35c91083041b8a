#!/usr/bin/env python3
"""Checks that a tokenizer.json written by `longtune convert llama2c` encodes text exactly as
llama2.c's own encoder (run.c `encode`: dummy-prefix space, one token per UTF-8 character with
byte fallback (+3), then greedy merges of the adjacent pair with the highest score, leftmost on
ties) and decodes back to the text, using the Hugging Face `tokenizers` library.

usage: python tools/check_llama2c_tokenizer.py --tokenizer_bin ../shared/data/models/stories260K/tok512.bin \
           --model_dir /tmp/stories260K_hf
Exit code 1 on any mismatch (each is printed). Known, intended difference not tested: Hugging
Face tokenizers treat "<s>" / "</s>" inside the text as the special tokens (added_tokens), as the
Llama tokenizers do; llama2.c's encoder spells them out.
"""
import argparse
import struct
import sys

from tokenizers import Tokenizer

TEXTS = [
    "Once upon a time, there was a little girl named Lily.",
    "Lily's mom said, \"Lily, let's go to the park.\"",
    "Hello world",
    " leading space and  double  spaces ",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "line one\nline two\n\ttabbed",
    "ünïcödé café naïve — “quotes” ™",
    "日本語のテキスト and 中文 mixed",
    "emoji 😀🚀 and math ∑∫√",
    "a",
    " ",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "the the the and and to to he she it they",
    "One day, Timmy's mom told him it was time to rest for a while.",
    "<0x41> is text, not a byte token",
    "[brackets] {braces} (parens) ~tilde~",
]


def read_llama2c_tokenizer(path):
    data = open(path, "rb").read()
    (max_len,) = struct.unpack_from("<i", data, 0)
    off, vocab, scores = 4, [], []
    while off < len(data):
        score, n = struct.unpack_from("<fi", data, off)
        off += 8
        vocab.append(data[off:off + n])
        off += n
        scores.append(score)
    return vocab, scores


def llama2c_encode(text, vocab, scores):
    """run.c encode(t, text, bos=1, eos=0), without the BOS."""
    lookup = {}
    for i, piece in enumerate(vocab):
        lookup.setdefault(piece, i)
    raw = text.encode("utf-8")
    tokens = []
    if raw:
        tokens.append(lookup[b" "])
    i = 0
    while i < len(raw):  # one UTF-8 character at a time (run.c reads up to 4 bytes)
        j = i + 1
        while j < len(raw) and (raw[j] & 0xC0) == 0x80 and j - i < 4:
            j += 1
        ch = raw[i:j]
        if ch in lookup:
            tokens.append(lookup[ch])
        else:
            tokens.extend(b + 3 for b in ch)
        i = j
    while True:
        best_score, best_id, best_idx = -1e10, -1, -1
        for k in range(len(tokens) - 1):
            merged = vocab[tokens[k]] + vocab[tokens[k + 1]]
            idx = lookup.get(merged, -1)
            if idx != -1 and scores[idx] > best_score:
                best_score, best_id, best_idx = scores[idx], idx, k
        if best_idx == -1:
            break
        tokens[best_idx:best_idx + 2] = [best_id]
    return tokens


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer_bin", required=True)
    ap.add_argument("--model_dir", required=True, help="folder with the converted tokenizer.json")
    args = ap.parse_args()
    vocab, scores = read_llama2c_tokenizer(args.tokenizer_bin)
    hf = Tokenizer.from_file(f"{args.model_dir}/tokenizer.json")
    bad = 0
    for text in TEXTS:
        want = llama2c_encode(text, vocab, scores)
        got = hf.encode(text, add_special_tokens=False).ids
        with_bos = hf.encode(text).ids
        decoded = hf.decode(got)  # the Strip decoder removes the dummy-prefix space
        if got != want or with_bos != [1] + want:
            bad += 1
            print(f"MISMATCH {text!r}\n  llama2.c   {want}\n  tokenizers {got}")
        elif decoded != text:
            bad += 1
            print(f"DECODE MISMATCH {text!r} -> {decoded!r}")
        else:
            print(f"ok {len(got):3d} tokens  {text!r}")
    print(f"{len(TEXTS) - bad}/{len(TEXTS)} texts agree" if bad == 0 else f"{bad} mismatches")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
