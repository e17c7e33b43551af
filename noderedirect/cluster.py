"""Cluster state -> membership decision -> ``Values``: the controller's pure core.

Owns the plain, frozen picture of what a node's controller knows about the cluster (this Node,
all Namespaces, the Pods scheduled on this node), the events that change it, and the rules that
turn it into the same :class:`~noderedirect.model.Values` a values file produces:

- which pods are enrolled (legacy-mode.md §4.4, with the exclusion gaps of W17 closed),
- which ztunnel pod this node's redirection points at (§4.3),
- which pod annotations must change so ``ambient.istio.io/redirection: enabled`` tells the truth.

Nothing here does I/O or knows about the Kubernetes client: ``kube.py`` and ``source_file.py``
turn their inputs into :class:`PodInfo` / :class:`NamespaceInfo` / :class:`NodeInfo` events.
Values are built by feeding a dict to :func:`noderedirect.values.parse`, so a pod from the API
is validated exactly like a pod in a values file. A pod that fails validation is skipped (and
reported), never allowed to stop the others.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from . import values as values_mod
from .model import Values

# Kubernetes names the design reads (legacy-mode.md §4.1, §4.4)
DATAPLANE_MODE_LABEL = "istio.io/dataplane-mode"
DATAPLANE_MODE_AMBIENT = "ambient"
REDIRECTION_ANNOTATION = "ambient.istio.io/redirection"
REDIRECTION_ENABLED = "enabled"
REDIRECTION_DISABLED = "disabled"
SIDECAR_STATUS_ANNOTATION = "sidecar.istio.io/status"
ZTUNNEL_LABEL = ("app", "ztunnel")

FINISHED_PHASES = ("Succeeded", "Failed")
KINDS = ("node", "namespace", "pod")     # the in-sync gate waits for a full list of each

Labels = tuple[tuple[str, str], ...]


def labels_of(mapping: Optional[Mapping[str, Any]]) -> Labels:
    """A sorted, hashable copy of a label/annotation map; non-string values are dropped."""
    if not mapping:
        return ()
    return tuple(sorted((k, v) for k, v in mapping.items() if isinstance(k, str) and isinstance(v, str)))


def _get(pairs: Labels, key: str) -> Optional[str]:
    for k, v in pairs:
        if k == key:
            return v
    return None


# ---------------------------------------------------------------- what the sources report


@dataclass(frozen=True)
class NodeInfo:
    name: str
    pod_cidrs: tuple[str, ...] = ()      # spec.podCIDRs (or spec.podCIDR), as given
    internal_ip: Optional[str] = None    # status.addresses[type=InternalIP], first IPv4 if any


@dataclass(frozen=True)
class NamespaceInfo:
    name: str
    labels: Labels = ()

    def label(self, key: str) -> Optional[str]:
        return _get(self.labels, key)


@dataclass(frozen=True)
class PodInfo:
    namespace: str
    name: str
    uid: str
    node_name: str = ""
    ips: tuple[str, ...] = ()            # status.podIPs (status.podIP first), as given
    host_network: bool = False
    labels: Labels = ()
    annotations: Labels = ()
    phase: str = "Running"
    ready: bool = False                  # Running, PodReady True, every container ready
    created: str = ""                    # metadata.creationTimestamp (RFC 3339, sortable)
    deleting: bool = False               # metadata.deletionTimestamp set

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def label(self, key: str) -> Optional[str]:
        return _get(self.labels, key)

    def annotation(self, key: str) -> Optional[str]:
        return _get(self.annotations, key)

    @property
    def is_ztunnel(self) -> bool:
        return self.label(ZTUNNEL_LABEL[0]) == ZTUNNEL_LABEL[1]


@dataclass(frozen=True)
class Hints:
    """What a ``--source`` file says about the kernel side: the ztunnel netns (and veth)."""

    ztunnel_netns: Optional[str] = None
    ztunnel_veth: Optional[str] = None


@dataclass(frozen=True)
class Event:
    """One change reported by a source. ``RELISTED`` replaces every object of ``kind``."""

    kind: str                       # "node" | "namespace" | "pod" | "hints"
    type: str                       # "ADDED" | "MODIFIED" | "DELETED" | "RELISTED"
    obj: Any = None
    objects: tuple = ()


@dataclass(frozen=True)
class ClusterState:
    """Copy-on-write: :func:`apply_event` returns a new state, the mappings are never mutated."""

    node: Optional[NodeInfo] = None
    namespaces: Mapping[str, NamespaceInfo] = field(default_factory=dict)
    pods: Mapping[str, PodInfo] = field(default_factory=dict)      # by UID
    hints: Hints = Hints()
    synced: frozenset = frozenset()                                # kinds listed at least once

    @property
    def in_sync(self) -> bool:
        return all(k in self.synced for k in KINDS)


def apply_event(state: ClusterState, ev: Event) -> ClusterState:
    """The state after one event. Unknown kinds or types are a programming error."""
    rep = dataclasses.replace
    if ev.kind == "hints":
        return rep(state, hints=ev.obj or Hints())
    if ev.kind == "node":
        if ev.type == "RELISTED":
            # field-selected on metadata.name: zero or one object
            return rep(state, node=ev.objects[0] if ev.objects else None, synced=state.synced | {"node"})
        return rep(state, node=None if ev.type == "DELETED" else ev.obj)
    if ev.kind == "namespace":
        if ev.type == "RELISTED":
            return rep(state, namespaces={n.name: n for n in ev.objects}, synced=state.synced | {"namespace"})
        nss = dict(state.namespaces)
        if ev.type == "DELETED":
            nss.pop(ev.obj.name, None)
        else:
            nss[ev.obj.name] = ev.obj
        return rep(state, namespaces=nss)
    if ev.kind == "pod":
        if ev.type == "RELISTED":
            return rep(state, pods={p.uid: p for p in ev.objects}, synced=state.synced | {"pod"})
        pods = dict(state.pods)
        if ev.type == "DELETED":
            pods.pop(ev.obj.uid, None)
        else:
            pods[ev.obj.uid] = ev.obj
        return rep(state, pods=pods)
    raise ValueError(f"unknown event kind {ev.kind!r}")


# ---------------------------------------------------------------- the enrollment decision


@dataclass(frozen=True)
class Settings:
    """Node-wide knobs of the controller (command-line flags), validated by values.parse."""

    node_name: str
    istio_version: str = "1.20"
    ipset_comments: bool = True
    dns_capture: bool = False
    geneve_port: Optional[int] = None
    ztunnel_interface: str = "eth0"
    # the plugin path of the original skipped these; its agent path did not (W17)
    exclude_namespaces: tuple[str, ...] = ("kube-system",)


@dataclass(frozen=True)
class Decision:
    pod: PodInfo
    enroll: bool
    reason: str           # why not, or "ambient"
    waiting: bool = False  # would be enrolled once it has an IP


def decide(pod: PodInfo, ns: Optional[NamespaceInfo], settings: Settings) -> Decision:
    """legacy-mode.md §4.4, plus the filters the original applied only on some paths."""
    def no(reason: str, waiting: bool = False) -> Decision:
        return Decision(pod, False, reason, waiting)

    if pod.node_name and pod.node_name != settings.node_name:
        return no(f"scheduled on {pod.node_name}")
    if pod.is_ztunnel:
        return no("ztunnel pod")
    if pod.host_network:
        return no("hostNetwork pod")                     # W17: the agent path never checked
    if pod.phase in FINISHED_PHASES:
        return no(f"pod {pod.phase}")                     # its IP is free for reuse
    if pod.namespace in settings.exclude_namespaces:
        return no("namespace excluded")                   # W17: honoured by the plugin only
    if ns is None:
        return no("namespace not known")
    if ns.label(DATAPLANE_MODE_LABEL) != DATAPLANE_MODE_AMBIENT:
        return no("namespace not ambient")
    if pod.annotation(SIDECAR_STATUS_ANNOTATION) is not None:
        return no("sidecar-injected")
    if pod.annotation(REDIRECTION_ANNOTATION) == REDIRECTION_DISABLED:
        return no("opted out")
    if not pod.ips:
        return no("waiting for an IP", waiting=True)
    return Decision(pod, True, "ambient")


def decisions(state: ClusterState, settings: Settings) -> tuple[Decision, ...]:
    out = [decide(p, state.namespaces.get(p.namespace), settings) for p in state.pods.values()]
    return tuple(sorted(out, key=lambda d: (d.pod.namespace, d.pod.name, d.pod.uid)))


def _newest_first(pods: Sequence[PodInfo]) -> list[PodInfo]:
    # RFC 3339 UTC timestamps ("2024-05-01T10:00:00Z") sort as text
    return sorted(pods, key=lambda p: (p.created, p.name, p.uid), reverse=True)


def select_ztunnel(state: ClusterState, settings: Settings,
                   current_uid: Optional[str] = None) -> Optional[PodInfo]:
    """§4.3: the newest ready ``app=ztunnel`` pod on this node. When none is ready, the current
    one is kept while it still exists (a readiness flap must not re-target or tear down: W6)."""
    zts = [p for p in state.pods.values() if p.is_ztunnel
           and (not p.node_name or p.node_name == settings.node_name)
           and p.phase not in FINISHED_PHASES and p.ips]
    ready = [p for p in zts if p.ready and not p.deleting]
    if ready:
        return _newest_first(ready)[0]
    return next((p for p in zts if p.uid == current_uid), None)


def ipv4_of(pod: PodInfo) -> Optional[str]:
    """The pod's IPv4 address (the legacy design is IPv4 only, W10); when it has none, its first
    address as given, so values.parse rejects it with the usual message."""
    for ip in pod.ips:
        try:
            if ipaddress.ip_address(ip).version == 4:
                return ip
        except ValueError:
            continue
    return pod.ips[0] if pod.ips else None


# ---------------------------------------------------------------- Values


class ClusterError(ValueError):
    """The node or the ztunnel pod cannot be turned into values; nothing can be applied."""


@dataclass(frozen=True)
class Skip:
    pod: PodInfo
    reason: str            # "bad-value" | "duplicate-ip" | "duplicate-name"
    detail: str


@dataclass(frozen=True)
class Build:
    values: Values
    enrolled: tuple[PodInfo, ...]        # in Values order
    skipped: tuple[Skip, ...]
    decisions: tuple[Decision, ...]


def node_section(node: Optional[NodeInfo]) -> dict:
    """§4.12: HostIP is the first address of the podCIDR; no podCIDR -> the InternalIP."""
    if node is None:
        raise ClusterError("the Node object of this node is not known (deleted, or wrong --node?)")
    if not node.internal_ip:
        raise ClusterError(f"node {node.name} has no InternalIP address")
    cidr = next((c for c in node.pod_cidrs if ":" not in c), None)
    if cidr is None:
        return {"name": node.name, "internalIP": node.internal_ip,
                "podCIDR": f"{node.internal_ip}/32", "hostIP": node.internal_ip}
    return {"name": node.name, "internalIP": node.internal_ip, "podCIDR": cidr}


def _dedupe(cands: list[PodInfo], key, what: str) -> tuple[list[PodInfo], list[Skip]]:
    """One pod per key. An IP reused by a new pod while the old one is not deleted yet, or a
    StatefulSet pod re-created under the same name, goes to the newest pod that is not
    terminating, so the ipset comment and table-100 route follow the new UID (W14)."""
    groups: dict[Any, list[PodInfo]] = {}
    for p in cands:
        groups.setdefault(key(p), []).append(p)
    keep, skips = [], []
    for k, group in groups.items():
        ranked = sorted(_newest_first(group), key=lambda p: p.deleting)
        keep.append(ranked[0])
        for p in ranked[1:]:
            skips.append(Skip(p, f"duplicate-{what}", f"{what} {k if what == 'ip' else p.key} is also "
                                                      f"used by {ranked[0].key} (uid {ranked[0].uid}, newer)"))
    return keep, skips


_POD_KEY = re.compile(r"^pods\[(\d+)\]")


def build_values(state: ClusterState, ztunnel: PodInfo, ztunnel_veth: str,
                 settings: Settings) -> Build:
    """The Values for this node. Raises ClusterError when the node or ztunnel part is invalid;
    a pod whose data is invalid is left out and listed in ``skipped``."""
    decs = decisions(state, settings)
    cands, skipped = _dedupe([d.pod for d in decs if d.enroll], ipv4_of, "ip")
    cands, more = _dedupe(cands, lambda p: (p.namespace, p.name), "name")
    skipped += more
    cands.sort(key=lambda p: (p.namespace, p.name, p.uid))
    data: dict[str, Any] = {
        "node": node_section(state.node),
        "ztunnel": {"ip": ipv4_of(ztunnel), "veth": ztunnel_veth, "interface": settings.ztunnel_interface},
        "istioVersion": settings.istio_version,
        "ipset": {"comments": settings.ipset_comments},
        "dnsCapture": settings.dns_capture,
    }
    if settings.geneve_port is not None:
        data["geneve"] = {"dstPort": settings.geneve_port}
    source = f"cluster:{settings.node_name}"
    # every rejected pod is named by its index; drop it and parse again (bounded by len(cands))
    while True:
        data["pods"] = [{"namespace": p.namespace, "name": p.name, "uid": p.uid, "ip": ipv4_of(p)}
                        for p in cands]
        try:
            vals = values_mod.parse(data, source=source)
        except values_mod.ValuesError as e:
            m = _POD_KEY.match(e.key)
            if not m:
                raise ClusterError(f"cannot build values for node {settings.node_name}: {e}") from None
            bad = cands.pop(int(m.group(1)))
            skipped.append(Skip(bad, "bad-value", str(e).replace(m.group(0), bad.key, 1)))
            continue
        return Build(values=vals, enrolled=tuple(cands), skipped=tuple(skipped), decisions=decs)


# ---------------------------------------------------------------- annotations


@dataclass(frozen=True)
class AnnotationPatch:
    namespace: str
    name: str
    uid: str
    value: Optional[str]        # "enabled", or None to remove the annotation

    def show(self) -> str:
        what = f"{REDIRECTION_ANNOTATION}={self.value}" if self.value else f"remove {REDIRECTION_ANNOTATION}"
        return f"{self.namespace}/{self.name}: {what}"


def annotation_patches(state: ClusterState, enrolled_uids: frozenset) -> tuple[AnnotationPatch, ...]:
    """Enrolled pods say ``enabled``; a pod that says ``enabled`` but is not enrolled loses the
    annotation. ``disabled`` is the user's opt-out and is never touched (§4.6). The annotation
    is output only: enrollment is decided from the state, never read back from it (W15)."""
    out = []
    for p in sorted(state.pods.values(), key=lambda p: (p.namespace, p.name, p.uid)):
        if p.is_ztunnel or p.host_network or p.deleting:
            continue
        have = p.annotation(REDIRECTION_ANNOTATION)
        if p.uid in enrolled_uids and have != REDIRECTION_ENABLED:
            out.append(AnnotationPatch(p.namespace, p.name, p.uid, REDIRECTION_ENABLED))
        elif p.uid not in enrolled_uids and have == REDIRECTION_ENABLED:
            out.append(AnnotationPatch(p.namespace, p.name, p.uid, None))
    return tuple(out)
