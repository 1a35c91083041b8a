#!/usr/bin/env bash
# The checks against the Python ecosystem, run after the test suite when the packages can be
# installed: PEFT loads adapters trained by longtune with the same logits (tools/interop.sh) and
# transformers loads model folders longtune wrote (tools/interop_hf.sh when present).
# The packages go into a virtual environment outside the repository, made once per machine:
#   LONGTUNE_INTEROP_VENV (default ~/.cache/longtune/venv-interop); LONGTUNE_INTEROP=0 skips.
# Exit status: 0 when the checks pass or cannot run here (said on stdout), 1 when a check fails.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${LONGTUNE_INTEROP:-1}" = 0 ]; then echo "interop: skipped (LONGTUNE_INTEROP=0)"; exit 0; fi
VENV=${LONGTUNE_INTEROP_VENV:-$HOME/.cache/longtune/venv-interop}
PY=$VENV/bin/python
PKGS="torch transformers peft safetensors numpy"
if ! "$PY" -c "import torch, transformers, peft, safetensors, numpy" 2>/dev/null; then
  echo "interop: installing $PKGS into $VENV (once per machine; PyPI)"
  if ! { python3 -m venv "$VENV" && timeout 1800 "$PY" -m pip install -q $PKGS; }; then
    echo "interop: SKIPPED: the Python packages could not be installed here"
    exit 0
  fi
fi
status=0
echo "interop: PEFT <-> longtune adapters"
bash tools/interop.sh build "$PY" || status=1
if [ -f tools/interop_hf.sh ]; then
  echo "interop: transformers loads longtune's model folders"
  bash tools/interop_hf.sh build "$PY" || status=1
fi
# The GPU check's baseline (scripts/gpu-check.sh, bench-hf-peft) on the CPU at a tiny shape: the
# script runs against these package versions, times steps and searches its longest sequence.
echo "interop: the transformers + PEFT baseline benchmark (a CPU smoke run)"
if out=$("$PY" bench/hf_peft_bench.py --device cpu --shape tiny --layers 2 --tokens 64,128 \
    --iters 1 --longest --max_tokens 1024 --granularity 128 2>&1) &&
    grep -qE '^ +128 ' <<< "$out" && grep -q "1024 tokens fit" <<< "$out"; then
  echo "  ok"
else
  echo "$out"
  echo "  FAILED: bench/hf_peft_bench.py"
  status=1
fi
# Experiment tracking: TensorBoard reads our event files; a real MLflow server on 127.0.0.1
# receives a run (packages in a second venv: mlflow pins its own versions).
TVENV=${LONGTUNE_TRACKING_VENV:-$HOME/.cache/longtune/venv-tracking}
if ! "$TVENV/bin/python" -c "import mlflow, tensorboard" 2>/dev/null; then
  echo "interop: installing mlflow tensorboard into $TVENV (once per machine; PyPI)"
  { python3 -m venv "$TVENV" && timeout 1200 "$TVENV/bin/python" -m pip install -q mlflow tensorboard; } ||
    echo "interop: tracking packages could not be installed here"
fi
if "$TVENV/bin/python" -c "import mlflow, tensorboard" 2>/dev/null; then
  echo "interop: MLflow server and TensorBoard reader"
  MLFLOW_PYTHON="$TVENV/bin/python" bash tools/test_mlflow.sh build/longtune || status=1
  tb=$(mktemp -d)
  build/longtune init --preset tiny --output_dir "$tb/model" >/dev/null
  python3 -c "import json; [print(json.dumps({'input_ids': [(7 * i + k) % 500 + 3 for k in range(40)]})) for i in range(16)]" > "$tb/data.jsonl"
  if build/longtune train --model_name_or_path "$tb/model" --data_path "$tb/data.jsonl" \
      --output_dir "$tb/out" --max_steps 6 --logging_steps 1 --per_device_train_batch_size 2 \
      --report_to tensorboard --save_strategy no >/dev/null; then
    "$TVENV/bin/python" tools/check_tensorboard.py "$tb/out" || status=1
  else
    status=1
  fi
  rm -rf "$tb"
else
  echo "interop: SKIPPED MLflow/TensorBoard checks: packages unavailable"
fi
[ $status = 0 ] && echo "interop: all checks passed" || echo "interop: FAILED"
exit $status
