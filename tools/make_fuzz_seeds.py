"""Writes the seed inputs of the libFuzzer targets into tests/fuzz_corpus/<target>/seed_*.

Input layouts are those of tests/fuzz/fuzz_entries.h. Run from the repo root:
    python3 tools/make_fuzz_seeds.py
Findings of scripts/fuzz.sh (crashes fixed since) are added beside the seeds by hand as
tests/fuzz_corpus/<target>/crash_*; test_fuzz_regressions replays every file.
"""
import json
import os
import struct

ROOT = "tests/fuzz_corpus"


def put(target, name, data):
    os.makedirs(os.path.join(ROOT, target), exist_ok=True)
    with open(os.path.join(ROOT, target, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def bytes_to_unicode():  # GPT-2's byte -> printable character table
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def tokenizer_seeds():
    b2u = bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    merges = ["Ġ t", "h e", "Ġt he", "i n", "e r"]
    for m in merges:
        vocab["".join(m.split())] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    bytelevel = {
        "version": "1.0",
        "added_tokens": [{"id": vocab["<|endoftext|>"], "content": "<|endoftext|>",
                          "special": True, "lstrip": False, "rstrip": False,
                          "single_word": False, "normalized": False}],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                          "use_regex": True},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                           "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "fuse_unk": False,
                  "byte_fallback": False, "vocab": vocab, "merges": merges},
    }
    put("tokenizer", "seed_bytelevel", b"\x00" + json.dumps(bytelevel).encode() +
        b"\x00Hello the world, there in  caf\xc3\xa9 <|endoftext|>!")

    sp_vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        sp_vocab["<0x%02X>" % b] = len(sp_vocab)
    for t in ["▁", "a", "b", "e", "h", "l", "o", "t", "▁t", "he", "▁the", "ll", "llo"]:
        sp_vocab[t] = len(sp_vocab)
    metaspace = {
        "version": "1.0",
        "added_tokens": [{"id": i, "content": c, "special": True, "lstrip": False,
                          "rstrip": False, "single_word": False, "normalized": False}
                         for c, i in [("<unk>", 0), ("<s>", 1), ("</s>", 2)]],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": None,
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                      {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                                    {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {"<s>": {"id": "<s>", "ids": [1],
                                                      "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "fuse_unk": True,
                  "byte_fallback": True, "vocab": sp_vocab,
                  "merges": ["▁ t", "h e", "▁t he", "l l", "ll o"]},
    }
    put("tokenizer", "seed_metaspace", b"\x00" + json.dumps(metaspace).encode() +
        "\x00hello the  world ü 你好 </s>".encode())

    split = dict(bytelevel)
    split["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\p{N}{1,3}| ?\p{L}+|\s+(?!\S)|\s+"},
         "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
         "use_regex": False}]}
    split["normalizer"] = {"type": "NFC"}
    put("tokenizer", "seed_split_regex", b"\x00" + json.dumps(split).encode() +
        b"\x00 12345 the  quick\n\nbrown")

    texts = ["Hello world", "caf\u00e9 na\u00efve \u4f60\u597d\u4e16\u754c \U0001F600",
             "<|endoftext|><s></s> <unk>", "   leading and trailing   ", "a\u0301 \ufb01 \u2163"]
    for i, t in enumerate(texts):
        put("tokenizer", f"seed_gpt2_{i}", b"\x01" + t.encode())
        put("tokenizer", f"seed_llama2_{i}", b"\x02" + t.encode())
    put("tokenizer", "seed_gpt2_bad_utf8", b"\x01abc\xff\xfe\xc3(\xed\xa0\x80")
    put("tokenizer", "seed_llama2_bad_utf8", b"\x02abc\xff\xfe\xc3(\xed\xa0\x80")


def dataset_seeds():
    # byte 0: ext (0 json, 1 jsonl, 2 txt) + 3 * format (0 auto, 1 alpaca, 2 messages,
    # 3 sharegpt, 4 completion, 5 text, 6 tokenized); byte 1: bit0 packing, bit1
    # train_on_inputs, bits2-3 length index (0, 7, 64, 1024), bits4+ template index.
    def seed(name, ext, fmt, settings, content):
        put("dataset", name, bytes([ext + 3 * fmt, settings]) + content.encode())

    alpaca = json.dumps([{"instruction": "Add.", "input": "1 2", "output": "3"},
                         {"instruction": "Say hi", "output": "hi"},
                         {"instruction": "Empty", "output": ""}])
    seed("seed_alpaca", 0, 0, 0b1000, alpaca)
    seed("seed_alpaca_packed", 0, 1, 0b1011, alpaca)
    msgs = "\n".join(json.dumps(r) for r in [
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Q"}]},
                      {"role": "assistant", "content": "A", "loss_weight": 1.0}]}])
    seed("seed_messages_chatml", 1, 0, 0b00001000, msgs)
    seed("seed_messages_llama3", 1, 2, 0b00101100, msgs)
    share = json.dumps([{"conversations": [{"from": "human", "value": "What is 2+2?"},
                                           {"from": "function_call", "value": "{\"name\": \"add\"}"},
                                           {"from": "observation", "value": "4"},
                                           {"from": "gpt", "value": "4"}],
                         "tools": "[{\"name\": \"add\"}]", "system": "sys"}])
    seed("seed_sharegpt_chatml", 0, 3, 0b00001000, share)
    seed("seed_sharegpt_llama3", 0, 0, 0b00101000, share)
    seed("seed_completion", 1, 4, 0b0100,
         '{"prompt": "The sky is", "completion": " blue."}\n{"prompt": "x", "completion": ""}\n')
    seed("seed_text", 1, 5, 0b1101, '{"text": "one two three four five six seven"}\n{"text": ""}\n')
    seed("seed_tokenized", 0, 6, 0b0101,
         json.dumps([{"input_ids": [1, 2, 3, 4], "labels": [-100, 2, 3, 4]},
                     {"input_ids": [5, 6]}]))
    seed("seed_txt", 2, 0, 0b0100, "Plain text file.\nSecond line \u00e9.\n")
    seed("seed_malformed", 1, 0, 0, '{"text": "a"}\n{"text": "b",}\n')


def safetensors_seeds():
    def st(header, data):
        h = json.dumps(header).encode()
        return struct.pack("<Q", len(h)) + h + data

    a = struct.pack("<4f", 1, 2, 3, 4)
    b = struct.pack("<2e", 0.5, -1)
    put("safetensors", "seed_two_tensors", st(
        {"__metadata__": {"format": "pt"},
         "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
         "b": {"dtype": "F16", "shape": [2], "data_offsets": [16, 20]}}, a + b))
    put("safetensors", "seed_empty_tensor", st(
        {"e": {"dtype": "BF16", "shape": [0, 3], "data_offsets": [0, 0]},
         "i": {"dtype": "I64", "shape": [], "data_offsets": [0, 8]}}, struct.pack("<q", 7)))
    put("safetensors", "seed_bad_offsets", st(
        {"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, a))


tokenizer_seeds()
dataset_seeds()
safetensors_seeds()
