#!/usr/bin/env bash
# The MLflow UI as a user sees it, in headless Chromium: the runs table of an experiment and the
# compare view of its runs, from a store (default: this project's mlflow.db).
#   benchmarks/mlflow_screenshots.sh [store-uri] [experiment-name] [out-dir]
#   benchmarks/mlflow_screenshots.sh sqlite:////tmp/qbench/mlflow.db uad-synthetic docs/figures
set -euo pipefail
store="${1:-sqlite:///mlflow.db}"; experiment="${2:-uad-synthetic}"; out="${3:-docs/figures}"
here="$(cd "$(dirname "$0")/.." && pwd)"; py="${PYTHON:-$here/.venv/bin/python}"
browser="$(command -v chromium || command -v chromium-browser || command -v google-chrome)" || {
  echo "Error: no Chromium found: install Debian's chromium package (apt-get install chromium)" >&2; exit 1; }
port="$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
mkdir -p "$out"; profile="$(mktemp -d)"; art="$(mktemp -d)"
"$py" -m mlflow ui --backend-store-uri "$store" --default-artifact-root "$art" --host 127.0.0.1 --port "$port" \
  >"$profile/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; rm -rf "$profile" "$art"' EXIT
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 1; done
read -r exp_id runs <<<"$(MLFLOW_TRACKING_URI="$store" "$py" - "$experiment" <<'PY'
import json, sys
from mlflow.tracking import MlflowClient
c = MlflowClient()
e = c.get_experiment_by_name(sys.argv[1])
runs = [r.info.run_id for r in c.search_runs([e.experiment_id], filter_string="attributes.status = 'FINISHED'",
        max_results=50) if r.data.tags.get("uad.action", "") == "" and r.data.tags.get("uad.method") != "benchmark"][:6]
print(e.experiment_id, json.dumps(runs).replace(" ", ""))
PY
)"
shot() {  # url png width height
  "$browser" --headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --user-data-dir="$profile/chrome" --hide-scrollbars \
    --window-size="$3,$4" --virtual-time-budget=25000 --screenshot="$(realpath -m "$2")" "$1" 2>/dev/null
  echo "screenshot: $2"
}
shot "http://127.0.0.1:$port/#/experiments/$exp_id/runs" "$out/mlflow_runs_table.png" 1600 900
shot "http://127.0.0.1:$port/#/compare-runs?runs=$runs&experiments=[\"$exp_id\"]" "$out/mlflow_compare.png" 1600 1400
