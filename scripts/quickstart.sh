#!/usr/bin/env bash
# longtune quickstart: builds the project, creates a tiny random Llama model, shows what it
# generates, fine-tunes it on examples/quickstart/train.jsonl (reverse a short word) for about
# half a minute on a CPU, and shows what it generates afterwards, on words it never saw.
#   bash scripts/quickstart.sh            (QUICKSTART_SKIP_BUILD=1 to reuse build/)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
WORK=$ROOT/build/quickstart
EXAMPLE=$ROOT/examples/quickstart
# The model is tiny: one thread is fastest, and extra OpenMP threads only spin on a busy machine.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}

if [ -t 1 ]; then bold=$'\033[1m' plain=$'\033[0m'; else bold='' plain=''; fi
step() { printf '\n%s==> %s%s\n' "$bold" "$*" "$plain"; }

step "1/5  Building longtune (scripts/build.sh; the first build takes a few minutes)"
if [ "${QUICKSTART_SKIP_BUILD:-0}" = 1 ] && [ -x build/longtune ]; then
  echo "QUICKSTART_SKIP_BUILD=1: using build/longtune"
else
  bash scripts/build.sh
fi
LT=$ROOT/build/longtune
"$LT" --version

step "2/5  Creating a tiny random Llama model (4 layers, hidden 64, 0.19M parameters)"
rm -rf "$WORK"
mkdir -p "$WORK"
"$LT" init --preset tiny --vocab_size 48 --max_position_embeddings 64 --seed 0 \
  --output_dir "$WORK/model"
# A character-level tokenizer made by tools/make_quickstart_example.py (48 tokens).
cp "$EXAMPLE/tokenizer.json" "$EXAMPLE/tokenizer_config.json" "$WORK/model/"
echo "task: $(wc -l < "$EXAMPLE/train.jsonl") rows like $(head -1 "$EXAMPLE/train.jsonl")"

# Greedy generation for words that are not in the training data.
demo() {
  for word in kite moon hello star plum quiz; do
    printf '  reverse: %s =' "$word"
    "$LT" generate --model_name_or_path "$1" --prompt "reverse: $word =" --temperature 0 \
      --max_new_tokens 8 2>/dev/null
  done
}

step "3/5  Before training: the random model answers (greedy, held-out words)"
demo "$WORK/model"

step "4/5  Fine-tuning on examples/quickstart/train.jsonl (25 epochs, loss on the answers only)"
start=$(date +%s)
"$LT" train --model_name_or_path "$WORK/model" --data_path "$EXAMPLE/train.jsonl" \
  --output_dir "$WORK/trained" --num_train_epochs 25 --per_device_train_batch_size 16 \
  --learning_rate 3e-3 --lr_scheduler_type cosine --warmup_steps 30 --weight_decay 0.01 \
  --logging_steps 50 --seed 0
echo "training took $(( $(date +%s) - start )) s"

step "5/5  After training: the same prompts (none of these words was in the training data)"
demo "$WORK/trained"

printf '\nDone. The trained model is a Hugging Face folder: %s\n' "$WORK/trained"
printf 'Try: %s generate --model_name_or_path %s --prompt "reverse: longtune =" --temperature 0\n' \
  "build/longtune" "build/quickstart/trained"
