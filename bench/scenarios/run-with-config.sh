#!/usr/bin/env bash
# Runs bench/scenarios/run.sh with infermesh started from an EndpointPickerConfig file
# (`infermesh serve --config-file`), so scheduler configs can be compared on the same
# seeded workload. run.sh itself is unchanged: this script points its BIN_DIR at a private
# directory whose `infermesh` execs the real binary with `--config-file CONFIG` appended
# (exec keeps the PID run.sh stops), and whose sim and bench are links to the real ones.
#
# Usage: bench/scenarios/run-with-config.sh CONFIG.yaml SCENARIO [ROUTER ...]
#   Every other setting is run.sh's environment (QPS, DURATION_S, OUT_DIR, SKIP_BUILD, ...).
#   Only the infermesh leg uses CONFIG; peers and round robin run as in run.sh.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CONFIG="${1:-}"
shift || true
[ -f "$CONFIG" ] || { echo "run-with-config.sh: config file '$CONFIG' not found (usage: run-with-config.sh CONFIG.yaml SCENARIO [ROUTER ...])" >&2; exit 1; }
CONFIG="$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")"
REAL_BIN_DIR="${BIN_DIR:-$ROOT/target/release}"

SHIM="$(mktemp -d "${TMPDIR:-/tmp}/infermesh-config-bin.XXXXXX")"
trap 'rm -rf "$SHIM"' EXIT
ln -s "$REAL_BIN_DIR/infermesh-sim" "$SHIM/infermesh-sim"
ln -s "$REAL_BIN_DIR/infermesh-bench" "$SHIM/infermesh-bench"
cat >"$SHIM/infermesh" <<SH
#!/usr/bin/env bash
exec "$REAL_BIN_DIR/infermesh" "\$@" --config-file "$CONFIG"
SH
chmod +x "$SHIM/infermesh"

BIN_DIR="$SHIM" "$ROOT/bench/scenarios/run.sh" "$@"
