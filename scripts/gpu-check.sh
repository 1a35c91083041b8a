#!/usr/bin/env bash
# One-call check of the CUDA backend on a bare GPU machine (CUDA toolkit, PyTorch, transformers,
# PEFT; no network). Everything goes under OUT_DIR: a log per step and summary.txt, which says
# for every step whether it passed, failed or was skipped and why. Budget: about 8 minutes.
#   scripts/gpu-check.sh OUT_DIR
set -u
OUT=${1:?usage: scripts/gpu-check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BUILD=$ROOT/build-gpu
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
START=$(date +%s)
JOBS=$(nproc)

note() { echo "$*" | tee -a "$SUMMARY"; }
# step NAME SECONDS CMD...: runs CMD with a time limit, its output in OUT/NAME.log.
step() {
  local name=$1 limit=$2
  shift 2
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then note "PASS  $name (${dt}s)"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then note "FAIL  $name: timed out after ${limit}s"
  else note "FAIL  $name: exit $rc (${dt}s), see $name.log"; fi
  return $rc
}

note "gpu-check $(date -u +%FT%TZ) at $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
NVCC=${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if ! nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1; then
  note "SKIP  everything: nvidia-smi failed (no GPU or no driver), see nvidia-smi.txt"
  exit 1
fi
GPU=$(nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader | head -1)
note "gpu: $GPU"
CAP=$(echo "$GPU" | awk -F', ' '{gsub(/\./,"",$2); print $2}')
case "$GPU" in
  *H100*|*H200*|*H800*) PEAK=989 ;;
  *A100*|*A800*) PEAK=312 ;;
  *L40S*) PEAK=362 ;;
  *) PEAK=0 ;;
esac

# 1. Build for this GPU only (faster than the default 80;90).
if ! step build-configure 120 cmake -S . -B "$BUILD" -G Ninja -DLONGTUNE_CUDA=ON \
    -DCMAKE_CUDA_COMPILER="$NVCC" -DCMAKE_CUDA_ARCHITECTURES="${CAP:-90}" -DLONGTUNE_MARCH=native; then
  note "SKIP  all later steps: configure failed"; exit 1
fi
if ! step build 300 ninja -C "$BUILD" -j"$JOBS"; then
  note "SKIP  all later steps: build failed"; exit 1
fi
"$BUILD/longtune" --version > "$OUT/version.txt" 2>&1

# 2. Conformance suite on the GPU, then the whole suite.
step ctest-gpu 120 ctest --test-dir "$BUILD" -L gpu --output-on-failure
grep -E "Skipped|SKIPPED|no CUDA device" "$OUT/ctest-gpu.log" | head -5 >> "$SUMMARY"
step ctest-all 240 ctest --test-dir "$BUILD" -j8 --output-on-failure --timeout 200

# 3. compute-sanitizer (memcheck, racecheck on the attention kernels) on small cases.
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
if [ -x "$SAN" ]; then
  step sanitizer-memcheck 150 "$SAN" --tool memcheck --error-exitcode 9 \
    "$BUILD/test_backend_ops" --gtest_filter='*SwiGlu/cuda:*Linear/cuda:*LmHeadCrossEntropy/cuda:*Attention/cuda:*RmsNorm/cuda:*Nf4*/cuda:*Lora/cuda:*Bf16ToF32/cuda:*LinearBf16Weight/cuda:CudaBackend.Bf16GemmMode'
  step sanitizer-racecheck 120 "$SAN" --tool racecheck --error-exitcode 9 \
    "$BUILD/test_backend_ops" --gtest_filter='*Attention/cuda'
else
  note "SKIP  compute-sanitizer: not found"
fi

# 4. The same tiny training run on GPU and on CPU: losses line by line.
DATA=""
for d in "$ROOT/../shared/data" "$ROOT/shared/data"; do [ -d "$d" ] && DATA=$d && break; done
if [ -z "$DATA" ]; then
  note "SKIP  train-compare: no shared/data folder beside or inside the checkout"
else
  TMP=$OUT/train
  rm -rf "$TMP" && mkdir -p "$TMP"
  TOK=$DATA/tokenizers/llama2
  step train-init 60 "$BUILD/longtune" init --preset tiny --vocab_size 32000 --seed 1 \
    --output_dir "$TMP/model"
  # compare NAME: the losses of train-NAME-cpu.log and train-NAME-cuda.log, line by line.
  compare() {
    local name=$1
    if ! [ -s "$OUT/train-$name-cpu.log" ] || ! [ -s "$OUT/train-$name-cuda.log" ]; then
      note "SKIP  compare-$name: a training log is empty"
      return
    fi
    python3 - "$OUT/train-$name-cpu.log" "$OUT/train-$name-cuda.log" > "$OUT/compare-$name.log" 2>&1 <<'PY'
import re, sys
def losses(path):
    return [float(m.group(1)) for m in re.finditer(r"loss ([0-9.eE+-]+|nan|inf)", open(path).read())]
cpu, gpu = losses(sys.argv[1]), losses(sys.argv[2])
print("step  cpu  cuda  rel_diff")
bad = len(cpu) == 0 or len(cpu) != len(gpu)
for i, (a, b) in enumerate(zip(cpu, gpu)):
    rel = abs(a - b) / max(abs(a), 1e-12)
    # bf16 attention on the GPU: losses agree to about 1e-2 relative after a few steps.
    ok = rel <= 2e-2
    bad |= not ok
    print(f"{i+1:4d} {a:.5f} {b:.5f} {rel:.2e} {'ok' if ok else 'MISMATCH'}")
print(f"{len(cpu)} cpu lines, {len(gpu)} cuda lines")
sys.exit(1 if bad else 0)
PY
    if [ $? -eq 0 ]; then note "PASS  compare-$name (losses within 2e-2 relative)"
    else note "FAIL  compare-$name: see compare-$name.log"; fi
  }
  # Full fine-tune in f32 storage, then LoRA over a bf16 base with bf16 GEMMs on the GPU, then
  # the same with checkpointing (GPU only) and with checkpoint offload (staged copies on the
  # copy stream, ordered by events).
  for cfg in full lora-bf16 lora-bf16-ckpt lora-bf16-offload; do
    extra=()
    case $cfg in lora-bf16*) extra=(--use_peft_lora True --lora_target_modules all-linear \
      --lora_dropout 0 --bf16 True) ;; esac
    case $cfg in
      *-ckpt) extra+=(--gradient_checkpointing True) ;;
      *-offload) extra+=(--gradient_checkpointing True --offload_activations True) ;;
    esac
    devs="cpu cuda"
    [ "$cfg" = lora-bf16-ckpt ] && devs=cuda
    for dev in $devs; do
      step "train-$cfg-$dev" 150 "$BUILD/longtune" train --model_name_or_path "$TMP/model" \
        --tokenizer "$TOK" --data_path "$DATA/instructions/llamafactory_alpaca_en_demo.json" \
        --output_dir "$TMP/out-$cfg-$dev" --max_steps 8 --logging_steps 1 --learning_rate 1e-3 \
        --per_device_train_batch_size 2 --model_max_length 256 --seed 1 --device "$dev" \
        "${extra[@]}"
    done
    [ "$cfg" != lora-bf16-ckpt ] && compare "$cfg"
  done
  # Offload only moves the checkpoints: on the GPU its losses equal checkpointing's exactly (a
  # copy read or overwritten out of order would change them).
  if python3 - "$OUT/train-lora-bf16-ckpt-cuda.log" "$OUT/train-lora-bf16-offload-cuda.log" \
      > "$OUT/compare-offload-exact.log" 2>&1 <<'PY'
import re, sys
def losses(path):
    return re.findall(r"loss ([0-9.eE+-]+|nan|inf)", open(path).read())
a, b = losses(sys.argv[1]), losses(sys.argv[2])
print("checkpointing:", a)
print("offload:      ", b)
sys.exit(0 if a and a == b else 1)
PY
  then note "PASS  offload-exact (GPU losses with offload equal checkpointing's)"
  else note "FAIL  offload-exact: see compare-offload-exact.log"; fi
  # The plan covers every GPU allocation: no scratch outside the planned workspace, and the
  # measured device peak within the plan plus the CUDA runtime it allows (1 GiB).
  if python3 - "$OUT"/train-*-cuda.log > "$OUT/plan-vs-device.log" 2>&1 <<'PY'
import re, sys
units = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
ok = True
for path in sys.argv[1:]:
    text = open(path).read()
    if "outside the plan" in text:
        print(path, ": the CUDA backend allocated scratch outside the planned workspace"); ok = False
    m = re.search(r"device memory on cuda: planned ([0-9.]+) (\w+), measured peak ([0-9.]+) (\w+)", text)
    if not m:
        print(path, ": no device memory line"); ok = False; continue
    planned, peak = float(m[1]) * units[m[2]], float(m[3]) * units[m[4]]
    print(f"{path}: planned {planned / 2**20:.1f} MiB, measured peak {peak / 2**20:.1f} MiB")
    ok &= peak <= planned * 1.02 + 2**20
sys.exit(0 if ok else 1)
PY
  then note "PASS  plan-vs-device (every GPU allocation planned; see plan-vs-device.log)"
  else note "FAIL  plan-vs-device: see plan-vs-device.log"; fi
fi

# 5. Benchmarks (validated before timing), if time is left.
ELAPSED=$(( $(date +%s) - START ))
if [ $ELAPSED -gt 420 ]; then
  note "SKIP  benchmarks: ${ELAPSED}s already spent of the ~8 minute budget"
else
  if [ "$PEAK" = 0 ]; then note "note: unknown GPU peak; MFU printed against 989 TFLOP/s"; PEAK=989; fi
  step bench-gpu-bf16 150 "$BUILD/bench_gpu" --precision bf16 --peak_tflops "$PEAK" \
    --tokens 4096,16384,32768
  # The whole model: Llama-3-8B shape, random weights, LoRA r=16 on every linear layer over a
  # bf16 base, bf16 GEMMs, checkpointing, batch 1; then with activation offload, each also at
  # the longest sequence the planner says fits in 95% of the GPU's memory.
  MEM=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
  FIT="$(( ${MEM:-81559} * 95 / 100 ))MiB"
  step bench-longtune-lora 240 "$BUILD/bench_train" preset:llama3-8b 4096,16384,32768 1 \
    device=cuda lora=16 bf16 ckpt mini=auto peak_tflops="$PEAK" fit="$FIT"
  step bench-longtune-lora-offload 180 "$BUILD/bench_train" preset:llama3-8b 32768 1 \
    device=cuda lora=16 bf16 offload mini=auto peak_tflops="$PEAK" fit="$FIT"
  step bench-hf-peft 300 python3 bench/hf_peft_bench.py --peak_tflops "$PEAK" \
    --tokens 4096,16384,32768 --longest --granularity 8192
  cat "$OUT/bench-gpu-bf16.log" "$OUT/bench-longtune-lora.log" \
    "$OUT/bench-longtune-lora-offload.log" "$OUT/bench-hf-peft.log" >> "$OUT/benchmarks.txt" 2>/dev/null
fi
note "total $(( $(date +%s) - START ))s"
grep -q '^FAIL' "$SUMMARY" && exit 1
exit 0
