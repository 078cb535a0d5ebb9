#!/usr/bin/env bash
# Regenerate the Python modules for every mesh/proto/*.proto.
#
# Protos are compiled from the repository root with the root as the include path, so a proto imports
# another as `import "mesh/proto/other.proto";` and the generated code imports it as
# `from mesh.proto import other_pb2`.  Protobuf's own well-known types (google/protobuf/*.proto) come
# from grpc_tools.  Writes <name>_pb2.py, <name>_pb2.pyi and <name>_pb2_grpc.py beside each proto.
#
# Usage: scripts/gen-protos.sh          (uses .venv/bin/python, or $PYTHON)
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
if [ ! -x "$PYTHON" ]; then
    PYTHON=python3
fi

WKT_INCLUDE="$("$PYTHON" -c 'import os, grpc_tools; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')"

shopt -s nullglob
protos=(mesh/proto/*.proto)
if [ ${#protos[@]} -eq 0 ]; then
    echo "gen-protos: no mesh/proto/*.proto files" >&2
    exit 0
fi

"$PYTHON" -m grpc_tools.protoc \
    -I . \
    -I "$WKT_INCLUDE" \
    --python_out=. \
    --pyi_out=. \
    --grpc_python_out=. \
    "${protos[@]}"

echo "gen-protos: generated code for ${protos[*]}"
