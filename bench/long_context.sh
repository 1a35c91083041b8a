#!/usr/bin/env bash
# Long-context benchmark: a small Llama with a real-size vocabulary (the `small` preset: 4 layers,
# hidden 256, vocab 32000) on CPU. For each setting (vanilla = plain attention and whole-sequence
# MLP/LM head; + flash attention; + mini-sequence; + checkpointing; + offload):
#   1. tokens/s and measured peak memory at several sequence lengths (and PyTorch eager where
#      it runs, same model and threads),
#   2. the longest sequence that fits a fixed budget (planner), verified by a real training step
#      at that length whose measured peak must stay within the budget.
# usage: bench/long_context.sh [BUDGET=512MiB] [SEQS=1024,2048,4096] [THREADS=2] [PY=python3]
#   SKIP_THROUGHPUT=1: only the longest-sequence part
# OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are unset for this run (OpenBLAS picks its fastest kernel).
set -euo pipefail
cd "$(dirname "$0")/.."
BUDGET=${1:-512MiB}
SEQS=${2:-1024,2048,4096}
THREADS=${3:-2}
PY=${4:-${PYTHON:-python3}}
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
unset OPENBLAS_CORETYPE OPENBLAS_L2_SIZE
export OMP_NUM_THREADS=$THREADS
MODEL=$OUT/small_model
[ -f "$MODEL/config.json" ] || build/longtune init --preset small --output_dir "$MODEL" --overwrite_output_dir True
R=$OUT/long_context.jsonl
: > "$R"
echo "machine: $(lscpu | grep 'Model name' | sed 's/.*: *//'), $(nproc) cores; threads $THREADS; load $(cut -d' ' -f1-3 /proc/loadavg)"
declare -A SET=([vanilla]="naive" [flash]="" [mini]="mini=auto" [ckpt]="mini=auto ckpt" [offload]="mini=auto offload")
echo "== throughput at $SEQS"
[ "${SKIP_THROUGHPUT:-0}" = 1 ] && SEQS_RUN="" || SEQS_RUN=$SEQS
for k in $([ -n "$SEQS_RUN" ] && echo vanilla flash mini ckpt offload); do
  build/bench_train "$MODEL" "$SEQS" 2 ${SET[$k]} | sed "s/\"impl\": \"longtune\"/\"impl\": \"longtune\", \"config\": \"$k\"/" | tee -a "$R"
done
if [ -n "$SEQS_RUN" ] && "$PY" -c "import torch, transformers" 2>/dev/null; then
  for T in ${SEQS//,/ }; do "$PY" bench/torch_train.py "$MODEL" "$T" 2 --threads "$THREADS" 2>/dev/null | tee -a "$R"; done
fi
echo "== longest sequence within $BUDGET (planner), verified by one training step"
build/longtune plan --model_name_or_path "$MODEL" --model_max_length 1024 --memory_budget "$BUDGET" |
  sed -n '/^longest sequence within/,$p' | tee "$OUT/longest.txt"
for k in vanilla flash mini ckpt offload; do
  case $k in vanilla) row="vanilla";; flash) row="+ flash attention";; mini) row="+ mini-sequence";;
    ckpt) row="+ checkpointing";; offload) row="+ offload";; esac
  T=$(grep -F "  $row " "$OUT/longest.txt" | awk '{print $NF}')
  build/bench_train "$MODEL" "$T" 0 ${SET[$k]} | sed "s/\"impl\": \"longtune\"/\"impl\": \"longtune\", \"config\": \"$k\", \"budget\": \"$BUDGET\"/" | tee -a "$R"
done
python3 - "$R" "$BUDGET" <<'PY'
import json, re, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
m = re.match(r"([\d.]+)\s*([KMG]?)i?B?", sys.argv[2]); budget = float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)]
print("| config | seq | tokens/s | peak MiB | predicted MiB | MFU |")
print("|---|---|---|---|---|---|")
for r in rows:
    if "budget" in r: continue
    print(f'| {r.get("config", r["impl"] + " " + r["settings"])} | {r["seq"]} | {r["tokens_per_s"]:.0f} | {r["peak_bytes"]/2**20:.0f} | '
          f'{r.get("predicted_bytes", 0)/2**20:.0f} | {r.get("mfu", float("nan")):.2f} |')
print(f"\nlongest sequence within {sys.argv[2]}, verified by a step at that length:")
print("| config | longest seq | measured peak MiB | fits | step s |")
print("|---|---|---|---|---|")
ok = True
for r in rows:
    if "budget" not in r: continue
    fits = r["peak_bytes"] <= budget
    ok &= fits
    print(f'| {r["config"]} | {r["seq"]} | {r["peak_bytes"]/2**20:.0f} | {"yes" if fits else "NO"} | {r["step_s"]:.1f} |')
sys.exit(0 if ok else 1)
PY
