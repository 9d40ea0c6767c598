#!/usr/bin/env bash
# Static checks CI runs before the tests: lint, format, types, protos, generated code.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${VENV:-.venv}/bin"

echo "== ruff"
"$BIN/ruff" check .
"$BIN/ruff" format --check .
echo "== mypy (strict)"
"$BIN/mypy"
echo "== buf lint / format"
"$BIN/buf" lint
"$BIN/buf" format --diff --exit-code
echo "== generated code is up to date"
before=$(mktemp -d)
trap 'rm -rf "$before"' EXIT
cp -r docket_common/pb "$before/pb"
PYTHON="$BIN/python" scripts/gen_protos.sh
if ! diff -r "$before/pb" docket_common/pb; then
  echo "docket_common/pb is stale: run scripts/gen_protos.sh and commit the result" >&2
  exit 1
fi
echo "checks passed"
