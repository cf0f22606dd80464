#!/usr/bin/env bash
# Coverage-guided fuzzing of every parser and protocol state machine that reads untrusted
# input, with AFL++ through cargo-afl on the stable toolchain (no nightly needed).
#
#   scripts/fuzz.sh --seconds 10                # short run (CI): every target, 10 s each
#   scripts/fuzz.sh --execs 1000000 --report bench/results/fuzz.md   # the long run
#   scripts/fuzz.sh --targets prom_text,openai_body --seconds 60
#
# Seeds come from the repository (fixtures, example configs, the tests' message shapes);
# findings stay in target/fuzz-out/<target>/default/{crashes,hangs}. Exits non-zero when
# any target saved a crash.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
TARGETS="openai_body,prom_text,epp_config,policy_yaml,endpoints_file,mesh_frame,gossip_datagram,xds_requests,ext_proc_sequence"
SECONDS_EACH=""
EXECS=""
REPORT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) SECONDS_EACH="$2"; shift 2 ;;
    --execs) EXECS="$2"; shift 2 ;;
    --targets) TARGETS="$2"; shift 2 ;;
    --report) REPORT="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ -z "$SECONDS_EACH$EXECS" ]; then SECONDS_EACH=10; fi

# cargo-afl from crates.io; it builds AFL++ (afl-fuzz and the LLVM runtime) for this rustc.
if ! cargo afl --version >/dev/null 2>&1; then
  cargo install cargo-afl --locked --quiet
fi
cargo afl config --build >/dev/null 2>&1 || true

export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$ROOT/target/fuzz}"
(cd fuzz && cargo afl build --release --quiet)
BIN="$CARGO_TARGET_DIR/release"

CORPUS="$ROOT/target/fuzz-corpus"
OUT="$ROOT/target/fuzz-out"
rm -rf "$CORPUS" "$OUT"
mkdir -p "$CORPUS" "$OUT"
"$BIN/make_seeds" "$CORPUS"
seed() { # seed TARGET FILE...
  mkdir -p "$CORPUS/$1"; local t=$1; shift
  for f in "$@"; do [ -f "$f" ] && cp "$f" "$CORPUS/$t/$(echo "$f" | tr '/' '_')"; done
}
seed epp_config scheduler/tests/fixtures/*.yaml deploy/configs/*.yaml deploy/examples/epp-config.yaml
seed policy_yaml deploy/examples/pool.yaml deploy/kubernetes/examples/gateway-api/inferencepool.yaml \
  deploy/kubernetes/examples/gateway-api/objectives.yaml deploy/examples/epp-config.yaml
seed endpoints_file deploy/examples/pool.yaml
mkdir -p "$CORPUS/prom_text" "$CORPUS/openai_body"
printf '# HELP vllm:num_requests_running Running.\n# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name="m"} 3\nvllm:num_requests_waiting{model_name="m"} 1\nvllm:kv_cache_usage_perc{model_name="m"} 0.25\nvllm:lora_requests_info{running_lora_adapters="a,b",max_lora="4",waiting_lora_adapters=""} 1.7e9\n' > "$CORPUS/prom_text/vllm"
printf '# TYPE sglang:num_running_reqs gauge\nsglang:num_running_reqs{model_name="m"} 2.0\nsglang:token_usage{model_name="m"} 0.5\n' > "$CORPUS/prom_text/sglang"
printf '\x00{"model":"m","prompt":"hello there","max_tokens":8}' > "$CORPUS/openai_body/completions"
printf '\x01{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":[{"type":"text","text":"hi"},{"type":"image_url","image_url":{"url":"data:x"}}]}],"tools":[{"type":"function","function":{"name":"f","parameters":{}}}],"stream":true}' > "$CORPUS/openai_body/chat"
printf '\x03{"model":"m","instructions":"x","input":[{"role":"user","content":"hi"}]}' > "$CORPUS/openai_body/responses"
printf '\x04{"model":"m","system":"s","messages":[{"role":"user","content":"hi"}],"max_tokens":5}' > "$CORPUS/openai_body/anthropic"
printf '\x05{"token_ids":[1,2,3],"sampling_params":{"max_tokens":4}}' > "$CORPUS/openai_body/vllm"

export AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_AFFINITY=1 AFL_QUIET=1
rows=()
crashed=0
IFS=',' read -ra LIST <<< "$TARGETS"
for t in "${LIST[@]}"; do
  limit=(-V "$SECONDS_EACH")
  [ -n "$EXECS" ] && limit=(-E "$EXECS")
  echo "fuzzing $t (${limit[*]})"
  cargo afl fuzz "${limit[@]}" -i "$CORPUS/$t" -o "$OUT/$t" -- "$BIN/$t" >"$OUT/$t.log" 2>&1 || {
    echo "afl-fuzz failed on $t:"; tail -20 "$OUT/$t.log"; exit 1; }
  stats="$OUT/$t/default/fuzzer_stats"
  get() { awk -F' *: *' -v k="$1" '$1==k {print $2}' "$stats"; }
  crashes=$(get saved_crashes); hangs=$(get saved_hangs)
  rows+=("| $t | $(get execs_done) | $(get execs_per_sec) | $(get edges_found) | $(get bitmap_cvg) | $(get corpus_count) | $crashes | $hangs | $(get run_time) |")
  if [ "${crashes:-0}" != 0 ]; then
    crashed=1
    echo "CRASH in $t: $(ls "$OUT/$t/default/crashes" | head -5)"
  fi
done
table="| target | execs | execs/s | edges found | map coverage | corpus | crashes | hangs | seconds |
|---|---|---|---|---|---|---|---|---|
$(printf '%s\n' "${rows[@]}")"
echo "$table"
if [ -n "$REPORT" ]; then
  {
    echo "# Fuzzing (AFL++ via cargo-afl, stable Rust)"
    echo
    echo "Measured by \`scripts/fuzz.sh ${EXECS:+--execs $EXECS}${SECONDS_EACH:+--seconds $SECONDS_EACH}\` on $(date -u +%Y-%m-%d), $(nproc) cores shared with other work; \`edges found\` is AFL++'s count of covered edges (map coverage is the share of its bitmap)."
    echo
    echo "$table"
  } > "$REPORT"
fi
exit $crashed
