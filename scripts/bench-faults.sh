#!/usr/bin/env bash
# The fault table of docs/resilience.md: for each fault (relay SIGTERM, relay SIGKILL,
# control restart, Redis restart with AOF, model drop) a fresh world of 3 relays, control
# and redis-server on loopback, N live calls started on relay 0, the fault once every
# call has spoken two turns, then every call to its end. Prints one Markdown row per
# fault: calls completed, frames lost, stream switch gap p50/p99, acknowledged events
# lost, transcript lines missing (what was in flight).
#   scripts/bench-faults.sh [--calls N] [--turns N] [--only FAULT]
# Builds the relay, control and bench_faults (debug profile; PROFILE=release to change).
# Needs redis-server on PATH. About 2 minutes with the defaults (10 calls of 16 turns).
set -euo pipefail
cd "$(dirname "$0")/.."

command -v redis-server >/dev/null 2>&1 || {
  echo "bench-faults: redis-server not found; apt-get install redis-server" >&2
  exit 1
}
profile="${PROFILE:-debug}"
flag=()
[ "$profile" = release ] && flag=(--release)
cargo build "${flag[@]}" --locked -p callbridge-relay -p callbridge-control -p callbridge-tests \
  --bin callbridge-relay --bin callbridge-control --bin bench_faults
target_dir="${CARGO_TARGET_DIR:-target}"
CALLBRIDGE_BIN_DIR="$target_dir/$profile" exec "$target_dir/$profile/bench_faults" "$@"
