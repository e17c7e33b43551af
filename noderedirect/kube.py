"""The Kubernetes side of the controller: the only module that imports the ``kubernetes`` client.

Owns list+watch of this node's Pods, all Namespaces and this Node, and the pod annotation patch.
API objects are read as plain JSON (never the client's model classes, which reject some objects
a real API server may return) and turned into :mod:`noderedirect.cluster` values at once; the
rest of the controller only sees :class:`~noderedirect.cluster.Event` batches.

Per resource, one :class:`Informer` thread does what client-go's reflector does:

- list, emit one ``RELISTED`` event with every object, remember the list's resourceVersion;
- watch from that resourceVersion (``allowWatchBookmarks``, a server-side ``timeoutSeconds``
  and a client read timeout a little longer, so a silently dead connection is noticed);
- a watch that ends (timeout) or drops after making progress is re-opened from the last
  resourceVersion seen, without a list;
- ``410 Gone`` (as an ERROR event in the stream or as the HTTP status) -> list again;
- any other failure -> back off (exponential with jitter, tenacity) and try again; errors that
  are not plain connection trouble also force a fresh list.

An object that cannot be understood (no UID, a label map that is not a map …) is skipped with
one log line and a ``bad_data`` metric; it never stops the stream.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import tenacity
import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes import watch as k8s_watch
from kubernetes.client.exceptions import ApiException

from . import cluster
from .cluster import AnnotationPatch, Event, NamespaceInfo, NodeInfo, PodInfo
from .metrics import Metrics

log = logging.getLogger(__name__)

Sink = Callable[[Sequence[Event]], None]

CONNECT_TIMEOUT = 5.0
LIST_READ_TIMEOUT = 60.0
WATCH_READ_GRACE = 15.0          # client read timeout = server timeoutSeconds + this
PROGRESS_SECONDS = 1.0           # a watch that lived this long "made progress"


class BadObject(ValueError):
    """An API object that cannot be turned into a cluster value."""


class PatchError(RuntimeError):
    """A pod annotation patch failed (the pod still exists)."""


def api_client(kubeconfig: Optional[str] = None, context: Optional[str] = None) -> k8s.ApiClient:
    """A client from a kubeconfig file, or the in-cluster service account when none is given."""
    if kubeconfig:
        return k8s_config.new_client_from_config(config_file=kubeconfig, context=context)
    cfg = k8s.Configuration()
    k8s_config.load_incluster_config(client_configuration=cfg)
    return k8s.ApiClient(cfg)


# ---------------------------------------------------------------- API objects -> values


def _map(obj: Any, what: str) -> Mapping[str, Any]:
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise BadObject(f"{what} is not a mapping ({type(obj).__name__})")
    return obj


def _str(obj: Mapping[str, Any], key: str, what: str, required: bool = True) -> str:
    v = obj.get(key)
    if v is None and not required:
        return ""
    if not isinstance(v, str) or (required and not v):
        raise BadObject(f"{what}.{key} is missing or not a string")
    return v


def _string_map(obj: Any, what: str) -> cluster.Labels:
    m = _map(obj, what)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in m.items()):
        raise BadObject(f"{what} holds a non-string key or value")
    return cluster.labels_of(m)


def pod_info(obj: Any) -> PodInfo:
    md = _map(_map(obj, "pod").get("metadata"), "metadata")
    spec = _map(obj.get("spec"), "spec")
    status = _map(obj.get("status"), "status")
    ips: list[str] = []
    if isinstance(status.get("podIP"), str) and status["podIP"]:
        ips.append(status["podIP"])
    for entry in status.get("podIPs") or []:
        ip = _map(entry, "status.podIPs[]").get("ip")
        if isinstance(ip, str) and ip and ip not in ips:
            ips.append(ip)
    phase = status.get("phase") if isinstance(status.get("phase"), str) else ""
    conds = [_map(c, "status.conditions[]") for c in status.get("conditions") or []]
    containers = [_map(c, "status.containerStatuses[]") for c in status.get("containerStatuses") or []]
    ready = (phase == "Running"
             and any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)
             and bool(containers) and all(c.get("ready") is True for c in containers))
    return PodInfo(
        namespace=_str(md, "namespace", "metadata"), name=_str(md, "name", "metadata"),
        uid=_str(md, "uid", "metadata"), node_name=_str(spec, "nodeName", "spec", required=False),
        ips=tuple(ips), host_network=spec.get("hostNetwork") is True,
        labels=_string_map(md.get("labels"), "metadata.labels"),
        annotations=_string_map(md.get("annotations"), "metadata.annotations"),
        phase=phase, ready=ready, created=_str(md, "creationTimestamp", "metadata", required=False),
        deleting=bool(md.get("deletionTimestamp")))


def namespace_info(obj: Any) -> NamespaceInfo:
    md = _map(_map(obj, "namespace").get("metadata"), "metadata")
    return NamespaceInfo(name=_str(md, "name", "metadata"),
                         labels=_string_map(md.get("labels"), "metadata.labels"))


def node_info(obj: Any) -> NodeInfo:
    md = _map(_map(obj, "node").get("metadata"), "metadata")
    spec = _map(obj.get("spec"), "spec")
    status = _map(obj.get("status"), "status")
    cidrs = [c for c in spec.get("podCIDRs") or [] if isinstance(c, str)]
    if isinstance(spec.get("podCIDR"), str) and spec["podCIDR"] not in cidrs:
        cidrs.insert(0, spec["podCIDR"])
    internal = [_map(a, "status.addresses[]").get("address") for a in status.get("addresses") or []
                if isinstance(a, dict) and a.get("type") == "InternalIP"]
    internal = [a for a in internal if isinstance(a, str) and a]
    v4 = next((a for a in internal if ":" not in a), internal[0] if internal else None)
    return NodeInfo(name=_str(md, "name", "metadata"), pod_cidrs=tuple(cidrs), internal_ip=v4)


def _identity(obj: Any) -> str:
    md = obj.get("metadata") if isinstance(obj, dict) else None
    if isinstance(md, dict):
        return "/".join(str(md.get(k)) for k in ("namespace", "name") if md.get(k))
    return "?"


# ---------------------------------------------------------------- errors


def error_class(exc: BaseException) -> str:
    """``gone`` (list again), ``network`` (retry, keep the resourceVersion), ``api`` (the server
    answered with an error), ``other``. Retry follows from the class, not from ad-hoc checks."""
    if isinstance(exc, ApiException):
        if exc.status == 410:
            return "gone"
        return "network" if exc.status == 0 else "api"
    if isinstance(exc, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)):
        return "network"
    return "other"


class _Gone(Exception):
    pass


# ---------------------------------------------------------------- informers


class Informer:
    """List+watch one resource on its own thread; events go to ``sink`` in order."""

    def __init__(self, resource: str, list_fn: Callable[..., Any], convert: Callable[[Any], Any],
                 sink: Sink, metrics: Metrics, *, field_selector: Optional[str] = None,
                 watch_timeout: int = 300, backoff_initial: float = 0.2, backoff_max: float = 30.0):
        self.resource, self.list_fn, self.convert = resource, list_fn, convert
        self.sink, self.metrics = sink, metrics
        self.field_selector = field_selector
        self.watch_timeout = watch_timeout
        self.backoff_initial, self.backoff_max = backoff_initial, backoff_max
        self.rv: Optional[str] = None
        self._stop = threading.Event()
        self._watch: Optional[k8s_watch.Watch] = None
        self._thread: Optional[threading.Thread] = None
        self._bad_seen: set[tuple[str, str]] = set()

    # ------------------------------------------------------------ thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"informer-{self.resource}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        w = self._watch
        if w is not None:
            w.stop()            # shuts the socket down, so a blocked read returns now

    def join(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(Exception),
            wait=(tenacity.wait_exponential(multiplier=self.backoff_initial, max=self.backoff_max)
                  + tenacity.wait_random(0, self.backoff_initial)),
            stop=tenacity.stop_when_event_set(self._stop),
            sleep=self._stop.wait,
            before_sleep=self._before_sleep,
            reraise=True,
        )
        while not self._stop.is_set():
            try:
                retrying(self._session)     # one list (if needed) + one watch
            except Exception as e:  # noqa: BLE001 - only when stopping: nothing left to retry
                if not self._stop.is_set():
                    log.exception("informer stopped unexpectedly resource=%s", self.resource)
                    raise
                log.debug("informer stopping resource=%s last_error=%s", self.resource, e)

    def _before_sleep(self, state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        cls = error_class(exc) if exc else "other"
        self.metrics.api_errors.inc(resource=self.resource, error=cls)
        wait = state.next_action.sleep if state.next_action else 0
        level = logging.WARNING if state.attempt_number < 5 else logging.ERROR
        log.log(level, "api request failed resource=%s error_class=%s attempt=%d retry_in=%.1fs error=%s",
                self.resource, cls, state.attempt_number, wait, _short(exc))
        if cls not in ("network",):
            self.rv = None          # anything but connection trouble: start from a fresh list

    # ------------------------------------------------------------ one session

    def _selector(self) -> dict:
        return {"field_selector": self.field_selector} if self.field_selector else {}

    def _session(self) -> None:
        if self._stop.is_set():
            return
        if self.rv is None:
            self._list()
        try:
            self._watch_once()
        except _Gone:
            self.rv = None
            self.metrics.watch_restarts.inc(resource=self.resource, reason="gone")
            log.info("watch expired (410 Gone), listing again resource=%s", self.resource)

    def _list(self) -> None:
        resp = self.list_fn(_preload_content=False, _request_timeout=(CONNECT_TIMEOUT, LIST_READ_TIMEOUT),
                            **self._selector())
        try:
            data = json.loads(resp.data)
        finally:
            resp.release_conn()
        if not isinstance(data, dict) or not isinstance(data.get("items"), list):
            raise BadObject(f"{self.resource} list is not a list object")
        rv = _map(data.get("metadata"), "list metadata").get("resourceVersion")
        if not isinstance(rv, str) or not rv:
            raise BadObject(f"{self.resource} list has no resourceVersion")
        objects = [o for o in (self._convert(item) for item in data["items"]) if o is not None]
        self.sink([Event(self.resource, "RELISTED", objects=tuple(objects))])
        self.rv = rv
        self.metrics.relists.inc(resource=self.resource)
        log.info("listed resource=%s objects=%d resource_version=%s", self.resource, len(objects), rv)

    def _watch_once(self) -> None:
        w = k8s_watch.Watch(return_type="object")     # raw JSON objects, see the module docstring
        self._watch = w
        started = time.monotonic()
        progress = False
        try:
            if self._stop.is_set():
                return
            stream = w.stream(self.list_fn, resource_version=self.rv, allow_watch_bookmarks=True,
                              timeout_seconds=self.watch_timeout,
                              _request_timeout=(CONNECT_TIMEOUT, self.watch_timeout + WATCH_READ_GRACE),
                              **self._selector())
            for ev in stream:
                progress = True
                self._on_event(ev)
                if self._stop.is_set():
                    return
            self.metrics.watch_restarts.inc(resource=self.resource, reason="timeout")
            log.debug("watch ended, re-watching resource=%s resource_version=%s", self.resource, self.rv)
            if not progress and time.monotonic() - started < PROGRESS_SECONDS:
                # a server (or proxy) that ends every watch at once must not make us spin
                self._stop.wait(self.backoff_initial)
        except Exception as e:  # noqa: BLE001 - classified below
            if self._stop.is_set():
                return
            cls = error_class(e)
            if cls == "gone":
                raise _Gone() from e
            lived = time.monotonic() - started
            if cls == "network" and (progress or lived >= PROGRESS_SECONDS):
                # an established watch dropped: re-open from the last resourceVersion now
                self.metrics.watch_restarts.inc(resource=self.resource, reason="dropped")
                log.info("watch dropped, re-watching resource=%s resource_version=%s after=%.1fs error=%s",
                         self.resource, self.rv, lived, _short(e))
                return
            self.metrics.watch_restarts.inc(resource=self.resource, reason="error")
            raise
        finally:
            self._watch = None

    def _on_event(self, ev: Mapping[str, Any]) -> None:
        etype = ev.get("type")
        raw = ev.get("raw_object")
        md = raw.get("metadata") if isinstance(raw, dict) else None
        rv = md.get("resourceVersion") if isinstance(md, dict) else None
        if etype == "BOOKMARK":
            if isinstance(rv, str) and rv:
                self.rv = rv
            return
        if etype not in ("ADDED", "MODIFIED", "DELETED"):
            log.warning("unknown watch event type=%s resource=%s: ignored", etype, self.resource)
            return
        obj = self._convert(raw)
        if obj is not None:
            self.sink([Event(self.resource, etype, obj=obj)])
        if isinstance(rv, str) and rv:
            self.rv = rv

    def _convert(self, raw: Any) -> Any:
        try:
            return self.convert(raw)
        except BadObject as e:
            key = (_identity(raw), str(e))
            if key not in self._bad_seen:
                self._bad_seen.add(key)
                self.metrics.bad_data.inc(kind=self.resource, reason="invalid-object")
                log.warning("skipping invalid object resource=%s object=%s problem=%s",
                            self.resource, key[0], e)
            return None


def _short(exc: Optional[BaseException]) -> str:
    if exc is None:
        return ""
    if isinstance(exc, ApiException):
        return f"HTTP {exc.status} {exc.reason or ''}".strip()
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]


# ---------------------------------------------------------------- the source


class KubeSource:
    """Pods on ``node_name``, all Namespaces and the Node itself, fed to ``sink``; and the
    annotation patch. ``start()`` returns at once; the first full list of each resource
    arrives as a ``RELISTED`` event."""

    def __init__(self, api: k8s.ApiClient, node_name: str, sink: Sink, metrics: Metrics, *,
                 watch_timeout: int = 300, backoff_initial: float = 0.2, backoff_max: float = 30.0):
        self.api = api
        self.core = k8s.CoreV1Api(api)
        self.node_name = node_name
        self.metrics = metrics
        opts = dict(watch_timeout=watch_timeout, backoff_initial=backoff_initial, backoff_max=backoff_max)
        self.informers = [
            Informer("node", self.core.list_node, node_info, sink, metrics,
                     field_selector=f"metadata.name={node_name}", **opts),
            Informer("namespace", self.core.list_namespace, namespace_info, sink, metrics, **opts),
            Informer("pod", self.core.list_pod_for_all_namespaces, pod_info, sink, metrics,
                     field_selector=f"spec.nodeName={node_name}", **opts),
        ]

    def start(self) -> None:
        for inf in self.informers:
            inf.start()

    def stop(self) -> None:
        for inf in self.informers:
            inf.stop()
        for inf in self.informers:
            inf.join()

    def annotate(self, patch: AnnotationPatch) -> bool:
        """Set or remove ``ambient.istio.io/redirection`` with a JSON merge patch. Returns False
        when the pod is gone (nothing to do); raises PatchError on any other failure."""
        body = {"metadata": {"annotations": {cluster.REDIRECTION_ANNOTATION: patch.value}}}
        try:
            resp = self.core.patch_namespaced_pod(
                patch.name, patch.namespace, body, _content_type="application/merge-patch+json",
                _preload_content=False, _request_timeout=(CONNECT_TIMEOUT, LIST_READ_TIMEOUT))
            resp.drain_conn()       # an unread body would poison the pooled connection
            resp.release_conn()
        except ApiException as e:
            if e.status == 404:
                self.metrics.annotation_patches.inc(result="gone")
                return False
            self.metrics.annotation_patches.inc(result="error")
            raise PatchError(f"patching {patch.show()} failed: {_short(e)}") from None
        except Exception as e:  # noqa: BLE001 - connection trouble of any kind
            self.metrics.annotation_patches.inc(result="error")
            raise PatchError(f"patching {patch.show()} failed: {_short(e)}") from None
        self.metrics.annotation_patches.inc(result="ok")
        log.info("annotated pod=%s/%s uid=%s %s=%s", patch.namespace, patch.name, patch.uid,
                 cluster.REDIRECTION_ANNOTATION, patch.value if patch.value else "<removed>")
        return True
