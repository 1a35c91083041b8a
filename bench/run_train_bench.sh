#!/usr/bin/env bash
# Training-step benchmark, longtune vs PyTorch eager (transformers LlamaForCausalLM, float32)
# on the same model folder, tokens and thread count; validates that both give the same loss.
#
# usage: bench/run_train_bench.sh [SEQS=512,1024,2048,4096] [THREADS=2] [PY=/path/to/python]
# Needs build/ (scripts/build.sh) and, for the PyTorch side, a python with torch + transformers.
# OpenBLAS: OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are unset for this run so that OpenBLAS picks
# its fastest kernel for this CPU (the figures say so).
set -euo pipefail
cd "$(dirname "$0")/.."
SEQS=${1:-512,1024,2048,4096}
THREADS=${2:-2}
PY=${3:-${PYTHON:-python3}}
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
unset OPENBLAS_CORETYPE OPENBLAS_L2_SIZE
export OMP_NUM_THREADS=$THREADS
MODEL=$OUT/small_model
[ -f "$MODEL/config.json" ] || build/longtune init --preset small --output_dir "$MODEL" --overwrite_output_dir True
echo "machine: $(lscpu | grep 'Model name' | sed 's/.*: *//'), $(nproc) cores; threads $THREADS"
RESULTS=$OUT/train_bench.jsonl
: > "$RESULTS"
build/bench_train "$MODEL" "$SEQS" 3 | tee -a "$RESULTS"
build/bench_train "$MODEL" "$SEQS" 3 mini=auto | tee -a "$RESULTS"
if "$PY" -c "import torch, transformers" 2>/dev/null; then
  for T in ${SEQS//,/ }; do
    "$PY" bench/torch_train.py "$MODEL" "$T" 3 --threads "$THREADS" 2>/dev/null | tee -a "$RESULTS"
  done
else
  echo "PyTorch side skipped: $PY cannot import torch and transformers"
fi
python3 bench/summarize.py "$RESULTS"
