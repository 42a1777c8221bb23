#!/usr/bin/env bash
# Soak: 200 concurrent calls churning (each 20–60 s, a new one replacing each as it ends)
# through the voice webhook, the relay and control on Redis (append-only file, everysec),
# for MINUTES (default 15). Prints every minute the relay's RSS, open FDs, runtime tasks
# and threads, control's RSS and FDs and Redis's used_memory; at the end the slope of each
# after the warm-up (% of its mean per 10 minutes; flat: under 1 %).
#   scripts/soak.sh [MINUTES] [soak options…]   (e.g. scripts/soak.sh 15 --calls 100)
# Not part of the test command. Builds the relay, control and the soak in release (what
# runs in production is what may leak), then runs it; everything on loopback, stopped by
# itself after MINUTES plus the longest call. Needs redis-server on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v redis-server >/dev/null 2>&1 || {
  echo "soak: redis-server not found; apt-get install redis-server" >&2
  exit 1
}
minutes="${1:-15}"
[ $# -gt 0 ] && shift
case "$minutes" in
  '' | *[!0-9.]*) echo "soak: MINUTES must be a number, got '$minutes'" >&2; exit 2 ;;
esac
# 200 calls hold ~1,000 sockets across the relay, control, the fake and this process.
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true

profile="${PROFILE:-release}"
flag=()
[ "$profile" = release ] && flag=(--release)
cargo build "${flag[@]}" --locked -p callbridge-relay -p callbridge-control -p callbridge-tests \
  --bin callbridge-relay --bin callbridge-control --bin soak
target_dir="${CARGO_TARGET_DIR:-target}"
CALLBRIDGE_BIN_DIR="$target_dir/$profile" exec "$target_dir/$profile/soak" --minutes "$minutes" "$@"
