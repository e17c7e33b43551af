#!/usr/bin/env bash
# Create the kind cluster for the experiments and wait for its nodes.
# Needs kind, kubectl and a container engine; not exercised by CI (see docs/controller.md).
#   KIND_CLUSTER     cluster name        (default: noderedirect)
#   KIND_CONFIG      cluster definition  (default: kind-config/kind-3nodes.yaml)
#   KIND_NODE_IMAGE  node image, e.g. a v1.28 kindest/node for Istio 1.20 (default: kind's)
set -euo pipefail
cd "$(dirname "$0")/.."

name=${KIND_CLUSTER:-noderedirect}
config=${KIND_CONFIG:-kind-config/kind-3nodes.yaml}

if kind get clusters 2>/dev/null | grep -qx "$name"; then
  echo "kind-up: cluster $name already exists"
else
  args=(create cluster --name "$name" --config "$config")
  if [ -n "${KIND_NODE_IMAGE:-}" ]; then
    args+=(--image "$KIND_NODE_IMAGE")
  fi
  kind "${args[@]}"
fi
kubectl --context "kind-$name" wait --for=condition=Ready nodes --all --timeout=300s
kubectl --context "kind-$name" get nodes -o wide
