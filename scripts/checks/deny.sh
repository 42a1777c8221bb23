#!/usr/bin/env bash
# Supply-chain policy (deny.toml, docs/supply-chain.md): banned crates (OpenSSL, a second
# TLS or crypto stack), licences outside the allowed list, sources other than crates.io.
#   bash scripts/checks/deny.sh
# Reads every crate of Cargo.lock, for every target: the build fetched only those of this
# platform, so `cargo fetch` gets the rest first (from the registry, once per machine; a
# no-op offline when they are there). The advisories check needs the RustSec database:
# see docs/supply-chain.md.
set -euo pipefail
cd "$(dirname "$0")/../.."

# Pinned so the policy is read by the same rules everywhere; bump it deliberately.
DENY_VERSION=0.20.2
if ! command -v cargo-deny >/dev/null 2>&1 \
   || [ "$(cargo-deny --version 2>/dev/null)" != "cargo-deny $DENY_VERSION" ]; then
  echo "deny: installing cargo-deny $DENY_VERSION (a few minutes, once per machine)"
  cargo install --locked --quiet cargo-deny --version "$DENY_VERSION"
fi
cargo fetch --locked --quiet
cargo deny --offline --log-level error check bans licenses sources
