"""``run --source FILE``: a YAML cluster-state file as the controller's source of pods.

Owns the file format and the polling. The file stands in for the API server in the lab and in
tests; it goes through the same pipeline (cluster events -> reconcile -> Engine), so a pod added
to the file is enrolled exactly as a pod created in a cluster would be.

Format (every pod field but namespace, name, uid and ip has a default)::

    node: {name: node-1, podCIDR: 10.244.1.0/24, internalIP: 172.18.0.2}
    ztunnel: {netns: lab-ztunnel, veth: veth-zt}     # the kernel side (veth optional)
    namespaces:
      - {name: default, labels: {istio.io/dataplane-mode: ambient}}
    pods:
      - {namespace: istio-system, name: ztunnel-x, uid: zt-1, ip: 10.244.1.2, labels: {app: ztunnel}}
      - {namespace: default, name: sleep, uid: 6b1f…, ip: 10.244.1.5}
      # optional: labels, annotations, hostNetwork, phase (Running), ready (true), created, ips

The file is read every ``interval`` seconds (no inotify: it works the same on every
filesystem and inside containers); when its bytes change, the whole state is replaced in one
batch of ``RELISTED`` events. A file that cannot be read or parsed keeps the last good state
(one log line and a metric); a bad pod entry is skipped and the rest is used.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Optional, Sequence

import yaml

from . import cluster
from .cluster import AnnotationPatch, Event, Hints, NamespaceInfo, NodeInfo, PodInfo
from .metrics import Metrics

log = logging.getLogger(__name__)

Sink = Callable[[Sequence[Event]], None]

_POD_KEYS = {"namespace", "name", "uid", "ip", "ips", "labels", "annotations", "hostNetwork",
             "phase", "ready", "created", "deleting", "nodeName"}


class SourceError(ValueError):
    """The file as a whole cannot be used; ``key`` names the part."""

    def __init__(self, key: str, reason: str):
        self.key = key
        super().__init__(f"{key}: {reason}")


def _mapping(v: Any, key: str) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise SourceError(key, "must be a mapping")
    return v


def _text(v: Any, key: str, required: bool = True) -> Optional[str]:
    if v is None and not required:
        return None
    if not isinstance(v, str) or not v:
        raise SourceError(key, f"must be a non-empty string (got {v!r})")
    return v


def _flag(v: Any, key: str, default: bool) -> bool:
    if v is None:
        return default
    if not isinstance(v, bool):
        raise SourceError(key, f"must be true or false (got {v!r})")
    return v


def _strings(v: Any, key: str) -> cluster.Labels:
    m = _mapping(v, key)
    for k, val in m.items():
        if not isinstance(k, str) or not isinstance(val, str):
            raise SourceError(f"{key}.{k}", f"must be a string (got {val!r}; quote it)")
    return cluster.labels_of(m)


def parse_node(data: Any) -> NodeInfo:
    n = _mapping(data, "node")
    if not n:
        raise SourceError("node", "is required")
    cidr = _text(n.get("podCIDR"), "node.podCIDR", required=False)
    return NodeInfo(name=_text(n.get("name"), "node.name"), pod_cidrs=(cidr,) if cidr else (),
                    internal_ip=_text(n.get("internalIP"), "node.internalIP"))


def parse_pod(data: Any, key: str, node_name: str) -> PodInfo:
    p = _mapping(data, key)
    unknown = sorted(set(p) - _POD_KEYS)
    if unknown:
        raise SourceError(f"{key}.{unknown[0]}", f"is not a known key (known: {', '.join(sorted(_POD_KEYS))})")
    ips = p.get("ips")
    if ips is None:
        ips = [_text(p["ip"], f"{key}.ip")] if p.get("ip") is not None else []
    if not isinstance(ips, list) or not all(isinstance(i, str) for i in ips):
        raise SourceError(f"{key}.ips", "must be a list of address strings")
    return PodInfo(
        namespace=_text(p.get("namespace"), f"{key}.namespace"), name=_text(p.get("name"), f"{key}.name"),
        uid=_text(p.get("uid"), f"{key}.uid"),
        node_name=_text(p.get("nodeName"), f"{key}.nodeName", required=False) or node_name,
        ips=tuple(ips), host_network=_flag(p.get("hostNetwork"), f"{key}.hostNetwork", False),
        labels=_strings(p.get("labels"), f"{key}.labels"),
        annotations=_strings(p.get("annotations"), f"{key}.annotations"),
        phase=_text(p.get("phase", "Running"), f"{key}.phase"),
        ready=_flag(p.get("ready"), f"{key}.ready", True),
        created=str(p.get("created") or ""), deleting=_flag(p.get("deleting"), f"{key}.deleting", False))


def parse(text: str, on_bad_pod: Optional[Callable[[str, str], None]] = None) -> list[Event]:
    """The file's text -> one batch of events. Raises SourceError for a bad file as a whole;
    a bad pod entry is reported through ``on_bad_pod(key, problem)`` and left out."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SourceError("<yaml>", f"not valid YAML ({getattr(e, 'problem', e)})") from None
    top = _mapping(data, "<top>")
    unknown = sorted(set(top) - {"node", "ztunnel", "namespaces", "pods"})
    if unknown:
        raise SourceError(unknown[0], "is not a known key (known: namespaces, node, pods, ztunnel)")
    node = parse_node(top.get("node"))
    zt = _mapping(top.get("ztunnel"), "ztunnel")
    hints = Hints(ztunnel_netns=_text(zt.get("netns"), "ztunnel.netns", required=False),
                  ztunnel_veth=_text(zt.get("veth"), "ztunnel.veth", required=False))
    nss = top.get("namespaces")
    nss = [] if nss is None else nss
    if not isinstance(nss, list):
        raise SourceError("namespaces", "must be a list")
    namespaces = []
    for i, ns in enumerate(nss):
        m = _mapping(ns, f"namespaces[{i}]")
        namespaces.append(NamespaceInfo(name=_text(m.get("name"), f"namespaces[{i}].name"),
                                        labels=_strings(m.get("labels"), f"namespaces[{i}].labels")))
    raw_pods = top.get("pods")
    raw_pods = [] if raw_pods is None else raw_pods
    if not isinstance(raw_pods, list):
        raise SourceError("pods", "must be a list")
    pods, uids = [], set()
    for i, raw in enumerate(raw_pods):
        try:
            pod = parse_pod(raw, f"pods[{i}]", node.name)
            if pod.uid in uids:
                raise SourceError(f"pods[{i}].uid", f"{pod.uid!r} is listed twice")
        except SourceError as e:
            if on_bad_pod is not None:
                on_bad_pod(f"pods[{i}]", str(e))
            continue
        uids.add(pod.uid)
        pods.append(pod)
    return [Event("hints", "RELISTED", obj=hints),
            Event("node", "RELISTED", objects=(node,)),
            Event("namespace", "RELISTED", objects=tuple(namespaces)),
            Event("pod", "RELISTED", objects=tuple(pods))]


class FileSource:
    """Polls ``path``; on every change of its bytes, sends the whole state to ``sink``."""

    def __init__(self, path: str, sink: Sink, metrics: Metrics, *, interval: float = 0.2):
        self.path, self.sink, self.metrics, self.interval = path, sink, metrics, interval
        self._last: Optional[bytes] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._complained: Optional[str] = None
        self._bad_seen: set[tuple[str, str]] = set()

    def start(self) -> None:
        self.poll()                       # the first read happens before start() returns
        self._thread = threading.Thread(target=self._run, name="source-file", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def annotate(self, patch: AnnotationPatch) -> bool:
        """A file has no annotations to write: the enrollment shows in ``status`` and logs."""
        log.debug("source file: not annotating %s", patch.show())
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self) -> bool:
        """Read the file once; True when a new state was sent."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except OSError as e:
            self._complain(f"cannot read {self.path}: {e.strerror}")
            return False
        if data == self._last:
            return False
        try:
            events = parse(data.decode("utf-8", errors="replace"), self._bad_pod)
        except SourceError as e:
            self._last = data             # complain once per content, keep the last good state
            self._complain(f"{self.path}: {e}; keeping the last good state")
            return False
        self._last = data
        self._complained = None
        pods = events[-1].objects
        log.info("source file read path=%s pods=%d namespaces=%d", self.path, len(pods),
                 len(events[2].objects))
        self.sink(events)
        return True

    def _bad_pod(self, key: str, problem: str) -> None:
        if (key, problem) not in self._bad_seen:
            self._bad_seen.add((key, problem))
            self.metrics.bad_data.inc(kind="pod", reason="invalid-object")
            log.warning("skipping pod entry path=%s entry=%s problem=%s", self.path, key, problem)

    def _complain(self, message: str) -> None:
        if message != self._complained:
            self._complained = message
            self.metrics.source_errors.inc()
            log.error("%s", message)
