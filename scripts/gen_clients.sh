#!/usr/bin/env bash
# Regenerates the TypeScript client (clients/typescript/src/gen) from protos/ with buf and the
# local protoc-gen-es that `npm ci --prefix clients/typescript` installs: no remote plugins,
# no network. The template is clients/typescript/buf.gen.yaml; it also generates
# google.rpc.ErrorInfo from the copy in clients/typescript/proto.
set -euo pipefail
cd "$(dirname "$0")/.."
BUF="${BUF:-${VENV:-.venv}/bin/buf}"
plugin=clients/typescript/node_modules/.bin/protoc-gen-es
if [[ ! -x $plugin ]]; then
  echo "$plugin is missing: run npm ci --prefix clients/typescript" >&2
  exit 1
fi
"$BUF" generate --template clients/typescript/buf.gen.yaml
