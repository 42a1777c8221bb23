#!/usr/bin/env bash
# Installs the Node packages the tests run exactly as locked: tests/node (the cargo test
# `node_client` runs `node tests/node/client-test.mjs`) and examples/express-campaign (the
# cargo test `node_express_campaign` runs its `server.mjs`).
#   bash scripts/checks/node-deps.sh
# Idempotent and quick: skips `npm ci` where node_modules already matches package-lock.json.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"

missing=()
command -v node >/dev/null 2>&1 || missing+=(node)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "node-deps: ${missing[*]} not found on PATH; install Node.js >= 18 with npm" \
       "(e.g. apt-get install nodejs npm) to run the Node tests" >&2
  exit 1
fi
major="$(node -p 'process.versions.node.split(".")[0]')"
if [ "$major" -lt 18 ]; then
  echo "node-deps: Node.js $(node --version) is too old; tests/node and examples/ need >= 18" >&2
  exit 1
fi

# npm writes node_modules/.package-lock.json on install; if it is newer than the
# committed lock and every locked package is present, there is nothing to do.
install() {
  local dir="$1"
  shift
  cd "$root/$dir"
  local stamp=node_modules/.package-lock.json
  if [ -f "$stamp" ] && [ "$stamp" -nt package-lock.json ] \
     && npm ls --omit=dev --depth=0 >/dev/null 2>&1; then
    echo "node-deps: $dir/node_modules is up to date"
    return 0
  fi
  echo "node-deps: npm ci in $dir"
  # --ignore-scripts: nothing we use needs an install script (protobufjs' postinstall only
  # prints a version warning), and running none is the safer default for CI.
  npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
  for module in "$@"; do
    node -e "require.resolve('$module')"
  done
  echo "node-deps: $dir installed"
}

install tests/node @grpc/grpc-js @grpc/proto-loader
install examples/express-campaign @grpc/grpc-js @grpc/proto-loader express
