#!/usr/bin/env bash
# Control-plane benchmark: events/s through Relay.Attach streams at 1, 10 and 100 calls,
# WatchCall latency at 100 calls, CreateCalls/ListCalls of 1,000 calls and one-at-a-time
# events (bulk), and redis-benchmark XADD on the same redis-server.
#   scripts/bench-control.sh [bench_control options…]   (e.g. --events 200000, --help)
# Builds callbridge-control and bench_control in release, then runs the bench, which starts
# its own redis-server (unix socket) and one control process on loopback. Prints a table
# and writes bench-results/control.json (override with --out). Needs redis-server,
# redis-cli and redis-benchmark on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in redis-server redis-cli redis-benchmark; do
  command -v "$tool" >/dev/null 2>&1 || {
    echo "bench-control: $tool not found; apt-get install redis-server redis-tools" >&2
    exit 1
  }
done

cargo build --release --locked -p callbridge-control -p callbridge-tests \
  --bin callbridge-control --bin bench_control
target_dir="${CARGO_TARGET_DIR:-target}"
# The bench spawns the control binary from this directory (callbridge_testkit::procs).
CALLBRIDGE_BIN_DIR="$target_dir/release" exec "$target_dir/release/bench_control" "$@"
