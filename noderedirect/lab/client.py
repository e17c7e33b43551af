"""The lab's HTTP client: one GET from inside a pod's netns, without curl.

:func:`request` creates its socket inside the given netns (a short-lived thread enters the
netns, creates the socket and ends; connecting, sending and reading then happen in the calling
thread, the socket stays in that netns). Failures are returned, never raised, so a scenario
can assert the failure it expects: ``error`` is ``"ECONNRESET"``, ``"ECONNREFUSED"``,
``"EHOSTUNREACH"`` …, ``"timeout"`` (the whole exchange took longer than ``timeout``),
``"empty response"`` (closed before a status line, curl's error 52), ``"truncated body
(got N of M bytes)"`` or ``"bad response: …"``.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Optional

from .procs import NetnsError, addr_text, errno_text, socket_in_netns

log = logging.getLogger(__name__)

MAX_RESPONSE = 80 * 1024 * 1024      # a little more than the server's largest body


@dataclass(frozen=True)
class Response:
    """The outcome of one request. ``local`` is the client's own ``ip:port``, also when the
    connection failed (None only if no route or address could be found for it)."""

    status: Optional[int]
    body: bytes
    local: Optional[str]
    error: Optional[str]
    seconds: float
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200

    @property
    def client_seen(self) -> Optional[str]:
        """The ``ip:port`` the server reported in a ``GET /`` body (``client=<ip:port>``)."""
        text = self.body.decode("latin-1").strip()
        return text[len("client="):] if text.startswith("client=") else None


def _error_name(e: BaseException) -> str:
    if isinstance(e, (socket.timeout, TimeoutError)) and getattr(e, "errno", None) in (None, 0):
        return "timeout"
    if isinstance(e, OSError) and e.errno:
        return errno.errorcode.get(e.errno, str(e.errno))
    return errno_text(e)


def _parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise ValueError("no end of headers")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ValueError(f"status line {lines[0]!r}")
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers, body


def request_bytes(host: str, port: int, path: str) -> bytes:
    """The exact request :func:`request` sends (its length is a relay's ``bytes_up``)."""
    return (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: noderedirect-lab\r\n"
            "Accept: */*\r\nConnection: close\r\n\r\n").encode()


def _source_ip(netns_path: str, host: str, port: int) -> Optional[str]:
    """The source address the kernel picks towards ``host`` in that netns (a UDP "connect"
    sends nothing), None if there is no route."""
    try:
        with socket_in_netns(netns_path, socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.connect((host, port))
            return udp.getsockname()[0]
    except (NetnsError, OSError):
        return None


def _exchange(sock: socket.socket, host: str, port: int, path: str, bind: Optional[str],
              deadline: float, seen: dict) -> bytes:
    """Connect, send the request and read until EOF; returns the raw response. ``seen``
    gets the local port at once and the local address once connected, so a failure can
    still name the connection."""

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout()
        return left

    # the port is fixed before connecting: a connection reset while connect() returns
    # (a proxy that accepts and resets at once) leaves the socket without one
    sock.bind((bind or "0.0.0.0", 0))
    seen["port"] = sock.getsockname()[1]
    sock.settimeout(remaining())
    sock.connect((host, port))
    seen["local"] = addr_text(sock.getsockname())
    sock.settimeout(remaining())
    sock.sendall(request_bytes(host, port, path))
    chunks, total = [], 0
    while True:
        sock.settimeout(remaining())
        data = sock.recv(262144)
        if not data:
            return b"".join(chunks)
        chunks.append(data)
        total += len(data)
        if total > MAX_RESPONSE:
            raise ValueError(f"response larger than {MAX_RESPONSE} bytes")


def request(netns_path: str, host: str, port: int, path: str = "/", bind: Optional[str] = None,
            timeout: float = 5.0) -> Response:
    """``GET path`` from inside the netns at ``netns_path`` to ``host:port``.

    ``bind`` is a local IP to send from (like ``curl --interface``); ``timeout`` bounds the
    whole exchange (connect, send, read). Errors are in the result, not raised.
    """
    start = time.monotonic()
    seen: dict = {"local": None, "port": None}
    try:
        sock = socket_in_netns(netns_path)
    except (NetnsError, OSError) as e:
        return Response(None, b"", None, f"netns: {e}", time.monotonic() - start)
    try:
        with sock:
            raw = _exchange(sock, host, port, path, bind, start + timeout, seen)
    except OSError as e:
        # the local address is still useful after e.g. a reset: it names the connection
        local = seen["local"]
        if local is None and seen["port"]:
            ip = bind or _source_ip(netns_path, host, port)
            local = f"{ip}:{seen['port']}" if ip else None
        return Response(None, b"", local, _error_name(e), time.monotonic() - start)
    except ValueError as e:
        return Response(None, b"", seen["local"], f"bad response: {e}", time.monotonic() - start)
    local = seen["local"]
    seconds = time.monotonic() - start
    if not raw:
        return Response(None, b"", local, "empty response", seconds)
    try:
        status, headers, body = _parse(raw)
    except ValueError as e:
        return Response(None, raw, local, f"bad response: {e}", seconds)
    error = None
    length = headers.get("content-length")
    if length is not None and length.isdigit() and len(body) != int(length):
        error = f"truncated body (got {len(body)} of {length} bytes)"
    log.debug("GET %s:%d%s from %s: status=%s bytes=%d in %.3fs", host, port, path,
              local, status, len(body), seconds)
    return Response(status, body, local, error, seconds, headers)
