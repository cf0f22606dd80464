#!/usr/bin/env bash
# The CI-sized chaos run (issue: chaos suite): kill, pause of the ADS node and a partition,
# two rounds each, under traffic through Envoy and concurrent policy writes. Fails when an
# invariant breaks (a lost acknowledged write, no convergence, a request failing after the
# detection window). Network namespaces when this machine can make them (root, iproute2,
# nftables); otherwise loopback, where the partition is skipped and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
# The same target set and features as the test build, so nothing is compiled twice (building
# three binaries alone resolves other features and rebuilt half the tree, doubling the disk).
cargo build --workspace --all-targets
TARGET=${CARGO_TARGET_DIR:-target}
mode=loopback
probe="imchaos-probe-$$"
if command -v nft >/dev/null && ip netns add "$probe" 2>/dev/null; then
  ip netns del "$probe"
  mode=netns
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$TARGET/debug/infermesh-chaos" run --scenario ci --seed "${CHAOS_SEED:-12}" --mode "$mode" --out "$out"
