#!/usr/bin/env bash
# The project's test command (README): installs what the tests need, then runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-test-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace --all-targets
# --all-targets leaves doctests out; they run here.
cargo test --workspace --doc
