"""Helpers shared by the lab's end-to-end tests and their fixtures (importable by both)."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess

from helpers import netns_unavailable
from noderedirect import names

PREFIX_BASE = f"nrt{secrets.token_hex(2)}"
_COUNT = [0]
PREFIXES: set[str] = set()
GUARDED_PRIOS = set(names.LEGACY_NODE_RULE_PRIOS) | set(names.LEGACY_ZTUNNEL_RULE_PRIOS)


why_not = netns_unavailable


SKIP = why_not()


def new_prefix() -> str:
    """A lab prefix no other lab of this machine uses."""
    _COUNT[0] += 1
    prefix = f"{PREFIX_BASE}{_COUNT[0]}-"
    PREFIXES.add(prefix)
    return prefix


def lab_netns(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return sorted(l.split()[0] for l in out.splitlines() if l.startswith(prefix))


def kernel_tunnels() -> tuple[str, ...]:
    """The tunnel drivers this kernel can run (geneve only when the kernel has GENEVE)."""
    if SKIP:
        return ("usergeneve", "vxlan")
    from noderedirect.tunnels.geneve import kernel_has_geneve

    probe = f"nr-probe-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", probe], check=True)
    try:
        has = kernel_has_geneve(f"/var/run/netns/{probe}")
    finally:
        subprocess.run(["ip", "netns", "del", probe])
    return ("usergeneve", "vxlan") + (("geneve",) if has else ())


def nft_refused(e: BaseException) -> bool:
    """The engine's own refusal of the native nft backend (not any other failure)."""
    text = str(e)
    return "nft" in text and "not implemented" in text


def drop(prefix: str) -> None:
    from noderedirect.lab import topology

    topology.down(prefix)
    assert lab_netns(prefix) == []


