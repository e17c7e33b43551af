"""Kernel GENEVE tunnels: the original's own devices (legacy-mode.md §1.6, §2.2).

Owns creating ``istioin``/``istioout``/``pistioin``/``pistioout`` as kernel GENEVE devices over
netlink, and detecting a kernel without GENEVE before anything is changed. EOPNOTSUPP from the
kernel means the device type is not built in: it becomes MissingFeature, never a retry.
"""

from __future__ import annotations

from .. import model
from ..host import borrowed
from ._kernel import PROBE_VNI, KernelTunnelDriver, probe_kind


def kernel_has_geneve(netns_path: str) -> bool:
    """Probe with a VNI the kernel must refuse: nothing is created either way."""
    with borrowed(netns_path) as host:
        return probe_kind(host, "geneve", {"geneve_id": PROBE_VNI}) is None


class GeneveDriver(KernelTunnelDriver):
    name = "geneve"
    feature = "geneve"
    probe_attrs = {"geneve_id": PROBE_VNI}

    def link_attrs(self, link: model.Link) -> dict:
        # no underlay device and no TTL/TOS, as the original: the kernel picks TTL "auto";
        # the MTU is set from the route to the remote afterwards
        return {"geneve_id": link.vni, "geneve_remote": link.remote, "geneve_port": link.dstport}
