#!/usr/bin/env bash
# The demo: install what is missing, build the lab (a kind-like node made of network
# namespaces, with the legacy redirection applied), send sleep -> httpbin and print the path the
# request took, hop by hop. `scripts/demo.sh --rm` removes the lab again at the end.
# Options after --rm (or instead of it) go to `lab up`, e.g. --tunnel vxlan --backend nft.
set -euo pipefail
cd "$(dirname "$0")/.."

rm_after=0
up_args=()
for a in "$@"; do
  case "$a" in
    --rm) rm_after=1 ;;
    *) up_args+=("$a") ;;
  esac
done

if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    exec sudo -E "$0" "$@"
  fi
  echo "demo: the lab creates network namespaces: run as root" >&2
  exit 1
fi

scripts/bootstrap.sh
nr=.venv/bin/noderedirect

if [ "$rm_after" -eq 1 ]; then
  trap '"$nr" lab down >/dev/null || echo "demo: lab down failed; run: $nr lab down" >&2' EXIT
fi

echo "== noderedirect lab up ${up_args[*]:-}"
"$nr" lab up "${up_args[@]}"
echo
echo "== noderedirect lab curl sleep httpbin:8000"
"$nr" lab curl sleep httpbin:8000
echo
if [ "$rm_after" -eq 1 ]; then
  echo "lab removed on exit (--rm). Run scripts/demo.sh without --rm to keep it and look around."
else
  echo "look around: $nr lab curl plain-a httpbin | $nr lab exec sleep -- ip route | $nr lab status; tear down: $nr lab down"
fi
