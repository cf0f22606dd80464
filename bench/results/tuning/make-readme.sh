#!/usr/bin/env bash
# Regenerates README.md from the saved reports and run logs (tables via infermesh-bench table).
cd "$(dirname "$0")/../../.."
T=$(bench/results/tuning/tables.sh)
sect() { printf '%s\n' "$T" | sed -n "/^## $1\$/,/^## /p" | sed '1d;/^## /d'; }
{
cat <<'MD'
# Scheduler-config tuning: shared-prefix scenario

Goal (issue 7): on one node, at least the best peer's hit rate and ≤ 0.7× its TTFT p90.
Every row below was produced by `infermesh-bench` (`run`, then `table`); the only edit is
the `label` field of each saved report, set to the config's name (the run's directory
name) so the rows can share one table. Raw reports:
`explore/`, `full/`, `full-repeat/` (one directory per config, as `run.sh` writes them);
relabelled copies in `reports/`; configs in `configs/`; start/end time and load average
of every run in `*-log.txt`. The machine has 2 cores shared with other helpers' builds
and benchmarks; the load average during these runs was 2.9–7.6, so latencies carry
that noise (vllm-router measured 408, 677 and 434 ms p90 in three runs of the same seeded workload).

How each infermesh row was run (peers: `bench/scenarios/run.sh shared-prefix vllm-router`
with the same environment):

    SKIP_BUILD=1 BASE_PORT=28100 ROUTER_PORT=28090 DURATION_S=60 \
      OUT_DIR=bench/results/tuning/explore/NAME \
      bench/scenarios/run-with-config.sh bench/results/tuning/configs/NAME.yaml shared-prefix infermesh

(`DURATION_S=120`, the scenario's own value, for `full/` and `full-repeat/`.)
`run-with-config.sh` is `run.sh` with `--config-file CONFIG` appended to `infermesh serve`.
`run-configs.sh PHASE DURATION_S CONFIG...` ran them back to back (logging load average);
`make-readme.sh` rebuilds this file (tables from `tables.sh`, i.e. `infermesh-bench table`).

## Where the p90 comes from

- The workload is a shuffled list of 500 groups × 5 prompts of which the run sends the
  first 692 (60 s) or 1394 (120 s). Requests are 7,200 prompt tokens (6,000 shared + 1,200
  unique) and fleet query tokens / requests = 7,200 exactly. A warm request can hit at
  most 6,000 of them, so the oracle hit rate (53.6% full, 34.6% short) means at least
  1 − 0.536/0.833 = 36% (full) and 58% (short) of requests are cold: first of their group.
- A cold request prefills 7,200 tokens: 5 ms + 7,200 × 50 µs = 365 ms on an idle
  llama-8b-h100 sim pod (warm: 1,200 tokens, 65 ms). With more than 10% cold requests, the
  p90 is a cold request's TTFT for every router, so **no router can get the p90 much
  below ~365 ms on this workload**: round robin (all cold, no queueing) measures 377/380
  ms p50/p90. The best peer's 408 ms p90 from `bench/results/shared-prefix` is 1.1× that
  floor; 0.7 × 408 = 286 ms is below it. The target is unreachable here by construction;
  what routing controls is how far above the floor the cold tail sits.
- Above the floor, the tail is cold prefills stacking on one pod. With the llm-d default,
  a cold request's prefix score is 0 everywhere and `queue-scorer` is a tie (the sim's
  chunked prefill admits requests at once, so the waiting queue is mostly 0), leaving
  `kv-cache-utilization-scorer` (usage = blocks held by running sequences) as the decider:
  the least-used pod wins every cold request until a scrape (every 50 ms) shows the new
  blocks, and a request that arrives mid-step (a cold step lasts 365 ms) holds no blocks
  until the step ends. c1 and c6 show that adding the in-flight `active-request-scorer`
  does not undo it while the scraped scorers stay, and c5 that in-flight counts alone do
  not fix it either (each request spends ~0.9 s decoding, which dominates the count but
  barely delays a prefill). What fixes it is `no-hit-lru-scorer`, which rotates cold
  requests over the pods least recently given one, at pick time (c2, c3, c4, c7: p90 at
  the floor).
- The node does feed in-flight counts: `node/src/dispatch.rs` `issue()` calls
  `EndpointSlot::acquire` on the primary right after the pick, the `Ticket` releases it at
  completion or drop, and `pool.rs` `to_endpoint()` puts `fleet_in_flight()` (own plus
  mesh-reported) into `Endpoint.in_flight`; `infermesh_endpoint_in_flight_requests`
  showed 0–4 per pod during a run.

## Exploration (60 s, 692 requests, seed 1)

MD
sect explore
printf '\nRun times and load average (1/5/15 min) at start and end:\n\n```\n'; cat bench/results/tuning/explore-log.txt; printf '```\n'
cat <<'MD'

Configs (full text in `configs/`): c0 llm-d default (queue 2, kv-util 2, prefix 3);
c1 c0 + active-request 2; c2 prefix 3, active-request 2, no-hit-lru 1; c3 prefix 3,
token-load (queueThresholdTokens 32768) 2, no-hit-lru 1; c4 prefix-cache-affinity-filter
(0.5, no exploration) then prefix 1, active-request 2, no-hit-lru 1; c5 prefix 3,
active-request 2; c6 queue 2, prefix 3, active-request 2; c7 prefix 3, no-hit-lru 1.

## Full scenario (120 s, 1394 requests, seed 1)

MD
sect full
printf '\nRun times and load average at start and end:\n\n```\n'; cat bench/results/tuning/full-log.txt; printf '```\n'
cat <<'MD'

## Repeat of the winner and the best peer, back to back

MD
sect full-repeat
printf '\nRun times and load average at start and end:\n\n```\n'; cat bench/results/tuning/full-repeat-log.txt; printf '```\n'
if [ -f bench/results/tuning/shipped-log.txt ] && ls bench/results/tuning/shipped/*/shared-prefix/*.json >/dev/null 2>&1; then
cat <<'MD'

## The shipped file itself (`deploy/configs/infermesh-recommended.yaml`, same plugins as c2)

MD
sect shipped
printf '\nRun times and load average at start and end:\n\n```\n'; cat bench/results/tuning/shipped-log.txt; printf '```\n'
fi
cat <<'MD'

## Verdict

Shipped: `deploy/configs/infermesh-recommended.yaml` = c2 (prefix-cache-scorer 3,
active-request-scorer 2, no-hit-lru-scorer 1; llm-d types and defaults only).

- Hit rate: met. 52.1%, 52.2% and 52.1% in three full runs of this config, against vllm-router's 52.1% (its
  repeat here and `bench/results/shared-prefix`) and the llm-d default's 52.2% (oracle 53.6%).
- TTFT p90 ≤ 0.7× the best peer: **not met, and not reachable on this workload**. c2's
  p90 is 379 ms in all three full runs, ~14 ms above the 365 ms prefill of a cold
  request, which is more than a third of the requests. Against vllm-router that is
  0.87× (434 ms, repeat run) or 0.93× (408 ms, `bench/results/shared-prefix`); the
  0.56× against its 677 ms run is not claimed, because that run was disturbed (load average
  7.6, p50 368 ms, hit rate 51.3%). 0.7 × 408 = 286 ms is below the cold-prefill floor. Against
  the llm-d default config, p90 falls from 579 to 379 ms (0.65×).
- Where balance does show: TTFT p99 483/496 ms vs vllm-router's 770/775 ms (0.63–0.64×)
  and the llm-d default's 1031 ms (0.47×).
- To test the 0.7× target meaningfully, the scenario needs a p90 set by queueing rather
  than by cold prefills, i.e. fewer than 10% cold requests: e.g. more prompts per group
  or a longer run over fewer groups (then the oracle is higher too). That change belongs
  to `bench/scenarios/run.sh` (not edited here).
MD
} > bench/results/tuning/README.md
