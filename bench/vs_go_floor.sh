#!/usr/bin/env bash
# The service, the floor of its stack (bench/floor_app.py: minimal Flask + flask-sock + gevent) and the seed's
# stack (Go + gorilla/websocket), back to back, with the load generator of ../shared/bench-peers/vs_go.sh.
# Usage, from the project's root, after vs_go.sh has run once (it builds the Go peer):
#   bench/vs_go_floor.sh [N]        (default N=1000, ROUNDS=30)
# Prints, for each server, what vs_go.sh prints (KiB per idle connection, fan-out p99, server CPU for the
# fan-out rounds, server µs per ping round trip) and each one's ratio to Go. Server on CPU 0, load on CPU 1.
set -uo pipefail
proj=$PWD
peers=$(cd "$proj/../shared/bench-peers" && pwd) || { echo "no ../shared/bench-peers"; exit 2; }
N=${1:-1000}
ROUNDS=${ROUNDS:-30}
bin=/tmp/bench-peers/go-peer
[ -x "$bin" ] || { echo "no Go peer at $bin: run ../shared/bench-peers/vs_go.sh once"; exit 2; }
[ -x "$proj/.venv/bin/gunicorn" ] || { echo "no .venv in $proj: run make test first"; exit 2; }
work=$(mktemp -d /tmp/vs-go-floor-XXXX)
cp "$peers/loadgen.mjs" "$peers/package.json" "$peers/package-lock.json" "$work/"
(cd "$work" && npm ci --silent --no-audit --no-fund >/dev/null 2>&1) || { echo "npm ci failed in $work"; exit 2; }
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
wait_up() { for _ in $(seq 1 150); do curl -sf "http://127.0.0.1:$1/health" >/dev/null && return 0; sleep 0.2; done; return 1; }
stop() { kill -TERM "$1" 2>/dev/null; for _ in $(seq 1 50); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.2; done; kill -KILL "$1" 2>/dev/null; }
ulimit -n "$(ulimit -Hn)" 2>/dev/null
load() {  # label port pid [loadgen options]
  local label=$1 p=$2 pid=$3; shift 3
  taskset -c 1 node "$work/loadgen.mjs" --url "http://127.0.0.1:$p" --n "$N" --pid "$pid" --rounds "$ROUNDS" \
    --ping-seconds 3 --label "$label" "$@" >"$work/$label.json" 2>"$work/$label.err"
}

p=$(port); PORT=$p taskset -c 0 "$bin" >"$work/go.log" 2>&1 & pid=$!
wait_up "$p" || { echo "Go peer did not start"; exit 2; }
load go "$p" "$pid"; stop "$pid"

# The floor runs, as vs_go.sh runs the service, without the load generator's warm-up session (Go has it):
# their KiB per connection also carries the first connection's one-time allocations, spread over N+1.
p=$(port)
(cd "$proj/bench" && exec taskset -c 0 "$proj/.venv/bin/gunicorn" -k gevent --worker-connections 5000 -b "127.0.0.1:$p" \
   --no-control-socket floor_app:app) >"$work/floor.log" 2>&1 & pid=$!
wait_up "$p" || { echo "the floor did not start"; tail -5 "$work/floor.log"; stop "$pid"; exit 2; }
load floor "$p" "$pid" --no-warmup; stop "$pid"

cat >"$work/seed.json" <<JSON
{"projects": {"bench-project": {"userID": "bench-owner", "projectName": "bench"}},
 "batches": {"bench-batch": {"projectID": "bench-project", "batchName": "bench"}}, "users": {}}
JSON
p=$(port)
(cd "$proj" && PORT=$p CANARY_STORE=memory CANARY_SEED="$work/seed.json" WEB_CONCURRENCY=1 LOG_LEVEL=WARNING \
   exec taskset -c 0 .venv/bin/gunicorn -c gunicorn.conf.py wsgi:app) >"$work/service.log" 2>&1 & pid=$!
wait_up "$p" || { echo "the service did not start"; tail -5 "$work/service.log"; stop "$pid"; exit 2; }
load service "$p" "$pid" --batch bench-batch --owner bench-owner --no-warmup; stop "$pid"

python3 - "$work" "$N" <<'PY'
import json, sys
work, n = sys.argv[1], sys.argv[2]
def last(label):
    try:
        return json.loads(open(f"{work}/{label}.json").read().strip().splitlines()[-1])
    except Exception:
        return None
runs = {label: last(label) for label in ("go", "floor", "service")}
missing = [label for label, r in runs.items() if not r]
if missing:
    print("no result from", ", ".join(missing), "; see the .err files in", work); sys.exit(1)
rows = [("KiB per idle connection", ("rss", "perConnKiB")), ("fan-out p99 (ms)", ("fanout", "p99")),
        ("server CPU, fan-out rounds (s)", ("fanout", "serverCpuS")),
        ("server µs per ping round trip", ("ping", "serverCpuUsPerRtt"))]
def get(d, path):
    for k in path:
        d = d[k]
    return d
print(f"N={n}  correct: " + " ".join(f"{k}={bool((r.get('correctness') or {}).get('ok'))}" for k, r in runs.items()))
for name, path in rows:
    g, f, s = (get(runs[k], path) for k in ("go", "floor", "service"))
    print(f"{name:32} go={g:10.2f} floor={f:10.2f} service={s:10.2f}  floor/go={f / g:5.2f} service/go={s / g:5.2f}"
          f" service/floor={s / f:5.2f}")
PY
