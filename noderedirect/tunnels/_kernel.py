"""Shared reconcile loop of the drivers whose tunnel is a kernel device (GENEVE, VXLAN).

Owns the compare / recreate / create / address / up sequence and the side-effect-free probe
for a link type; a subclass only says how to create its device.
"""

from __future__ import annotations

import errno
import logging
from typing import Iterable, Optional, Sequence

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .. import model
from ..host import Host, LinkInfo, MissingFeature, NetlinkFailed, borrowed
from . import TunnelDriver, _links

log = logging.getLogger(__name__)

# A VNI the kernel must refuse (24 bits). A device type's validate step runs before anything
# is created and before the name is even looked at, so a probe with it is answered ERANGE if
# the type exists and EOPNOTSUPP if it does not, and never creates a device.
PROBE_VNI = 1 << 24
PROBE_NAME = "nr-probe0"


def probe_kind(host: Host, kind: str, attrs: dict) -> Optional[str]:
    """None if the kernel knows link type ``kind``, else why not (the kernel's answer)."""
    def probe(ipr: IPRoute) -> Optional[str]:
        try:
            ipr.link("add", ifname=PROBE_NAME, kind=kind, **attrs)
        except NetlinkError as e:
            if e.code == errno.EOPNOTSUPP:
                return f"the kernel answered '{errno.errorcode[e.code]}' to a {kind} link"
            return None
        # a kernel that accepted an out-of-range VNI: the type exists; take the device away
        for idx in ipr.link_lookup(ifname=PROBE_NAME):
            ipr.link("del", index=idx)
        return None
    return host.netlink(probe, f"probe {kind} links")


def same_tunnel(info: LinkInfo, want: model.Link) -> bool:
    """Whether the device can stay: kind, VNI, remote and port are fixed at creation."""
    return (info.kind == want.kind and not info.external and info.vni == want.vni
            and info.remote == want.remote and info.dstport == want.dstport)


def only_remote_differs(info: LinkInfo, want: model.Link) -> bool:
    """The device is ours in every fixed respect but points at another remote."""
    return (info.kind == want.kind and not info.external and info.vni == want.vni
            and info.dstport == want.dstport and info.remote != want.remote
            and want.remote not in (None, "", _links.NO_REMOTE))


def log_changes(driver: str, netns_path: str, changes: list[str]) -> list[str]:
    for c in changes:
        log.info("tunnel change driver=%s netns=%s: %s", driver, netns_path, c)
    return changes


class KernelTunnelDriver(TunnelDriver):
    feature = ""                  # Host FEATURE_HELP key, for MissingFeature
    probe_attrs: dict = {}

    def link_attrs(self, link: model.Link) -> dict:
        """pyroute2 attributes that create ``link`` as this driver's device."""
        raise NotImplementedError

    def check(self, node_netns_path: str, zt_netns_path: Optional[str] = None) -> None:
        for path in filter(None, (node_netns_path, zt_netns_path)):
            with borrowed(path) as host:
                why = probe_kind(host, self.feature, self.probe_attrs)
            if why:
                raise MissingFeature(self.feature, path, why)

    def observe(self, netns_path: str, names_: Iterable[str]) -> list[model.Link]:
        with borrowed(netns_path) as host:
            have = _links.read(host, names_)
            taps = _links.tap_indexes(host) if have else set()
        return [_links.to_model(have[n], have[n].index in taps) for n in sorted(have)]

    def ensure(self, netns_path: str, links: Sequence[model.Link]) -> list[str]:
        wants = [self.desired(link) for link in links]
        changes: list[str] = []
        with borrowed(netns_path) as host:
            have = _links.read(host, [w.name for w in wants])
            taps: set[int] = set()
            if any(i.kind == "tun" for i in have.values()):
                # a user-space GENEVE bridge may hold the UDP port our devices need
                from .usergeneve import stop_bridge
                changes += stop_bridge(netns_path)
                taps = _links.tap_indexes(host)
            for want in wants:
                info = have.get(want.name)
                if info is not None and only_remote_differs(info, want):
                    moved = self._move_remote(host, info, want)
                    if moved:
                        changes += moved
                        info = _links.read(host, [want.name])[want.name]
                if info is not None and not same_tunnel(info, want):
                    was = _links.to_model(info, info.index in taps).show()
                    changes.append(_links.delete(host, info, f"was {was}"))
                    info = None
                if info is None:
                    host.link_add(want.name, self.feature, **self.link_attrs(want))
                    changes.append(f"created {want.kind} {want.name} id {want.vni} "
                                   f"remote {want.remote} dstport {want.dstport}")
                    info = _links.read(host, [want.name])[want.name]
                    changes += _links.set_mtu(host, info, _links.underlay_mtu(host, want.remote))
                changes += _links.sync_address(host, info, want.address)
                changes += _links.sync_up(host, info, want.up)
        return log_changes(self.name, netns_path, changes)

    def _move_remote(self, host: Host, info: LinkInfo, want: model.Link) -> list[str]:
        """Change the remote in place (a new ztunnel IP): the device and the routes through it
        stay, so no packet meets a missing route. [] when the kernel refuses; the caller then
        re-creates the device (the routes come back in the same apply)."""
        try:
            host.link_set_remote(want.name, want.kind, want.remote)
        except NetlinkFailed as e:
            log.warning("in-place remote change refused, re-creating instead: %s", e)
            return []
        changes = [f"{want.name}: remote {info.remote} -> {want.remote} (in place)"]
        moved = _links.read(host, [want.name])[want.name]
        return changes + _links.set_mtu(host, moved, _links.underlay_mtu(host, want.remote))

    def remove(self, netns_path: str, names_: Iterable[str]) -> list[str]:
        changes: list[str] = []
        with borrowed(netns_path) as host:
            have = _links.read(host, names_)
            if any(i.kind == "tun" for i in have.values()):
                from .usergeneve import stop_bridge
                changes += stop_bridge(netns_path)
            for name in sorted(have):
                changes.append(_links.delete(host, have[name]))
        return log_changes(self.name, netns_path, changes)
