#!/usr/bin/env python3
"""Builds tests/fixtures/tokenizer/: golden ids and decoded text from the `tokenizers` library.

Run from the repo root with the project venv:
    /work/venv/bin/python tools/make_tokenizer_fixtures.py

Deterministic. Writes corpus_<name>.json for the GPT-2 and Llama-2 tokenizers of
../shared/data/tokenizers and for two small tokenizers trained here on the shipped data:
  llama3style/ byte-level BPE with the Llama-3 Split regex, ignore_merges, added tokens with
               lstrip/rstrip/single_word, a TemplateProcessing BOS;
  metaspace/   NFKC + Metaspace(prepend_scheme=first, split) + Digits, byte_fallback BPE with
               unk/fuse_unk, ByteFallback/Metaspace decoders.
Ids come from tokenizers.Tokenizer (the library longtune must match). transformers 5 rebuilds
the Llama-2 pipeline instead of reading tokenizer.json verbatim, so it is not used for ids.
"""
import json
import os
import random
import sys

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors, trainers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared", "data")
OUT = os.path.join(ROOT, "tests", "fixtures", "tokenizer")
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def collect_strings(obj, out):
    if isinstance(obj, str):
        if obj:
            out.append(obj)
    elif isinstance(obj, list):
        for x in obj:
            collect_strings(x, out)
    elif isinstance(obj, dict):
        for k in sorted(obj):
            collect_strings(obj[k], out)


def shipped_texts():
    texts = []
    for sub in ("instructions", "conversations"):
        d = os.path.join(SHARED, sub)
        for name in sorted(os.listdir(d)):
            path = os.path.join(d, name)
            if name.endswith(".json"):
                with open(path, encoding="utf-8") as f:
                    collect_strings(json.load(f), texts)
            elif name.endswith(".jsonl"):
                with open(path, encoding="utf-8") as f:
                    for line in f:
                        if line.strip():
                            collect_strings(json.loads(line), texts)
    seen, out = set(), []
    for t in texts:
        if t not in seen and t not in ("human", "gpt", "user", "assistant", "system", "text"):
            seen.add(t)
            out.append(t)
    return out


def synthetic_cases(specials):
    cases = ["", " ", "  ", "          ", "\t", "\n", "\n\n", "\r\n", " \n \t ", "a", " a", "a ",
             "  leading and trailing  ", "tabs\tand\nnewlines\r\nmixed \t\n end",
             "many     spaces      here", "x" * 300, "ab" * 150, "1234567890" * 5, "3.14159 2,718",
             "007 0 00 000 0000", "emoji 😀🎉👩‍👩‍👧‍👦 🇫🇷 ✌🏽", "日本語のテキストと中文和한국어",
             "e\u0301 a\u0308 n\u0303 Z\u0336\u0335 \u0915\u093f", "ﬁ ﬂ ① ㈱ ｶﾞ Ⅻ ²³ ½",
             "a\u0085\u0085b c\u00a0d e\u2003f g\u3000h", "wow!\u0085", "end.\u0085\u0085next",
             "(\u0085)\u0085\u0085\u0085 \u0085", "x \u0085 y\u0085\n z;\u0085\u0085\u0085\u0085", "\u200b\u200d zero width",
             "I'm you're they'LL it'S WE'VE", "don't won't can't", "x = [1, 2, 3]; // comment",
             "def f(x):\n    return x ** 2\n\n\n", "<html><body>hi</body></html>",
             "http://example.com/a?b=c&d=e#f", "ALLCAPS lowercase MiXeD", "ǅ ǈ ß ẞ İ ı",
             "....!!!???,,,;;;", "--- *** ___ ===", "\\n \\t \\\\", "\"quoted\" 'single'",
             "Ünïcödé Ŝtŕîñĝ", "Привет, мир! Ελληνικά", "مرحبا بالعالم", "שלום עולם",
             "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕄𝕒𝕥𝕙 𐍈 𓀀", "a\u00adb soft hyphen", "\ufeffBOM start", "end\ufeff"]
    for s in specials:
        cases += [s, s + s, " " + s, s + " ", "a" + s + "b", "a " + s + " b", "hello" + s,
                  s + "hello", "x\n" + s + "\ny", "  " + s + "  ", s + " " + s, s[:-1],
                  s[1:], s[:len(s) // 2] + " " + s[len(s) // 2:]]
    return cases


def build_cases(specials, rng, n_shipped=1500, max_len=400):
    texts = shipped_texts()
    picked = rng.sample(texts, min(n_shipped, len(texts)))
    cases = []
    for t in picked:
        if len(t) > max_len:
            start = rng.randrange(0, len(t) - max_len)
            t = t[start:start + max_len]
        cases.append(t)
    # Special tokens inside real text.
    for k in range(150):
        a, b = rng.choice(texts)[:80], rng.choice(texts)[:80]
        s = rng.choice(specials)
        sep = rng.choice(["", " ", "\n", "  "])
        cases.append(a + sep + s + rng.choice(["", " ", "\n"]) + b)
    return synthetic_cases(specials) + cases


def quirk_ids(tok):
    """Ids of added tokens with normalized=True. tokenizers 0.23.3 decodes these as their
    normalized form ("<s>" -> "▁<s>") and does not skip them as special, unlike
    transformers 4.57.1 (the shared vectors) and earlier tokenizers; decodes that hold them are
    not recorded (the shared vectors cover them)."""
    return {i for i, t in tok.get_added_tokens_decoder().items() if t.normalized}


def encode_cases(tok, cases):
    out = []
    quirk = quirk_ids(tok)
    for text in cases:
        ids = tok.encode(text, add_special_tokens=False).ids
        ids_special = tok.encode(text, add_special_tokens=True).ids
        case = {"text": text, "ids": ids}
        if ids_special != ids:
            case["ids_special"] = ids_special
        if not quirk.intersection(ids_special):
            source = ids_special
        elif not quirk.intersection(ids):
            source = ids
            case["decode_of"] = "ids"
        else:
            case["decode_of"] = "none"
            out.append(case)
            continue
        decoded = tok.decode(source, skip_special_tokens=False)
        decoded_skip = tok.decode(source, skip_special_tokens=True)
        if decoded != text:
            case["decoded"] = decoded
        if decoded_skip != decoded:
            case["decoded_skip"] = decoded_skip
        out.append(case)
    return out


def write_corpus(name, tokenizer_ref, tok, cases):
    path = os.path.join(OUT, f"corpus_{name}.json")
    data = {"generator": "tools/make_tokenizer_fixtures.py",
            "tokenizers_version": __import__("tokenizers").__version__,
            "tokenizer": tokenizer_ref,
            "note": "missing ids_special = ids; missing decoded = text; missing decoded_skip = "
                    "decoded; decodes are of ids_special unless decode_of says ids or none",
            "cases": encode_cases(tok, cases)}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    print(f"{path}: {len(cases)} cases, {os.path.getsize(path) / 1e6:.2f} MB")


IGNORE_MERGES_WORDS = [" zqxjv", "qwertyuiop", " the quick"]


def train_llama3style(texts):
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"]
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    # Whole words in the vocab that the merges do not build: only ignore_merges yields them.
    j = json.loads(tok.to_str())
    for word in IGNORE_MERGES_WORDS:
        j["model"]["vocab"].setdefault(word.replace(" ", "\u0120"), len(j["model"]["vocab"]))
    tok = Tokenizer.from_str(json.dumps(j))
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                      pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    # Non-special added tokens exercising the matching flags.
    tok.add_tokens([AddedToken("<tool>", lstrip=True, rstrip=False, normalized=False),
                    AddedToken("</tool>", rstrip=True, normalized=False),
                    AddedToken("xyzzy", single_word=True, normalized=False),
                    AddedToken("[MASK]", lstrip=True, rstrip=True, normalized=False)])
    return tok, specials + ["<tool>", "</tool>", "xyzzy", "[MASK]", " zqxjv", "qwertyuiop"]


def train_metaspace(texts):
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(),
                                           normalizers.Replace(Regex(r"\s{3,}"), "   ")])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
        pre_tokenizers.Digits(individual_digits=True)])
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Metaspace(replacement="▁", prepend_scheme="first")])
    specials = ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=specials, show_progress=False,
                                  limit_alphabet=200)
    tok.train_from_iterator(texts, trainer)
    # Add the 256 <0xXX> byte tokens to the model vocab so byte_fallback has them; characters
    # outside the alphabet that are not covered stay possible only via bytes.
    j = json.loads(tok.to_str())
    vocab = j["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    tok = Tokenizer.from_str(json.dumps(j))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> $B:1",
        special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))])
    return tok, specials


def save_trained(tok, name, config):
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    tok.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def main():
    os.makedirs(OUT, exist_ok=True)
    texts = shipped_texts()

    gpt2 = Tokenizer.from_file(os.path.join(SHARED, "tokenizers", "gpt2", "tokenizer.json"))
    write_corpus("gpt2", "gpt2", gpt2,
                 build_cases(["<|endoftext|>"], random.Random(1)))
    llama2 = Tokenizer.from_file(os.path.join(SHARED, "tokenizers", "llama2", "tokenizer.json"))
    write_corpus("llama2", "llama2", llama2,
                 build_cases(["<s>", "</s>", "<unk>"], random.Random(2)))

    l3, l3_tokens = train_llama3style(texts)
    save_trained(l3, "llama3style", {"bos_token": "<|begin_of_text|>",
                                     "eos_token": "<|eot_id|>",
                                     "chat_template": [{"name": "default", "template": "{{x}}"},
                                                       {"name": "tool_use", "template": "t"}]})
    write_corpus("llama3style", "fixtures:llama3style", l3,
                 build_cases(l3_tokens, random.Random(3), n_shipped=1200))

    ms, ms_tokens = train_metaspace(texts)
    save_trained(ms, "metaspace", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                   "chat_template": "{{ messages }}"})
    write_corpus("metaspace", "fixtures:metaspace", ms,
                 build_cases(ms_tokens, random.Random(4), n_shipped=800))


if __name__ == "__main__":
    sys.exit(main())
