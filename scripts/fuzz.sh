#!/usr/bin/env bash
# Runs the hostile-input property tests (relay/tests/hostile_input.rs,
# control/tests/hostile_input.rs) far longer than the test suite does: SECONDS (default
# 300) split evenly over the targets; each target reruns with PROPTEST_CASES doubling
# until its share is spent. Prints the cases tried per target and the largest resident
# memory of any run (a leak or unbounded queue would show there).
#   scripts/fuzz.sh [SECONDS]
# A failing case stops the script with proptest's minimal failing input, and proptest
# saves its seed in the test's *.proptest-regressions file (commit it: the suite then
# replays it first every run).
set -euo pipefail
cd "$(dirname "$0")/.."

budget="${1:-300}"
case "$budget" in
  '' | *[!0-9]*) echo "usage: scripts/fuzz.sh [SECONDS]" >&2; exit 64 ;;
esac

# crate:target (target = the module holding the properties)
targets=(
  callbridge-relay:twilio_events
  callbridge-relay:realtime_events
  callbridge-relay:signatures
  callbridge-relay:webhooks
  callbridge-relay:twiml_docs
  callbridge-relay:call_phase
  callbridge-relay:ids
  callbridge-relay:stream_credentials
  callbridge-control:numbers
  callbridge-control:ids
  callbridge-control:agent_settings
  callbridge-control:relay_events
  callbridge-control:calling_windows
)

# The test executables, built once (cargo prints "Executable … (path)").
declare -A bin
for crate in callbridge-relay callbridge-control; do
  echo "fuzz: building $crate's hostile_input tests" >&2
  path="$(cargo test -p "$crate" --test hostile_input --no-run --message-format=json 2>/dev/null \
    | jq -r 'select(.reason == "compiler-artifact" and .target.name == "hostile_input"
                    and .profile.test == true) | .executable' | tail -n 1)"
  [ -x "$path" ] || { echo "fuzz: no test executable for $crate" >&2; exit 1; }
  bin[$crate]="$path"
done

share=$(( budget / ${#targets[@]} ))
[ "$share" -ge 1 ] || share=1
printf '%-34s %6s %12s %8s %10s\n' target props cases seconds max_rss_kb
total=0
for entry in "${targets[@]}"; do
  crate="${entry%%:*}"
  target="${entry#*:}"
  exe="${bin[$crate]}"
  props="$("$exe" --list "${target}::" 2>/dev/null | grep -c ': test$' || true)"
  [ "$props" -gt 0 ] || { echo "fuzz: $crate has no properties under ${target}::" >&2; exit 1; }
  cases=256 tried=0 rss=0
  start=$(date +%s%N)
  while :; do
    now=$(date +%s%N)
    spent_ms=$(( (now - start) / 1000000 ))
    left_ms=$(( share * 1000 - spent_ms ))
    [ "$left_ms" -gt 0 ] || break
    run_start=$now
    log="$(mktemp)"
    if ! PROPTEST_CASES="$cases" /usr/bin/time -f '%M' -o "$log.rss" \
        "$exe" "${target}::" --test-threads 2 -q >"$log" 2>&1; then
      cat "$log" >&2
      echo "fuzz: $crate ${target} FAILED at PROPTEST_CASES=$cases (see above)" >&2
      rm -f "$log" "$log.rss"
      exit 1
    fi
    run_rss="$(tail -n 1 "$log.rss")"
    [ "$run_rss" -gt "$rss" ] && rss="$run_rss"
    rm -f "$log" "$log.rss"
    tried=$(( tried + cases * props ))
    run_ms=$(( ($(date +%s%N) - run_start) / 1000000 ))
    left_ms=$(( left_ms - run_ms ))
    # Next run: double, or what fits in the time left at this run's pace.
    if [ "$run_ms" -gt 0 ] && [ $(( run_ms * 2 )) -gt "$left_ms" ]; then
      cases=$(( cases * left_ms / run_ms ))
      [ "$cases" -ge 16 ] || break
    else
      cases=$(( cases * 2 ))
    fi
  done
  secs=$(( ($(date +%s%N) - start) / 1000000000 ))
  printf '%-34s %6d %12d %8d %10d\n' "$crate:$target" "$props" "$tried" "$secs" "$rss"
  total=$(( total + tried ))
done
echo "fuzz: $total cases, no failure, in about ${budget}s"
