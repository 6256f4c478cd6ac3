#!/usr/bin/env bash
# Generates the Python gRPC stubs of tandem.v1 (types, participant,
# coordinator) from proto/ with grpcio-tools. The stubs are build output:
# never edit them, never commit them; run.sh generates them into its work
# directory on every run.
#
#   examples/python/gen.sh [OUT_DIR]     # default: examples/python/tandem_pb
#
# Then put OUT_DIR on PYTHONPATH: `from tandem.v1 import participant_pb2`.
# PYTHON names the interpreter that has grpcio-tools (default: python3).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="${1:-$here/tandem_pb}"
python="${PYTHON:-python3}"

mkdir -p "$out"
rm -rf "$out/tandem"
"$python" -m grpc_tools.protoc -I "$root/proto" \
  --python_out="$out" --grpc_python_out="$out" \
  "$root/proto/tandem/v1/types.proto" \
  "$root/proto/tandem/v1/participant.proto" \
  "$root/proto/tandem/v1/coordinator.proto"
