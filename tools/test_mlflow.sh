#!/usr/bin/env bash
# End-to-end check of `longtune train --report_to mlflow` against a real MLflow tracking server
# started here on 127.0.0.1 (sqlite store in a temporary folder), read back with MLflow's own
# Python client. Skipped, with a message, when the `mlflow` package is not installed.
#
# usage: tools/test_mlflow.sh [path/to/longtune]
#   MLFLOW_PYTHON: a python that has mlflow (default: python3 if
#   it can import mlflow)
set -euo pipefail
LONGTUNE=${1:-build/longtune}
PY=${MLFLOW_PYTHON:-}
if [ -z "$PY" ]; then
  for c in python3; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c "import mlflow" >/dev/null 2>&1; then PY=$c; break; fi
  done
fi
if [ -z "$PY" ]; then
  echo "SKIP: tools/test_mlflow.sh needs the mlflow Python package (pip install mlflow); not run"
  exit 0
fi
[ -x "$LONGTUNE" ] || { echo "FAIL: $LONGTUNE is not built"; exit 1; }

WORK=$(mktemp -d)
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT
PORT=$("$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])")
URI="http://127.0.0.1:$PORT"
"$PY" -m mlflow server --host 127.0.0.1 --port "$PORT" --workers 1 \
  --backend-store-uri "sqlite:///$WORK/mlflow.db" --default-artifact-root "$WORK/artifacts" \
  >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 120); do
  curl -sf "$URI/health" >/dev/null 2>&1 && break
  kill -0 "$SERVER_PID" 2>/dev/null || { echo "FAIL: mlflow server exited"; cat "$WORK/server.log"; exit 1; }
  sleep 0.5
done
curl -sf "$URI/health" >/dev/null || { echo "FAIL: mlflow server did not start"; tail "$WORK/server.log"; exit 1; }

"$LONGTUNE" init --preset tiny --output_dir "$WORK/model" >/dev/null
"$PY" - "$WORK/train.jsonl" <<'PYEOF'
import json, random, sys
r = random.Random(0)
with open(sys.argv[1], "w") as f:
    for _ in range(8):
        ids = [r.randrange(512) for _ in range(12)]
        f.write(json.dumps({"input_ids": ids, "labels": ids}) + "\n")
PYEOF
MLFLOW_TRACKING_URI=$URI MLFLOW_EXPERIMENT_NAME=longtune-test "$LONGTUNE" train \
  --model_name_or_path "$WORK/model" --data_path "$WORK/train.jsonl" --output_dir "$WORK/out" \
  --per_device_train_batch_size 2 --max_steps 4 --logging_steps 1 --learning_rate 1e-3 \
  --save_strategy no --report_to mlflow --run_name mlflow-check >"$WORK/train.log" 2>&1 \
  || { echo "FAIL: longtune train"; cat "$WORK/train.log"; exit 1; }

MLFLOW_TRACKING_URI=$URI "$PY" - "$WORK/out/metrics.jsonl" <<'PYEOF'
import json, sys
from mlflow.tracking import MlflowClient
c = MlflowClient()
exp = c.get_experiment_by_name("longtune-test")
assert exp is not None, "experiment longtune-test was not created"
runs = c.search_runs([exp.experiment_id])
assert len(runs) == 1, f"expected 1 run, got {len(runs)}"
run = runs[0]
assert run.info.status == "FINISHED", f"run status {run.info.status}"
assert run.info.run_name == "mlflow-check", run.info.run_name
assert run.data.params.get("learning_rate") == "1e-3", run.data.params.get("learning_rate")
want = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l]
hist = {m.step: m.value for m in c.get_metric_history(run.info.run_id, "loss")}
assert len(want) == 4 and set(hist) == {r["step"] for r in want}, (hist, want)
for r in want:
    assert abs(hist[r["step"]] - r["loss"]) <= 1e-12 * abs(r["loss"]), (r, hist[r["step"]])
assert "train_runtime" in run.data.metrics
print(f"ok: MLflow run {run.info.run_id} FINISHED with {len(run.data.params)} params and "
      f"{len(hist)} loss points equal to metrics.jsonl")
PYEOF
