#!/usr/bin/env bash
# The docs' measured tables must be what their committed result files say
# (docs/results/*.json and docs/performance/*/, written by the bench binaries), and the
# relay's pod requests in deploy/k8s/base/relay/deployment.yaml what the HPA derivation
# computes from them: scripts/doc_tables.py --check.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec python3 scripts/doc_tables.py --check
