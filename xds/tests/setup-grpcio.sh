#!/usr/bin/env bash
# Installs gRPC's Python xDS client (grpcio >= 1.85) into the test venv, for
# xds/tests/grpc_xds.rs. Idempotent; called from scripts/setup-test-deps.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=.venv-test
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
if ! "$VENV/bin/python" -c 'import grpc, sys; v = tuple(int(x) for x in grpc.__version__.split(".")[:2]); sys.exit(0 if v >= (1, 85) else 1)' 2>/dev/null; then
  "$VENV/bin/pip" install --quiet --disable-pip-version-check 'grpcio>=1.85'
fi
echo "grpcio: $("$VENV/bin/python" -c 'import grpc; print(grpc.__version__)')"
