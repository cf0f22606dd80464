#!/usr/bin/env bash
# Runs a named benchmark scenario end to end, once per router under test:
#   start infermesh-sim (fresh, so every router starts with cold caches), start the router,
#   wait until a real completion succeeds through it, run infermesh-bench, stop the router
#   and the sim (by the PIDs this script started; a trap does it on any exit).
#
# Usage: bench/scenarios/run.sh SCENARIO [ROUTER ...]
#   SCENARIO: shared-prefix | shared-prefix-warm | overload-sweep | smoke | overload-priority
#     (overload-priority runs bench/scenarios/overload-priority.sh; see its header)
#   ROUTER:   round-robin | infermesh | sglang-router | vllm-router   (default: all four)
#
# Environment (defaults in brackets):
#   PODS [8]  PROFILE [llama-8b-h100]  TIME_SCALE [1]  SEED [1]  BASE_PORT [18100]
#   ROUTER_PORT [18090]  OUT_DIR [bench/results]  SKIP_BUILD [0]  BIN_DIR [target/release]
#   REPLICAS [1]: run that many replicas of the router, each over all pods, and spread
#     requests over them at random (an L4 balancer); results are labelled ROUTER-xN.
#   QPS, MAX_REQUESTS, DURATION_S: override the scenario's load.
#   REPORT_ONLY [0]: run nothing; rebuild the scenario's README table (and plot) from the
#     reports already saved.
#   INFERMESH_CONFIG []: EndpointPickerConfig file for the infermesh leg (`infermesh serve
#     --config-file`); its path is saved next to the report and named in the README.
#
# Scenario arithmetic (shared-prefix; printed again at run time from the pods' metrics):
#   The llama-8b-h100 sim profile has num_gpu_blocks=31,250 x block_size=16 = 500,000 KV
#   tokens per pod, 4,000,000 over 8 pods. llm-d's published shared-prefix benchmark uses
#   6,000-token shared prefixes, 1,200-token questions and 5 users per group; we keep that
#   shape and size the number of groups so the prefixes fill 75% of the fleet's KV:
#   groups = round(0.75 x 4,000,000 / 6,000) = 500. A cache-aware router can keep each
#   group's prefix on one pod (62 groups x 6,000 = 375k tokens per pod, 75% of a pod);
#   round robin spreads every group over all pods, so each pod would need 3M tokens of
#   prefixes: it thrashes and nearly every request re-prefills 7,200 tokens.
#   Load: the profile prefills 20k tokens/s per pod (50 us/token). A fully cold request
#   costs ~0.36 s of prefill, so round robin saturates near 8 x 20,000 / 7,200 = 22 req/s;
#   with perfect reuse the mean request prefills 0.2 x 7,200 + 0.8 x 1,200 = 2,400 tokens,
#   so the fleet could take ~66 req/s. 12 QPS is loaded (about half of the cache-blind
#   capacity, where queueing shows) but not overloaded for any router.
#   The oracle hit rate for this workload is about (4/5) x 6000/7200 = 0.67 when every
#   group is sent 5 times (first request per group is a cold miss; questions never hit).
#
# Scenario arithmetic (shared-prefix-warm): the same llm-d shape (6,000-token shared
#   prefixes, 1,200-token questions, 128 output tokens) with few groups and many users per
#   group, so almost every request is warm and the TTFT tail is set by routing, not by
#   unavoidable cold prefills. 48 groups x 25 users = 1,200 requests, sent once each in
#   shuffled order: the first request of each group is cold, 48 / 1,200 = 4% of requests
#   (< 10%). Prefixes: 48 x 6,000 = 288k tokens = 7.2% of the fleet's 4M KV tokens; a
#   cache-aware router keeps ~6 groups (36k tokens) per pod, and even round robin, which
#   caches every group on every pod, needs 288k of a pod's 500k: nothing is evicted, and
#   round robin pays one cold prefill per group per pod, 8 x 48 = 384 of 1,200 (32%).
#   Load, with the shared-prefix method: a request prefills 5 ms + 50 us/token. Perfect
#   reuse: 0.04 x 7,200 + 0.96 x 1,200 = 1,440 tokens (77 ms) per request, so the fleet's
#   prefill capacity is 8 x 20,000 / 1,440 = 111 req/s; cache-blind (round robin, 32%
#   cold): 0.32 x 7,200 + 0.68 x 1,200 = 3,120 tokens (161 ms), 8 x 20,000 / 3,120 = 51
#   req/s. 24 QPS is about half the cache-blind capacity, as 12 QPS is for shared-prefix:
#   3 req/s per pod keeps a pod's prefill busy 0.23 of the time with perfect reuse (more on
#   a pod given more than its share of groups) and 0.48 under round robin, so queueing
#   shows but no router is overloaded. 1,200 requests at 24 QPS take ~50 s (DURATION_S 60
#   only bounds it). Oracle hit rate: (24/25) x 6000/7200 = 0.80.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
# shellcheck source=bench/scenarios/lib.sh
source "$ROOT/bench/scenarios/lib.sh"

SCENARIO="${1:-}"
shift || true
# Flow control under overload has its own legs (objectives, tenants, peer settings).
[ "$SCENARIO" = overload-priority ] && exec "$ROOT/bench/scenarios/overload-priority.sh"
ROUTERS=("$@")
[ ${#ROUTERS[@]} -eq 0 ] && ROUTERS=(round-robin infermesh sglang-router vllm-router)

PODS="${PODS:-8}"
PROFILE="${PROFILE:-llama-8b-h100}"
TIME_SCALE="${TIME_SCALE:-1}"
SEED="${SEED:-1}"
BASE_PORT="${BASE_PORT:-18100}"
ROUTER_PORT="${ROUTER_PORT:-18090}"
REPLICAS="${REPLICAS:-1}"
OUT_DIR="${OUT_DIR:-bench/results}"
BIN_DIR="${BIN_DIR:-$ROOT/target/release}"
MODEL="meta-llama/Llama-3.1-8B-Instruct"
VENV="$ROOT/bench/.venv-peers"

die() { echo "run.sh: $*" >&2; exit 1; }

case "$SCENARIO" in
  shared-prefix)
    SYS_TOKENS=6000; Q_TOKENS=1200; PPG=5; OUT_TOKENS=128; FILL=0.75
    QPS="${QPS:-12}"; MAX_REQUESTS="${MAX_REQUESTS:-1500}"; DURATION_S="${DURATION_S:-120}"
    ;;
  shared-prefix-warm)
    # Sizing in the header: 48 groups x 25 users, 4% cold, 24 QPS.
    SYS_TOKENS=6000; Q_TOKENS=1200; PPG=25; OUT_TOKENS=128; GROUPS_FIXED=48
    QPS="${QPS:-24}"; MAX_REQUESTS="${MAX_REQUESTS:-1200}"; DURATION_S="${DURATION_S:-60}"
    ;;
  overload-sweep)
    # The shared-prefix shape with prefixes filling 25% of the fleet's KV (167 groups), so
    # a 30 s point already repeats groups; offered load from below to ~3x the cache-blind
    # capacity (~22 req/s, see above). Each point uses seed + k: its prefixes start cold.
    SYS_TOKENS=6000; Q_TOKENS=1200; PPG=5; OUT_TOKENS=128; FILL=0.25
    QPS="${QPS:-8,16,32,64}"; MAX_REQUESTS="${MAX_REQUESTS:-2000}"; DURATION_S="${DURATION_S:-30}"
    ;;
  smoke)
    # Seconds-long sanity run of the whole pipeline on small pods.
    SYS_TOKENS=512; Q_TOKENS=64; PPG=4; OUT_TOKENS=16; FILL=0.75; GROUPS_FIXED=4
    PODS="${PODS_SMOKE:-2}"
    QPS="${QPS:-20}"; MAX_REQUESTS="${MAX_REQUESTS:-60}"; DURATION_S="${DURATION_S:-10}"
    ;;
  *) die "usage: bench/scenarios/run.sh shared-prefix|shared-prefix-warm|overload-sweep|smoke [round-robin|infermesh|sglang-router|vllm-router ...]" ;;
esac

if [ "${SKIP_BUILD:-0}" != 1 ] && [ "${REPORT_ONLY:-0}" != 1 ]; then
  cargo build --release -p infermesh-sim -p infermesh-bench
  if printf '%s\n' "${ROUTERS[@]}" | grep -qx infermesh; then
    cargo build --release -p infermesh-node --bin infermesh || echo "run.sh: building infermesh-node failed; its leg will be skipped" >&2
  fi
fi
SIM="$BIN_DIR/infermesh-sim"
BENCH="$BIN_DIR/infermesh-bench"
[ -x "$SIM" ] || die "$SIM not found (build it: cargo build --release -p infermesh-sim)"
[ -x "$BENCH" ] || die "$BENCH not found (build it: cargo build --release -p infermesh-bench)"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/infermesh-bench.XXXXXX")"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  PIDS=()
}
trap 'cleanup; rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM

POD_URLS=()
for ((i = 0; i < PODS; i++)); do POD_URLS+=("http://127.0.0.1:$((BASE_PORT + i))"); done
POD_CSV="$(IFS=,; echo "${POD_URLS[*]}")"


start_sim() {
  "$SIM" --pods "$PODS" --base-port "$BASE_PORT" --profile "$PROFILE" --time-scale "$TIME_SCALE" --seed "$SEED" \
    >"$WORK/sim.log" 2>&1 &
  PIDS+=($!)
  for url in "${POD_URLS[@]}"; do wait_for "pod $url" 30 "$url/health" || { tail -20 "$WORK/sim.log" >&2; return 1; }; done
}

ensure_peers() {
  if [ ! -x "$VENV/bin/sglang-router" ] || [ ! -x "$VENV/bin/vllm-router" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q sglang-router==0.3.2 vllm-router==0.1.17
  fi
}

# Starts replica $2 of the router named $1 on ROUTER_PORT + $2 and appends its URL to
# TARGET_URLS (left empty for client-side round robin). Returns 2 when the router is not
# available (skipped).
start_router() {
  local router="$1" k="$2"
  local port=$((ROUTER_PORT + k)) url="http://127.0.0.1:$((ROUTER_PORT + k))"
  case "$router" in
    round-robin) return 0 ;;
    infermesh)
      local bin="$BIN_DIR/infermesh"
      if [ ! -x "$bin" ] || ! "$bin" serve --help >/dev/null 2>&1; then
        echo "run.sh: SKIP infermesh: $bin has no 'serve' subcommand (build it: cargo build --release -p infermesh-node)" >&2
        return 2
      fi
      local mesh=()
      if [ "$REPLICAS" -gt 1 ]; then
        if ! "$bin" serve --help 2>&1 | grep -q -- '--seeds'; then
          echo "run.sh: SKIP infermesh with REPLICAS=$REPLICAS: 'infermesh serve' has no mesh flags (--seeds), so its nodes would not share state" >&2
          return 2
        fi
        # One mesh: node k gossips on port+400 and joins through node 0.
        [ -f "$WORK/cluster.key" ] || head -c 32 /dev/urandom | base64 >"$WORK/cluster.key"
        mesh=(--node-name "bench-node-$k" --gossip-addr "127.0.0.1:$((port + 400))" --cluster-key-file "$WORK/cluster.key")
        [ "$k" -gt 0 ] && mesh+=(--seeds "127.0.0.1:$((ROUTER_PORT + 400))")
      fi
      pool_yaml "$PODS" "$BASE_PORT" "$MODEL" >"$WORK/pool.yaml"
      local cfg=()
      if [ -n "${INFERMESH_CONFIG:-}" ]; then
        [ -f "$INFERMESH_CONFIG" ] || die "INFERMESH_CONFIG file '$INFERMESH_CONFIG' not found"
        cfg=(--config-file "$INFERMESH_CONFIG")
      fi
      "$bin" serve --proxy-addr "127.0.0.1:$port" --endpoints "$WORK/pool.yaml" \
        --ext-proc-addr "127.0.0.1:$((port + 200))" --metrics-addr "127.0.0.1:$((port + 300))" "${mesh[@]}" "${cfg[@]}" \
        >"$WORK/router-$k.log" 2>&1 &
      PIDS+=($!)
      ;;
    sglang-router)
      ensure_peers >&2
      "$VENV/bin/sglang-router" launch --worker-urls "${POD_URLS[@]}" --policy cache_aware \
        --host 127.0.0.1 --port "$port" --prometheus-port $((port + 100)) \
        --worker-startup-check-interval 1 --log-level warn >"$WORK/router-$k.log" 2>&1 &
      PIDS+=($!)
      ;;
    vllm-router)
      ensure_peers >&2
      "$VENV/bin/vllm-router" --worker-urls "${POD_URLS[@]}" --policy cache_aware \
        --host 127.0.0.1 --port "$port" --prometheus-port $((port + 100)) \
        --worker-startup-check-interval 1 --log-level warning >"$WORK/router-$k.log" 2>&1 &
      PIDS+=($!)
      ;;
    *) die "unknown router $router" ;;
  esac
  # Readiness is a real completion succeeding through the router (sglang-router says
  # "ready" before its workers are registered).
  wait_for "$router" 90 -X POST "$url/v1/completions" -H 'content-type: application/json' \
    -d "{\"model\":\"$MODEL\",\"prompt\":\"ready?\",\"max_tokens\":1}" || { tail -20 "$WORK/router-$k.log" >&2; return 1; }
  TARGET_URLS+=("$url")
}

mkdir -p "$OUT_DIR/$SCENARIO"
REPORTS=()
[ "${REPORT_ONLY:-0}" = 1 ] && ROUTERS=()
for router in "${ROUTERS[@]}"; do
  echo "=== $SCENARIO / $router ===" >&2
  start_sim
  if [ -n "${GROUPS_FIXED:-}" ]; then
    GROUPS_N="$GROUPS_FIXED"
  else
    GROUPS_N="$("$BENCH" size-shared-prefix --metrics "$POD_CSV" --fill "$FILL" --system-prompt-tokens "$SYS_TOKENS")"
  fi
  rc=0
  TARGET_URLS=()
  label="$router"
  replicas=$REPLICAS
  if [ "$router" = round-robin ]; then replicas=1; elif [ "$REPLICAS" -gt 1 ]; then label="$router-x$REPLICAS"; fi
  for ((k = 0; k < replicas; k++)); do
    start_router "$router" "$k" || { rc=$?; break; }
  done
  if [ $rc -eq 0 ] && [ "$router" = infermesh ] && [ "$replicas" -gt 1 ]; then
    # Every node must see the whole mesh before load starts.
    for ((k = 0; k < replicas; k++)); do
      deadline=$((SECONDS + 30))
      until curl -fsS --max-time 2 "http://127.0.0.1:$((ROUTER_PORT + k + 300))/metrics" 2>/dev/null |
        grep -qx "infermesh_mesh_members $replicas"; do
        [ $SECONDS -lt $deadline ] || { echo "run.sh: infermesh node $k does not see $replicas members" >&2; rc=1; break 2; }
        sleep 0.5
      done
    done
  fi
  if [ $rc -ne 0 ]; then
    cleanup
    [ $rc -eq 2 ] && continue
    die "$router did not start"
  fi
  if [ ${#TARGET_URLS[@]} -eq 0 ]; then
    TARGET_ARGS=(--round-robin "$POD_CSV")
  elif [ ${#TARGET_URLS[@]} -eq 1 ]; then
    TARGET_ARGS=(--target "${TARGET_URLS[0]}" --metrics "$POD_CSV")
  else
    TARGET_ARGS=(--random "$(IFS=,; echo "${TARGET_URLS[*]}")" --metrics "$POD_CSV")
  fi
  "$BENCH" run "${TARGET_ARGS[@]}" --model "$MODEL" --label "$label" \
    --workload shared-prefix --groups "$GROUPS_N" --prompts-per-group "$PPG" \
    --system-prompt-tokens "$SYS_TOKENS" --question-tokens "$Q_TOKENS" --output-tokens "$OUT_TOKENS" \
    --qps "$QPS" --max-requests "$MAX_REQUESTS" --duration-s "$DURATION_S" --seed "$SEED" \
    --out-dir "$OUT_DIR/$SCENARIO" --name "$label" >&2
  REPORTS+=("$OUT_DIR/$SCENARIO/$label.json")
  rm -f "$OUT_DIR/$SCENARIO/$label.config"
  if [ "$router" = infermesh ] && [ -n "${INFERMESH_CONFIG:-}" ]; then
    echo "$INFERMESH_CONFIG" >"$OUT_DIR/$SCENARIO/$label.config"
  fi
  cleanup
done

[ ${#REPORTS[@]} -gt 0 ] || [ "${REPORT_ONLY:-0}" = 1 ] || die "no router ran"
# The table and plot cover every router's latest report for this scenario, so legs run
# in separate invocations end up side by side.
REPORTS=()
for r in round-robin infermesh sglang-router vllm-router; do
  for f in "$OUT_DIR/$SCENARIO/$r.json" "$OUT_DIR/$SCENARIO/$r"-x*.json; do
    [ -f "$f" ] && REPORTS+=("$f")
  done
done
{
  echo "# $SCENARIO: $PODS pods, profile $PROFILE, time scale $TIME_SCALE, seed $SEED"
  echo
  echo "Table written $(date -u +%FT%TZ) at commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown) by bench/scenarios/run.sh"
  echo "on a $(nproc)-core machine shared with other work (latencies include that noise)."
  echo "Sizing arithmetic: see the header of bench/scenarios/run.sh."
  [ "$SCENARIO" = overload-sweep ] && echo "TTFT against offered load: ttft-vs-qps.svg (thick p90, thin p50)."
  for f in "${REPORTS[@]}"; do
    c="${f%.json}.config"
    [ -f "$c" ] && echo "$(basename "${f%.json}") ran \`infermesh serve --config-file $(cat "$c")\`."
  done
  if [ "$SCENARIO" = shared-prefix-warm ]; then
    # Every warm request hits exactly its SYS_TOKENS prefix in the oracle (6,000 is a whole
    # number of 16-token blocks; questions never repeat), so the oracle's hit tokens count
    # the warm requests and the rest were cold (first of their group).
    for f in "${REPORTS[@]}"; do
      python3 -c 'import json,sys
for r in json.load(open(sys.argv[1])):
    n = r["requests_sent"]; warm = r["oracle"]["hit_tokens"] // int(sys.argv[2]); cold = n - warm
    print("Cold requests (%s): %d of %d = %.1f%% (first request of their group)." % (r["label"], cold, n, 100 * cold / n))' "$f" "$SYS_TOKENS"
    done
  fi
  echo
  "$BENCH" table "${REPORTS[@]}"
} >"$OUT_DIR/$SCENARIO/README.md"
if [ "$SCENARIO" = overload-sweep ]; then
  "$BENCH" plot "${REPORTS[@]}" --out "$OUT_DIR/$SCENARIO/ttft-vs-qps.svg"
  # The per-router plots `run` draws are superseded by the combined one.
  rm -f "$OUT_DIR/$SCENARIO"/*-ttft.svg
fi
cat "$OUT_DIR/$SCENARIO/README.md"
