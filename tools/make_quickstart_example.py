#!/usr/bin/env python3
"""Writes the quickstart example (examples/quickstart/): a character-level tokenizer.json built
with the Hugging Face `tokenizers` library (SentencePiece-style: spaces as U+2581, BOS added,
no merges, so every character is one token) and train.jsonl, a prompt/completion task that a
tiny model visibly learns in a couple of minutes on a CPU: reversing a short word.

  {"prompt": "reverse: abcd =", "completion": " dcba"}

usage: /work/venv/bin/python tools/make_quickstart_example.py --out examples/quickstart
Deterministic (seed 0). The words used by scripts/quickstart.sh for its before/after demo are
held out of train.jsonl.
"""
import argparse
import json
import os
import random
import string

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

HELD_OUT = ["kite", "moon", "hello", "star", "plum", "quiz"]
SPACE = "\u2581"


def make_tokenizer():
    chars = [SPACE] + list(string.ascii_lowercase) + list(string.digits) + list(":=.,?!'-")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in chars:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.Sequence([
        decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, normalized=True, special=True)
                            for t in ("<unk>", "<s>", "</s>")])
    return tok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="examples/quickstart")
    ap.add_argument("--rows", type=int, default=600)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    tok = make_tokenizer()
    tok.save(os.path.join(args.out, "tokenizer.json"))
    config = {
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": None, "clean_up_tokenization_spaces": False,
        "model_max_length": 64, "tokenizer_class": "PreTrainedTokenizerFast"}
    with open(os.path.join(args.out, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    rng = random.Random(0)
    seen = set(HELD_OUT)
    rows = []
    while len(rows) < args.rows:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 5)))
        if word in seen:
            continue
        seen.add(word)
        rows.append({"prompt": f"reverse: {word} =", "completion": f" {word[::-1]}"})
    with open(os.path.join(args.out, "train.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    ids = tok.encode("reverse: abcd = dcba").ids
    assert ids[0] == 1 and tok.decode(ids[1:]) == "reverse: abcd = dcba", tok.decode(ids[1:])
    print(f"wrote {args.out}: tokenizer ({tok.get_vocab_size()} tokens), {len(rows)} rows; "
          f"'reverse: abcd = dcba' -> {len(ids)} ids")


if __name__ == "__main__":
    main()
