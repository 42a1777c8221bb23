#!/usr/bin/env bash
# Supply-chain policy (deny.toml, docs/supply-chain.md): banned crates (OpenSSL, a second
# TLS or crypto stack), licences outside the allowed list, sources other than crates.io.
#   bash scripts/checks/deny.sh
# Needs no network once the crates are fetched (the fetch below gets what the build did not). The
# advisories check needs the RustSec database: see docs/supply-chain.md.
set -euo pipefail
cd "$(dirname "$0")/../.."

# Pinned so the policy is read by the same rules everywhere; bump it deliberately.
DENY_VERSION=0.20.2
if ! command -v cargo-deny >/dev/null 2>&1 \
   || [ "$(cargo-deny --version 2>/dev/null)" != "cargo-deny $DENY_VERSION" ]; then
  echo "deny: installing cargo-deny $DENY_VERSION (a few minutes, once per machine)"
  cargo install --locked --quiet cargo-deny --version "$DENY_VERSION"
fi
# cargo-deny reads `cargo metadata`, which wants every locked package on disk, optional
# ones a build never fetches included (jiff's jiff-static, for one); fetch them first.
cargo fetch --locked --quiet
cargo deny --offline --log-level error check bans licenses sources
