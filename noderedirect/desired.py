"""Pods + node parameters -> desired state, for either design.

This is where validated values become template context: the names from
:mod:`noderedirect.names` plus the node's own values, then the rule folders are rendered.
Pure: no I/O beyond reading rule files.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from . import consistency, names
from .model import NetnsState, Pod, Rendered, Values
from .render import RenderError, render_family

LEGACY_ROLES = ("node", "ztunnel")

log = logging.getLogger(__name__)


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


def inpod_ipv6(values: Values) -> bool:
    """IPv6 in-pod rules: asked for, and the era could do it (1.21-1.22 never passed the flag on)."""
    n = values.node
    return n.inpod_ipv6 and n.inpod_version >= "1.23"


def inpod_pod_context(values: Values, pod: Pod) -> dict[str, Any]:
    """Context for one ambient pod's netns in in-pod mode (per-pod knobs resolved).

    A knob the era did not know yet is ignored, as that era's agent ignored the annotation:
    ingress mode from 1.24, per-pod DNS and virtual interfaces from 1.25.
    """
    n = values.node
    ver = n.inpod_version
    ctx = context(values)
    dns = n.dns_capture if pod.dns_capture is None or ver < "1.25" else pod.dns_capture
    ingress = pod.ingress and ver >= "1.24"
    vis = list(pod.virtual_interfaces) if ver >= "1.25" else []
    if (pod.ingress and not ingress) or (pod.virtual_interfaces and not vis) or (
            pod.dns_capture is not None and ver < "1.25"):
        log.info("pod=%s version=%s: per-pod knobs this era did not have are ignored", pod.key, ver)
    ctx.update({
        "version": ver,
        "pod": pod,
        "dns_capture": dns,
        "ingress": ingress,
        "virtual_interfaces": vis,
        "ipv6": inpod_ipv6(values),
        "per_family": {
            4: {"LO": "127.0.0.1/32", "PROBE": n.probe_snat_v4},
            6: {"LO": "::1/128", "PROBE": n.probe_snat_v6},
        },
    })
    return ctx


def inpod(values: Values, rules: Optional[Path] = None) -> Rendered:
    """In-pod mode: the node netns (probe SNAT + ipsets) and one netns per ambient pod."""
    n = values.node
    ipv6 = inpod_ipv6(values)
    fams = (4, 6) if ipv6 else (4,)
    nctx = context(values)
    nctx.update({"version": n.inpod_version, "ipv6": ipv6,
                 "per_family": {4: {"PROBE": n.probe_snat_v4}, 6: {"PROBE": n.probe_snat_v6}}})
    netns: list[NetnsState] = [render_family("inpod/node", nctx, "node", families=fams, base=rules)]
    for pod in values.pods:
        netns.append(render_family("inpod/pod", inpod_pod_context(values, pod), f"pod:{pod.key}",
                                   families=fams, base=rules))
    return Rendered(mode="inpod", version=n.inpod_version, netns=tuple(netns))


def render(values: Values, mode: str = "legacy", rules: Optional[Path] = None) -> Rendered:
    """Render one design and check it (a template bug raises RenderError, never reaches a kernel)."""
    if mode == "legacy":
        out = legacy(values, rules)
    elif mode == "inpod":
        out = inpod(values, rules)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    try:
        consistency.check(out)
    except consistency.ConsistencyError as e:
        raise RenderError(str(e)) from None
    return out
