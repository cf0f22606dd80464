#!/usr/bin/env bash
# Mesh end-to-end benchmark: fleet cache hit rate and TTFT for 1, 3, 5 sharing nodes and
# 3 independent replicas; load convergence, failure detection, mesh bytes per request.
# Writes bench/results/mesh-e2e.md. Only loopback traffic; takes a few minutes.
#
#   bench/mesh-e2e/run.sh [--requests N] [--qps Q] [--out FILE]
set -euo pipefail
cd "$(dirname "$0")/../.."
exec cargo run --release -p infermesh-e2e --bin mesh-e2e -- "$@"
