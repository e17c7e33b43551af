"""The controller loop: cluster events in, one coalesced ``Engine.apply()`` out.

Owns when the dataplane is changed, never how (that is :mod:`noderedirect.apply`). The shape
follows Calico Felix: event handlers only update the cluster state and mark it dirty; one
thread turns the state into ``Values`` (:mod:`noderedirect.cluster`) and applies them.

- **In-sync gate.** Nothing is applied, and nothing is cleaned up, before every resource has
  been listed in full once. A restarted controller therefore never acts on a partial view.
- **Coalescing.** A burst of events is one apply: the loop waits ``debounce`` seconds after the
  first dirty mark, then works on the newest state. An event that changes nothing the dataplane
  cares about (an annotation echo, a pod of another namespace) costs a values comparison, not
  an apply.
- **Resync.** Every ``resync`` seconds the engine observes and plans again even when nothing
  happened; a non-empty plan then is drift someone else caused, repaired and counted.
- **ztunnel changes.** One long-lived Engine per ztunnel netns. A new ztunnel (rolling update,
  restart, new IP) gets a new Engine on the same node netns; its plan programs the new ztunnel
  netns and updates the node side *in place*: the ipset keeps every member, the ``ztunnel-*``
  chains are rewritten atomically by ``iptables-restore``. The original tore the node down and
  rebuilt it (W6). See docs/controller.md for exactly what changes and what the kernel does to
  routes through a re-created tunnel link.
- **Failures.** A failed apply is retried with exponential backoff; the last good state stays
  in the kernel meanwhile. The controller never removes anything when it stops (W20): removal
  is ``noderedirect cleanup``.

Pod annotations (``ambient.istio.io/redirection: enabled``) are patched only after an apply
that enrolled the pod converged, and removed once it is no longer enrolled.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import logging
import os
import re
import threading
import time
from typing import Any, Callable, Optional, Protocol, Sequence

from . import cluster
from .cluster import AnnotationPatch, ClusterState, Event, Hints, PodInfo, Settings
from .host import Host, HostError, NetnsRef
from .metrics import Metrics
from .model import Values

log = logging.getLogger(__name__)

MAIN_TABLE = 254


class LocateError(HostError):
    """The ztunnel pod's netns or its host-side interface cannot be found."""


class EngineLike(Protocol):
    values: Values

    def apply(self) -> Any: ...
    def close(self) -> None: ...


EngineFactory = Callable[[Values, NetnsRef, NetnsRef], EngineLike]
Annotate = Callable[[AnnotationPatch], bool]


def engine_factory(backend: str = "iptables", tunnel: str = "auto") -> EngineFactory:
    def make(values: Values, node_ns: NetnsRef, zt_ns: NetnsRef) -> EngineLike:
        from .apply import Engine
        return Engine(values, node_ns, zt_ns, backend=backend, tunnel=tunnel)
    return make


# ---------------------------------------------------------------- finding the ztunnel in the kernel


def cgroup_mentions_pod(text: str, uid: str) -> bool:
    """Whether a ``/proc/PID/cgroup`` text puts the process in pod ``uid``: cgroupfs driver
    (``/kubepods/burstable/pod<uid>/…``), systemd driver (``kubepods-burstable-pod<uid with
    _>.slice``) on cgroup v1 or v2, cri-o and containerd alike."""
    for form in {uid, uid.replace("-", "_")}:
        if re.search(r"pod" + re.escape(form) + r"(?![0-9A-Za-z_-])", text):
            return True
    return False


def _start_time(stat_text: str) -> int:
    # field 22 of /proc/PID/stat, counted after the ")" that ends the command name
    return int(stat_text.rsplit(")", 1)[1].split()[19])


def find_pod_netns(uid: str, proc_root: str = "/proc", exclude: Optional[tuple] = None) -> NetnsRef:
    """The netns of the oldest process of pod ``uid`` (its sandbox), as ``PROC/PID/ns/net``.
    ``exclude`` is a netns identity to skip (the node's own: a hostNetwork process)."""
    found: list[tuple[int, int, str]] = []
    try:
        pids = [p for p in os.listdir(proc_root) if p.isdigit()]
    except OSError as e:
        raise LocateError(f"cannot list {proc_root}: {e.strerror}") from None
    for pid in pids:
        base = os.path.join(proc_root, pid)
        try:
            with open(os.path.join(base, "cgroup"), encoding="utf-8", errors="replace") as f:
                if not cgroup_mentions_pod(f.read(), uid):
                    continue
            with open(os.path.join(base, "stat"), encoding="utf-8", errors="replace") as f:
                start = _start_time(f.read())
            st = os.stat(os.path.join(base, "ns", "net"))
        except (OSError, ValueError, IndexError):
            continue            # the process exited, or it is not ours to read
        if exclude is not None and (st.st_dev, st.st_ino) == exclude:
            continue
        found.append((start, int(pid), os.path.join(base, "ns", "net")))
    if not found:
        raise LocateError(f"no process of pod uid {uid} found under {proc_root} "
                          "(is the host's /proc mounted there?)")
    return NetnsRef.resolve(min(found)[2])


class Locator:
    """Where the kernel side is: the node netns, the ztunnel netns and its host-side veth.

    The ztunnel netns comes from ``--ztunnel-netns``, else the source file's hint, else a scan
    of ``proc_root`` for the pod's processes (cached while the path stays valid). The veth is
    ``--ztunnel-veth``, else the hint, else the device of the node's main-table ``/32`` route
    to the ztunnel IP (the original's rule, legacy-mode.md W11)."""

    def __init__(self, node_ns: NetnsRef, *, proc_root: str = "/proc",
                 ztunnel_netns: Optional[str] = None, ztunnel_veth: Optional[str] = None):
        self.node_ns = node_ns
        self.proc_root = proc_root
        self.netns_override, self.veth_override = ztunnel_netns, ztunnel_veth
        self._host: Optional[Host] = None
        self._cache: dict[str, NetnsRef] = {}

    def close(self) -> None:
        if self._host is not None:
            self._host.close()
            self._host = None

    def ztunnel_netns(self, zt: PodInfo, hints: Hints) -> NetnsRef:
        spec = self.netns_override or hints.ztunnel_netns
        if spec:
            return NetnsRef.resolve(spec)
        cached = self._cache.get(zt.uid)
        if cached is not None:
            try:
                return NetnsRef.resolve(cached.path)
            except HostError:
                self._cache.pop(zt.uid, None)
        ref = find_pod_netns(zt.uid, self.proc_root, exclude=self.node_ns.identity)
        self._cache = {zt.uid: ref}
        log.info("found ztunnel netns pod=%s uid=%s path=%s", zt.key, zt.uid, ref.path)
        return ref

    def ztunnel_veth(self, zt_ip: str, hints: Hints) -> str:
        if self.veth_override or hints.ztunnel_veth:
            return self.veth_override or hints.ztunnel_veth
        if self._host is None:
            self._host = Host(self.node_ns)
        want = ipaddress.ip_network(f"{zt_ip}/32")
        for r in self._host.routes(MAIN_TABLE):
            try:
                if ipaddress.ip_network(r.dst) == want and r.dev:
                    return r.dev
            except ValueError:
                continue
        raise LocateError(f"no /32 route to the ztunnel IP {zt_ip} in the main table of netns "
                          f"{self.node_ns.spec}: the legacy design needs a per-pod veth CNI "
                          "(ptp, Calico …), not a bridge; or pass --ztunnel-veth")


# ---------------------------------------------------------------- the loop


@dataclasses.dataclass
class _Status:
    in_sync: bool = False
    ok: bool = False
    message: str = "waiting for the first full list of pods, namespaces and the node"
    heartbeat: float = 0.0


class Reconciler:
    """Holds the cluster state and runs the apply loop on its own thread."""

    def __init__(self, settings: Settings, locator: Locator, metrics: Metrics, *,
                 make_engine: EngineFactory, annotate: Optional[Annotate] = None,
                 resync: float = 60.0, debounce: float = 0.05, retry_max: float = 60.0):
        self.settings = settings
        self.locator = locator
        self.metrics = metrics
        self.make_engine = make_engine
        self.annotate = annotate
        self.resync, self.debounce, self.retry_max = resync, debounce, retry_max
        self._cond = threading.Condition()
        self._state = ClusterState()
        self._dirty = False
        self._busy = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._status = _Status(heartbeat=time.monotonic())
        # what the kernel holds, as far as we know
        self._engine: Optional[EngineLike] = None
        self._engine_key: Optional[tuple] = None
        self._engine_fresh = False
        self._zt_uid: Optional[str] = None
        self._applied: Optional[Values] = None
        self._enrolled: frozenset = frozenset()
        self._last_apply = 0.0
        self._failures = 0
        self._retry_at: Optional[float] = None
        self._sent: dict[str, Optional[str]] = {}
        self._skips_seen: set[tuple[str, str]] = set()
        self._said: str = ""
        self.passes = 0
        self.applies: list[Any] = []      # engine results, newest last (bounded)

    # ------------------------------------------------------------ input

    def handle(self, events: Sequence[Event]) -> None:
        """Called by sources, from any thread: update the state, mark it dirty. Never blocks on
        the kernel."""
        with self._cond:
            self._state = functools.reduce(cluster.apply_event, events, self._state)
            self._dirty = True
            self._cond.notify_all()

    @property
    def state(self) -> ClusterState:
        with self._cond:
            return self._state

    # ------------------------------------------------------------ thread

    def start(self) -> "Reconciler":
        self._thread = threading.Thread(target=self._loop, name="reconcile", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the loop. The dataplane is left exactly as it is."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        self.locator.close()

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """True once no event is pending and no pass is running (for tests and ``--once``)."""
        end = time.monotonic() + timeout
        with self._cond:
            while self._dirty or self._busy:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                self._status.heartbeat = time.monotonic()
                trigger = self._due()
                if trigger is None:
                    self._cond.wait(self._sleep_for())
                    continue
                if trigger == "event" and self.debounce:
                    # coalesce: let the rest of a burst arrive (their notifications must not cut
                    # the wait short), then take the newest state
                    until = time.monotonic() + self.debounce
                    while not self._stop.is_set() and (left := until - time.monotonic()) > 0:
                        self._cond.wait(left)
                if self._stop.is_set():
                    break
                state, self._dirty, self._busy = self._state, False, True
            try:
                self._pass(state, trigger)
            except Exception:  # noqa: BLE001 - the loop must survive a bug in one pass
                log.exception("reconcile pass failed unexpectedly")
                self._failed("internal error (see log)")
            finally:
                self.passes += 1
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _due(self) -> Optional[str]:
        now = time.monotonic()
        if self._stop.is_set():
            return None
        if self._retry_at is not None and now >= self._retry_at:
            return "retry"
        if self._dirty:
            return "event"
        # while a failed apply waits for its retry, the retry is the resync (else a failure,
        # which never moves _last_apply, would make resync due at once: a hot loop)
        if (self._retry_at is None and self._status.in_sync and self._engine is not None
                and now >= self._last_apply + self.resync):
            return "resync"
        return None

    def _sleep_for(self) -> float:
        now = time.monotonic()
        wake = [self._last_apply + self.resync] if self._engine is not None and self._retry_at is None else []
        if self._retry_at is not None:
            wake.append(self._retry_at)
        wake.append(now + 5.0)      # keep the heartbeat fresh
        return max(0.01, min(wake) - now)

    # ------------------------------------------------------------ one pass

    def _pass(self, state: ClusterState, trigger: str) -> None:
        if not state.in_sync:
            missing = [k for k in cluster.KINDS if k not in state.synced]
            self._say(f"waiting for the first full list of: {', '.join(missing)}")
            return
        if not self._status.in_sync:
            log.info("in sync: pods=%d namespaces=%d node=%s", len(state.pods), len(state.namespaces),
                     state.node.name if state.node else "<none>")
        self._status.in_sync = True
        self.metrics.in_sync.set(1)
        zt = cluster.select_ztunnel(state, self.settings, self._zt_uid)
        if zt is None:
            self.metrics.ztunnel_ready.set(0)
            self._retry_at = None
            self._status.ok = True
            self._say("no ready ztunnel pod on this node: the dataplane is kept as it is "
                      "(captured traffic waits for a ztunnel, as in 1.19/1.20)", level=logging.WARNING)
            return
        try:
            ref = self.locator.ztunnel_netns(zt, state.hints)
            veth = self.locator.ztunnel_veth(cluster.ipv4_of(zt) or "", state.hints)
            build = cluster.build_values(state, zt, veth, self.settings)
        except (cluster.ClusterError, HostError, ValueError) as e:
            self.metrics.ztunnel_ready.set(0)
            self._failed(str(e))
            return
        self.metrics.ztunnel_ready.set(1)
        self._report_skips(build)
        engine = self._engine_for(zt, ref, build.values)
        changed_values = build.values != self._applied
        if changed_values or self._engine_fresh or trigger in ("resync", "retry"):
            if not self._apply(engine, build, trigger, changed_values):
                return
        self._patch_annotations(state)

    def _engine_for(self, zt: PodInfo, ref: NetnsRef, values: Values) -> EngineLike:
        try:
            key: tuple = (ref.path, ref.identity)
        except OSError:
            key = (ref.path,)
        if self._engine is not None and key == self._engine_key:
            return self._engine
        old = self._applied.node if self._applied is not None else None
        if self._engine is not None:
            self.metrics.ztunnel_changes.inc()
            log.info("ztunnel changed from=%s/%s to=%s/%s netns=%s: programming the new ztunnel netns "
                     "and updating the node side in place; pod enrollment is kept",
                     self._zt_uid, old.ztunnel_ip if old else "?", zt.uid, values.node.ztunnel_ip, ref.path)
            self._engine.close()
        self._engine = self.make_engine(values, self.locator.node_ns, ref)
        self._engine_key, self._engine_fresh, self._zt_uid = key, True, zt.uid
        return self._engine

    def _apply(self, engine: EngineLike, build: cluster.Build, trigger: str, changed_values: bool) -> bool:
        engine.values = build.values
        t0 = time.perf_counter()
        try:
            result = engine.apply()
        except Exception as e:  # noqa: BLE001 - host errors, conflicts, missing features, bugs alike
            self.metrics.apply_duration.observe(time.perf_counter() - t0)
            self.metrics.apply_errors.inc()
            self.metrics.applies.inc(trigger=trigger, outcome="error")
            self._failed(f"apply failed: {e}", exc=e)
            return False
        seconds = time.perf_counter() - t0
        self.metrics.apply_duration.observe(seconds)
        changes = len(getattr(result, "applied", []) or [])
        self.metrics.applies.inc(trigger=trigger, outcome="changed" if changes else "unchanged")
        if trigger == "resync" and not changed_values and not self._engine_fresh and changes:
            self.metrics.drift_repairs.inc()
            log.warning("drift repaired changes=%d first=%r", changes,
                        getattr(result.applied[0], "desc", str(result.applied[0])))
        elif changes:
            log.info("applied trigger=%s changes=%d pods=%d seconds=%.3f",
                     trigger, changes, len(build.values.pods), seconds)
        for note in getattr(result, "notes", []) or []:
            log.info("note: %s", note)
        self.applies = (self.applies + [result])[-50:]
        self._applied = build.values
        self._enrolled = frozenset(p.uid for p in build.enrolled)
        self._engine_fresh = False
        self._last_apply = time.monotonic()
        self._failures, self._retry_at = 0, None
        self.metrics.pods_enrolled.set(len(build.values.pods))
        self.metrics.last_sync.set(time.time())
        self._status.ok = True
        self._say(f"ready: {len(build.values.pods)} pods enrolled, ztunnel {build.values.node.ztunnel_ip}")
        return True

    def _failed(self, why: str, exc: Optional[BaseException] = None) -> None:
        self._failures += 1
        delay = min(self.retry_max, 0.5 * 2 ** (self._failures - 1))
        self._retry_at = time.monotonic() + delay
        self._status.ok = False
        level = logging.WARNING if self._failures < 5 else logging.ERROR
        log.log(level, "reconcile failed attempt=%d retry_in=%.1fs error=%s", self._failures, delay,
                why.splitlines()[0] if why else "?")
        if exc is not None and not isinstance(exc, HostError):
            log.debug("traceback", exc_info=exc)
        self._status.message = f"not ready: {why.splitlines()[0] if why else '?'}"

    def _report_skips(self, build: cluster.Build) -> None:
        counts: dict[str, int] = {}
        for s in build.skipped:
            counts[s.reason] = counts.get(s.reason, 0) + 1
            key = (s.pod.uid, s.detail)
            if key not in self._skips_seen:
                self._skips_seen.add(key)
                self.metrics.bad_data.inc(kind="pod", reason=s.reason)
                log.warning("pod not enrolled pod=%s uid=%s reason=%s detail=%r",
                            s.pod.key, s.pod.uid, s.reason, s.detail)
        for reason in ("bad-value", "duplicate-ip", "duplicate-name"):
            self.metrics.pods_skipped.set(counts.get(reason, 0), reason=reason)

    def _patch_annotations(self, state: ClusterState) -> None:
        if self.annotate is None:
            return
        # forget what we sent once the state shows it (or the pod is gone)
        for uid, value in list(self._sent.items()):
            pod = state.pods.get(uid)
            if pod is None or pod.annotation(cluster.REDIRECTION_ANNOTATION) == value:
                del self._sent[uid]
        for patch in cluster.annotation_patches(state, self._enrolled):
            if patch.uid in self._sent and self._sent[patch.uid] == patch.value:
                continue        # sent already; the watch has not echoed it yet
            try:
                self.annotate(patch)
                self._sent[patch.uid] = patch.value
            except Exception as e:  # noqa: BLE001 - the pod stays as it is; retried below
                self._failures += 1
                delay = min(self.retry_max, 0.5 * 2 ** (self._failures - 1))
                self._retry_at = time.monotonic() + delay
                log.warning("annotation patch failed pod=%s/%s retry_in=%.1fs error=%s",
                            patch.namespace, patch.name, delay, e)
                return

    def _say(self, message: str, level: int = logging.INFO) -> None:
        self._status.message = message
        if message != self._said:
            self._said = message
            log.log(level, "%s", message)

    # ------------------------------------------------------------ health

    def health(self) -> tuple[bool, str]:
        """Alive: the loop thread runs and has woken up recently (a hung apply fails this)."""
        if self._thread is None or not self._thread.is_alive():
            return False, "reconcile loop is not running"
        age = time.monotonic() - self._status.heartbeat
        limit = max(3 * self.resync, 120.0)
        if age > limit and self._busy:
            return False, f"a reconcile pass has been running for {age:.0f}s"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        """Ready: in sync with the cluster and the last pass did not fail."""
        s = self._status
        return (s.in_sync and s.ok), s.message
