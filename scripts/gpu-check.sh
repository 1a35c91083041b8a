#!/usr/bin/env bash
# One-call check of the CUDA backend on a bare GPU machine (CUDA toolkit, PyTorch, transformers,
# PEFT; no network, none of longtune's other libraries). Usage:
#   scripts/gpu-check.sh OUT_DIR [STEP...]
# STEPs, in the order they run (default: all but longest):
#   conformance  the op-conformance suite on the GPU (ctest -L gpu)
#   train        the same tiny training runs on GPU and CPU, losses compared line by line
#                (full fine-tune, LoRA on a bf16 base, + checkpointing, + checkpoint offload);
#                with --full_determinism offload's GPU losses equal checkpointing's bit for bit
#                and two full fine-tunes write the same model bytes; every GPU allocation planned
#   bench        the Llama-3-8B-shaped benchmarks: longtune LoRA r16 bf16 at 4K/16K/32K with
#                checkpointing, an op profile per length (and 32K with held GEMM inputs off);
#                one layer's ops (attention and GEMM TFLOP/s; the attention backward's
#                transposed-tile and deterministic variants too); transformers + PEFT side by
#                side (tokens/s, peak memory, MFU, its longest sequence); longtune at 32K with
#                offload, and with selective recomputation
#   longest      (only when named) longtune's longest planned sequences in 95% of the GPU's
#                memory, one step each, with checkpointing and with offload (several minutes)
#   sanitizer    compute-sanitizer memcheck and racecheck on small op cases
# Binaries: from .gpu-bundle/ when it is there (scripts/gpu-bundle.sh builds them on a machine
# with longtune's libraries and packs them; LONGTUNE_GPU_BUNDLE names another folder), else
# built here into build-gpu/ (needs longtune's build dependencies installed).
# GPU_CHECK_BUILD_DIR names a build folder to use as it is instead (the CI check of this script
# on the CPU emulator, tests/cuda_emu/gpu_check_emu.sh).
# Time: GPU_CHECK_BUDGET seconds in all (default 500): a step whose minimum does not fit in what
# is left is skipped and says so; each step's limit is cut to what is left. The train step's
# runs: GPU_CHECK_TRAIN_STEPS (default 8) steps of GPU_CHECK_TRAIN_BATCH (2) rows of up to
# GPU_CHECK_TRAIN_TOKENS (256) tokens. The bench step's model and lengths: GPU_CHECK_BENCH_MODEL
# (default preset:llama3-8b) and GPU_CHECK_BENCH_TOKENS (4096,16384,32768; offload at the last).
# GPU_CHECK_SKIP: step names not to run (each says SKIP).
# Output under OUT_DIR, at most a few files (the device tool returns 8): summary.txt (one line a
# step: PASS / FAIL / SKIP and why), benchmarks.txt, logs.tar.gz (every step's log, repacked
# after each step so a run cut short still returns what it did).
set -u
# The sources a bundle was built from, as a hash of the files themselves (a checkout copied to
# a GPU machine may have no .git): gpu-bundle.sh records it, the check compares.
if [ "${1:-}" = --sources-hash ]; then
  cd "$(dirname "$0")/.."
  find CMakeLists.txt src tests/*.cpp tests/*.h tests/cuda_emu bench tools/emulate_cuda_kernel.py \
    -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16
  exit 0
fi
OUT=${1:?usage: scripts/gpu-check.sh OUT_DIR [conformance] [train] [bench] [longest] [sanitizer]}
shift
STEPS=${*:-conformance train bench sanitizer}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BUILD=${GPU_CHECK_BUILD_DIR:-$ROOT/build-gpu}
LOGS=$(mktemp -d /tmp/gpu-check-logs.XXXXXX)
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-500}
DEADLINE=$((START + BUDGET))
JOBS=$(nproc)

note() { echo "$*" | tee -a "$SUMMARY"; }
pack() {
  tar -C "$LOGS" -czf "$OUT/.logs.tar.gz.tmp" . 2>/dev/null && mv "$OUT/.logs.tar.gz.tmp" "$OUT/logs.tar.gz"
}
finish() {
  note "total $(( $(date +%s) - START ))s of a ${BUDGET}s budget"
  pack
  rm -rf "$LOGS"
}
trap finish EXIT
wants() { [[ " $STEPS " == *" $1 "* ]]; }
# step NAME MIN_SECONDS LIMIT_SECONDS CMD...: runs CMD with a time limit cut to what is left of
# the budget (skipped when less than MIN is left), its output in NAME.log.
step() {
  local name=$1 min=$2 limit=$3
  shift 3
  if [[ " ${GPU_CHECK_SKIP:-} " == *" $name "* ]]; then
    note "SKIP  $name: named in GPU_CHECK_SKIP"
    return 75
  fi
  local left=$((DEADLINE - $(date +%s)))
  if [ "$left" -lt "$min" ]; then
    note "SKIP  $name: ${left}s left of the budget, it needs at least ${min}s"
    return 75
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  # A benchmark that skips itself (no device, a missing package) has not passed on a GPU machine.
  if [ $rc -eq 0 ] && grep -q ': skipped: ' "$LOGS/$name.log"; then
    rc=3
    note "FAIL  $name: $(grep -m1 ': skipped: ' "$LOGS/$name.log")"
  elif [ $rc -eq 0 ]; then note "PASS  $name (${dt}s)"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then note "FAIL  $name: timed out after ${limit}s"
  else note "FAIL  $name: exit $rc (${dt}s), see $name.log"; fi
  pack
  return $rc
}

note "gpu-check $(date -u +%FT%TZ) at $(git rev-parse --short HEAD 2>/dev/null || echo '?'), steps: $STEPS"
if ! nvidia-smi > "$LOGS/nvidia-smi.txt" 2>&1; then
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

# 1. The binaries: unpack a bundle, or build for this GPU only.
BUNDLE=${LONGTUNE_GPU_BUNDLE:-$ROOT/.gpu-bundle}
LIBPATH=""
if [ -n "${GPU_CHECK_BUILD_DIR:-}" ]; then
  if [ ! -x "$BUILD/longtune" ]; then note "FAIL  setup: no longtune in $BUILD"; exit 1; fi
  note "PASS  setup (the build in $BUILD as it is)"
elif [ -f "$BUNDLE/manifest" ]; then
  src_dir=$(sed -n 's/^source_dir=//p' "$BUNDLE/manifest")
  built_dir=$(sed -n 's/^build_dir=//p' "$BUNDLE/manifest")
  note "bundle: $(tr '\n' ' ' < "$BUNDLE/manifest")"
  if [ "$built_dir" != "$src_dir/build-gpu" ]; then
    note "FAIL  setup: the bundle's build folder $built_dir is not build-gpu/ of $src_dir"; exit 1
  fi
  built_from=$(sed -n 's/^sources=//p' "$BUNDLE/manifest")
  here=$(bash "$ROOT/scripts/gpu-check.sh" --sources-hash)
  if [ "$built_from" != "$here" ]; then
    note "FAIL  setup: the bundle was built from other sources (hash $built_from) than this" \
      "checkout's ($here): run scripts/gpu-bundle.sh again"
    exit 1
  fi
  need=$(sed -n 's/^glibc=//p' "$BUNDLE/manifest")
  have=$(getconf GNU_LIBC_VERSION | awk '{print $2}')
  if [ -n "$need" ] && [ "$(printf '%s\n%s\n' "$need" "$have" | sort -V | head -1)" != "$need" ]; then
    note "FAIL  setup: the bundle needs glibc $need, this machine has $have"; exit 1
  fi
  rm -rf "$BUILD" && mkdir -p "$BUILD/deps"
  tar -C "$BUILD" -xJf "$BUNDLE/build.tar.xz"
  tar -C "$BUILD/deps" -xJf "$BUNDLE/deps.tar.xz"
  # A library this machine has under the same name (soname) is a compatible version, most
  # likely newer than the bundle's (Debian 12): use it, so that the bundle adds only what is
  # missing and this machine's own programs (ctest, grep, python) never load the bundle's.
  # The GCC runtime must have what the bundle's gives (GLIBCXX_3.4.30, GCC 12).
  for path in "$BUILD"/deps/*; do
    lib=$(basename "$path")
    sys=$(ldconfig -p | awk -v n="$lib" '$1 == n && /x86-64/ {print $NF; exit}')
    [ -n "$sys" ] || continue
    if [ "$lib" = libstdc++.so.6 ] && ! grep -qa GLIBCXX_3.4.30 "$sys"; then continue; fi
    rm -f "$path"
  done
  note "bundle: libraries this machine lacks, taken from the bundle: $(cd "$BUILD/deps" && ls | tr '\n' ' ')"
  # ctest's files and the tests name the folders the bundle was built in; the tests read
  # ../shared/data beside the source folder.
  if [ "$src_dir" != "$ROOT" ]; then
    if [ -e "$src_dir" ] && [ ! -L "$src_dir" ]; then
      note "FAIL  setup: $src_dir exists here and is not this checkout"; exit 1
    fi
    mkdir -p "$(dirname "$src_dir")" && ln -sfn "$ROOT" "$src_dir"
  fi
  if [ ! -d "$ROOT/../shared/data" ] && [ -f "$BUNDLE/data.tar.xz" ]; then
    tar -C "$ROOT/.." -xJf "$BUNDLE/data.tar.xz"
  fi
  LIBPATH=$BUILD/deps
  note "PASS  setup (bundle unpacked into build-gpu/)"
else
  NVCC=${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
  if ! step build-configure 20 120 cmake -S . -B "$BUILD" -G Ninja -DLONGTUNE_CUDA=ON \
      -DCMAKE_CUDA_COMPILER="$NVCC" -DCMAKE_CUDA_ARCHITECTURES="${CAP:-90}" \
      -DLONGTUNE_MARCH=native; then
    note "SKIP  all later steps: configure failed (on a machine without longtune's libraries," \
      "run scripts/gpu-bundle.sh where they are and carry .gpu-bundle)"
    exit 1
  fi
  if ! step build 60 300 ninja -C "$BUILD" -j"$JOBS"; then
    note "SKIP  all later steps: build failed"; exit 1
  fi
fi
# The driver, cuBLAS, cuBLASLt, NCCL and the CUDA runtime come from this machine: its folders or
# the NVIDIA wheels beside PyTorch, wherever the loader does not already find them.
for lib in libcuda.so.1 libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libnccl.so.2; do
  [ -f "$BUILD/deps/$lib" ] && continue
  ldconfig -p | grep -q "^[[:space:]]*$lib " && continue
  found=$(find /usr/local/nvidia/ /usr/local/cuda*/ /usr/local/lib /usr/lib/python3*/ /opt \
    -maxdepth 10 -name "$lib" -print -quit 2>/dev/null)
  if [ -n "$found" ]; then LIBPATH=$LIBPATH:$(dirname "$found")
  else note "warning: $lib not found on this machine"; fi
done
LIBPATH=${LIBPATH#:}
export LD_LIBRARY_PATH=$LIBPATH${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
# Python steps use this machine's own libraries.
py() { env LD_LIBRARY_PATH= python3 "$@"; }
"$BUILD/longtune" --version > "$LOGS/version.txt" 2>&1
note "longtune: $(tr '\n' ' ' < "$LOGS/version.txt")"

# 2. Conformance suite on the GPU.
if wants conformance; then
  step conformance 30 150 ctest --test-dir "$BUILD" -L gpu --output-on-failure -j4
  # On a GPU machine a skipped CUDA case means the backend did not start: that is a failure.
  if grep -q "(Skipped)" "$LOGS/conformance.log"; then
    note "FAIL  conformance-cuda: CUDA cases were skipped (the backend did not start):"
    "$BUILD/test_backend_ops" --gtest_filter='Backends/BackendOps.Embedding/cuda' 2>&1 |
      grep -m1 "no CUDA device" | tee -a "$SUMMARY"
  fi
fi

# 3. The same tiny training run on GPU and on CPU: losses line by line.
DATA=""
for d in "$ROOT/../shared/data" "$ROOT/shared/data"; do [ -d "$d" ] && DATA=$d && break; done
if wants train && [ -z "$DATA" ]; then
  note "SKIP  train: no shared/data folder beside or inside the checkout"
elif wants train; then
  TMP=$LOGS/train
  rm -rf "$TMP" && mkdir -p "$TMP"
  TOK=$DATA/tokenizers/llama2
  step train-init 10 60 "$BUILD/longtune" init --preset tiny --vocab_size 32000 --seed 1 \
    --output_dir "$TMP/model"
  # compare NAME: the losses of train-NAME-cpu.log and train-NAME-cuda.log, line by line.
  compare() {
    local name=$1
    if ! [ -s "$LOGS/train-$name-cpu.log" ] || ! [ -s "$LOGS/train-$name-cuda.log" ]; then
      note "SKIP  compare-$name: a training log is empty"
      return
    fi
    py - "$LOGS/train-$name-cpu.log" "$LOGS/train-$name-cuda.log" > "$LOGS/compare-$name.log" 2>&1 <<'PY'
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
  # copy stream, ordered by events), these two with --full_determinism; last the full fine-tune
  # with --full_determinism twice on the GPU (full-det-a, full-det-b: the same model bytes).
  for cfg in full lora-bf16 lora-bf16-ckpt lora-bf16-offload full-det-a full-det-b; do
    extra=()
    case $cfg in lora-bf16*) extra=(--use_peft_lora True --lora_target_modules all-linear \
      --lora_dropout 0 --bf16 True) ;; esac
    case $cfg in
      *-ckpt) extra+=(--gradient_checkpointing True --full_determinism True) ;;
      *-offload) extra+=(--gradient_checkpointing True --offload_activations True \
        --full_determinism True) ;;
      full-det-*) extra+=(--full_determinism True) ;;
    esac
    devs="cpu cuda"
    case $cfg in lora-bf16-ckpt | full-det-*) devs=cuda ;; esac
    for dev in $devs; do
      step "train-$cfg-$dev" 15 90 "$BUILD/longtune" train --model_name_or_path "$TMP/model" \
        --tokenizer "$TOK" --data_path "$DATA/instructions/llamafactory_alpaca_en_demo.json" \
        --output_dir "$TMP/out-$cfg-$dev" --max_steps "${GPU_CHECK_TRAIN_STEPS:-8}" \
        --logging_steps 1 --learning_rate 1e-3 \
        --per_device_train_batch_size "${GPU_CHECK_TRAIN_BATCH:-2}" \
        --model_max_length "${GPU_CHECK_TRAIN_TOKENS:-256}" --seed 1 --device "$dev" \
        --report_to none "${extra[@]}"
    done
    case $cfg in lora-bf16-ckpt | full-det-*) ;; *) compare "$cfg" ;; esac
  done
  # The deterministic kernels (no atomics): two runs, the same bits, although the GPU's blocks
  # finish in another order every run.
  if [ -s "$TMP/out-full-det-a-cuda/model.safetensors" ] &&
      cmp "$TMP/out-full-det-a-cuda/model.safetensors" \
        "$TMP/out-full-det-b-cuda/model.safetensors" > "$LOGS/compare-determinism.log" 2>&1; then
    note "PASS  determinism (--full_determinism: two GPU runs wrote the same model.safetensors)"
  else
    note "FAIL  determinism: the two --full_determinism runs differ or are missing (compare-determinism.log)"
  fi
  rm -rf "$TMP"/out-* "$TMP/model"
  # Offload only moves the checkpoints: on the GPU, with --full_determinism, its losses equal
  # checkpointing's bit for bit (a copy read or overwritten out of order would change them).
  if py - "$LOGS/train-lora-bf16-ckpt-cuda.log" "$LOGS/train-lora-bf16-offload-cuda.log" \
      > "$LOGS/compare-offload.log" 2>&1 <<'PY'
import re, sys
def losses(path):
    return [float(x) for x in re.findall(r"loss ([0-9.eE+-]+|nan|inf)", open(path).read())]
a, b = losses(sys.argv[1]), losses(sys.argv[2])
print("checkpointing:", a)
print("offload:      ", b)
ok = bool(a) and a == b
print("identical" if ok else "not bit-identical")
sys.exit(0 if ok else 1)
PY
  then note "PASS  offload-vs-ckpt (GPU losses with offload equal checkpointing's bit for bit)"
  else note "FAIL  offload-vs-ckpt: see compare-offload.log"; fi
  # The plan covers every GPU allocation: no scratch outside the planned workspace, and the
  # measured device peak within the plan plus the CUDA runtime it allows (1 GiB).
  if py - "$LOGS"/train-*-cuda.log > "$LOGS/plan-vs-device.log" 2>&1 <<'PY'
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
  pack
fi

# 4. Benchmarks (each validates its result before timing): the whole model first, then the
# transformers + PEFT baseline on the same GPU, then one layer's ops.
if [ "$PEAK" = 0 ]; then note "note: unknown GPU peak; MFU printed against 989 TFLOP/s"; PEAK=989; fi
MEM=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
FIT="$(( ${MEM:-81559} * 95 / 100 ))MiB"
# Offloaded checkpoints are pinned host memory: at most 90% of this machine's RAM.
HOST="$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) * 9 / 10 ))KiB"
# Llama-3-8B shape, random weights, LoRA r=16 on every linear layer over a bf16 base, bf16
# GEMMs, batch 1, mini-sequence chosen by the planner; checkpointing, or checkpoint offload.
M8B=${GPU_CHECK_BENCH_MODEL:-preset:llama3-8b}
TOKENS=${GPU_CHECK_BENCH_TOKENS:-4096,16384,32768}
LORA8B=(device=cuda lora=16 bf16 mini=auto peak_tflops="$PEAK")
if wants bench; then
  # The figures the targets need first (longtune and transformers + PEFT side by side, one
  # layer's kernels), then the A/B variants, each skipped when the budget runs out.
  # `profile`: one more step per length with every op timed on the GPU (CUDA events), a table
  # of where the step's time goes: kernels, cuBLAS products, bf16 staging, time outside the ops.
  step bench-longtune-lora 90 240 "$BUILD/bench_train" "$M8B" "$TOKENS" 1 "${LORA8B[@]}" ckpt \
    profile
  # One layer op by op: which kernel reaches what fraction of the peak.
  step bench-gpu-ops 30 120 "$BUILD/bench_gpu" --preset "${M8B#preset:}" --precision bf16 \
    --peak_tflops "$PEAK" --tokens "$TOKENS"
  step bench-hf-peft 90 300 env LD_LIBRARY_PATH= python3 bench/hf_peft_bench.py \
    --peak_tflops "$PEAK" --tokens "$TOKENS" --iters 2 --longest --granularity 8192
  step bench-longtune-lora-offload 45 120 "$BUILD/bench_train" "$M8B" "${TOKENS##*,}" 1 \
    "${LORA8B[@]}" offload
  # Selective recomputation (attention outputs kept, no attention forward in the recompute) at
  # the longest length: its tokens/s against bench-longtune-lora's.
  step bench-longtune-lora-selective 30 90 "$BUILD/bench_train" "$M8B" "${TOKENS##*,}" 1 \
    "${LORA8B[@]}" ckpt selective
  # The longest length with held GEMM inputs off (every bf16 GEMM rounds its f32 inputs
  # itself): what holding them saves, in tokens/s and in the profile's staging row.
  step bench-longtune-lora-unheld 30 90 env LONGTUNE_CUDA_HOLD_GEMM_INPUTS=0 \
    "$BUILD/bench_train" "$M8B" "${TOKENS##*,}" 1 "${LORA8B[@]}" ckpt profile
  # The attention backward's former kernel (transposed tile copies, one block per SM) at one
  # length, to compare its attn_bwd_TF with the default's above.
  step bench-gpu-ops-transposed 15 60 env LONGTUNE_ATTENTION_TRANSPOSED_TILES=1 \
    "$BUILD/bench_gpu" --preset "${M8B#preset:}" --precision bf16 --peak_tflops "$PEAK" \
    --tokens "${TOKENS##*,}" --iters 2
  # The deterministic backward (--full_determinism: dQ by a query-tile kernel, no atomics) at
  # the same length: its cost against the default's attn_bwd_TF and tokens/s.
  step bench-gpu-ops-deterministic 15 60 "$BUILD/bench_gpu" --preset "${M8B#preset:}" \
    --precision bf16 --peak_tflops "$PEAK" --tokens "${TOKENS##*,}" --iters 2 --deterministic
fi
# 5. The longest sequences the planner says fit in 95% of the GPU's memory, one timed step each
# (minutes: several hundred thousand tokens), with checkpointing and with offload.
if wants longest; then
  step longest-longtune-lora 120 420 "$BUILD/bench_train" "$M8B" fit 0 \
    "${LORA8B[@]}" ckpt fit="$FIT"
  step longest-longtune-lora-offload 180 540 "$BUILD/bench_train" "$M8B" fit 0 \
    "${LORA8B[@]}" offload fit="$FIT" host="$HOST"
fi
for b in bench-longtune-lora bench-longtune-lora-unheld bench-gpu-ops bench-gpu-ops-transposed \
    bench-gpu-ops-deterministic bench-hf-peft \
    bench-longtune-lora-offload bench-longtune-lora-selective \
    longest-longtune-lora longest-longtune-lora-offload; do
  [ -f "$LOGS/$b.log" ] && { echo "== $b"; cat "$LOGS/$b.log"; }
done > "$OUT/benchmarks.txt"
[ -s "$OUT/benchmarks.txt" ] || rm -f "$OUT/benchmarks.txt"

# 6. compute-sanitizer (memcheck, racecheck on the attention kernels) on small cases.
if wants sanitizer; then
  SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  if [ -x "$SAN" ]; then
    step sanitizer-memcheck 60 150 "$SAN" --tool memcheck --error-exitcode 9 \
      "$BUILD/test_backend_ops" --gtest_filter='*SwiGlu/cuda:*Linear/cuda:*LmHeadCrossEntropy/cuda:*Attention/cuda:*RmsNorm/cuda:*Nf4*/cuda:*Lora/cuda:*Bf16ToF32/cuda:*LinearBf16Weight/cuda:CudaBackend.Bf16GemmMode'
    step sanitizer-racecheck 60 120 "$SAN" --tool racecheck --error-exitcode 9 \
      "$BUILD/test_backend_ops" --gtest_filter='*Attention/cuda'
  else
    note "SKIP  sanitizer: compute-sanitizer not found"
  fi
fi
grep -q '^FAIL' "$SUMMARY" && exit 1
exit 0
