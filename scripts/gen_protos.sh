#!/usr/bin/env bash
# Regenerates docket_common/pb from protos/ with grpcio-tools and mypy-protobuf.
# protoc names modules after the .proto path (docket/v1/x.proto -> package `docket`), which
# would clash with PyPI's `pydocket`; the generated tree is flattened into docket_common.pb and
# its imports rewritten.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
export PATH="$(dirname "$PY"):$PATH"  # protoc-gen-mypy lives beside the interpreter
out=docket_common/pb
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

"$PY" -m grpc_tools.protoc -I protos \
  --python_out="$tmp" --grpc_python_out="$tmp" \
  --mypy_out="$tmp" --mypy_grpc_out="$tmp" \
  protos/docket/v1/*.proto

rm -rf "$out"
mkdir -p "$out"
cp "$tmp"/docket/v1/* "$out"/
# `from docket.v1 import x_pb2` -> `from docket_common.pb import x_pb2`; the same in stubs.
sed -i -E 's/^from docket\.v1 import /from docket_common.pb import /; s/^import docket\.v1\.([a-z_0-9]+) as /import docket_common.pb.\1 as /; s/\bdocket\.v1\.([a-z_0-9]+_pb2)\b/docket_common.pb.\1/g' "$out"/*.py "$out"/*.pyi
printf '"""Generated from protos/docket/v1 by scripts/gen_protos.sh. Do not edit."""\n' > "$out/__init__.py"
