#!/usr/bin/env bash
# longtune -> transformers write-back check: longtune writes model folders (one file and sharded,
# f32 and bf16; Llama from `init`, Qwen2 with q/k/v biases, a fully fine-tuned `train` output)
# plus its own logits on fixed ids, then tools/check_hf_roundtrip.py loads each folder with
# AutoModelForCausalLM.from_pretrained and must reproduce those logits.
# Usage: tools/interop_hf.sh [build_dir] [python]
#   (defaults: build, $PYTHON or /work/venv/bin/python; needs torch, transformers, safetensors)
# Exit 0 = every folder loads with no missing/unexpected tensors and its logits match.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-$root/build}"
python="${2:-${PYTHON:-/work/venv/bin/python}}"
lt="$build/longtune"
if ! "$python" -c "import torch, transformers, safetensors, numpy" 2>/dev/null; then
  echo "interop_hf: $python lacks torch/transformers/safetensors/numpy; skipping" >&2
  exit 0
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
ids="1,17,300,42,5,511,77,2"
small_qwen="--hidden_size 64 --intermediate_size 176 --num_hidden_layers 2 --num_attention_heads 4
  --num_key_value_heads 2 --vocab_size 512 --max_position_embeddings 256"

"$lt" init --preset tiny --seed 1 --output_dir "$out/llama_f32_single" >/dev/null
"$lt" init --preset tiny --seed 2 --dtype bf16 --output_dir "$out/llama_bf16_single" >/dev/null
"$lt" init --preset tiny --seed 3 --max_shard_size 200KB --output_dir "$out/llama_f32_sharded" \
  >/dev/null
"$lt" init --preset tiny --seed 4 --dtype bf16 --max_shard_size 100KB \
  --output_dir "$out/llama_bf16_sharded" >/dev/null
# shellcheck disable=SC2086
"$lt" init --preset qwen2-7b $small_qwen --seed 5 --dtype bf16 --max_shard_size 100KB \
  --output_dir "$out/qwen2_bf16_sharded" >/dev/null
# A fully fine-tuned model as `longtune train` writes it back (bf16, sharded).
for r in 0 1 2 3; do
  echo "{\"input_ids\": [$((r + 1)), $((r * 7 + 3)), 99, 250, $((r * 31 + 10)), 400, 12, 7]}"
done >"$out/data.jsonl"
"$lt" train --model_name_or_path "$out/llama_f32_single" --data_path "$out/data.jsonl" \
  --output_dir "$out/llama_trained_bf16_sharded" --max_steps 3 --learning_rate 1e-2 \
  --save_strategy no --report_to none --disable_tqdm True --save_dtype bf16 \
  --max_shard_size 100KB >/dev/null

dirs=()
for d in "$out"/*/; do
  d="${d%/}"
  "$lt" generate --model_name_or_path "$d" --prompt_ids "$ids" \
    --dump_logits "$d/longtune_logits.safetensors" >/dev/null
  echo "$(basename "$d"): $(cd "$d" && ls model*.safetensors* | tr '\n' ' ')"
  dirs+=("$d")
done
"$python" "$root/tools/check_hf_roundtrip.py" "${dirs[@]}"
