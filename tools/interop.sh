#!/usr/bin/env bash
# longtune -> PEFT interop check: the C++ test writes adapters trained by longtune (LoRA with
# embed/norm, rsLoRA on Qwen2 with biases, QLoRA, LoRA over a bf16 base) plus the logits longtune computes, then PEFT
# loads each adapter on its base model and must reproduce those logits.
# Usage: tools/interop.sh [build_dir] [python]   (defaults: build, python3 with torch+peft)
# Needs: torch, transformers >= 5, peft, safetensors, numpy. Exit 0 = all adapters match.
# The QLoRA adapter is checked on the base with its projections NF4 round-tripped by the numpy
# reference quantizer (tools/peft_interop.py), as bitsandbytes would hold them; the bf16-base
# adapter on the base with its projections, embedding and LM head rounded to bfloat16 by torch.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-$root/build}"
python="${2:-${PYTHON:-python3}}"
if ! "$python" -c "import torch, transformers, peft, safetensors, numpy" 2>/dev/null; then
  echo "interop: $python lacks torch/transformers/peft/safetensors/numpy; skipping" >&2
  exit 0
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
cd "$root"
LT_INTEROP_OUT="$out" "$build/test_lora" --gtest_filter='LoraAdapter.TrainSaveReloadAndWriteInteropFolder'
"$python" tools/peft_interop.py --check "$out/llama_embed_norm" "$out/qwen2_qv" "$out/llama_qlora" "$out/llama_bf16_base"
