#!/usr/bin/env bash
# scripts/gpu-check.sh's conformance, train and bench steps, run here on the CUDA emulator (label
# emu), so that the script a GPU session runs once, in minutes it cannot spare, has run before:
# setup, budgeting, the conformance step and its skipped-case check, the CPU-vs-GPU loss
# comparisons, offload against checkpointing, the plan against the device's peak, longtune's
# benchmarks (on the tiny preset) and the output files. Not here: transformers + PEFT on a GPU
# (bench-hf-peft), the longest sequences, compute-sanitizer.
# Usage: gpu_check_emu.sh BUILD_DIR (with liblongtune_cuda_emu.so in it).
set -euo pipefail
BUILD=$(cd "${1:?usage: gpu_check_emu.sh BUILD_DIR}" && pwd)
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=$(mktemp -d /tmp/lt_gpu_check_emu.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
# nvidia-smi as the script asks it: the emulated device (emu_runtime.h).
mkdir -p "$WORK/bin"
cat > "$WORK/bin/nvidia-smi" <<'EOF'
#!/bin/sh
case "$*" in
  *name,compute_cap*) echo "cuda_emu, 8.0" ;;
  *memory.total*) echo 4096 ;;
  *) echo "cuda_emu: the CPU emulator of tests/cuda_emu" ;;
esac
EOF
chmod +x "$WORK/bin/nvidia-smi"
export PATH=$WORK/bin:$PATH
export LONGTUNE_CUDA_MODULE=$BUILD/liblongtune_cuda_emu.so
export GPU_CHECK_BUILD_DIR=$BUILD GPU_CHECK_BUDGET=600
# The script's model (the tiny preset with the Llama-2 vocabulary), fewer and shorter steps.
export GPU_CHECK_TRAIN_STEPS=2 GPU_CHECK_TRAIN_BATCH=1 GPU_CHECK_TRAIN_TOKENS=96
export GPU_CHECK_BENCH_MODEL=preset:tiny GPU_CHECK_BENCH_TOKENS=128,256
export GPU_CHECK_SKIP=bench-hf-peft
status=0
bash "$ROOT/scripts/gpu-check.sh" "$WORK/out" conformance train bench || status=$?
cat "$WORK/out/summary.txt"
fail() {
  echo "gpu_check_emu: $*" >&2
  exit 1
}
[ "$status" -eq 0 ] || fail "gpu-check.sh exited $status"
[ -s "$WORK/out/logs.tar.gz" ] || fail "no logs.tar.gz"
if grep -E "^FAIL|^SKIP" "$WORK/out/summary.txt" | grep -v "^SKIP  bench-hf-peft: named in"; then
  fail "a step failed or was skipped"
fi
for want in "PASS  setup" "PASS  conformance" "PASS  compare-full" "PASS  compare-lora-bf16 " \
    "PASS  compare-lora-bf16-offload" "PASS  offload-vs-ckpt" "PASS  determinism" \
    "PASS  plan-vs-device" "PASS  bench-longtune-lora " "PASS  bench-longtune-lora-unheld" \
    "PASS  bench-gpu-ops " \
    "PASS  bench-gpu-ops-transposed" "PASS  bench-gpu-ops-deterministic" \
    "PASS  bench-longtune-lora-offload" "PASS  bench-longtune-lora-selective"; do
  grep -qF "$want" "$WORK/out/summary.txt" || fail "no line \"$want\" in summary.txt"
done
# benchmarks.txt: longtune's JSON lines at both lengths with checkpointing (and at 256 with held
# GEMM inputs off), one with offload, and the op table.
B=$WORK/out/benchmarks.txt
[ "$(grep -c '"impl": "longtune", "device": "cuda", "settings": "[^"]*ckpt"' "$B")" -eq 3 ] ||
  fail "benchmarks.txt lacks the three checkpointing lines"
grep -q '"settings": "[^"]*ckpt+selective", "seq": 256' "$B" ||
  fail "benchmarks.txt lacks selective recomputation at 256"
grep -q '"settings": "[^"]*offload", "seq": 256' "$B" || fail "benchmarks.txt lacks offload at 256"
grep -qE '^ +256 .*%' "$B" || fail "benchmarks.txt lacks bench_gpu's row at 256 tokens"
# The op profile of a checkpointing step at each length: the attention kernels and the cuBLAS
# products inside the linear layers each take a share.
[ "$(grep -c '^op profile: cuda .*ckpt seq' "$B")" -eq 3 ] || fail "benchmarks.txt lacks the op profiles"
for op in attention_backward linear_forward_bf16w "cuBLAS GEMM (bf16 inputs)" \
    "bf16 staging of GEMM inputs" "(outside the ops)"; do
  grep -qF "  $op " "$B" || fail "the op profile lacks $op"
done
# Held GEMM inputs: fewer stagings at 256 tokens than the same step with holding off.
read -r -a staged <<< "$(awk '/bf16 staging of GEMM inputs/ {printf "%s ", $(NF-3)}' "$B")"
[ "${#staged[@]}" -eq 3 ] && [ "${staged[1]}" -lt "${staged[2]}" ] ||
  fail "stagings at 128, 256 and 256 unheld: ${staged[*]}"
echo "gpu_check_emu: every step passed"
