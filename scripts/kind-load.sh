#!/usr/bin/env bash
# Build the controller image and load it into the kind cluster's nodes.
# Needs kind and docker or podman; not exercised by CI (see docs/controller.md).
#   KIND_CLUSTER      cluster name          (default: noderedirect)
#   IMAGE             image tag             (default: noderedirect:dev, as in deploy/daemonset.yaml)
#   CONTAINER_ENGINE  docker or podman      (default: docker)
set -euo pipefail
cd "$(dirname "$0")/.."

name=${KIND_CLUSTER:-noderedirect}
image=${IMAGE:-noderedirect:dev}
engine=${CONTAINER_ENGINE:-docker}

"$engine" build -f deploy/Dockerfile -t "$image" .
if [ "$engine" = docker ]; then
  kind load docker-image "$image" --name "$name"
else
  archive=$(mktemp --suffix=.tar)
  trap 'rm -f "$archive"' EXIT
  "$engine" save -o "$archive" "$image"
  kind load image-archive "$archive" --name "$name"
fi
echo "kind-load: $image loaded into $name"
