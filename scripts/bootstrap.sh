#!/usr/bin/env bash
# Install what noderedirect needs on a Debian/Ubuntu machine (as root) and build .venv.
# Idempotent: apt runs only for packages that are missing; pip only when setup.cfg changed.
set -euo pipefail
cd "$(dirname "$0")/.."

pkgs=(iptables ipset nftables libnftables1 iproute2 python3 python3-venv python3-pip tcpdump conntrack curl make
      librsvg2-2 libcairo2 fonts-dejavu-core)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "bootstrap: missing packages ${missing[*]}; run as root (or with sudo)" >&2
    exit 1
  fi
  echo "bootstrap: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

VENV=${VENV:-.venv}
stamp="$VENV/.installed"
if [ ! -x "$VENV/bin/python" ] || [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ]; then
  echo "bootstrap: creating $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -e '.[test]'
  touch "$stamp"
fi
