#!/usr/bin/env bash
# Regenerate the committed Python gRPC code from proto/lowband/v1/*.proto into node/proto/.
# The directory-prefixed path (lowband/v1/...) keeps descriptor names from clashing with hivemind's.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
out=${1:-node/proto}
mkdir -p "$out"
"$PY" -m grpc_tools.protoc -I proto --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" proto/lowband/v1/*.proto
# protoc emits absolute imports (`from lowband.v1 import ...`); make them package-relative.
sed -i 's/^from lowband\.v1 import/from node.proto.lowband.v1 import/' "$out"/lowband/v1/*_grpc.py
for d in "$out" "$out/lowband" "$out/lowband/v1"; do [ -f "$d/__init__.py" ] || : > "$d/__init__.py"; done
