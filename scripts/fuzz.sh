#!/usr/bin/env bash
# Builds the libFuzzer targets (tests/fuzz/fuzz_*.cpp) with clang + ASan/UBSan into build-fuzz/
# and runs each for SECONDS (default 60) on the seed corpus tests/fuzz_corpus/<target>/.
# New inputs found go to build-fuzz/corpus/<target>/; crashes to build-fuzz/crashes/<target>/.
# Needs clang and libclang-rt-dev (scripts/install-deps.sh --fuzz installs them).
#   scripts/fuzz.sh [SECONDS] [TARGET...]      e.g. scripts/fuzz.sh 300 dataset
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(tokenizer dataset safetensors)
CXX=${CXX:-clang++}
command -v "$CXX" >/dev/null || { echo "fuzz.sh: $CXX not found (scripts/install-deps.sh --fuzz)"; exit 1; }
cmake -S . -B build-fuzz -G Ninja -DCMAKE_CXX_COMPILER="$CXX" -DCMAKE_C_COMPILER="${CC:-clang}" \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DLONGTUNE_FUZZ=ON -DLONGTUNE_TESTS=OFF -DLONGTUNE_BENCH=OFF \
  -DLONGTUNE_CUDA=OFF >/dev/null
ninja -C build-fuzz -j"${JOBS:-2}" $(printf 'fuzz_%s ' "${targets[@]}")
status=0
for t in "${targets[@]}"; do
  corpus=build-fuzz/corpus/$t crashes=build-fuzz/crashes/$t
  mkdir -p "$corpus" "$crashes"
  echo "== fuzz_$t for ${seconds}s"
  # -rss_limit_mb / -timeout: a hang or a memory blow-up counts as a finding, like a crash.
  ./build-fuzz/fuzz_$t -max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 \
      -max_len=65536 -artifact_prefix="$crashes/" -print_final_stats=1 \
      "$corpus" "tests/fuzz_corpus/$t" > "build-fuzz/fuzz_$t.log" 2>&1 || status=1
  tail -n 25 "build-fuzz/fuzz_$t.log"
done
exit $status
