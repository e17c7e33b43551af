"""Tunnel drivers: how the rendered istioin/istioout/pistioin/pistioout links become real.

Owns the choice between the three ways to realise a rendered GENEVE link, and the GENEVE
destination-port selection of the original (legacy-mode.md §4.11):

| driver       | what it creates                                                   | needs          |
|--------------|-------------------------------------------------------------------|----------------|
| ``geneve``     | kernel GENEVE devices, exactly as the original                     | CONFIG_GENEVE  |
| ``usergeneve`` | persistent TAP devices + one bridge process per netns (RFC 8926)  | tuntap         |
| ``vxlan``      | kernel VXLAN devices with the same VNIs, remote, port, addresses  | CONFIG_VXLAN   |

Every driver keeps the model.Link shape (name, VNI, remote, dst port, address, up); only
``kind`` tells them apart, so plans and diffs read the same whichever driver runs.
This package is part of the host layer: it is the only place besides ``host.py`` that talks
to the kernel about links.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterable, Optional, Sequence

from .. import model, names

log = logging.getLogger(__name__)

KINDS = ("geneve", "usergeneve", "vxlan")
CHOICES = ("auto",) + KINDS


class TunnelDriver:
    """What apply/plan need from a tunnel implementation. Every method takes the netns path."""

    name: str = ""

    def check(self, node_netns_path: str, zt_netns_path: Optional[str] = None) -> None:
        """Raise MissingFeature (one line: what is missing, what to use instead) before any
        change is made. Must leave both netns exactly as they were."""
        raise NotImplementedError

    def desired(self, link: model.Link) -> model.Link:
        """The rendered link as this driver realises it, comparable with ``observe()``."""
        return dataclasses.replace(link, kind=self.name)

    def observe(self, netns_path: str, names_: Iterable[str]) -> list[model.Link]:
        """The links of those names that exist now, in model.Link shape ([] if none)."""
        raise NotImplementedError

    def ensure(self, netns_path: str, links: Sequence[model.Link]) -> list[str]:
        """Create or repair exactly these links (+address +up). Idempotent: returns the
        human-readable changes made, [] when everything already matched."""
        raise NotImplementedError

    def remove(self, netns_path: str, names_: Iterable[str]) -> list[str]:
        """Remove these links (and anything running for them); absent is fine."""
        raise NotImplementedError

    def extra_rules(self, role: str, links: Sequence[model.Link]) -> list[model.IptRule]:
        """iptables rules the driver needs in the netns of ``role``; [] unless it must make up
        for something the kernel GENEVE device does by itself."""
        return []

    def status(self, netns_path: str) -> dict:
        """Driver-specific runtime facts (counters, processes) for ``status`` output."""
        return {}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


def driver(kind: str) -> TunnelDriver:
    """The driver for an explicit kind (no probing)."""
    if kind == "geneve":
        from .geneve import GeneveDriver
        return GeneveDriver()
    if kind == "vxlan":
        from .vxlan import VxlanDriver
        return VxlanDriver()
    if kind == "usergeneve":
        from .usergeneve import UserGeneveDriver
        return UserGeneveDriver()
    raise ValueError(f"unknown tunnel kind {kind!r} (expected one of {', '.join(CHOICES)})")


def select(kind: str, node_netns_path: str) -> TunnelDriver:
    """The driver for ``kind``; ``auto`` probes the kernel once for GENEVE and falls back to
    user-space GENEVE, saying so in one info line."""
    if kind != "auto":
        return driver(kind)
    from .geneve import GeneveDriver, kernel_has_geneve
    if kernel_has_geneve(node_netns_path):
        log.info("tunnel driver: geneve (kernel GENEVE available)")
        return GeneveDriver()
    log.info("tunnel driver: usergeneve (kernel has no GENEVE; user-space GENEVE over TAP)")
    return driver("usergeneve")


# ---------------------------------------------------------------- GENEVE port (legacy-mode.md §4.11)


def _field(link, *candidates, default=None):
    """Read a link attribute under any of its usual spellings (LinkInfo, model.Link, dicts)."""
    for c in candidates:
        if isinstance(link, dict):
            if link.get(c) is not None:
                return link[c]
        elif getattr(link, c, None) is not None:
            return getattr(link, c)
    return default


def geneve_port(links: Iterable, zt_ip: str,
                own_names: frozenset = frozenset(names.OWNED_LINKS)) -> int:
    """The GENEVE destination port the original would pick, given the node's links.

    Start at 6081 and step past every port held by a GENEVE link that is either external
    (VNI 0 and no remote: e.g. the flow-based device OVN-Kubernetes keeps on 6081) or one of
    the original's VNIs (1000/1001) pointing at ``zt_ip`` — unless the link is ours (the
    original deleted its own links before choosing; we keep them, so they are skipped here).
    Pure: the caller lists the links, and uses 6081 if listing fails.
    """
    reserved = set()
    for link in links:
        if _field(link, "kind") != "geneve" or _field(link, "name", "ifname") in own_names:
            continue
        vni = _field(link, "vni", "geneve_id", "id", default=0)
        remote = _field(link, "remote", "geneve_remote")
        port = _field(link, "dstport", "port", "geneve_port", default=names.GENEVE_DEFAULT_PORT)
        external = vni == 0 and not remote
        ours_twin = vni in (names.VNI_IN, names.VNI_OUT) and remote == zt_ip
        if external or ours_twin:
            reserved.add(int(port))
    port = names.GENEVE_DEFAULT_PORT
    while port in reserved:
        port += 1
    return port
