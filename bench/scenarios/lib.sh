# Shared by the scenario scripts (sourced, not run).

# Waits (bounded) until `curl ARGS...` succeeds: wait_for WHAT SECS ARGS...
wait_for() {
  local what="$1" secs="$2"; shift 2
  local deadline=$((SECONDS + secs))
  until curl -fsS -o /dev/null --max-time 5 "$@" 2>/dev/null; do
    [ $SECONDS -lt $deadline ] || { echo "$(basename "$0"): $what not ready after ${secs}s" >&2; return 1; }
    sleep 0.5
  done
}

# Prints the endpoints file of a simulated fleet: pool `sim` serving MODEL, PODS pods on
# 127.0.0.1 from BASE_PORT up: pool_yaml PODS BASE_PORT MODEL
pool_yaml() {
  local pods="$1" base="$2" model="$3"
  echo "apiVersion: inference.networking.k8s.io/v1"
  echo "kind: InferencePool"
  echo "metadata: {name: sim}"
  echo "spec:"
  echo "  selector: {matchLabels: {app: sim}}"
  echo "  targetPorts: [{number: $base}]"
  echo "models: [$model]"
  echo "pods:"
  for ((i = 0; i < pods; i++)); do
    echo "- {name: sim-$i, address: 127.0.0.1, labels: {app: sim}, targetPorts: [{number: $((base + i))}]}"
  done
}
