#!/usr/bin/env bash
# Policy (Raft) benchmark on 3 infermesh processes over the QUIC mesh on loopback: write
# latency p50/p99 and writes/s through the admin API, time until every node applied a write,
# recovery time after a leader SIGKILL. Writes bench/results/policy.md.
#
#   bench/policy/run.sh [--writes N] [--clients N] [--writes-per-client N] [--kills N]
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -p infermesh-node --bin infermesh -p infermesh-e2e --bin policy
TARGET=${CARGO_TARGET_DIR:-target}
{
  "$TARGET/release/policy" --out bench/results/policy.md "$@"
} 2>&1
