#!/usr/bin/env python3
"""Golden files for the dataset and chat-template code (tests/fixtures/data/*.json).

Run from the repository root with the project venv:
    /work/venv/bin/python tools/make_dataset_fixtures.py

Writes
  jinja_renders.json   every built-in chat template rendered by transformers'
                       apply_chat_template (tokenize=False) for a set of message lists
  jinja_features.json  small templates exercising the Jinja subset, rendered by the
                       environment transformers compiles chat templates with
  dataset_golden.json  input_ids / labels of the first rows of the shipped datasets, built with
                       transformers' tokenizers exactly as longtune's loader should:
                       Alpaca as Stanford Alpaca train.py, conversations with
                       apply_chat_template and the incremental-prefix assistant mask.
"""
import json
import os

import transformers
from transformers import AutoTokenizer
from transformers.utils.chat_template_utils import _compile_jinja_template

OUT = "tests/fixtures/data"
DATA = "../shared/data"

# Must equal src/data/chat_template.cpp byte for byte (the C++ test checks it).
TEMPLATES = {
    # meta-llama/Llama-2-7b-chat-hf
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}{% else %}"
        "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
        "{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}"
        "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}"
        "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
    ),
    # meta-llama/Meta-Llama-3-8B-Instruct
    "llama3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ "
        "message['content'] | trim + '<|eot_id|>' %}"
        "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
        "{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
        "{% endif %}"
    ),
    # mistralai/Mistral-7B-Instruct-v0.2, mistralai/Mixtral-8x7B-Instruct-v0.1
    "mistral": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
        "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
        "{% endfor %}"
    ),
    # Qwen/Qwen2-7B-Instruct
    "chatml": (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # HuggingFaceH4/zephyr-7b-beta; TinyLlama/TinyLlama-1.1B-Chat-v1.0 has the same string
    "zephyr": (
        "{% for message in messages %}\n"
        "{% if message['role'] == 'user' %}\n"
        "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
        "{% elif message['role'] == 'system' %}\n"
        "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
        "{% elif message['role'] == 'assistant' %}\n"
        "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
        "{% endif %}\n"
        "{% if loop.last and add_generation_prompt %}\n"
        "{{ '<|assistant|>' }}\n"
        "{% endif %}\n"
        "{% endfor %}"
    ),
}
TEMPLATES["tinyllama"] = TEMPLATES["zephyr"]

U = lambda c: {"role": "user", "content": c}
A = lambda c: {"role": "assistant", "content": c}
S = lambda c: {"role": "system", "content": c}

MESSAGE_LISTS = [
    [U("Hello!"), A("Hi there.")],
    [S("You are terse."), U("Hello!"), A("Hi.")],
    [U("What is 2+2?"), A("4"), U("And 3+3?"), A("6")],
    [S("Be kind."), U("one"), A("two"), U("three"), A("four")],
    [U("Only a question")],
    [S("sys"), U("q1"), A("a1"), U("q2")],
    [U("  padded question \n"), A("\n answer with spaces\u3000 ")],
    [U("\u4f60\u597d\uff0c\u4e16\u754c"), A("caf\u00e9 \U0001f600 \"quoted\" 'single' \\ back")],
    [U("a"), U("b")],  # roles do not alternate
    [S("only system")],
]

FEATURES = [
    ("{{ 'a' + 'b' ~ 1 ~ none ~ true }}", {}),
    ("{{ x }}|{{ y }}|{{ z }}|{{ w }}|{{ v }}", {"x": 1.5, "y": [1, "a", None, True],
                                                 "z": {"k": "v", "n": 2}, "w": 3.0, "v": None}),
    ("{% for m in xs %}{{ loop.index0 }}{{ loop.index }}{{ loop.first }}{{ loop.last }}"
     "{{ loop.length }}{{ loop.revindex }};{% endfor %}", {"xs": ["a", "b", "c"]}),
    ("{% for m in xs if m != 'b' %}{{ m }}{{ loop.index }}{% else %}empty{% endfor %}",
     {"xs": ["a", "b", "c"]}),
    ("{% for m in xs %}x{% else %}empty{% endfor %}", {"xs": []}),
    ("{% set ns = namespace(found=false, n=0) %}{% for m in xs %}{% if m == 'b' %}"
     "{% set ns.found = true %}{% endif %}{% set ns.n = ns.n + 1 %}{% endfor %}"
     "{{ ns.found }} {{ ns.n }}", {"xs": ["a", "b"]}),
    ("{% set x = 1 %}{% for i in [1, 2] %}{% set x = i %}{% endfor %}{{ x }}", {}),
    ("  {% if true %}\n    yes\n  {% endif %}\n  after\n", {}),
    ("a  {%- if true -%}  b  {%- endif -%}  c", {}),
    ("{{- ' x ' -}}\n\n{{ 'y' }}\n{# comment #}\nz", {}),
    ("line1\n    {# indented comment #}\nline2", {}),
    ("{% if a %}A{% elif b %}B{% else %}C{% endif %}", {"a": False, "b": 0}),
    ("{{ s | trim }}|{{ s | length }}|{{ s | upper }}|{{ s | lower }}", {"s": "  H\u00e9llo W \u3000"}),
    ("{{ d | tojson }}|{{ d | tojson(indent=2) }}", {"d": {"b": [1, 2.5, "\u00e9\n\"q\""],
                                                         "a": None, "c": {}, "t": True}}),
    ("{{ u | default('dflt') }}|{{ e | default('dflt') }}|{{ e | default('dflt', true) }}|"
     "{{ u is defined }}{{ e is defined }}{{ n is none }}{{ s is string }}{{ u is not defined }}",
     {"e": "", "n": None, "s": "x"}),
    ("{{ xs[1:] }}{{ xs[:-1] }}{{ xs[::-1] }}{{ xs[-1] }}{{ s[1:3] }}{{ s[-2:] }}",
     {"xs": [1, 2, 3, 4], "s": "h\u00e9llo"}),
    ("{{ 'b' in 'abc' }}{{ 2 in xs }}{{ 'k' in d }}{{ 'z' not in d }}{{ not 1 }}",
     {"xs": [1, 2], "d": {"k": 1}}),
    ("{{ 7 % 3 }} {{ -7 % 3 }} {{ 7 // 2 }} {{ -7 // 2 }} {{ 7 / 2 }} {{ 2 * 3 }} {{ 2 ** 3 }} "
     "{{ 1 - 3 }} {{ 0.1 + 0.2 }}", {}),
    ("{{ 'yes' if x > 1 else 'no' }}{{ 'a' if false }}|{{ x > 1 and x < 5 }}{{ x or 'z' }}"
     "{{ 0 or 'z' }}{{ '' and 'q' }}", {"x": 3}),
    ("{{ s.strip() }}|{{ s.lstrip() }}|{{ s.rstrip() }}|{{ s.strip(' h') }}|{{ s.upper() }}|"
     "{{ s.startswith(' h') }}{{ s.endswith('x') }}|{{ s.split() }}|{{ 'a,b'.split(',') }}|"
     "{{ s.replace('l', 'L') }}|{{ s.title() }}", {"s": " hello world "}),
    ("{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}{{ d.get('a') }}{{ d.get('z', 9) }}"
     "{{ d.keys() | list }}{% for k in d %}{{ k }}{% endfor %}", {"d": {"b": 1, "a": 2}}),
    ("{% for x in xs %}{% if x == 3 %}{% break %}{% endif %}{% if x == 1 %}{% continue %}{% endif %}"
     "{{ x }}{% endfor %}", {"xs": [0, 1, 2, 3, 4]}),
    ("{{ xs | join(', ') }}|{{ xs | first }}|{{ xs | last }}|{{ xs | length }}|"
     "{{ ms | selectattr('role', 'equalto', 'user') | map(attribute='content') | join }}|"
     "{{ ms | rejectattr('role', 'equalto', 'user') | list | length }}",
     {"xs": ["a", "b"], "ms": [U("u1"), A("a1"), U("u2")]}),
    ("{% set a, b = 1, 2 %}{{ a }}{{ b }}{% set l = [1, 2] + [3] %}{{ l }}{{ l | length }}"
     "{% set dd = {'k': 'v', 'n': [1]} %}{{ dd.k }}{{ dd['n'][0] }}", {}),
    ("{{ raise_exception('bad thing: ' + x) }}", {"x": "boom"}),
    ("{% for m in messages %}{% if m.role == 'user' %}{{ m.content | trim }}{% endif %}"
     "{{ m['role'][0] | upper }}{% endfor %}", {"messages": [U(" q "), A("a")]}),
    ("{{ 'It\\'s' }} {{ \"dq\\\"\" }} {{ 'tab\\tnl\\n' }}{{ '\\u00e9' }}", {}),
    ("{{ x | string }}{{ x | int + 1 }}{{ '%s-%s' % (1, 'a') }}{{ 3 | float }}",
     {"x": "41"}),
    ("{% if x is divisibleby(3) %}div{% endif %}{% if x is odd %}odd{% endif %}"
     "{{ x is number }}{{ xs is iterable }}{{ d is mapping }}", {"x": 9, "xs": [1], "d": {}}),
    ("{%- for m in ms -%}\n  {{- m.role -}}\n  {%- if not loop.last %}, {% endif -%}\n"
     "{%- endfor %}\n", {"ms": [U("1"), A("2"), U("3")]}),
    ("{{ messages[5]['role'] }}|{{ d.missing }}|{{ none }}", {"messages": [], "d": {}}),
]


def render_features():
    cases = []
    for tmpl, ctx in FEATURES:
        case = {"template": tmpl, "context": ctx}
        try:
            case["expected"] = _compile_jinja_template(tmpl).render(**ctx)
        except Exception as e:  # noqa: BLE001 -- recorded as the expected error
            case["error"] = str(e)
        cases.append(case)
    return cases


def render_builtins(tok):
    cases = []
    for name, src in TEMPLATES.items():
        for messages in MESSAGE_LISTS:
            for gen in (False, True):
                case = {"template": name, "messages": messages, "add_generation_prompt": gen}
                try:
                    case["expected"] = tok.apply_chat_template(
                        messages, chat_template=src, tokenize=False, add_generation_prompt=gen)
                except Exception as e:  # noqa: BLE001
                    case["error"] = str(e)
                cases.append(case)
    return {"bos_token": tok.bos_token, "eos_token": tok.eos_token, "templates": TEMPLATES,
            "cases": cases}


# ------------------------------------------------------------------ datasets

ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:")

ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "model": "assistant", "function_call": "assistant", "system": "system", "tool": "tool",
         "observation": "tool", "function": "tool", "ipython": "tool"}


def alpaca_row(tok, row, train_on_inputs):
    # Stanford Alpaca train.py: PROMPT_DICT, source + output + EOS, source tokens masked.
    fmt = ALPACA_INPUT if row.get("input", "") != "" else ALPACA_NO_INPUT
    prompt = fmt.format_map(row)
    if row["output"] == "":
        return None
    ids = tok(prompt + row["output"]).input_ids + [tok.eos_token_id]
    labels = list(ids)
    if not train_on_inputs:
        n = len(tok(prompt).input_ids)
        labels[:n] = [-100] * min(n, len(labels))
    return ids, labels


def content_text(content):
    if isinstance(content, str):
        return content
    return "".join(p.get("text", p.get("value")) for p in content)


def conversation_row(tok, row, key, template, train_on_inputs):
    messages, trained = [], []
    if row.get("system"):
        messages.append({"role": "system", "content": row["system"]})
        trained.append(False)
    for m in row[key]:
        role = ROLES[m.get("role", m.get("from"))]
        content = content_text(m["content"] if "content" in m else m["value"])
        train = role == "assistant"
        if m.get("loss_weight") is not None:
            train = m["loss_weight"] > 0
        messages.append({"role": role, "content": content})
        trained.append(train)
    if not any(trained):
        return None
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except ValueError:
            pass

    def render(n, gen):
        return tok.apply_chat_template(messages[:n], chat_template=template, tokenize=False,
                                       add_generation_prompt=gen, tools=tools)

    def encode(text):
        return tok(text, add_special_tokens=False).input_ids

    try:
        ids = encode(render(len(messages), False))
        labels = list(ids) if train_on_inputs else [-100] * len(ids)
        if not train_on_inputs:
            for k, t in enumerate(trained):
                if not t:
                    continue
                start = 0 if k == 0 else len(encode(render(k, messages[k]["role"] == "assistant")))
                end = min(len(encode(render(k + 1, False))), len(ids))
                labels[start:end] = ids[start:end]
    except Exception as e:  # noqa: BLE001 -- template raise_exception: the loader skips the row
        if "TemplateError" in type(e).__name__:
            return None
        raise
    return ids, labels


def spans(labels):
    """Trained label spans [start, end) (labels equal input_ids there)."""
    out, start = [], None
    for i, l in enumerate(labels + [-100]):
        if l != -100 and start is None:
            start = i
        if l == -100 and start is not None:
            out.append([start, i])
            start = None
    return out


DATASET_CASES = [
    # name, file, tokenizer, format, chat_template, rows, model_max_length, train_on_inputs
    ("alpaca_en_llama2", "instructions/llamafactory_alpaca_en_demo.json", "llama2", "alpaca", "",
     5, 256, False),
    ("alpaca_zh_llama2", "instructions/llamafactory_alpaca_zh_demo.json", "llama2", "alpaca", "",
     5, 256, False),
    ("alpaca_fastchat_gpt2", "instructions/fastchat_alpaca_data_cleaned_1000.json", "gpt2",
     "alpaca", "", 5, 256, False),
    ("alpaca_en_llama2_train_inputs", "instructions/llamafactory_alpaca_en_demo.json", "llama2",
     "alpaca", "", 3, 256, True),
    ("sharegpt_dummy_llama2", "conversations/fastchat_dummy_conversation.json", "llama2",
     "sharegpt", "llama2", 5, 256, False),
    ("sharegpt_dummy_gpt2_chatml", "conversations/fastchat_dummy_conversation.json", "gpt2",
     "sharegpt", "chatml", 5, 256, False),
    ("glaive_toolcall_llama2_chatml", "conversations/llamafactory_glaive_toolcall_en_demo.json",
     "llama2", "sharegpt", "chatml", 4, 512, False),
    ("glaive_toolcall_llama2_mistral", "conversations/llamafactory_glaive_toolcall_en_demo.json",
     "llama2", "sharegpt", "mistral", 6, 512, False),
    ("v1_messages_llama2_llama3", "conversations/llamafactory_v1_sft_demo.jsonl", "llama2",
     "messages", "llama3", 5, 256, False),
    ("v1_messages_llama2_zephyr", "conversations/llamafactory_v1_sft_demo.jsonl", "llama2",
     "messages", "zephyr", 5, 256, False),
    ("v1_messages_gpt2_mistral", "conversations/llamafactory_v1_sft_demo.jsonl", "gpt2",
     "messages", "mistral", 5, 256, False),
]


def load_rows(path, n):
    if path.endswith(".jsonl"):
        rows = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    rows.append(json.loads(line))
                if len(rows) == n:
                    break
        return rows
    with open(path, encoding="utf-8") as f:
        return json.load(f)[:n]


def make_datasets(tokenizers):
    cases = []
    for name, file, tok_name, fmt, tmpl, n, max_len, train_inputs in DATASET_CASES:
        tok = tokenizers[tok_name]
        rows, skipped, truncated = [], 0, 0
        for row in load_rows(os.path.join(DATA, file), n):
            if fmt == "alpaca":
                r = alpaca_row(tok, row, train_inputs)
            else:
                key = "messages" if fmt == "messages" else "conversations"
                r = conversation_row(tok, row, key, TEMPLATES[tmpl], train_inputs)
            if r is None:
                skipped += 1
                continue
            ids, labels = r
            if len(ids) > max_len:
                ids, labels = ids[:max_len], labels[:max_len]
                truncated += 1
            if all(l == -100 for l in labels):
                skipped += 1
                continue
            rows.append({"input_ids": ids, "trained_spans": spans(labels)})
        cases.append({"name": name, "file": os.path.join(DATA, file),
                      "tokenizer": os.path.join(DATA, "tokenizers", tok_name), "format": fmt,
                      "chat_template": tmpl, "max_rows": n, "model_max_length": max_len,
                      "train_on_inputs": train_inputs, "rows_skipped": skipped,
                      "rows_truncated": truncated, "rows": rows})
    return cases


def load_tokenizer(folder):
    """The tokenizer.json pipeline verbatim, as the `tokenizers` library runs it (and as
    transformers 4.x did). transformers 5's LlamaTokenizerFast rebuilds the Llama-2 pipeline
    instead of reading tokenizer.json, which changes ids such as ' </s>'; longtune follows the
    file, like the tokenizer conformance vectors."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8") as f:
        cfg = json.load(f)

    def tok_str(v):
        return v.get("content") if isinstance(v, dict) else v

    kwargs = {k: tok_str(cfg[k]) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
              if cfg.get(k) is not None}
    t = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_file(os.path.join(folder, "tokenizer.json")), **kwargs)
    if cfg.get("chat_template"):
        t.chat_template = cfg["chat_template"]
    return t


def main():
    os.makedirs(OUT, exist_ok=True)
    tokenizers = {k: load_tokenizer(os.path.join(DATA, "tokenizers", k)) for k in ("llama2", "gpt2")}
    meta = {"generator": "tools/make_dataset_fixtures.py",
            "transformers": transformers.__version__}
    with open(os.path.join(OUT, "jinja_features.json"), "w", encoding="utf-8") as f:
        json.dump({**meta, "cases": render_features()}, f, ensure_ascii=False, indent=1)
    with open(os.path.join(OUT, "jinja_renders.json"), "w", encoding="utf-8") as f:
        json.dump({**meta, **render_builtins(tokenizers["llama2"])}, f, ensure_ascii=False,
                  indent=1)
    with open(os.path.join(OUT, "dataset_golden.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps({**meta, "cases": make_datasets(tokenizers)}, ensure_ascii=False,
                           separators=(",", ":")))


if __name__ == "__main__":
    main()
