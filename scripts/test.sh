#!/usr/bin/env bash
# Builds longtune, runs the Python-ecosystem interop checks (scripts/interop.sh: installs its
# packages into a venv outside the repository once, or says why it cannot run; LONGTUNE_INTEROP=0
# skips it), then the whole test suite (ctest). Fails if either fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
interop=0
bash scripts/interop.sh || interop=$?
cd build
ctest --output-on-failure -j"$(nproc)" --timeout 900
if [ "$interop" != 0 ]; then
  echo "interop checks FAILED (see above)"
  exit 1
fi
