#!/usr/bin/env bash
# `longtune train` under mpirun (2 ranks, per-device batch 2) against one process with batch 4:
# the logged loss and grad_norm of every step agree (4 decimals), only rank 0 prints, rank 0
# saves one model. Usage: train_cli.sh LONGTUNE MPIRUN REPO_ROOT
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
common=(train --model_name_or_path "$root/tests/fixtures/models/llama_gqa" --data_path data.jsonl
        --max_steps 4 --logging_steps 1 --learning_rate 1e-3 --weight_decay 0.1
        --gradient_accumulation_steps 2 --overwrite_output_dir True)
"$longtune" "${common[@]}" --output_dir one --per_device_train_batch_size 4 > one.log
steps() { grep -E '^step ' "$1" | awk '{print $2, $6, $10}'; }  # step, loss, grad_norm
status=0
for variant in "--deepspeed ds.json" "--fsdp shard_grad_op"; do
  # shellcheck disable=SC2086
  "$mpirun" --oversubscribe -np 2 "$longtune" "${common[@]}" --output_dir two \
      --per_device_train_batch_size 2 $variant > two.log
  if [ "$(steps one.log)" != "$(steps two.log)" ]; then
    echo "FAIL ($variant): steps differ"; paste <(steps one.log) <(steps two.log); status=1
  fi
  if [ "$(grep -c '^step 1/' two.log)" != 1 ]; then echo "FAIL: not only rank 0 logged"; status=1; fi
  grep -q "distributed: 2 ranks (mpi)" two.log || { echo "FAIL: not distributed"; status=1; }
  [ -f two/model.safetensors ] || { echo "FAIL: no saved model"; status=1; }
  echo "$variant:"; steps two.log
done
exit $status
