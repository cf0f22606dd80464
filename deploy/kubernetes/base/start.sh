#!/bin/sh
# Entry point of an infermesh StatefulSet pod. Ordinal 0 forms the policy cluster the first
# time it starts; every other ordinal joins through ordinal 0's admin API. Once the data
# volume holds cluster state both flags are ignored, so a restarted pod (any ordinal)
# simply rejoins. Gossip seeds are the stable DNS names of the first three ordinals on the
# headless Service, resolved again on every join attempt until a member answers. Every
# node watches the Kubernetes API (pools, pods, objectives, rewrites, the config); the
# Raft leader alone writes what it sees into policy.
set -eu
: "${POD_IP:?set from status.podIP}"
: "${POD_NAMESPACE:?set from metadata.namespace}"
: "${INFERMESH_PEER_SERVICE:=infermesh-mesh}"
set_name="${HOSTNAME%-*}"
ordinal="${HOSTNAME##*-}"
peers="${INFERMESH_PEER_SERVICE}.${POD_NAMESPACE}.svc"
first="${set_name}-0.${peers}"
seeds="${first}:7946,${set_name}-1.${peers}:7946,${set_name}-2.${peers}:7946"
if [ "$ordinal" = 0 ]; then
  set -- --bootstrap --admin-token-file /etc/infermesh/secrets/admin-tokens "$@"
else
  set -- --join "${first}:9191" "$@"
fi
exec infermesh serve \
  --node-name "$HOSTNAME" \
  --gossip-addr "${POD_IP}:7946" \
  --mesh-addr "${POD_IP}:7947" \
  --seeds "$seeds" \
  --cluster-key-file /etc/infermesh/secrets/cluster-key \
  --data-dir /var/lib/infermesh \
  --admin-addr 0.0.0.0:9191 \
  --ext-proc-addr 0.0.0.0:9002 \
  --advertise-ext-proc-addr "${POD_IP}:9002" \
  --proxy-addr 0.0.0.0:8080 \
  --metrics-addr 0.0.0.0:9090 \
  --config-file /etc/infermesh/config/epp-config.yaml \
  --kubernetes \
  --kubernetes-namespace "$POD_NAMESPACE" \
  --kubernetes-config-map infermesh-epp-config/epp-config.yaml \
  "$@"
