"""A small stand-in for the Kubernetes API server that speaks the real HTTP list/watch protocol.

It is driven through the real ``kubernetes`` Python client, so what it must get right is the
wire protocol, not Kubernetes semantics at large:

- JSON list objects (``PodList`` …) with ``metadata.resourceVersion``; items without kind;
- ``?watch=true&resourceVersion=N&timeoutSeconds=T``: ``200`` with ``Transfer-Encoding:
  chunked``, one JSON event per line (``ADDED``/``MODIFIED``/``DELETED``/``BOOKMARK``), every
  event after N in order, ended by the terminating chunk when T runs out;
- a watch from a resourceVersion older than the last compaction gets the real server's answer:
  ``200`` then ``{"type":"ERROR","object":{"kind":"Status","code":410,…}}``;
- ``fieldSelector`` ``spec.nodeName=…`` / ``metadata.name=…`` on lists and watches;
- ``PATCH`` of a pod with ``application/merge-patch+json`` (RFC 7386), recorded in ``patches``;
- failure injection: expire open watches with 410, drop every connection without the
  terminating chunk, go down (connections refused) and come back up on the same port, answer
  the next N matching requests with an error status.

Objects live in memory and keep their resourceVersions across down/up, like etcd.
"""

from __future__ import annotations

import copy
import json
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional
from urllib.parse import parse_qs, urlsplit

KINDS = {"pods": "Pod", "namespaces": "Namespace", "nodes": "Node"}


# ---------------------------------------------------------------- object builders


def pod(name: str, namespace: str = "default", *, ip: Optional[str] = None, uid: Optional[str] = None,
        node: str = "node-1", labels: Optional[dict] = None, annotations: Optional[dict] = None,
        ready: bool = True, phase: str = "Running", host_network: bool = False,
        created: str = "2024-05-01T10:00:00Z", ips: Optional[list] = None) -> dict:
    status: dict[str, Any] = {"phase": phase}
    if ip is not None:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": a} for a in (ips or [ip])]
    status["conditions"] = [{"type": "Ready", "status": "True" if ready else "False"}]
    status["containerStatuses"] = [{"name": "main", "ready": ready}]
    md: dict[str, Any] = {"name": name, "namespace": namespace, "uid": uid or str(uuid.uuid4()),
                          "creationTimestamp": created}
    if labels:
        md["labels"] = dict(labels)
    if annotations:
        md["annotations"] = dict(annotations)
    spec: dict[str, Any] = {"nodeName": node, "containers": [{"name": "main", "image": "x"}]}
    if host_network:
        spec["hostNetwork"] = True
    return {"metadata": md, "spec": spec, "status": status}


def namespace(name: str, labels: Optional[dict] = None) -> dict:
    md: dict[str, Any] = {"name": name, "uid": str(uuid.uuid4())}
    if labels:
        md["labels"] = dict(labels)
    return {"metadata": md, "spec": {}, "status": {"phase": "Active"}}


def node(name: str = "node-1", pod_cidr: Optional[str] = "10.244.1.0/24",
         internal_ip: str = "172.18.0.2") -> dict:
    spec = {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]} if pod_cidr else {}
    return {"metadata": {"name": name, "uid": str(uuid.uuid4())}, "spec": spec,
            "status": {"addresses": [{"type": "InternalIP", "address": internal_ip},
                                     {"type": "Hostname", "address": name}]}}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


# ---------------------------------------------------------------- the server


@dataclass
class _Injected:
    method: str
    path_prefix: str
    status: int
    count: int


class _Watch:
    def __init__(self, kind: str, selector: dict, handler: "_Handler"):
        self.kind, self.selector, self.handler = kind, selector, handler
        self.expire = False


class FakeApiServer:
    def __init__(self, port: int = 0):
        self.cond = threading.Condition()
        self.rv = 100
        self.objects: dict[tuple[str, str, str], dict] = {}
        self.history: list[tuple[int, str, str, dict]] = []
        self.compacted_rv = 0
        self.patches: list[dict] = []
        self.requests: list[tuple[str, str]] = []
        self.injected: list[_Injected] = []
        self.watches: set[_Watch] = set()
        self.conns: set[socket.socket] = set()
        self.down = False
        self._port = port
        self._srv: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def start(self) -> "FakeApiServer":
        srv = ThreadingHTTPServer(("127.0.0.1", self._port), _Handler)
        srv.daemon_threads = True
        srv.fake = self  # type: ignore[attr-defined]
        self._port = srv.server_address[1]
        self._srv = srv
        self._thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-apiserver", daemon=True)
        self._thread.start()
        with self.cond:
            self.down = False
        return self

    def stop(self) -> None:
        self.go_down()

    def go_down(self) -> None:
        """Stop listening and cut every open connection: clients get connection refused."""
        with self.cond:
            self.down = True
            self.cond.notify_all()
        if self._srv is not None:
            self._srv.shutdown()
            self._srv.server_close()
            self._srv = None
        self._cut_all()

    def come_up(self) -> None:
        self.start()

    def drop_watches(self) -> None:
        """Close every connection mid-stream, without the terminating chunk."""
        self._cut_all()

    def _cut_all(self) -> None:
        with self.cond:
            conns = list(self.conns)
            self.conns.clear()
            self.cond.notify_all()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def expire_watches(self) -> None:
        """etcd compaction: every open watch gets a 410 ERROR event, and so does any new watch
        from a resourceVersion up to now."""
        with self.cond:
            self.compacted_rv = self.rv
            for w in self.watches:
                w.expire = True
            self.cond.notify_all()

    def compact(self) -> None:
        with self.cond:
            self.compacted_rv = self.rv

    def fail_next(self, method: str, path_prefix: str, status: int, count: int = 1) -> None:
        with self.cond:
            self.injected.append(_Injected(method, path_prefix, status, count))

    def open_watches(self, kind: Optional[str] = None) -> int:
        with self.cond:
            return sum(1 for w in self.watches if kind is None or w.kind == kind)

    def wait_watches(self, n: int = 3, timeout: float = 10.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.open_watches() >= n:
                return
            time.sleep(0.02)
        raise AssertionError(f"only {self.open_watches()} watches open after {timeout}s")

    # ------------------------------------------------------------ objects

    @staticmethod
    def _key(kind: str, obj: dict) -> tuple[str, str, str]:
        md = obj["metadata"]
        return kind, md.get("namespace", ""), md["name"]

    def _record(self, etype: str, kind: str, obj: dict) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.history.append((self.rv, etype, kind, copy.deepcopy(obj)))
        self.cond.notify_all()

    def put(self, kind: str, obj: dict) -> dict:
        """Create or replace (ADDED / MODIFIED)."""
        obj = copy.deepcopy(obj)
        with self.cond:
            key = self._key(kind, obj)
            etype = "MODIFIED" if key in self.objects else "ADDED"
            self.objects[key] = obj
            self._record(etype, kind, obj)
            return copy.deepcopy(obj)

    def update(self, kind: str, name: str, ns: str = "", fn=None, **merge) -> dict:
        with self.cond:
            key = (kind, ns, name)
            obj = copy.deepcopy(self.objects[key])
            obj = fn(obj) if fn else merge_patch(obj, merge)
            self.objects[key] = obj
            self._record("MODIFIED", kind, obj)
            return copy.deepcopy(obj)

    def delete(self, kind: str, name: str, ns: str = "") -> None:
        with self.cond:
            obj = self.objects.pop((kind, ns, name))
            self._record("DELETED", kind, obj)

    def get(self, kind: str, name: str, ns: str = "") -> dict:
        with self.cond:
            return copy.deepcopy(self.objects[(kind, ns, name)])

    # ------------------------------------------------------------ request side

    def _injected(self, method: str, path: str) -> Optional[int]:
        with self.cond:
            for inj in self.injected:
                if inj.method == method and path.startswith(inj.path_prefix) and inj.count > 0:
                    inj.count -= 1
                    return inj.status
        return None


def _selector(q: dict) -> dict:
    raw = (q.get("fieldSelector") or [""])[0]
    out = {}
    for part in filter(None, raw.split(",")):
        k, sep, v = part.partition("=")
        if not sep or k not in ("spec.nodeName", "metadata.name", "metadata.namespace"):
            raise ValueError(f"unsupported field selector {part!r}")
        out[k] = v.lstrip("=")
    return out


def _matches(obj: dict, selector: dict) -> bool:
    for k, v in selector.items():
        cur: Any = obj
        for part in k.split("."):
            cur = cur.get(part) if isinstance(cur, dict) else None
        if (cur or "") != v:
            return False
    return True


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ThreadingHTTPServer

    @property
    def fake(self) -> FakeApiServer:
        return self.server.fake  # type: ignore[attr-defined]

    def setup(self) -> None:
        super().setup()
        with self.fake.cond:
            self.fake.conns.add(self.connection)

    def finish(self) -> None:
        with self.fake.cond:
            self.fake.conns.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, fmt: str, *args) -> None:
        pass

    # ------------------------------------------------------------ plumbing

    def _json(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _route(self) -> tuple[str, Optional[str], Optional[str]]:
        """(kind, namespace, name) from /api/v1/... paths."""
        parts = urlsplit(self.path).path.strip("/").split("/")
        if parts[:2] != ["api", "v1"]:
            raise LookupError(self.path)
        rest = parts[2:]
        if len(rest) == 1 and rest[0] in KINDS:
            return rest[0], None, None
        if len(rest) == 4 and rest[0] == "namespaces" and rest[2] in KINDS:
            return rest[2], rest[1], rest[3]
        if len(rest) == 2 and rest[0] in KINDS:
            return rest[0], None, rest[1]
        raise LookupError(self.path)

    def _pre(self, method: str) -> bool:
        fake = self.fake
        if fake.down:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return False
        with fake.cond:
            fake.requests.append((method, self.path))
        code = fake._injected(method, urlsplit(self.path).path)
        if code is not None:
            self._json(code, _status(code, "InternalError" if code >= 500 else "Forbidden", "injected"))
            return False
        return True

    # ------------------------------------------------------------ verbs

    def do_GET(self) -> None:  # noqa: N802
        if not self._pre("GET"):
            return
        try:
            kind, ns, name = self._route()
        except LookupError:
            self._json(404, _status(404, "NotFound", f"no route {self.path}"))
            return
        q = parse_qs(urlsplit(self.path).query)
        try:
            sel = _selector(q)
        except ValueError as e:
            self._json(400, _status(400, "BadRequest", str(e)))
            return
        if name is not None:
            with self.fake.cond:
                obj = self.fake.objects.get((kind, ns or "", name))
            if obj is None:
                self._json(404, _status(404, "NotFound", f"{kind} {name} not found"))
            else:
                self._json(200, dict(obj, kind=KINDS[kind], apiVersion="v1"))
            return
        if (q.get("watch") or [""])[0] in ("true", "1", "True"):
            self._watch(kind, sel, q)
            return
        with self.fake.cond:
            items = [copy.deepcopy(o) for (k, _, _), o in sorted(self.fake.objects.items())
                     if k == kind and _matches(o, sel)]
            rv = str(self.fake.rv)
        self._json(200, {"kind": KINDS[kind] + "List", "apiVersion": "v1",
                         "metadata": {"resourceVersion": rv}, "items": items})

    def _watch(self, kind: str, sel: dict, q: dict) -> None:
        fake = self.fake
        start = (q.get("resourceVersion") or ["0"])[0] or "0"
        timeout = float((q.get("timeoutSeconds") or ["1800"])[0])
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        w = _Watch(kind, sel, self)
        with fake.cond:
            pos = int(start) if start != "0" else fake.rv
            gone = pos < fake.compacted_rv
            if not gone:
                fake.watches.add(w)
        try:
            if gone:
                self._chunk(self._gone_line(pos))
                self._chunk(b"")
                return
            deadline = time.monotonic() + timeout
            while True:
                with fake.cond:
                    while True:
                        pending = [h for h in fake.history if h[0] > pos]
                        if (pending or w.expire or fake.down or self.connection not in fake.conns
                                or time.monotonic() >= deadline):
                            break
                        fake.cond.wait(max(0.0, min(0.5, deadline - time.monotonic())))
                    expire, cut = w.expire, fake.down or self.connection not in fake.conns
                if cut:
                    self.close_connection = True
                    return
                for rv, etype, k, obj in pending:
                    pos = rv
                    if k == kind and _matches(obj, sel):
                        self._chunk(json.dumps({"type": etype, "object": obj}).encode() + b"\n")
                if expire:
                    self._chunk(self._gone_line(pos))
                    self._chunk(b"")
                    return
                if time.monotonic() >= deadline:
                    self._chunk(b"")            # the terminating chunk: a clean end
                    return
        except OSError:
            self.close_connection = True
        finally:
            with fake.cond:
                fake.watches.discard(w)

    @staticmethod
    def _gone_line(rv: int) -> bytes:
        st = _status(410, "Expired", f"too old resource version: {rv}")
        return json.dumps({"type": "ERROR", "object": st}).encode() + b"\n"

    def do_PATCH(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if not self._pre("PATCH"):
            return
        try:
            kind, ns, name = self._route()
        except LookupError:
            self._json(404, _status(404, "NotFound", f"no route {self.path}"))
            return
        ctype = self.headers.get("Content-Type", "")
        if ctype != "application/merge-patch+json":
            self._json(415, _status(415, "UnsupportedMediaType", f"only merge patches here, not {ctype}"))
            return
        patch = json.loads(body or b"{}")
        fake = self.fake
        with fake.cond:
            key = (kind, ns or "", name)
            if key not in fake.objects:
                self._json(404, _status(404, "NotFound", f"{kind} {ns}/{name} not found"))
                return
            fake.patches.append({"namespace": ns, "name": name, "body": patch, "content_type": ctype,
                                 "uid": fake.objects[key]["metadata"].get("uid")})
            obj = merge_patch(fake.objects[key], patch)
            fake.objects[key] = obj
            fake._record("MODIFIED", kind, obj)
            out = copy.deepcopy(obj)
        self._json(200, dict(out, kind=KINDS[kind], apiVersion="v1"))
