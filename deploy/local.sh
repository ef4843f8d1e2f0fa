#!/usr/bin/env bash
# A local Prefect stack for AnyFlow in one command (`make prefect-up` runs `deploy/local.sh up`):
#   1. `prefect server start --host 127.0.0.1 --port $ANYFLOW_PREFECT_PORT` in the background, waits for /api/health
#   2. creates the work pools of deploy/prefect.yaml if missing (anyflow-local: process, anyflow-gpu: kubernetes)
#   3. `prefect --no-prompt deploy --prefect-file deploy/prefect.yaml --all`, then checks that EVERY deployment of
#      deploy/prefect.yaml is registered on its pool (exit 1 naming the missing ones otherwise)
#   4. `prefect worker start --pool anyflow-local` in the background, waits until the pool is READY
#   5. prints the commands to trigger runs and to stop everything.
# Re-running it is safe: a running server/worker is reused, existing pools are left as they are (an edited
# anyflow-gpu job template is kept), deployments are updated in place.
#
# Usage: deploy/local.sh [up|stop|status]
# Environment (all optional):
#   ANYFLOW_PREFECT_PORT   API/UI port on 127.0.0.1 (default 4200)
#   ANYFLOW_PREFECT_STATE  logs, pid files and the default PREFECT_HOME (default <repo>/.prefect-local)
#   PREFECT_HOME           the server's database and settings (default $ANYFLOW_PREFECT_STATE/home)
#   ANYFLOW_REPO           the directory flow runs work in (default: this repository)
#   ANYFLOW_VENV           the environment whose bin/prefect is used (default <repo>/.venv, else prefect on PATH)
#   ANYFLOW_PREFECT_TIMEOUT seconds to wait for the server and the worker (default 120)
#   ANYFLOW_PREFECT_YAML   the deployments file (default deploy/prefect.yaml; entrypoints relative to the repository)
# Any other PREFECT_* setting (e.g. PREFECT_SERVER_UI_ENABLED=false, PREFECT_WORKER_QUERY_SECONDS=2) is passed on.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
abspath() { case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac; }

PORT="${ANYFLOW_PREFECT_PORT:-4200}"
STATE="$(abspath "${ANYFLOW_PREFECT_STATE:-$ROOT/.prefect-local}")"
export PREFECT_HOME="$(abspath "${PREFECT_HOME:-$STATE/home}")"
export ANYFLOW_REPO="$(abspath "${ANYFLOW_REPO:-$ROOT}")"
VENV="$(abspath "${ANYFLOW_VENV:-$ROOT/.venv}")"
TIMEOUT="${ANYFLOW_PREFECT_TIMEOUT:-120}"
API="http://127.0.0.1:$PORT/api"
export PREFECT_API_URL="$API"
PREFECT_YAML="$(abspath "${ANYFLOW_PREFECT_YAML:-$ROOT/deploy/prefect.yaml}")"
# Pool types are not part of prefect.yaml (a deployment only names its pool): every pool it names must be here.
pool_type() { case "$1" in anyflow-local) echo process ;; anyflow-gpu) echo kubernetes ;; esac; }
WORKER_POOL=anyflow-local

if [ -x "$VENV/bin/prefect" ]; then
  PREFECT="$VENV/bin/prefect"; PY="$VENV/bin/python"
elif command -v prefect >/dev/null 2>&1; then
  PREFECT="$(command -v prefect)"; PY="$(dirname "$PREFECT")/python"
  [ -x "$PY" ] || PY="$(command -v python3)"
else
  echo "deploy/local.sh: no prefect in $VENV/bin or on PATH (run \`make install\` first)" >&2; exit 1
fi

log() { printf '[local.sh +%ss] %s\n' "$SECONDS" "$*"; }
die() { printf '[local.sh] ERROR: %s\n' "$*" >&2; exit 1; }

alive() {  # alive NAME: the process recorded in $STATE/NAME.pid is running
  local pid
  [ -f "$STATE/$1.pid" ] && pid="$(cat "$STATE/$1.pid")" && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

healthy() {  # the API answers /health (curl if there is one: polled every second, cheaper than a python)
  if command -v curl >/dev/null 2>&1; then curl -fsS -m 3 "$API/health" >/dev/null 2>&1; return; fi
  "$PY" - "$API/health" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=3) as r:
    sys.exit(0 if r.status == 200 else 1)
EOF
}

api() {  # api METHOD PATH [JSON]: print the response body; non-zero on an HTTP error
  "$PY" - "$1" "$API$2" "${3:-}" <<'EOF'
import sys, urllib.request
method, url, body = sys.argv[1:4]
req = urllib.request.Request(url, method=method, data=body.encode() if body else None,
                             headers={"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=10) as r:
    sys.stdout.write(r.read().decode())
EOF
}

start_bg() {  # start_bg NAME CMD...: run CMD in its own session (process group), output to $STATE/NAME.log
  local name="$1"; shift
  if command -v setsid >/dev/null 2>&1; then
    setsid "$@" </dev/null >>"$STATE/$name.log" 2>&1 &
  else
    set -m; nohup "$@" </dev/null >>"$STATE/$name.log" 2>&1 & set +m
  fi
  echo $! >"$STATE/$name.pid"
}

stop_one() {  # stop_one NAME [GRACE]: TERM the process group, KILL it after GRACE seconds (default 10)
  local pid i grace="${2:-10}"
  [ -f "$STATE/$1.pid" ] || return 0
  pid="$(cat "$STATE/$1.pid")"
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    log "stopping $1 (pid $pid and its process group)"
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 $((grace * 2))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$STATE/$1.pid"
}

tail_log() { [ -f "$STATE/$1.log" ] && tail -n "${2:-40}" "$STATE/$1.log" >&2 || true; }

expected() {  # the deployment and pool names of deploy/prefect.yaml, one "pool<TAB>deployment" per line
  "$PY" - "$PREFECT_YAML" <<'EOF'
import sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
for d in doc["deployments"]:
    print(f"{d['work_pool']['name']}\t{d['name']}")
EOF
}

up() {
  mkdir -p "$STATE" "$PREFECT_HOME"
  log "repository: $ROOT; flow runs work in ANYFLOW_REPO=$ANYFLOW_REPO"
  log "state: $STATE (logs, pids); PREFECT_HOME=$PREFECT_HOME; prefect: $PREFECT"

  # 1. server
  if alive server && healthy; then
    log "server already running on $API (pid $(cat "$STATE/server.pid"))"
  else
    alive server && stop_one server
    healthy && die "something already answers on $API but was not started by this script; stop it or set ANYFLOW_PREFECT_PORT"
    log "starting prefect server on 127.0.0.1:$PORT (log: $STATE/server.log)"
    start_bg server "$PREFECT" server start --host 127.0.0.1 --port "$PORT"
    local t0=$SECONDS
    until healthy; do
      alive server || { tail_log server; die "prefect server exited during start-up (log above: $STATE/server.log)"; }
      [ $((SECONDS - t0)) -ge "$TIMEOUT" ] && { tail_log server; stop_one server; die "server did not answer $API/health within ${TIMEOUT}s"; }
      sleep 1
    done
    log "server up on $API after $((SECONDS - t0))s"
  fi

  # 2. work pools: create only the missing ones (never overwrite an operator's edited job template), each with
  #    Prefect's default base job template for its type, as `prefect work-pool create NAME --type TYPE` does
  local pool type missing_pools=""
  for pool in $(expected | cut -f1 | sort -u); do
    type="$(pool_type "$pool")"
    [ -n "$type" ] || die "$PREFECT_YAML uses work pool '$pool', whose type deploy/local.sh does not know (add it to pool_type)"
    if api GET "/work_pools/$pool" >/dev/null 2>&1; then
      log "work pool $pool exists"
    else
      missing_pools="$missing_pools $pool=$type"
    fi
  done
  if [ -n "$missing_pools" ]; then
    log "creating work pools:$missing_pools"
    # shellcheck disable=SC2086
    "$PY" - $missing_pools <<'EOF' >>"$STATE/pools.log" 2>&1 || { tail_log pools; die "could not create the work pools:$missing_pools"; }
import asyncio, sys
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.workers.utilities import get_default_base_job_template_for_infrastructure_type

async def main():
    async with get_client() as client:
        for item in sys.argv[1:]:
            name, type_ = item.split("=")
            template = await get_default_base_job_template_for_infrastructure_type(type_)
            if template is None:
                sys.exit(f"no default base job template for work pool type {type_!r}")
            pool = await client.create_work_pool(WorkPoolCreate(name=name, type=type_, base_job_template=template))
            print(f"created work pool {pool.name!r} (type {pool.type})")

asyncio.run(main())
EOF
  fi

  # 3. every deployment, then check that every one of them is registered
  log "deploying every deployment of $PREFECT_YAML (log: $STATE/deploy.log)"
  local rc=0
  (cd "$ROOT" && "$PREFECT" --no-prompt deploy --prefect-file "$PREFECT_YAML" --all) >"$STATE/deploy.log" 2>&1 || rc=$?
  local registered missing="" line dpool dname
  registered="$(api POST /deployments/filter '{"limit": 200}' | "$PY" -c \
    'import json,sys; [print(d["work_pool_name"], d["name"], sep="\t") for d in json.load(sys.stdin)]')" \
    || die "could not list the deployments on $API"
  while IFS=$'\t' read -r dpool dname; do
    grep -qxF "$dpool"$'\t'"$dname" <<<"$registered" || missing="$missing $dname(pool $dpool)"
  done < <(expected)
  if [ "$rc" -ne 0 ] || [ -n "$missing" ]; then
    tail_log deploy 30
    [ -n "$missing" ] && die "deployments NOT registered:$missing (prefect deploy exit $rc; full log: $STATE/deploy.log)"
    die "prefect deploy exited $rc (full log: $STATE/deploy.log)"
  fi
  log "registered: $(expected | cut -f2 | tr '\n' ' ')"

  # 4. a worker on the local pool
  if alive worker; then
    log "worker already running (pid $(cat "$STATE/worker.pid"))"
  else
    log "starting a worker on $WORKER_POOL (log: $STATE/worker.log)"
    start_bg worker "$PREFECT" worker start --pool "$WORKER_POOL"
  fi
  local t0=$SECONDS status=""
  until [ "$status" = READY ]; do
    status="$(api GET "/work_pools/$WORKER_POOL" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["status"])' || true)"
    [ "$status" = READY ] && break
    alive worker || { tail_log worker; die "the worker exited (log above: $STATE/worker.log)"; }
    [ $((SECONDS - t0)) -ge "$TIMEOUT" ] && { tail_log worker; die "work pool $WORKER_POOL not READY within ${TIMEOUT}s"; }
    sleep 1
  done
  log "worker polling $WORKER_POOL"

  # 5. what to do next
  local here; here="$(cd "$ROOT" && pwd)"
  cat <<EOF

AnyFlow's Prefect stack is up. UI: http://127.0.0.1:$PORT   API: $API
Trigger runs (anyflow-gpu deployments need a worker on a Kubernetes cluster, see docs/orchestration.md):
  export PREFECT_API_URL=$API
  $PREFECT deployment run anyflow-distill/nightly-refresh
  $PREFECT deployment run anyflow-release/release -p action=promote
  $PREFECT deployment run anyflow-release/release -p action=rollback -p name=<release>
Stop the server and the worker:
  $here/deploy/local.sh stop
EOF
}

stop() {
  stop_one worker 5  # a process worker can take long to shut down gracefully; its flow runs die with its group
  stop_one server
  log "stopped (state kept in $STATE)"
}

status() {
  local name
  for name in server worker; do
    if alive "$name"; then log "$name: running (pid $(cat "$STATE/$name.pid"))"; else log "$name: not running"; fi
  done
  healthy && log "API $API answers" || log "API $API does not answer"
}

case "${1:-up}" in
  up|start) up ;;
  stop|down) stop ;;
  status) status ;;
  *) echo "usage: deploy/local.sh [up|stop|status]" >&2; exit 2 ;;
esac
