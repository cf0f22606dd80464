#!/usr/bin/env bash
# The project's test command (README): installs what the tests need, then runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
# No incremental state by default: with every test binary of the workspace it grew past
# 35 GiB here and filled the disk; a full run rebuilds most crates anyway.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
scripts/setup-test-deps.sh
cargo fmt --all -- --check
# Every kustomization under deploy/kubernetes renders and validates (Kubernetes schemas,
# the CRDs' own schemas).
KUBECTL=kubectl
kubectl kustomize --help >/dev/null 2>&1 || KUBECTL=.venv-test/kube/usr/bin/kubectl
.venv-test/bin/python scripts/check-kubernetes.py --kubectl "$KUBECTL"
# No import cycles between the modules of a crate (down to submodules).
for src in scheduler/src gossip/src raft-store/src xds/src node/src; do
  scripts/module-cycles.py "$src" 2
done
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace --all-targets
# --all-targets leaves doctests out; they run here.
cargo test --workspace --doc
# A short coverage-guided fuzzing run of every target (AFL++ via cargo-afl; 5 s each);
# the long run is `scripts/fuzz.sh --execs 1000000 --report bench/results/fuzz.md`.
scripts/fuzz.sh --seconds 5
# The CI-sized chaos run, alone on the machine (it loads every core).
scripts/chaos-ci.sh
