#!/usr/bin/env bash
# Dialer pacing benchmark: a campaign of 10,000 queued numbers at each of 10, 50 and 100
# calls/s for 30 s each; from the fake Twilio's request log, the sustained rate and its
# ratio to the configured one, the most starts in any second, and the gaps between starts.
#   scripts/bench-dialer.sh [bench_dialer options…]   (e.g. --cps 100 --secs 60, --help)
# Builds the relay, control and the bench in release, then runs it; everything on loopback
# (real control, relay and redis-server, the fake Twilio REST API), stopped by itself after
# each rate's window. Writes bench-results/dialer.json (override with --out). Needs
# redis-server on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v redis-server >/dev/null 2>&1 || {
  echo "bench-dialer: redis-server not found; apt-get install redis-server" >&2
  exit 1
}
cargo build --release --locked -p callbridge-relay -p callbridge-control -p callbridge-tests \
  --bin callbridge-relay --bin callbridge-control --bin bench_dialer
target_dir="${CARGO_TARGET_DIR:-target}"
CALLBRIDGE_BIN_DIR="$target_dir/release" exec "$target_dir/release/bench_dialer" "$@"
