#!/usr/bin/env bash
# Precise (KV-event) vs approximate prefix routing under drift: fleet hit rate and TTFT
# for precise, approximate and round-robin at 1 and 3 nodes (precise also at 5), event
# lag at 3 nodes, one node's KV-event ingest rate, index memory per node.
# Writes bench/results/precise-e2e.md. Only loopback traffic; takes about 6 minutes.
#
#   bench/precise-e2e/run.sh [--requests N] [--qps Q] [--out FILE]
set -euo pipefail
cd "$(dirname "$0")/../.."
exec cargo run --release -p infermesh-e2e --bin precise-e2e -- "$@"
