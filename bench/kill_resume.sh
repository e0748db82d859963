#!/usr/bin/env bash
# Kill-and-resume check of `dvc repro` on the embedded default, in a temporary copy of the project:
# run A uninterrupted; run B killed with SIGKILL during training, then `dvc repro` again.
# Prints both metrics tables and whether they are identical.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="$ROOT/.venv/bin"
export PATH="$BIN:$PATH" DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true HF_HUB_OFFLINE=1
KILL_AFTER="${KILL_AFTER:-60}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for run in A B; do
  mkdir -p "$work/$run"
  cp -r "$ROOT/components" "$ROOT/pipelines" "$ROOT/dvc.yaml" "$ROOT/params.yaml" "$work/$run/"
  (cd "$work/$run" && git init -q && dvc init -q && git add -A && git -c user.name=k -c user.email=k@k commit -qm init)
done
(cd "$work/A" && dvc repro -q >/dev/null 2>&1)
cd "$work/B"
dvc repro -q >/dev/null 2>&1 &
pid=$!
# wait until training has written its first checkpoint, then kill -9 the whole process group
for _ in $(seq 1 600); do
  if ls artifacts/checkpoints/*/all/LATEST >/dev/null 2>&1; then break; fi
  sleep 1
done
sleep "$KILL_AFTER"
echo "checkpoint before kill: $(cat artifacts/checkpoints/*/all/LATEST)"
pkill -9 -f "inpformer train" || true
kill -9 "$pid" 2>/dev/null || true
wait "$pid" 2>/dev/null || true
rm -f .dvc/tmp/rwlock .dvc/tmp/lock  # a SIGKILLed dvc leaves its lock behind
dvc repro 2>&1 | grep -E "Resumed|Running stage|resumed" || true
echo "--- uninterrupted (A) ---"; cat "$work/A/artifacts/eval/metrics.md"
echo "--- killed + resumed (B) ---"; cat "$work/B/artifacts/eval/metrics.md"
if cmp -s <(python3 -c "import json;print(json.load(open('$work/A/metrics/metrics.json')))") \
          <(python3 -c "import json;print(json.load(open('$work/B/metrics/metrics.json')))"); then
  echo "IDENTICAL metrics.json"
else
  echo "metrics differ"; exit 1
fi
