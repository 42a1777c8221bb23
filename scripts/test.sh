#!/usr/bin/env bash
# The test command: installs what the tests need, builds, and runs every test.
#   scripts/test.sh
# Needs: the Rust toolchain, and root (or sudo) the first time to apt-get redis-server.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# What apt can provide when it is missing: redis-server (integration tests), Node.js >= 18
# with npm (the Node client test) and Python's venv (the deploy validators). kubectl (the
# deploy check's kustomize) is not in Debian's archive; scripts/checks/deploy.sh names it.
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing ${missing[*]} (apt)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# The distro package starts a system redis on 6379; the tests start their own servers.

# A one-shot run (CI, a fresh clone) gains nothing from incremental artefacts: they only
# cost disk (several GiB per clone) and write time.
if [ -n "${CI:-}" ]; then export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"; fi

echo "== format"
cargo fmt --all --check
echo "== clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== build (binaries the cross-process tests spawn)"
cargo build --workspace --bins --locked
echo "== checks beyond cargo test (scripts/checks/*.sh)"
for check in scripts/checks/*.sh; do
  [ -e "$check" ] || continue
  echo "== $check"
  bash "$check"
done
echo "== cargo test"
cargo test --workspace --locked -- --test-threads="${TEST_THREADS:-2}"
