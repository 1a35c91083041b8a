#!/usr/bin/env bash
# `longtune train` under mpirun (2 ranks) against one process with the same global batch: the
# logged loss and grad_norm of every step agree (to 4 decimals) for data parallel with ZeRO
# (ZeRO-3 with the optimizer offloaded, and the parameters too), sequence parallel (Ulysses,
# FPDT), pipeline stages, and LoRA / QLoRA over data parallel and pipeline stages; only rank 0
# prints and saves; checkpoints resume on their own and on other layouts; an impossible layout is
# a clear error. Usage: train_cli.sh LONGTUNE MPIRUN REPO_ROOT
set -euo pipefail
longtune=$1 mpirun=$2 root=$3
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
# 32 pre-tokenized rows of 4..20 ids (vocab 97), deterministic.
for i in $(seq 1 32); do
  n=$(( (i * 7) % 17 + 4 )) ids=""
  for t in $(seq 1 $n); do ids="$ids$(( (i * 31 + t * 17) % 97 )),"; done
  echo "{\"input_ids\": [${ids%,}]}"
done > data.jsonl
cat > ds.json <<'JSON'
{"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
 "train_batch_size": "auto", "gradient_clipping": "auto",
 "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}},
 "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                       "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto"}}
JSON
# ZeRO-3 with the parameter shard offloaded too (each rank's shard lives in host memory).
sed 's/"offload_optimizer": {"device": "cpu"},/"offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"},/' \
  ds.json > ds_param.json
grep -q offload_param ds_param.json || { echo "FAIL: ds_param.json"; exit 1; }
common=(train --model_name_or_path "$root/tests/fixtures/models/llama_gqa" --data_path data.jsonl
        --max_steps 4 --logging_steps 1 --learning_rate 1e-3 --weight_decay 0.1
        --gradient_accumulation_steps 2 --overwrite_output_dir True --save_steps 2
        --report_to none)
"$longtune" "${common[@]}" --output_dir one --per_device_train_batch_size 4 > one.log
if [ -n "${LONGTUNE_CUDA_MODULE:-}" ] && ! grep -q "^device: cuda" one.log; then
  echo "FAIL: LONGTUNE_CUDA_MODULE is set but the run is not on cuda"; exit 1
fi
steps() { grep -E '^step ' "$1" | awk '{print $2, $6, $10}'; }  # step, loss, grad_norm
# differ A B: the step lists A and B (steps' output) differ: other steps, or a loss or grad_norm
# more than one unit of the 4th decimal apart (two values that agree to 4 decimals can print
# one unit apart when they straddle a rounding boundary); LT_TRAIN_CLI_TOL sets another bound
# (the run on the emulated GPU: its bf16 attention tiles a split sequence differently).
TOL=${LT_TRAIN_CLI_TOL:-1.01e-4}
differ() {
  [ "$(printf '%s\n' "$1" | awk '{print $1}')" != "$(printf '%s\n' "$2" | awk '{print $1}')" ] && return 0
  paste <(printf '%s\n' "$1") <(printf '%s\n' "$2") |
    awk -v tol="$TOL" '{ for (i = 2; i <= 3; ++i) { d = $i - $(i + 3); if (d < 0) d = -d; if (d > tol) bad = 1 } }
         END { exit bad ? 0 : 1 }'
}
status=0
for variant in "--deepspeed ds.json" "--deepspeed ds_param.json" "--fsdp shard_grad_op"; do
  # shellcheck disable=SC2086
  "$mpirun" --oversubscribe -np 2 "$longtune" "${common[@]}" --output_dir two \
      --per_device_train_batch_size 2 $variant > two.log
  if differ "$(steps one.log)" "$(steps two.log)"; then
    echo "FAIL ($variant): steps differ"; paste <(steps one.log) <(steps two.log); status=1
  fi
  if [ "$(grep -c '^step 1/' two.log)" != 1 ]; then echo "FAIL: not only rank 0 logged"; status=1; fi
  grep -q "distributed: 2 ranks = 2 data-parallel x 1 sequence-parallel x 1 pipeline (mpi)" two.log ||
    { echo "FAIL: not distributed"; status=1; }
  # On the emulated GPU the device collectives go over (emulated) NCCL: nccl_comm.cpp runs.
  if [ -n "${LONGTUNE_CUDA_MODULE:-}" ] && ! grep -q "^device collectives: nccl" two.log; then
    echo "FAIL ($variant): the device collectives are not NCCL's"; status=1
  fi
  [ -f two/model.safetensors ] || { echo "FAIL: no saved model"; status=1; }
  echo "$variant:"; steps two.log
done
# ZeRO-3 resume from checkpoint-2 (gathered by rank 0): steps 3 and 4 as in the one-process run.
rm -rf two/checkpoint-4
"$mpirun" --oversubscribe -np 2 "$longtune" "${common[@]}" --output_dir two \
    --per_device_train_batch_size 2 --deepspeed ds.json --resume_from_checkpoint latest > resumed.log
if differ "$(steps one.log | tail -n 2)" "$(steps resumed.log)"; then
  echo "FAIL (resume): steps differ"; paste <(steps one.log | tail -n 2) <(steps resumed.log); status=1
fi
grep -q "resumed from two/checkpoint-2" resumed.log || { echo "FAIL: did not resume"; status=1; }
# Sequence and pipeline parallelism from the command line: one replica of 4 rows per
# micro-batch over 2 ranks gives the one-process steps.
for variant in "--sequence_parallel_size 2" "--sequence_parallel_size 2 --fpdt_chunk_size 16" \
               "--pipeline_parallel_size 2" "--pipeline_parallel_size 2 --deepspeed ds1.json"; do
  [ -f ds1.json ] || echo '{"zero_optimization": {"stage": 1}, "gradient_accumulation_steps": "auto"}' > ds1.json
  # shellcheck disable=SC2086
  "$mpirun" --oversubscribe -np 2 "$longtune" "${common[@]}" --output_dir layout \
      --per_device_train_batch_size 4 $variant > layout.log
  if differ "$(steps one.log)" "$(steps layout.log)"; then
    echo "FAIL ($variant): steps differ"; paste <(steps one.log) <(steps layout.log); status=1
  fi
  grep -q "distributed: 2 ranks = 1 data-parallel" layout.log || { echo "FAIL: layout line"; cat layout.log; status=1; }
  [ -f layout/model.safetensors ] || { echo "FAIL ($variant): no saved model"; status=1; }
  echo "$variant:"; steps layout.log
done
# A pipeline checkpoint resumes in one process (the checkpoint is the one-process layout).
rm -rf layout/checkpoint-4
"$longtune" "${common[@]}" --output_dir layout --per_device_train_batch_size 4 \
    --resume_from_checkpoint latest > layout_resumed.log
if differ "$(steps one.log | tail -n 2)" "$(steps layout_resumed.log)"; then
  echo "FAIL (pipeline checkpoint resumed in one process): steps differ"
  paste <(steps one.log | tail -n 2) <(steps layout_resumed.log); status=1
fi
grep -q "resumed from layout/checkpoint-2" layout_resumed.log || { echo "FAIL: did not resume"; status=1; }
# LoRA, QLoRA and LoRA over a bf16 base: data parallel (ZeRO-2 config: the adapter stays
# replicated) and pipeline stages give the one-process adapter training; the adapter folder is
# written once.
lora=(--use_peft_lora True --lora_r 4 --lora_target_modules all-linear --lora_dropout 0)
for q in "--bf16 True" "" "--load_in_4bit True"; do  # QLoRA last: resumed below
  # shellcheck disable=SC2086
  "$longtune" "${common[@]}" "${lora[@]}" $q --output_dir lora_one --per_device_train_batch_size 4 > lora_one.log
  for variant in "--per_device_train_batch_size 2 --fsdp shard_grad_op" \
                 "--per_device_train_batch_size 4 --pipeline_parallel_size 2"; do
    # shellcheck disable=SC2086
    "$mpirun" --oversubscribe -np 2 "$longtune" "${common[@]}" "${lora[@]}" $q $variant \
        --output_dir lora_two > lora_two.log
    if differ "$(steps lora_one.log)" "$(steps lora_two.log)"; then
      echo "FAIL (LoRA $q $variant): steps differ"; paste <(steps lora_one.log) <(steps lora_two.log); status=1
    fi
    [ -f lora_two/adapter_model.safetensors ] && [ -f lora_two/adapter_config.json ] ||
      { echo "FAIL (LoRA $q $variant): no adapter folder"; status=1; }
    echo "LoRA $q $variant:"; steps lora_two.log
  done
done
# The LoRA pipeline run's checkpoint-2 resumes over 2 data-parallel ranks.
rm -rf lora_two/checkpoint-4
"$mpirun" --oversubscribe -np 2 "$longtune" "${common[@]}" "${lora[@]}" --load_in_4bit True \
    --output_dir lora_two --per_device_train_batch_size 2 --resume_from_checkpoint latest > lora_resumed.log
if differ "$(steps lora_one.log | tail -n 2)" "$(steps lora_resumed.log)"; then
  echo "FAIL (LoRA resume on another layout): steps differ"
  paste <(steps lora_one.log | tail -n 2) <(steps lora_resumed.log); status=1
fi
grep -q "resumed from lora_two/checkpoint-2" lora_resumed.log || { echo "FAIL: LoRA did not resume"; status=1; }
# A layout that cannot run is a clear error, not a crash.
if "$mpirun" --oversubscribe -np 2 "$longtune" "${common[@]}" --output_dir bad \
    --per_device_train_batch_size 2 --pipeline_parallel_size 2 --fsdp full_shard > bad.log 2>&1; then
  echo "FAIL: pipeline + ZeRO-3 ran"; status=1
fi
grep -q "pipeline stages shard with ZeRO stage 0 or 1 only" bad.log ||
  { echo "FAIL: no pipeline/ZeRO-3 error"; cat bad.log; status=1; }
exit $status
