#!/usr/bin/env bash
# Installs the Node client test's dependencies (tests/node) exactly as locked, so the
# cargo test `node_client` can run `node tests/node/client-test.mjs`.
#   bash scripts/checks/node-deps.sh
# Idempotent and quick: skips `npm ci` when node_modules already matches package-lock.json.
set -euo pipefail
cd "$(dirname "$0")/../../tests/node"

missing=()
command -v node >/dev/null 2>&1 || missing+=(node)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "node-deps: ${missing[*]} not found on PATH; install Node.js >= 18 with npm" \
       "(e.g. apt-get install nodejs npm) to run the Node client test" >&2
  exit 1
fi
major="$(node -p 'process.versions.node.split(".")[0]')"
if [ "$major" -lt 18 ]; then
  echo "node-deps: Node.js $(node --version) is too old; tests/node needs >= 18" >&2
  exit 1
fi

# npm writes node_modules/.package-lock.json on install; if it is newer than the
# committed lock and every locked package is present, there is nothing to do.
stamp=node_modules/.package-lock.json
if [ -f "$stamp" ] && [ "$stamp" -nt package-lock.json ] \
   && npm ls --omit=dev --depth=0 >/dev/null 2>&1; then
  echo "node-deps: tests/node/node_modules is up to date"
  exit 0
fi

echo "node-deps: npm ci in tests/node"
# --ignore-scripts: nothing we use needs an install script (protobufjs' postinstall only
# prints a version warning), and running none is the safer default for CI.
npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
node -e 'require.resolve("@grpc/grpc-js"); require.resolve("@grpc/proto-loader")'
echo "node-deps: installed"
