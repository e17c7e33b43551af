"""The controller's metrics and its HTTP endpoints: ``/metrics``, ``/healthz``, ``/readyz``.

Owns the metric names and the Prometheus text exposition format (version 0.0.4), written here by
hand: three metric types (counter, gauge, histogram) with labels are all the controller needs,
and they do not justify a dependency. The server is ``http.server`` on its own thread; it only
reads values, so a stuck apply never blocks a scrape.
"""

from __future__ import annotations

import logging
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional, Sequence

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_PORT = 15111   # on the host (hostNetwork): clear of kubelet, kube-proxy and istio-cni 15014
APPLY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()):
        self.name, self.help, self.label_names = name, help, tuple(labels)
        self._lock = threading.Lock()

    def _key(self, labels: dict) -> tuple[str, ...]:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {tuple(labels)}")
        return tuple(str(labels[n]) for n in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()):
        super().__init__(name, help, labels)
        self._values: dict[tuple[str, ...], float] = {} if labels else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        k = self._key(labels)
        with self._lock:
            self._values[k] = self._values.get(k, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def lines(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_num(v)}" for k, v in items]


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        k = self._key(labels)
        with self._lock:
            self._values[k] = float(value)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        k = self._key(labels)
        with self._lock:
            self._values[k] = self._values.get(k, 0.0) + amount


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Sequence[float] = APPLY_BUCKETS):
        super().__init__(name, help)
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self._counts = [0] * len(self.buckets)
        self._sum = 0.0
        self._n = 0

    def observe(self, value: float) -> None:
        with self._lock:
            self._sum += value
            self._n += 1
            for i, b in enumerate(self.buckets):
                if value <= b:
                    self._counts[i] += 1

    @property
    def count(self) -> int:
        with self._lock:
            return self._n

    def lines(self) -> list[str]:
        with self._lock:
            counts, total, n = list(self._counts), self._sum, self._n
        out = self.header()
        for b, c in zip(self.buckets, counts):
            out.append(f'{self.name}_bucket{{le="{_num(b)}"}} {c}')
        out += [f"{self.name}_sum {_num(total)}", f"{self.name}_count {n}"]
        return out


class Registry:
    def __init__(self) -> None:
        self._metrics: list[_Metric] = []

    def add(self, metric: _Metric) -> _Metric:
        if any(m.name == metric.name for m in self._metrics):
            raise ValueError(f"metric {metric.name} registered twice")
        self._metrics.append(metric)
        return metric

    def render(self) -> str:
        return "".join(line + "\n" for m in self._metrics for line in m.lines())


class Metrics:
    """Every metric the controller exports, on one registry."""

    def __init__(self) -> None:
        r = self.registry = Registry()
        p = "noderedirect_"
        self.pods_enrolled = r.add(Gauge(p + "pods_enrolled", "Pods in the ipset after the last successful apply."))
        self.pods_skipped = r.add(Gauge(p + "pods_skipped", "Pods that would be enrolled but carry data "
                                        "that cannot be used, by reason.", ["reason"]))
        self.bad_data = r.add(Counter(p + "bad_data_total", "Objects skipped because of invalid data "
                                      "(counted once per object and problem).", ["kind", "reason"]))
        self.apply_duration = r.add(Histogram(p + "apply_duration_seconds", "Duration of Engine.apply() "
                                              "(observe, plan, apply, verify)."))
        self.applies = r.add(Counter(p + "applies_total", "Applies by trigger (event|resync) and outcome "
                                     "(changed|unchanged|error).", ["trigger", "outcome"]))
        self.apply_errors = r.add(Counter(p + "apply_errors_total", "Applies that raised an error."))
        self.drift_repairs = r.add(Counter(p + "drift_repairs_total", "Periodic resyncs that found the "
                                           "kernel changed behind our back and repaired it."))
        self.last_sync = r.add(Gauge(p + "last_successful_sync_timestamp_seconds", "Unix time of the last "
                                     "apply that converged."))
        self.in_sync = r.add(Gauge(p + "in_sync", "1 once every resource has been listed in full."))
        self.ztunnel_ready = r.add(Gauge(p + "ztunnel_ready", "1 when a ztunnel pod of this node is "
                                         "selected and its netns found."))
        self.ztunnel_changes = r.add(Counter(p + "ztunnel_changes_total", "Times the selected ztunnel "
                                             "(pod, netns or IP) changed."))
        self.api_errors = r.add(Counter(p + "api_errors_total", "Failed Kubernetes API requests by "
                                        "resource and error class.", ["resource", "error"]))
        self.relists = r.add(Counter(p + "relists_total", "Full lists by resource.", ["resource"]))
        self.watch_restarts = r.add(Counter(p + "watch_restarts_total", "Watches restarted, by resource "
                                            "and reason (timeout|gone|dropped|error).", ["resource", "reason"]))
        self.annotation_patches = r.add(Counter(p + "annotation_patches_total", "Pod annotation patches "
                                                "by result (ok|gone|error).", ["result"]))
        self.source_errors = r.add(Counter(p + "source_errors_total", "Unreadable or invalid --source "
                                           "files."))


# ---------------------------------------------------------------- HTTP


Check = Callable[[], tuple[bool, str]]


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, self.server.registry.render(), CONTENT_TYPE)
        elif path in ("/healthz", "/readyz"):
            ok, why = (self.server.health if path == "/healthz" else self.server.ready)()
            self._send(200 if ok else 503, (why or ("ok" if ok else "not ok")) + "\n")
        else:
            self._send(404, "not found: try /metrics, /healthz or /readyz\n")

    def _send(self, code: int, body: str, ctype: str = "text/plain; charset=utf-8") -> None:
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt: str, *args) -> None:
        log.debug("http %s", fmt % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    registry: Registry
    health: Check
    ready: Check


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on ``address:port`` (port 0: any free port)."""

    def __init__(self, registry: Registry, health: Check, ready: Check,
                 address: str = "0.0.0.0", port: int = DEFAULT_PORT):
        self._srv = _Server((address, port), _Handler)
        self._srv.registry, self._srv.health, self._srv.ready = registry, health, ready
        self._thread: Optional[threading.Thread] = None

    @property
    def port(self) -> int:
        return self._srv.server_address[1]

    def start(self) -> "MetricsServer":
        self._thread = threading.Thread(target=self._srv.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()
        log.info("serving /metrics /healthz /readyz port=%d", self.port)
        return self

    def stop(self) -> None:
        self._srv.shutdown()
        self._srv.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


def parse_text(text: str) -> dict[str, float]:
    """Sample lines of an exposition as ``{'name{a="x",b="y"}': value}``, labels sorted by name
    (for tests and tooling; label values must not contain '",')."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        if "{" in name:
            base, _, labels = name.partition("{")
            parts = sorted(labels.rstrip("}").split('",'))
            name = base + "{" + '",'.join(p.rstrip('"') for p in parts) + '"}'
        out[name] = float(value)
    return out
