#!/usr/bin/env bash
# The main job on the bundled example: render the legacy design, then diff it against in-pod.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
nr=.venv/bin/noderedirect
echo "== noderedirect render --mode legacy --values examples/values.yaml"
"$nr" render --mode legacy --values examples/values.yaml
