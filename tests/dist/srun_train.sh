#!/usr/bin/env bash
# `longtune train` launched by Slurm's srun (through Open MPI's PMIx support) on a private
# one-node cluster (slurm_cluster.sh): 2 ranks of batch 2 give the steps of one process with
# batch 4, and rank 0 alone prints and saves. Exit 77 (skipped) without Slurm.
# Usage: srun_train.sh LONGTUNE REPO_ROOT
set -uo pipefail
longtune=$1 root=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
for i in $(seq 1 16); do
  n=$(( (i * 7) % 13 + 4 )) ids=""
  for t in $(seq 1 $n); do ids="$ids$(( (i * 31 + t * 17) % 97 )),"; done
  echo "{\"input_ids\": [${ids%,}]}"
done > data.jsonl
common=(train --model_name_or_path "$root/tests/fixtures/models/llama_gqa" --data_path data.jsonl
        --max_steps 3 --logging_steps 1 --learning_rate 1e-3 --overwrite_output_dir True
        --save_strategy no --report_to none)
"$longtune" "${common[@]}" --output_dir one --per_device_train_batch_size 4 > one.log || exit 1
cat > run.sh <<RUN
set -e
srun --immediate=60 --mpi=pmix -n 2 "$longtune" ${common[*]} --output_dir two --per_device_train_batch_size 2 > two.log
RUN
bash "$root/tests/dist/slurm_cluster.sh" bash run.sh
rc=$?
[ "$rc" = 77 ] && exit 77
[ "$rc" = 0 ] || { echo "FAIL: srun exited $rc"; cat two.log; exit 1; }
steps() { grep -E '^step ' "$1" | awk '{print $2, $6, $10}'; }
status=0
if [ "$(steps one.log)" != "$(steps two.log)" ]; then
  echo "FAIL: steps differ"; paste <(steps one.log) <(steps two.log); status=1
fi
grep -q "distributed: 2 ranks = 2 data-parallel" two.log || { echo "FAIL: not 2 ranks"; cat two.log; status=1; }
[ "$(grep -c '^step 1/' two.log)" = 1 ] || { echo "FAIL: not only rank 0 logged"; status=1; }
[ -f two/model.safetensors ] || { echo "FAIL: no saved model"; status=1; }
echo "srun 2 ranks:"; steps two.log
exit $status
