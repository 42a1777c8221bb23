#!/usr/bin/env bash
# The one-command demo: control (in-memory store) + relay in one process, a fake OpenAI
# Realtime server and a simulated Twilio caller on loopback. No keys, no Redis.
#   scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo run -q -p callbridge-tests --bin callbridge-demo
