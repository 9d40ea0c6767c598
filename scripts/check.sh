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
echo "== buf breaking (against the last released API: clients/api-baseline/README.md)"
"$BIN/buf" breaking --against clients/api-baseline/docket-v1.binpb
echo "== generated code is up to date"
before=$(mktemp -d)
trap 'rm -rf "$before"' EXIT
cp -r docket_common/pb "$before/pb"
PYTHON="$BIN/python" scripts/gen_protos.sh
if ! diff -r "$before/pb" docket_common/pb; then
  echo "docket_common/pb is stale: run scripts/gen_protos.sh and commit the result" >&2
  exit 1
fi
echo "== TypeScript client (clients/typescript) is up to date and type-checks"
if [[ -x clients/typescript/node_modules/.bin/protoc-gen-es ]]; then
  cp -r clients/typescript/src/gen "$before/ts-gen"
  BUF="$BIN/buf" scripts/gen_clients.sh
  if ! diff -r "$before/ts-gen" clients/typescript/src/gen; then
    echo "clients/typescript/src/gen is stale: run scripts/gen_clients.sh and commit the result" >&2
    exit 1
  fi
  npm --prefix clients/typescript run --silent typecheck
elif ci="${CI:-}" && [[ ! ${ci,,} =~ ^(|0|false|no)$ ]]; then
  echo "clients/typescript/node_modules is missing: run npm ci --prefix clients/typescript" >&2
  exit 1
else
  echo "skipped: no clients/typescript/node_modules (npm ci --prefix clients/typescript)"
fi
echo "checks passed"
