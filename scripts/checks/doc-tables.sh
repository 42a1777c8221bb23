#!/usr/bin/env bash
# The docs' measured tables must be what their committed result files say
# (docs/results/*.json, written by the bench binaries): scripts/doc_tables.py --check.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec python3 scripts/doc_tables.py --check
