"""Kernel VXLAN stand-in for GENEVE (kernel-notes.md §9), for kernels built without GENEVE.

Owns creating the tunnel links as VXLAN devices with the original's names, VNIs, remote,
destination port and addresses, and the iptables rules that make up for the one thing VXLAN
does not do: a non-external GENEVE device drops packets whose outer source is not its
``remote``; VXLAN accepts any source, which would hide a wrong HostIP (kernel-notes.md §3).
"""

from __future__ import annotations

from typing import Sequence

from .. import model, names
from ._kernel import PROBE_VNI, KernelTunnelDriver


class VxlanDriver(KernelTunnelDriver):
    name = "vxlan"
    feature = "vxlan"
    probe_attrs = {"vxlan_id": PROBE_VNI}

    def link_attrs(self, link: model.Link) -> dict:
        # learning off: the peer is fixed, there is nothing to learn (GENEVE does not learn)
        return {"vxlan_id": link.vni, "vxlan_group": link.remote, "vxlan_port": link.dstport,
                "vxlan_learning": 0}

    def extra_rules(self, role: str, links: Sequence[model.Link]) -> list[model.IptRule]:
        """The outer-source check, in the owned chain ``ztunnel-TUNNEL`` hooked into filter
        INPUT: one DROP per distinct (remote, port), spelled as iptables-save prints it."""
        pairs = sorted({(link.dstport, link.remote) for link in links})
        if not pairs:
            return []
        chain = names.CHAIN_TUNNEL
        rules = [model.IptRule(table="filter", chain="INPUT", args=f"-j {chain}", op="-I")]
        rules += [model.IptRule(table="filter", chain=chain,
                                args=f"! -s {remote}/32 -p udp -m udp --dport {port} -j DROP")
                  for port, remote in pairs]
        return rules
