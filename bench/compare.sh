#!/usr/bin/env bash
# healthgate vs HAProxy on this machine; prints ratios and writes
# bench/results/latest.md and bench/results/latest.jsonl.
#
#   bench/compare.sh              # full run (~12 minutes on 2 cores)
#   QUICK=1 bench/compare.sh      # one repeat, short runs (~7 minutes)
#
# Needs the machine's MariaDB (127.0.0.1:3306, passwordless root over TCP),
# Redis (6379) and RabbitMQ (5672, guest): they are only checked, never
# reconfigured. Other knobs: see the docstring of bench/compare.py.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v nginx >/dev/null || missing+=(nginx-light)
command -v haproxy >/dev/null || missing+=(haproxy)
command -v wrk >/dev/null || missing+=(wrk)
command -v valgrind >/dev/null || missing+=(valgrind)
command -v strace >/dev/null || missing+=(strace)
command -v python3 >/dev/null || missing+=(python3)
command -v h2load >/dev/null || missing+=(nghttp2-client)
command -v cc >/dev/null || missing+=(gcc)
if ((${#missing[@]})); then
    echo "installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
    # The packages start their services; the benchmark runs its own instances.
    systemctl disable --now nginx haproxy >/dev/null 2>&1 || service nginx stop >/dev/null 2>&1 || true
fi

if [[ -z "${HG_BIN:-}" ]]; then
    cargo build --release --locked >&2
fi
exec python3 bench/compare.py "$@"
