#!/usr/bin/env bash
# Longer runs of the property-based fuzzers in tests/fuzz.rs (config loader,
# request path against a running healthgate). CI runs 64 cases of each; this
# runs FUZZ_CASES (default 10000) per round, in rounds with fresh random
# seeds until FUZZ_SECONDS (default 0: one round) have passed. A failure
# prints the minimal input and stops with a non-zero exit. Record the result
# in docs/reliability.md.
set -euo pipefail
cd "$(dirname "$0")/.."

CASES=${FUZZ_CASES:-10000}
BUDGET=${FUZZ_SECONDS:-0}
log=$(mktemp)
trap 'rm -f "$log"' EXIT

cargo test --locked --test fuzz --no-run
echo "fuzz: $(date -u +%FT%TZ) $(uname -m) $(nproc) cores; $CASES cases per property per round, budget ${BUDGET}s"
start=$(date +%s)
round=0
while :; do
  round=$((round + 1))
  if ! HG_FUZZ_CASES=$CASES cargo test --locked --test fuzz -- --nocapture --test-threads=1 >"$log" 2>&1; then
    cat "$log"
    echo "fuzz: round $round FAILED"
    exit 1
  fi
  echo "round $round:"
  grep -E 'cases|^test ' "$log" | sed 's/^/  /'
  elapsed=$(( $(date +%s) - start ))
  [ "$BUDGET" -gt 0 ] && [ "$elapsed" -lt "$BUDGET" ] || break
done
echo "fuzz: $round round(s), $((round * CASES)) cases per property, ${elapsed}s, no failure"
