#!/usr/bin/env python3
"""Renders every kustomization under deploy/kubernetes and validates what it renders.

- Built-in kinds (apps/v1, v1, rbac, policy, apiextensions …) are checked strictly against
  the Kubernetes JSON schemas that kubernetes-validate ships, for --kubernetes-version.
- Custom resources whose CRD lives in deploy/kubernetes/crds (InferencePool,
  InferenceObjective, InferenceModelRewrite) are checked against that CRD's own
  openAPIV3Schema, with unknown fields refused as the API server's pruning would drop them.
- Kinds of other projects (Gateway API's HTTPRoute, the Prometheus Operator's
  ServiceMonitor) have no schema here: they are listed as such, never silently passed.

Exits non-zero naming the overlay, the object and the failing field.
Usage: check-kubernetes.py [--kubectl PATH] [--kubernetes-version 1.33.0]
"""
import argparse
import copy
import pathlib
import subprocess
import sys

import jsonschema
import kubernetes_validate
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
FOREIGN = {("gateway.networking.k8s.io", "HTTPRoute"), ("monitoring.coreos.com", "ServiceMonitor")}


def kustomizations():
    return sorted(p.parent for p in ROOT.rglob("kustomization.yaml"))


def render(kubectl, path):
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{path.relative_to(ROOT)}: kubectl kustomize failed:\n{out.stderr}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def structural(schema):
    """The CRD schema as JSON Schema: x-kubernetes-* keys dropped, objects closed."""
    s = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            for k in [k for k in node if k.startswith("x-kubernetes-")]:
                del node[k]
            if node.get("type") == "object" and "properties" in node:
                node.setdefault("additionalProperties", False)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(s)
    # metadata is the API server's; only its name is required here.
    s["properties"]["metadata"] = {"type": "object", "required": ["name"]}
    return s


def crd_schemas(kubectl):
    schemas = {}
    for doc in render(kubectl, ROOT / "crds"):
        spec = doc["spec"]
        for v in spec["versions"]:
            key = (f"{spec['group']}/{v['name']}", spec["names"]["kind"])
            schemas[key] = structural(v["schema"]["openAPIV3Schema"])
    return schemas


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kubectl", default="kubectl")
    ap.add_argument("--kubernetes-version", default="1.33.0")
    args = ap.parse_args()
    schemas = crd_schemas(args.kubectl)
    failures, unchecked, checked = [], set(), 0
    for path in kustomizations():
        where = path.relative_to(ROOT)
        docs = render(args.kubectl, path)
        if not docs:
            failures.append(f"{where}: renders nothing")
        for doc in docs:
            api, kind = doc.get("apiVersion", ""), doc.get("kind", "")
            name = (doc.get("metadata") or {}).get("name", "?")
            what = f"{where}: {kind} {name}"
            group = api.rsplit("/", 1)[0] if "/" in api else ""
            if (api, kind) in schemas:
                errors = sorted(
                    jsonschema.Draft7Validator(schemas[(api, kind)]).iter_errors(doc),
                    key=lambda e: list(e.path),
                )
                for e in errors:
                    field = ".".join(str(p) for p in e.path) or "(root)"
                    failures.append(f"{what}: {field}: {e.message}")
            elif (group, kind) in FOREIGN:
                if not name or name == "?":
                    failures.append(f"{what}: metadata.name missing")
                unchecked.add(f"{api} {kind}")
                continue
            else:
                try:
                    kubernetes_validate.validate(doc, args.kubernetes_version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    field = ".".join(str(p) for p in e.path) or "(root)"
                    failures.append(f"{what}: {field}: {e.message}")
                except kubernetes_validate.SchemaNotFoundError:
                    failures.append(f"{what}: no schema for {api} {kind} (add its CRD)")
            checked += 1
        print(f"{where}: {len(docs)} objects")
    for u in sorted(unchecked):
        print(f"not schema-checked (no schema shipped for this kind): {u}")
    if failures:
        print("\n".join(failures), file=sys.stderr)
        raise SystemExit(f"{len(failures)} problem(s)")
    print(f"ok: {checked} objects valid against Kubernetes {args.kubernetes_version} and the CRDs")


main()
