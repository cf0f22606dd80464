#!/usr/bin/env bash
# Runs the shared-prefix scenario once per config (or "vllm-router"), one after another,
# logging start/end time and load average: run-configs.sh PHASE DURATION_S CONFIG...
cd "$(dirname "$0")/../../.."
phase=$1; dur=$2; shift 2
for c in "$@"; do
  name=$(basename "$c" .yaml)
  echo "### $name start $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)" >> bench/results/tuning/$phase-log.txt
  if [ "$name" = vllm-router ]; then
    SKIP_BUILD=1 BASE_PORT=28100 ROUTER_PORT=28090 DURATION_S=$dur OUT_DIR=bench/results/tuning/$phase/$name bench/scenarios/run.sh shared-prefix vllm-router > /tmp/tune-$phase-$name.log 2>&1
  else
    SKIP_BUILD=1 BASE_PORT=28100 ROUTER_PORT=28090 DURATION_S=$dur OUT_DIR=bench/results/tuning/$phase/$name bench/scenarios/run-with-config.sh "$c" shared-prefix infermesh > /tmp/tune-$phase-$name.log 2>&1
  fi
  echo "### $name end $(date -u +%T) rc=$? load $(cut -d' ' -f1-3 /proc/loadavg)" >> bench/results/tuning/$phase-log.txt
done
