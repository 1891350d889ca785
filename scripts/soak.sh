#!/usr/bin/env bash
# Soak: a release healthgate under steady proxied load for SOAK_MINUTES
# (default 10) while a critical dependency flaps every SOAK_FLAP_SECONDS
# (default 3). Samples healthgate's RSS and open fds every
# SOAK_SAMPLE_SECONDS (default 10) and prints their growth, the response
# status counts and wrk's socket errors. Not part of CI; run on demand and
# record the result in docs/reliability.md.
#
# Needs wrk (apt-get install wrk) and python3. Load is throttled (wrk's
# delay() hook) so it is steady, not a benchmark, and has three parts that
# exercise different connection paths:
# * busy: SOAK_CONNECTIONS keep-alive connections (default 32), each waiting
#   SOAK_DELAY_MS (default 10) between requests;
# * parking: SOAK_PARK_CONNECTIONS (default 200) keep-alive connections idle
#   SOAK_PARK_DELAY_MS (default 250) between requests, longer than the 100 ms
#   after which healthgate parks an idle connection, so every request wakes one;
# * churn: SOAK_CHURN_CONNECTIONS (default 4) clients sending
#   `Connection: close`, a new connection per request.
set -euo pipefail
cd "$(dirname "$0")/.."

MINUTES=${SOAK_MINUTES:-10}
FLAP=${SOAK_FLAP_SECONDS:-3}
SAMPLE=${SOAK_SAMPLE_SECONDS:-10}
CONNS=${SOAK_CONNECTIONS:-32}
DELAY_MS=${SOAK_DELAY_MS:-10}
PARK_CONNS=${SOAK_PARK_CONNECTIONS:-200}
PARK_DELAY_MS=${SOAK_PARK_DELAY_MS:-250}
CHURN_CONNS=${SOAK_CHURN_CONNECTIONS:-4}
command -v wrk >/dev/null || { echo "wrk not found (apt-get install wrk)" >&2; exit 1; }

[ -n "${SOAK_SKIP_BUILD:-}" ] || cargo build --release --locked
BIN=${SOAK_BIN:-target/release/healthgate}

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

# The app and the flapping dependency.
SOAK_FLAP_SECONDS=$FLAP python3 scripts/soak_app.py >"$work/app.out" 2>"$work/app.err" &
pids+=($!)
for _ in $(seq 100); do [ -s "$work/app.out" ] && break; sleep 0.1; done
read -r app_kv dep_kv <"$work/app.out"
APP=${app_kv#app=}; DEP=${dep_kv#dep=}

cat >"$work/hg.yaml" <<YAML
workers: 2
admin:
  listen: 127.0.0.1:0
drain:
  delay: 0s
  timeout: 5s
listeners:
  - name: web
    listen: 127.0.0.1:0
    upstream: "127.0.0.1:$APP"
    upstream_idle_timeout: 2s
dependencies:
  - name: db
    type: tcp
    address: "127.0.0.1:$DEP"
    interval: 250ms
    timeout: 500ms
    rise: 1
    fall: 1
    jitter: 0
  - name: api
    type: http
    url: "http://127.0.0.1:$APP/health"
    impact: degraded
    interval: 1s
    timeout: 500ms
YAML
"$BIN" --log-format json run --config "$work/hg.yaml" 2>"$work/hg.log" &
HG=$!
pids+=($HG)
for _ in $(seq 100); do grep -q 'healthgate started' "$work/hg.log" && break; sleep 0.1; done
started=$(grep -m1 'healthgate started' "$work/hg.log")
LISTEN=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["listeners"])' "$started")
ADMIN=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["admin"])' "$started")

cat >"$work/load.lua" <<'LUA'
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) counts = {} end
function delay() return DELAY_MS end
function response(status, headers, body) counts[status] = (counts[status] or 0) + 1 end
function done(summary, latency, requests)
  local total = {}
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("counts")) do total[k] = (total[k] or 0) + v end
  end
  for k, v in pairs(total) do io.write(string.format("status %d: %d\n", k, v)) end
  local e = summary.errors
  io.write(string.format("socket errors: connect %d, read %d, write %d, timeout %d\n",
    e.connect, e.read, e.write, e.timeout))
end
LUA

sample() {
  local rss fds
  rss=$(awk '/^VmRSS/ {print $2}' "/proc/$HG/status")
  fds=$(ls "/proc/$HG/fd" | wc -l)
  echo "$1 $rss $fds"
}

# load NAME CONNECTIONS DELAY_MS [wrk options]
wrks=()
load() {
  local name=$1 conns=$2 delay=$3
  shift 3
  sed "s/DELAY_MS/$delay/" "$work/load.lua" >"$work/$name.lua"
  wrk -t1 -c"$conns" -d"${MINUTES}m" --timeout 10s -s "$work/$name.lua" "$@" "http://$LISTEN/$name" >"$work/wrk-$name.out" 2>&1 &
  wrks+=($!)
  pids+=($!)
}

echo "soak: $(date -u +%FT%TZ) $(uname -m) $(nproc) cores; $MINUTES min; load: busy $CONNS conns/${DELAY_MS}ms, parking $PARK_CONNS conns/${PARK_DELAY_MS}ms, churn $CHURN_CONNS conns (Connection: close); dependency flaps every ${FLAP}s"
echo "healthgate pid $HG on $LISTEN (admin $ADMIN), app :$APP, dependency :$DEP"
load busy "$CONNS" "$DELAY_MS"
load parking "$PARK_CONNS" "$PARK_DELAY_MS"
load churn "$CHURN_CONNS" 5 -H "Connection: close"
running() { for p in "${wrks[@]}"; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }
t0=$(date +%s)
printf '%8s %10s %6s\n' seconds rss_kib fds
samples=()
while running; do
  kill -0 "$HG" || { echo "healthgate died" >&2; exit 1; }
  s=$(sample $(( $(date +%s) - t0 )))
  samples+=("$s")
  printf '%8s %10s %6s\n' $s
  sleep "$SAMPLE"
done
s=$(sample $(( $(date +%s) - t0 ))); samples+=("$s"); printf '%8s %10s %6s\n' $s
metrics=$(curl -s "http://$ADMIN/metrics" 2>/dev/null || python3 -c "import urllib.request,sys; print(urllib.request.urlopen('http://$ADMIN/metrics').read().decode())")
for name in busy parking churn; do
  echo "--- wrk $name"
  cat "$work/wrk-$name.out"
done
echo "--- healthgate metrics"
grep -E '^healthgate_(dependency_transitions_total|requests_total)' <<<"$metrics" || true
read -r _ rss0 fd0 <<<"${samples[0]}"
# After a minute the allocator and pools have warmed up; growth from there is what a leak looks like.
warm=${samples[0]}
for s in "${samples[@]}"; do read -r t _ _ <<<"$s"; [ "$t" -ge 60 ] && { warm=$s; break; }; done
read -r tw rssw fdw <<<"$warm"
read -r tn rssn fdn <<<"${samples[-1]}"
echo "--- growth"
echo "RSS KiB: start $rss0 -> ${tw}s $rssw -> end $rssn (since ${tw}s: $(( rssn - rssw )) KiB)"
echo "open fds: start $fd0 -> ${tw}s $fdw -> end $fdn (since ${tw}s: $(( fdn - fdw )))"
kill -TERM "$HG"
for _ in $(seq 100); do kill -0 "$HG" 2>/dev/null || break; sleep 0.1; done
wait "$HG" && echo "healthgate exited 0 after SIGTERM" || echo "healthgate exit code $?"
