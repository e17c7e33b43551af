"""The controller under test, wired to the fake API server, and a dataplane that records.

``Harness`` is what a DaemonSet pod runs — KubeSource (the real ``kubernetes`` client) feeding a
Reconciler — with the Engine and the netns lookup replaceable: ``FakeEngine`` keeps what a node
would hold (enrolled pods, the ztunnel it points at) and every change an apply made.

The fixtures ``api`` and ``harness_factory`` are imported by the test modules (this folder has
no conftest.py: the other test folders import their own ``conftest`` by that name).
"""

from __future__ import annotations

import time

import pytest
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from fake_apiserver import FakeApiServer
from noderedirect.cluster import Hints, PodInfo, Settings
from noderedirect.host import NetnsRef
from noderedirect.metrics import Metrics
from noderedirect.model import Values


def eventually(pred: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        last = pred()
        if last:
            return last
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


# ---------------------------------------------------------------- a dataplane that records


@dataclass
class FakeKernel:
    """What a node would hold: the enrolled pods (ip -> uid) and the ztunnel the node points at.
    ``events`` records every change an apply made, in order."""

    pods: dict = field(default_factory=dict)
    ztunnel: Optional[tuple] = None
    events: list = field(default_factory=list)
    applies: list = field(default_factory=list)       # (zt netns spec, Values) per apply() call
    fail: Optional[Exception] = None


@dataclass
class FakeResult:
    applied: list
    notes: list = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.applied)


class FakeEngine:
    def __init__(self, kernel: FakeKernel, values: Values, node_ns: NetnsRef, zt_ns: NetnsRef):
        self.kernel, self.values, self.node_ns, self.zt_ns = kernel, values, node_ns, zt_ns
        self.notes: list = []
        self.closed = False

    def apply(self) -> FakeResult:
        k = self.kernel
        k.applies.append((self.zt_ns.spec, self.values))
        if k.fail is not None:
            raise k.fail
        changes = []
        want = {p.ip: p.uid for p in self.values.pods}
        for ip in sorted(set(k.pods) - set(want)):
            changes.append(("del", ip, k.pods.pop(ip)))
        for ip, uid in sorted(want.items()):
            if k.pods.get(ip) != uid:
                changes.append(("add", ip, uid))
                k.pods[ip] = uid
        zt = (self.zt_ns.spec, self.values.node.ztunnel_ip)
        if k.ztunnel != zt:
            changes.append(("ztunnel", zt))
            k.ztunnel = zt
        k.events += changes
        return FakeResult(applied=changes)

    def close(self) -> None:
        self.closed = True


class FakeLocator:
    """ztunnel netns named after the pod UID; veth named after the IP's last octet."""

    def __init__(self):
        self.node_ns = NetnsRef(spec="node", path="/nonexistent/node")

    def ztunnel_netns(self, zt: PodInfo, hints: Hints) -> NetnsRef:
        return NetnsRef(spec=f"zt-{zt.uid}", path=f"/nonexistent/zt-{zt.uid}")

    def ztunnel_veth(self, zt_ip: str, hints: Hints) -> str:
        return f"veth{zt_ip.rsplit('.', 1)[1]}"

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- the controller against the fake API


class Harness:
    """Fake API server + KubeSource (real client) + Reconciler, with a fake or real dataplane."""

    def __init__(self, api: FakeApiServer, *, kernel: Optional[FakeKernel] = None, locator=None,
                 make_engine=None, settings: Optional[Settings] = None, resync: float = 3600.0,
                 watch_timeout: int = 5, debounce: float = 0.02):
        from kubernetes import client as k8s

        from noderedirect.kube import KubeSource
        from noderedirect.reconcile import Reconciler

        self.api = api
        self.kernel = kernel if kernel is not None else FakeKernel()
        self.metrics = Metrics()
        cfg = k8s.Configuration(host=api.url)
        self.client = k8s.ApiClient(cfg)
        if make_engine is None:
            make_engine = lambda v, n, z: FakeEngine(self.kernel, v, n, z)  # noqa: E731
        self.rec = Reconciler(settings or Settings(node_name="node-1"), locator or FakeLocator(),
                              self.metrics, make_engine=make_engine, resync=resync, debounce=debounce,
                              retry_max=0.5)
        self.source = KubeSource(self.client, "node-1", self.rec.handle, self.metrics,
                                 watch_timeout=watch_timeout, backoff_initial=0.05, backoff_max=0.3)
        self.rec.annotate = self.source.annotate

    def start(self) -> "Harness":
        self.rec.start()
        self.source.start()
        return self

    def stop(self) -> None:
        if getattr(self, "_stopped", False):
            return
        self._stopped = True
        self.source.stop()
        self.rec.stop()
        self.client.close()

    # ------------------------------------------------------------ helpers

    def values(self) -> Optional[Values]:
        return self.kernel.applies[-1][1] if self.kernel.applies else None

    def enrolled(self) -> dict:
        """ip -> uid as the (fake) kernel holds it."""
        return dict(self.kernel.pods)

    def settle(self, timeout: float = 10.0) -> None:
        assert self.rec.wait_idle(timeout), "the reconciler did not go idle"


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def api():
    srv = FakeApiServer().start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def harness_factory(api):
    made: list[Harness] = []

    def make(**kw) -> Harness:
        h = Harness(api, **kw)
        made.append(h)
        return h

    try:
        yield make
    finally:
        for h in made:
            h.stop()
