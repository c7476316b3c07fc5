#!/usr/bin/env bash
# Local Prefect stack for dpo-suite: a Prefect server, the `dpo-local` process work pool, concurrency limits,
# the deployments of prefect.yaml, and a worker.
#
#   deployments/dpo.sh up        # start everything (idempotent), print the UI address
#   deployments/dpo.sh status    # what is running
#   deployments/dpo.sh down      # stop the worker, then the server
#
# Then: prefect deployment run dpo-suite/default --watch   (with PREFECT_API_URL printed by `up`)
# Settings: DPO_PREFECT_PORT (default 4200), PREFECT_HOME (default <repo>/.prefect: its own database),
# DPO_WORKERS (process workers to start, default 1), DPO_WORKER_LIMIT (flow runs each worker runs at once;
# default: no limit). With several workers of limit 1, a suite's `dispatch=pool` experiments spread over them.
# The workers (and every flow run they start) see only the environment of the shell that ran `up`: export
# TINKER_API_KEY, DPO_* settings and HF_HOME / HF_HUB_OFFLINE before `up`, or `down` and `up` again.
set -euo pipefail
set -m  # background jobs get their own process group, so `down` stops them and their children

# The header comment above is the help: one text for readers of this file and for `dpo.sh help`.
usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; }
case "${1:-}" in help|-h|--help) usage; exit 0 ;; esac

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PORT="${DPO_PREFECT_PORT:-4200}"
export PREFECT_HOME="${PREFECT_HOME:-$ROOT/.prefect}"
export PREFECT_API_URL="http://127.0.0.1:${PORT}/api"
# No HF_HUB_OFFLINE: each flow run sets it itself on the local backend only (flows/bootstrap.py); forcing it here
# would break a worker on the tinker path, whose client loads tokenizers by HF repo id.
export PREFECT_SERVER_ANALYTICS_ENABLED=false HF_HUB_DISABLE_TELEMETRY=1 TINKER_TELEMETRY=0
PY="${DPO_PYTHON:-$ROOT/.venv/bin/python}"
PREFECT=("$PY" -m prefect)
RUN_DIR="$PREFECT_HOME/run"
mkdir -p "$RUN_DIR"

# Worker names: "worker" for the first (as before), then worker-2, worker-3, ...
workers() {
  local count="${DPO_WORKERS:-1}"
  echo worker
  for i in $(seq 2 "$count"); do echo "worker-$i"; done
}

alive() { [ -f "$RUN_DIR/$1.pid" ] && kill -0 "$(cat "$RUN_DIR/$1.pid")" 2>/dev/null; }

stop() {
  if alive "$1"; then
    local pid; pid="$(cat "$RUN_DIR/$1.pid")"
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$RUN_DIR/$1.pid"
}

wait_healthy() {
  for _ in $(seq 1 240); do
    if "$PY" - "$PREFECT_API_URL" <<'PYEOF' 2>/dev/null; then return 0; fi
import sys, httpx
sys.exit(0 if httpx.get(sys.argv[1] + "/health", timeout=2).status_code == 200 else 1)
PYEOF
    sleep 0.5
  done
  echo "Prefect server did not become healthy; see $RUN_DIR/server.log" >&2
  return 1
}

up() {
  if ! alive server; then
    "${PREFECT[@]}" server start --host 127.0.0.1 --port "$PORT" >"$RUN_DIR/server.log" 2>&1 &
    echo $! >"$RUN_DIR/server.pid"
  fi
  wait_healthy
  "${PREFECT[@]}" work-pool inspect dpo-local >/dev/null 2>&1 \
    || "${PREFECT[@]}" work-pool create dpo-local --type process >/dev/null
  "$PY" -c "from tasks.setup import ensure_concurrency_limits; ensure_concurrency_limits()"
  "${PREFECT[@]}" --no-prompt deploy --all >"$RUN_DIR/deploy.log" 2>&1 \
    || { cat "$RUN_DIR/deploy.log" >&2; return 1; }
  local limit=()
  if [ -n "${DPO_WORKER_LIMIT:-}" ]; then limit=(--limit "$DPO_WORKER_LIMIT"); fi
  for name in $(workers); do
    if ! alive "$name"; then
      "${PREFECT[@]}" worker start --pool dpo-local --type process --name "$name-$(hostname)" "${limit[@]}" \
        >"$RUN_DIR/$name.log" 2>&1 &
      echo $! >"$RUN_DIR/$name.pid"
    fi
  done
  echo "Prefect UI: http://127.0.0.1:${PORT}"
  echo "export PREFECT_API_URL=$PREFECT_API_URL"
  echo "then: prefect deployment run dpo-suite/default --watch"
}

status() {
  for name in server $(workers); do
    if alive "$name"; then echo "$name: running (pid $(cat "$RUN_DIR/$name.pid"))"; else echo "$name: stopped"; fi
  done
  if alive server; then "${PREFECT[@]}" deployment ls 2>/dev/null || true; fi
}

down() {
  # The workers first: they must not pick up runs from a dying server. Every worker this folder started,
  # whatever DPO_WORKERS says now.
  for pidfile in "$RUN_DIR"/worker*.pid; do [ -e "$pidfile" ] && stop "$(basename "$pidfile" .pid)"; done
  stop server
  echo "stopped"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) usage >&2; exit 2 ;;
esac
