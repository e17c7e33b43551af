"""Pods + node parameters -> desired state, for either design.

This is where validated values become template context: the names from
:mod:`noderedirect.names` plus the node's own values, then the rule folders are rendered.
Pure: no I/O beyond reading rule files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from . import names
from .model import NetnsState, Pod, Rendered, Values
from .render import render_family

LEGACY_ROLES = ("node", "ztunnel")


def context(values: Values) -> dict[str, Any]:
    """Every name a legacy template may use."""
    n = values.node
    ctx: dict[str, Any] = dict(names.template_vars())
    ctx.update({
        "NODE_NAME": n.node_name,
        "POD_CIDR": n.pod_cidr,
        "INTERNAL_IP": n.internal_ip,
        "HOST_IP": n.host_ip,
        "ZT_IP": n.ztunnel_ip,
        "ZT_VETH": n.ztunnel_veth,
        "ZT_IF": n.ztunnel_if,
        "TUN_HOST_IP": n.tun_host_ip,
        # 1.18 and earlier never set a port: the kernel default
        "GENEVE_PORT": str(n.geneve_port if n.istio_version >= "1.19" else names.GENEVE_DEFAULT_PORT),
        "version": n.istio_version,
        "dns_capture": n.dns_capture,
        "ipset_comments": n.ipset_comments,
        "pods": list(values.pods),
    })
    return ctx


def legacy(values: Values, rules: Optional[Path] = None) -> Rendered:
    ctx = context(values)
    node = render_family("legacy/node", ctx, "node", base=rules)
    zt = render_family("legacy/ztunnel", ctx, "ztunnel", base=rules)
    return Rendered(mode="legacy", version=values.node.istio_version, netns=(node, zt))


def inpod_pod_context(values: Values, pod: Pod) -> dict[str, Any]:
    """Context for one ambient pod's netns in in-pod mode (per-pod knobs resolved)."""
    n = values.node
    ctx = context(values)
    dns = n.dns_capture if pod.dns_capture is None else pod.dns_capture
    ctx.update({
        "version": n.inpod_version,
        "pod": pod,
        "dns_capture": dns,
        "ingress": pod.ingress,
        "virtual_interfaces": list(pod.virtual_interfaces),
        "ipv6": n.inpod_ipv6,
        "per_family": {
            4: {"LO": "127.0.0.1/32", "PROBE": n.probe_snat_v4},
            6: {"LO": "::1/128", "PROBE": n.probe_snat_v6},
        },
    })
    return ctx


def inpod(values: Values, rules: Optional[Path] = None) -> Rendered:
    """In-pod mode: the node netns (probe SNAT + ipset) and one netns per ambient pod."""
    n = values.node
    fams = (4, 6) if n.inpod_ipv6 else (4,)
    nctx = context(values)
    nctx.update({"version": n.inpod_version, "ipv6": n.inpod_ipv6,
                 "per_family": {4: {"PROBE": n.probe_snat_v4}, 6: {"PROBE": n.probe_snat_v6}}})
    netns: list[NetnsState] = [render_family("inpod/node", nctx, "node", families=fams, base=rules)]
    for pod in values.pods:
        netns.append(render_family("inpod/pod", inpod_pod_context(values, pod), f"pod:{pod.key}",
                                   families=fams, base=rules))
    return Rendered(mode="inpod", version=n.inpod_version, netns=tuple(netns))


def render(values: Values, mode: str = "legacy", rules: Optional[Path] = None) -> Rendered:
    if mode == "legacy":
        return legacy(values, rules)
    if mode == "inpod":
        return inpod(values, rules)
    raise ValueError(f"unknown mode {mode!r}")
