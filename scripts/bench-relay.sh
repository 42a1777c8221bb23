#!/usr/bin/env bash
# Relay benchmark: N simulated calls through the real relay (release build) to the fake
# Realtime server in echo mode, plus the same load straight to the echo fake (baseline),
# standalone and production (control + redis) paths; N = 10, 100, 300, 1000 by default;
# then the hang-up and cold-start checks.
#   scripts/bench-relay.sh [bench_relay options…]   (e.g. --calls 10,100 --secs 5, --help)
# Builds callbridge-relay, callbridge-control and bench_relay in release, then runs the
# bench, which starts its own redis-server (unix socket), control and one relay per level
# on loopback. Prints a table, writes bench-results/relay.json and bench-results/relay.svg
# (override with --out / --svg). Needs redis-server on PATH. Bounded: about 5–8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v redis-server >/dev/null 2>&1 || {
  echo "bench-relay: redis-server not found; apt-get install redis-server" >&2
  exit 1
}
# 1,000 calls hold ~4,000 sockets across the relay and this process.
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true

cargo build --release --locked -p callbridge-relay -p callbridge-control -p callbridge-tests \
  --bin callbridge-relay --bin callbridge-control --bin bench_relay
target_dir="${CARGO_TARGET_DIR:-target}"
# The bench spawns the relay and control binaries from this directory (callbridge_testkit::procs).
CALLBRIDGE_BIN_DIR="$target_dir/release" exec "$target_dir/release/bench_relay" "$@"
