#!/usr/bin/env bash
# Deploy check: renders every kustomize overlay with the real kustomize (kubectl's), validates
# every object against the Kubernetes JSON schemas, lints the Dockerfile, and checks the
# manifests, compose file, dashboard and docs against the code (env names, routes, ports,
# metrics), then probes the built binaries the way Kubernetes will. See docs/operations.md
# "How the manifests are checked".
#
# Tools: kubectl (part of this machine image; `kubectl kustomize` is kustomize v5), and a
# Python venv in target/deploy-venv with pinned PyPI packages (installed on first run,
# reused afterwards: idempotent, and fast once installed).
set -euo pipefail
# Keep __pycache__ out of the source tree.
export PYTHONDONTWRITEBYTECODE=1
cd "$(dirname "$0")/../.."

venv=target/deploy-venv
requirements=scripts/deploy/requirements.txt
stamp="$venv/.requirements"

if ! command -v kubectl >/dev/null 2>&1 && ! command -v kustomize >/dev/null 2>&1; then
  echo "deploy check: needs kubectl (kubectl kustomize) or kustomize on PATH to render the overlays" >&2
  exit 1
fi

if [ ! -x "$venv/bin/python" ] || ! cmp -s "$requirements" "$stamp"; then
  echo "deploy check: installing validators into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
  cp "$requirements" "$stamp"
fi

echo "deploy check: hadolint deploy/Dockerfile"
"$venv/bin/hadolint" deploy/Dockerfile

echo "deploy check: dashboard is the generator's output"
"$venv/bin/python" scripts/deploy/gen_dashboard.py --check

echo "deploy check: render, schemas, consistency with the code, live probes"
exec "$venv/bin/python" scripts/deploy/validate.py "$@"
