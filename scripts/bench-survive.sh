#!/usr/bin/env bash
# Resilience figures: how long a caller goes unheard when a model socket drops (reconnect
# gap), when a relay is drained with hand-off (SIGTERM) and when one is killed (SIGKILL),
# and how long a new caller waits for the fallback during a model outage, with and
# without the circuit breaker.
#   scripts/bench-survive.sh [--calls N] [--reconnects N] [--outage-calls N] [--out FILE]
# Builds the relay, control and bench_survive (debug profile: the gaps are dominated by
# timers, sockets and process work, not by code speed; pass PROFILE=release to change),
# then runs the bench, which starts its own redis-server, control, relays and fake model
# on loopback. Prints p50/p99/max per figure and writes them with their provenance to
# bench-results/survive.json (--out FILE; docs/results/survive.json feeds the docs). Needs redis-server on PATH. About 3 minutes
# (the outage figures wait out 5 s dial timeouts).
set -euo pipefail
cd "$(dirname "$0")/.."

command -v redis-server >/dev/null 2>&1 || {
  echo "bench-survive: redis-server not found; apt-get install redis-server" >&2
  exit 1
}
profile="${PROFILE:-debug}"
flag=()
[ "$profile" = release ] && flag=(--release)
cargo build "${flag[@]}" --locked -p callbridge-relay -p callbridge-control -p callbridge-tests \
  --bin callbridge-relay --bin callbridge-control --bin bench_survive
target_dir="${CARGO_TARGET_DIR:-target}"
CALLBRIDGE_BIN_DIR="$target_dir/$profile" exec "$target_dir/$profile/bench_survive" "$@"
