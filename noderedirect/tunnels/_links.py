"""Link plumbing shared by the tunnel drivers, on top of :class:`noderedirect.host.Host`.

Owns the few link operations every driver repeats: read the links of some names (knowing
which ones are TAP devices), delete, make the IPv4 address exactly the wanted one, set the
admin state, and derive the tunnel MTU from the underlay the way the kernel GENEVE device does.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Iterable, Optional

from pyroute2 import IPRoute

from .. import model
from ..host import Host, LinkInfo

log = logging.getLogger(__name__)

TUN_TYPE_TAP = 2
# outer IPv4 (20) + UDP (8) + GENEVE/VXLAN header (8) + inner Ethernet (14): what the kernel
# GENEVE device subtracts from the underlay MTU (1500 -> 1450 on kind, 1460 -> 1410 on GKE)
TUNNEL_OVERHEAD = 50
NO_REMOTE = "none"    # model.Link.remote of a link that has no tunnel peer


def read(host: Host, wanted: Iterable[str]) -> dict[str, LinkInfo]:
    wanted = set(wanted)
    return {l.name: l for l in host.links() if l.name in wanted}


def tap_indexes(host: Host) -> set[int]:
    """ifindexes of the tun devices that are in TAP mode (LinkInfo only says 'tun')."""
    def scan(ipr: IPRoute) -> set[int]:
        found = set()
        for m in ipr.get_links():
            info = m.get_attr("IFLA_LINKINFO")
            data = info.get_attr("IFLA_INFO_DATA") if info else None
            if info and info.get_attr("IFLA_INFO_KIND") == "tun" and data is not None \
                    and data.get_attr("IFLA_TUN_TYPE") == TUN_TYPE_TAP:
                found.add(m["index"])
        return found
    return host.netlink(scan, "list TAP devices")


def address(info: LinkInfo) -> str:
    """model.Link's single address; several are joined, so they never compare equal to one."""
    return ",".join(sorted(info.addresses))


def to_model(info: LinkInfo, is_tap: bool = False) -> model.Link:
    """Any link in model.Link shape; non-tunnels show their kind with empty tunnel fields."""
    if info.kind in ("geneve", "vxlan"):
        return model.Link(name=info.name, kind=info.kind, vni=info.vni or 0,
                          remote=info.remote or NO_REMOTE, dstport=info.dstport or 0,
                          address=address(info), up=info.up)
    kind = "tap" if is_tap else (info.kind or "link")
    return model.Link(name=info.name, kind=kind, vni=0, remote=NO_REMOTE, dstport=0,
                      address=address(info), up=info.up)


def delete(host: Host, info: LinkInfo, why: str = "") -> str:
    host.link_del(info.name)
    return f"deleted {info.kind or 'link'} {info.name}" + (f" ({why})" if why else "")


def sync_address(host: Host, info: LinkInfo, want: str) -> list[str]:
    """Make ``want`` the link's only IPv4 address (Host adds the broadcast address, as the
    original's netlink library did: ``192.168.126.1/30 brd 192.168.126.3``)."""
    iface = ipaddress.IPv4Interface(want)
    want = f"{iface.ip}/{iface.network.prefixlen}"
    changes = []
    for have in info.addresses:
        if have != want:
            host.addr_del(info.name, have)
            changes.append(f"{info.name}: removed stray address {have}")
    if want not in info.addresses:
        host.addr_add(info.name, want)
        changes.append(f"{info.name}: address {want}")
    return changes


def sync_up(host: Host, info: LinkInfo, up: bool) -> list[str]:
    if info.up == up:
        return []
    (host.link_up if up else host.link_down)(info.name)
    return [f"{info.name}: {'up' if up else 'down'}"]


def underlay_mtu(host: Host, remote: str) -> Optional[int]:
    """The MTU for a tunnel to ``remote``: the MTU of the device the route to ``remote`` leaves
    by, minus the tunnel overhead (what the kernel GENEVE device does at creation; VXLAN keeps
    1500 without an underlay device). None if no route is known yet."""
    found = host.route_get(remote)
    if found is None or found[0] is None:
        return None
    dev = next((l for l in host.links() if l.index == found[0]), None)
    return dev.mtu - TUNNEL_OVERHEAD if dev is not None and dev.mtu else None


def set_mtu(host: Host, info: LinkInfo, mtu: Optional[int]) -> list[str]:
    if not mtu or mtu == info.mtu:
        return []
    host.link_set_mtu(info.name, mtu)
    return [f"{info.name}: mtu {mtu}"]
