#!/usr/bin/env bash
# Data-plane benchmark of one infermesh node: ext_proc hop latency, max requests/s through
# Envoy and through the standalone proxy next to sglang-router and vllm-router, and the
# metrics fetcher's CPU at 100 pods. Writes bench/results/dataplane.md.
#
#   bench/dataplane/run.sh [--duration SECS] [--connections N] [--no-peers]
#
# Installs what it needs: wrk (apt), Envoy (scripts/setup-test-deps.sh), and the peer
# routers in bench/dataplane/.venv (pip; gitignored). Only loopback traffic.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
PEERS=1
ARGS=()
for a in "$@"; do
  if [ "$a" = "--no-peers" ]; then PEERS=0; else ARGS+=("$a"); fi
done
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
scripts/setup-test-deps.sh >/dev/null
ENVOY=${ENVOY_BIN:-$ROOT/.venv-test/bin/envoy}
ROUTERS=()
if [ "$PEERS" = 1 ]; then
  VENV=bench/dataplane/.venv
  if [ ! -x "$VENV/bin/vllm-router" ] || [ ! -x "$VENV/bin/sglang-router" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check sglang-router==0.3.2 vllm-router==0.1.17
  fi
  ROUTERS=(--routers "$ROOT/$VENV/bin")
fi
cargo build --release -p infermesh-node --bin infermesh -p infermesh-e2e --bin dataplane --bin extproc-null --bin forwarder
TARGET=${CARGO_TARGET_DIR:-target}
exec "$TARGET/release/dataplane" --envoy "$ENVOY" "${ROUTERS[@]}" \
  --out "$ROOT/bench/results/dataplane.md" "${ARGS[@]}"
