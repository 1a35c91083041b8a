#!/usr/bin/env bash
# The checks against the Python ecosystem, run after the test suite when the packages can be
# installed: PEFT loads adapters trained by longtune with the same logits (tools/interop.sh) and
# transformers loads model folders longtune wrote (tools/interop_hf.sh when present).
# The packages go into a virtual environment outside the repository, made once per machine:
#   LONGTUNE_INTEROP_VENV (default ~/.cache/longtune/venv-interop); LONGTUNE_INTEROP=0 skips.
# Exit status: 0 when the checks pass or cannot run here (said on stdout), 1 when a check fails.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${LONGTUNE_INTEROP:-1}" = 0 ]; then echo "interop: skipped (LONGTUNE_INTEROP=0)"; exit 0; fi
VENV=${LONGTUNE_INTEROP_VENV:-$HOME/.cache/longtune/venv-interop}
PY=$VENV/bin/python
PKGS="torch transformers peft safetensors numpy"
if ! "$PY" -c "import torch, transformers, peft, safetensors, numpy" 2>/dev/null; then
  echo "interop: installing $PKGS into $VENV (once per machine; PyPI)"
  if ! { python3 -m venv "$VENV" && timeout 1800 "$PY" -m pip install -q $PKGS; }; then
    echo "interop: SKIPPED: the Python packages could not be installed here"
    exit 0
  fi
fi
status=0
echo "interop: PEFT <-> longtune adapters"
bash tools/interop.sh build "$PY" || status=1
if [ -f tools/interop_hf.sh ]; then
  echo "interop: transformers loads longtune's model folders"
  bash tools/interop_hf.sh build "$PY" || status=1
fi
[ $status = 0 ] && echo "interop: all checks passed" || echo "interop: FAILED"
exit $status
