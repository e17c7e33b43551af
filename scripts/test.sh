#!/usr/bin/env bash
# The whole test suite: unit + golden (pure) and netns (real kernel, root; each test makes and
# removes its own namespaces). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/python -m pytest "$@"
