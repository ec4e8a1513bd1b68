#!/usr/bin/env bash
# Regenerate the committed Python stubs of the wire contract:
#   proto/editlens/v1/editlens_pb2.py, editlens_pb2.pyi, editlens_pb2_grpc.py
# from proto/editlens/v1/editlens.proto. Needs grpcio-tools (pinned in the
# "dev" extra of pyproject.toml together with the protobuf runtime the stubs
# require): pip install -e ".[dev]" && bash proto/generate.sh
# The stubs import each other as `editlens.v1...`; pyproject maps the import
# package `editlens` to proto/editlens (there is no Python package `proto`).
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python}"
if [ -x ../.venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=../.venv/bin/python; fi
"$PY" -m grpc_tools.protoc -I . \
  --python_out=. --pyi_out=. --grpc_python_out=. \
  editlens/v1/editlens.proto
echo "regenerated: $(ls editlens/v1/*_pb2*.py* | tr '\n' ' ')"
