#!/usr/bin/env bash
# Configures and builds longtune into build/ (CUDA backend compiled when nvcc is found).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
if [ -z "${CUDACXX:-}" ] && ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDACXX=/usr/local/cuda/bin/nvcc
fi
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release ${LONGTUNE_CMAKE_ARGS:-} >/dev/null
ninja -C build -j"$(nproc)"
