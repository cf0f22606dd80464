#!/usr/bin/env bash
# Checks that sglang-router and vllm-router (policy cache_aware) serve through infermesh-sim and
# that vllm-router routes by cache (it reads token_ids from /v1/*/render).
# Needs: VENV with `pip install sglang-router vllm-router`; infermesh-sim built.
# Usage: VENV=/tmp/venv sim/scripts/peer-routers-smoke.sh
# Stops everything it started (by PID) on exit.
set -euo pipefail
VENV=${VENV:?set VENV to a virtualenv holding sglang-router and vllm-router}
SIM=${SIM:-target/release/infermesh-sim}
BASE=${BASE:-18800}
MODEL=meta-llama/Llama-3.1-8B-Instruct
LOGS=$(mktemp -d)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true' EXIT

"$SIM" --pods 4 --base-port "$BASE" > "$LOGS/sim.log" 2>&1 & PIDS+=($!)
W=$(seq -f 'http://127.0.0.1:%g' "$BASE" $((BASE + 3)))
"$VENV/bin/vllm-router" --worker-urls $W --policy cache_aware --host 127.0.0.1 --port $((BASE + 10)) \
  --prometheus-port $((BASE + 20)) --worker-startup-check-interval 1 --log-level debug \
  > "$LOGS/vllm-router.log" 2>&1 & PIDS+=($!)
"$VENV/bin/sglang-router" launch --worker-urls $W --policy cache_aware --host 127.0.0.1 \
  --port $((BASE + 11)) --prometheus-port $((BASE + 21)) --worker-startup-check-interval 1 \
  > "$LOGS/sglang-router.log" 2>&1 & PIDS+=($!)

for port in $((BASE + 10)) $((BASE + 11)); do
  ready=no
  for _ in $(seq 1 60); do
    sleep 0.5
    # sglang-router answers 422 without "model": always send it.
    if curl -s -m 5 -X POST "http://127.0.0.1:$port/v1/completions" -H 'content-type: application/json' \
        -d "{\"model\":\"$MODEL\",\"prompt\":\"ready?\",\"max_tokens\":1}" | grep -q text_completion; then
      ready=yes; break
    fi
  done
  echo "router on $port ready: $ready"
  [ "$ready" = yes ] || { tail -20 "$LOGS"/*router.log; exit 1; }
  for i in 1 2 3 4 5 6; do
    prompt=$(printf "group $((i % 2)) system prompt text. %.0s" $(seq 1 40))
    curl -sf -m 5 -o /dev/null -X POST "http://127.0.0.1:$port/v1/chat/completions" \
      -H 'content-type: application/json' \
      -d "{\"model\":\"$MODEL\",\"messages\":[{\"role\":\"user\",\"content\":\"$prompt q$i\"}],\"max_tokens\":4,\"stream\":true}"
  done
done
decisions=$(grep -c 'Cache prefix decision' "$LOGS/vllm-router.log" || true)
problems=$(grep -cE 'render_unavailable|invalid_token_ids' "$LOGS/vllm-router.log" || true)
echo "vllm-router cache decisions: $decisions, render problems: $problems (logs in $LOGS)"
[ "$problems" = 0 ] && [ "$decisions" -gt 0 ]
