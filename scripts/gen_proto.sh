#!/usr/bin/env bash
# Regenerates almapipe/v1/pipeline_pb2*.py from proto/almapipe/v1/pipeline.proto.
# The proto package almapipe.v1 maps onto the Python package almapipe.v1.
# Run from the repository root; tests/test_proto.py checks the committed copy is current.
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-.}
"$PY" -m grpc_tools.protoc -Iproto --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" proto/almapipe/v1/pipeline.proto
touch "$OUT/almapipe/v1/__init__.py"
