#!/usr/bin/env bash
# Distributed benchmark on one machine: the `small` preset (4 layers, hidden 256, 8 heads, vocab
# 32000) trained for a few steps of 4 rows x SEQ tokens under every layout of 2 ranks (one
# OpenMP thread each) against one process (1 and 2 threads): tokens/s, each rank's measured
# peak memory, and the bytes each rank handed to communication per step. The volumes are
# checked against the theory by the multi-rank tests (printed at the end).
# usage: bench/dist_bench.sh [SEQ=1024] [STEPS=4]
# OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are unset for this run (OpenBLAS picks its fastest kernel).
set -euo pipefail
cd "$(dirname "$0")/.."
SEQ=${1:-1024}
STEPS=${2:-4}
OUT=${OUT:-bench/out/dist}
mkdir -p "$OUT"
unset OPENBLAS_CORETYPE OPENBLAS_L2_SIZE
B=build/longtune
MPI=(mpirun --oversubscribe -np 2)
[ "$(id -u)" = 0 ] && MPI+=(--allow-run-as-root)
MODEL=$OUT/small_model
[ -f "$MODEL/config.json" ] || $B init --preset small --output_dir "$MODEL" --overwrite_output_dir True >/dev/null
python3 - "$OUT/data.jsonl" "$SEQ" <<'PY'
import json, random, sys
random.seed(1)
with open(sys.argv[1], "w") as f:
    for _ in range(64):
        f.write(json.dumps({"input_ids": [random.randrange(32000) for _ in range(int(sys.argv[2]))]}) + "\n")
PY
for z in 1 2 3; do
  echo "{\"zero_optimization\": {\"stage\": $z}, \"gradient_accumulation_steps\": \"auto\"}" > "$OUT/zero$z.json"
done
echo '{"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}' > "$OUT/zero3_offload.json"
echo "machine: $(lscpu | grep 'Model name' | sed 's/.*: *//'), $(nproc) cores; load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "model: small preset; $STEPS steps of 4 rows x $SEQ tokens (2 micro-batches of 2 rows); mini-sequence auto"
common=(train --model_name_or_path "$MODEL" --data_path "$OUT/data.jsonl" --max_steps "$STEPS"
        --logging_steps 1 --learning_rate 1e-4 --gradient_accumulation_steps 2 --overwrite_output_dir True
        --save_strategy no --report_to none --mini_sequence auto --log_all_ranks True
        --model_max_length "$SEQ")
printf "%-34s %10s %10s %14s  %s\n" layout tokens/s "loss(last)" "peak/rank" "communication per step per rank (bytes)"
run() {  # name, ranks(1|2), threads, extra flags...
  local name=$1 ranks=$2 threads=$3
  shift 3
  local log=$OUT/$(echo "$name" | tr ' /+' '___').log
  local rc=0
  if [ "$ranks" = 1 ]; then
    OMP_NUM_THREADS=$threads $B "${common[@]}" --output_dir "$OUT/run" "$@" > "$log" 2>&1 || rc=$?
  else
    OMP_NUM_THREADS=$threads "${MPI[@]}" $B "${common[@]}" --output_dir "$OUT/run" "$@" > "$log" 2>&1 || rc=$?
  fi
  if [ "$rc" != 0 ]; then printf "%-34s FAILED (see %s)\n" "$name" "$log"; return; fi
  local tps loss peak comm
  # tokens/s of the steps after the first (warm-up), from the progress lines.
  tps=$(grep -E '^step ' "$log" | awk 'NR>1 {for(i=1;i<NF;i++) if($i == "tokens/s") {s+=$(i+1); n++}} END {if(n) printf "%.0f", s/n; else print "?"}')
  loss=$(grep -E '^step ' "$log" | tail -n 1 | awk '{print $6}')
  peak=$(grep -o 'measured peak RSS [0-9.]* [KMG]iB' "$log" | awk '{print $4 $5}' | paste -sd/ - || true)
  comm=$(grep -o 'communication per step on rank 0: .*' "$log" | sed 's/communication per step on rank 0: //' || true)
  printf "%-34s %10s %10s %14s  %s\n" "$name" "$tps" "$loss" "$peak" "${comm:--}"
}
run "1 process, 1 thread" 1 1 --per_device_train_batch_size 2
run "1 process, 2 threads" 1 2 --per_device_train_batch_size 2
run "DP2 (ZeRO-0)" 2 1 --per_device_train_batch_size 1
run "DP2 ZeRO-1" 2 1 --per_device_train_batch_size 1 --deepspeed "$OUT/zero1.json"
run "DP2 ZeRO-2" 2 1 --per_device_train_batch_size 1 --deepspeed "$OUT/zero2.json"
run "DP2 ZeRO-3" 2 1 --per_device_train_batch_size 1 --deepspeed "$OUT/zero3.json"
run "DP2 ZeRO-3 + optimizer offload" 2 1 --per_device_train_batch_size 1 --deepspeed "$OUT/zero3_offload.json"
run "SP2 Ulysses" 2 1 --per_device_train_batch_size 2 --sequence_parallel_size 2
run "SP2 FPDT chunk 512" 2 1 --per_device_train_batch_size 2 --sequence_parallel_size 2 --fpdt_chunk_size 512
run "PP2 (1F1B, 2 micro-batches)" 2 1 --per_device_train_batch_size 2 --pipeline_parallel_size 2
run "PP2 + LoRA r16" 2 1 --per_device_train_batch_size 2 --pipeline_parallel_size 2 --use_peft_lora True --lora_r 16 --lora_target_modules all-linear
echo
echo "communication volume against the theory (tests/dist/dist_worker.cpp, 2 ranks):"
OMP_NUM_THREADS=1 "${MPI[@]}" build/test_dist_worker \
  --gtest_filter='Dist.CommunicationBytes:Parallel.CommunicationBytes:Dist.Zero3MemoryIsSharded' 2>&1 |
  grep -E 'stage [0-3]:|Ulysses|pipeline PP2|ZeRO-3 on'
