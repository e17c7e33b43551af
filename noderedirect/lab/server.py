"""The lab's test HTTP server: one process, one selector loop, listeners in many pod netns.

Run as ``python -m noderedirect.lab.server --serve NETNS_PATH=IP:PORT [--serve …] --log FILE
[--ready-file FILE]`` (NETNS_PATH may also be a name under ``/var/run/netns``). For each
``--serve`` a short-lived thread enters that netns, creates,
binds and listens on the socket, and ends; the socket stays in that netns, so one loop serves
every pod of the lab (kernel-notes.md §2: test servers on :8000).

Minimal HTTP/1.1, every response with ``Connection: close``:

- ``GET /`` → 200, body ``client=<ip:port>\\n``: the peer address this server sees, which shows
  whether a proxy in between kept the original source;
- ``GET /bytes/N`` → 200 with N bytes (``N <= MAX_BODY``) of :func:`pattern_bytes`, so a
  relayed body can be checked byte for byte; N above the limit → 400;
- any other path → 404, any other method → 405, no complete request head within
  ``IDLE_TIMEOUT`` seconds → closed.

One JSON line per request in the log: ``netns``, ``listen``, ``client``, ``method``,
``path``, ``status``, ``bytes`` (body length). It is written before the response is sent, so
a client that has its answer will find the line. A listener whose netns was deleted is
closed (its socket would keep the namespace alive); the process exits when none is left,
and on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import logging
import os
import re
import selectors
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import Optional

from .procs import (NetnsError, addr_text, errno_text, netns_identity, netns_path,
                    run_in_netns, same_netns, write_ready)

log = logging.getLogger(__name__)

PROGRAM = "noderedirect.lab.server"
MAX_BODY = 64 * 1024 * 1024
MAX_HEAD = 16 * 1024            # bytes of request head before the request is refused
IDLE_TIMEOUT = 10.0
CHECK_INTERVAL = 1.0            # seconds between "are the netns still there" checks
SEND_HIGH_WATER = 256 * 1024    # body bytes generated ahead of the socket
PATTERN_PERIOD = 251            # prime: a shifted or dropped chunk never lines up again
_BLOCK = bytes(i % PATTERN_PERIOD for i in range(PATTERN_PERIOD * 261))   # 65,511 bytes
_BYTES_PATH = re.compile(r"^/bytes/(\d{1,12})$")
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


class ServeError(Exception):
    """A ``--serve`` argument is malformed or its socket could not be bound."""


def pattern_bytes(n: int) -> bytes:
    """The body of ``GET /bytes/N``: byte k is ``k % 251``."""
    reps, rest = divmod(n, len(_BLOCK))
    return _BLOCK * reps + _BLOCK[:rest]


@dataclass(frozen=True)
class Serve:
    """One listener: an address inside one netns."""

    netns: str
    ip: str
    port: int

    @property
    def listen(self) -> str:
        return f"{self.ip}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> "Serve":
        path, sep, addr = text.rpartition("=")
        ip, sep2, port = addr.rpartition(":")
        if not sep or not sep2 or not path:
            raise ServeError(f"--serve {text!r}: expected NETNS_PATH=IP:PORT")
        try:
            ipaddress.IPv4Address(ip)
            port_n = int(port)
        except ValueError:
            raise ServeError(f"--serve {text!r}: {addr!r} is not IPv4:PORT") from None
        if not 0 < port_n < 65536:
            raise ServeError(f"--serve {text!r}: port {port_n} out of range")
        return cls(netns=netns_path(path), ip=ip, port=port_n)

    def arg(self) -> str:
        return f"{self.netns}={self.listen}"


def _listener(ip: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((ip, port))
        s.listen(128)
    except OSError:
        s.close()
        raise
    s.setblocking(False)
    return s


def open_listener(serve: Serve) -> socket.socket:
    """The listening socket for ``serve``, created inside its netns."""
    try:
        return run_in_netns(serve.netns, _listener, serve.ip, serve.port)
    except NetnsError as e:
        raise ServeError(f"cannot listen on {serve.listen}: {e}") from None
    except OSError as e:
        raise ServeError(f"cannot listen on {serve.listen} in netns {serve.netns}: "
                         f"{errno_text(e)}") from None


def response_head(status: int, length: int) -> bytes:
    """Status line and headers of every response (for exact byte counts in tests)."""
    return (f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Length: {length}\r\n"
            "Content-Type: text/plain\r\nConnection: close\r\n\r\n").encode()


def respond(method: str, path: str, peer: str) -> tuple[int, int, bytes]:
    """(status, body length, body prefix) for a request; a ``/bytes/N`` body is generated
    while sending, so the prefix is empty and the length says how much to send."""
    if method != "GET":
        return 405, 0, b""
    if path == "/":
        body = f"client={peer}\n".encode()
        return 200, len(body), body
    m = _BYTES_PATH.match(path)
    if m:
        n = int(m.group(1))
        return (200, n, b"") if n <= MAX_BODY else (400, 0, b"")
    return 404, 0, b""


class Conn:
    """One accepted connection: read the request head, then send the response."""

    def __init__(self, sock: socket.socket, serve: Serve, peer: str):
        self.sock, self.serve, self.peer = sock, serve, peer
        self.inbuf = bytearray()
        self.out = bytearray()
        self.body_left = 0        # generated body bytes not yet appended to ``out``
        self.body_sent = 0
        self.responding = False
        self.deadline = time.monotonic() + IDLE_TIMEOUT

    def on_readable(self, event_log: "EventLog") -> bool:
        """Returns False when the connection is finished."""
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        if not data:
            return False                # EOF before a full request: nothing to answer
        self.inbuf += data
        self.deadline = time.monotonic() + IDLE_TIMEOUT
        head, sep, _ = bytes(self.inbuf).partition(b"\r\n\r\n")
        if not sep:
            if len(self.inbuf) > MAX_HEAD:
                self._start(400, "?", "?", 0, b"", event_log)
            return True
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        method, path = (parts[0], parts[1]) if len(parts) == 3 else ("?", "?")
        status, length, prefix = respond(method, path, self.peer) if len(parts) == 3 \
            else (400, 0, b"")
        self._start(status, method, path, length, prefix, event_log)
        return True

    def _start(self, status: int, method: str, path: str, length: int, prefix: bytes,
               event_log: "EventLog") -> None:
        event_log.write(netns=self.serve.netns, listen=self.serve.listen, client=self.peer,
                        method=method, path=path, status=status, bytes=length)
        self.responding = True
        self.out += response_head(status, length)
        self.out += prefix
        self.body_left = length - len(prefix)

    def on_writable(self) -> bool:
        """Send what is pending; returns False once the whole response is out."""
        while self.body_left and len(self.out) < SEND_HIGH_WATER:
            # whole blocks keep the k % 251 pattern continuous across chunks
            n = min(self.body_left, len(_BLOCK))
            self.out += _BLOCK[:n]
            self.body_left -= n
        try:
            sent = self.sock.send(self.out)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        del self.out[:sent]
        self.deadline = time.monotonic() + IDLE_TIMEOUT
        if self.out or self.body_left:
            return True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        return False

    def close(self) -> None:
        self.sock.close()


class EventLog:
    """One JSON line per request, flushed at once."""

    def __init__(self, path: str):
        self._f = open(path, "a", buffering=1, encoding="utf-8")

    def write(self, **fields) -> None:
        self._f.write(json.dumps({"ts": round(time.time(), 6), **fields}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class Server:
    """The selector loop over every listener and connection."""

    def __init__(self, event_log: EventLog):
        self.log = event_log
        self.sel = selectors.DefaultSelector()
        self.listeners: dict[socket.socket, tuple[Serve, tuple[int, int]]] = {}
        self.conns: set[Conn] = set()
        self._stop = False

    def add(self, serve: Serve) -> None:
        try:
            identity = netns_identity(serve.netns)
        except OSError as e:
            raise ServeError(f"no netns at {serve.netns}: {e.strerror}") from None
        sock = open_listener(serve)
        self.listeners[sock] = (serve, identity)
        self.sel.register(sock, selectors.EVENT_READ, serve)

    def stop(self) -> None:
        self._stop = True

    def _accept(self, lsock: socket.socket, serve: Serve) -> None:
        try:
            sock, peer = lsock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        sock.setblocking(False)
        conn = Conn(sock, serve, addr_text(peer))
        self.conns.add(conn)
        self.sel.register(sock, selectors.EVENT_READ, conn)

    def _finish(self, conn: Conn) -> None:
        self.sel.unregister(conn.sock)
        conn.close()
        self.conns.discard(conn)

    def _on_conn(self, conn: Conn, mask: int) -> None:
        alive = True
        if mask & selectors.EVENT_READ:
            was_responding = conn.responding
            alive = conn.on_readable(self.log)
            if alive and conn.responding and not was_responding:
                # the head is all we read: from now on only writing matters (and a peer's
                # EOF would otherwise keep the socket readable forever)
                self.sel.modify(conn.sock, selectors.EVENT_WRITE, conn)
        if alive and mask & selectors.EVENT_WRITE:
            alive = conn.on_writable()
        if not alive:
            self._finish(conn)

    def _housekeeping(self) -> None:
        now = time.monotonic()
        for conn in [c for c in self.conns if c.deadline < now]:
            log.info("closing idle connection client=%s listen=%s", conn.peer, conn.serve.listen)
            self._finish(conn)
        for lsock, (serve, identity) in list(self.listeners.items()):
            if not same_netns(serve.netns, identity):
                log.info("netns %s is gone: closing listener %s", serve.netns, serve.listen)
                self.sel.unregister(lsock)
                lsock.close()
                del self.listeners[lsock]

    def serve_forever(self, wakeup: socket.socket) -> str:
        self.sel.register(wakeup, selectors.EVENT_READ, None)
        next_check = time.monotonic() + CHECK_INTERVAL
        while not self._stop:
            for key, mask in self.sel.select(timeout=CHECK_INTERVAL):
                if key.data is None:
                    with contextlib.suppress(OSError):
                        wakeup.recv(64)
                elif isinstance(key.data, Serve):
                    self._accept(key.fileobj, key.data)
                else:
                    self._on_conn(key.data, mask)
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + CHECK_INTERVAL
                self._housekeeping()
                if not self.listeners:
                    return "every netns is gone"
        return "signal"

    def close(self) -> None:
        for conn in list(self.conns):
            self._finish(conn)
        for lsock in self.listeners:
            lsock.close()
        self.sel.close()


def read_log(path: str) -> list[dict]:
    """Every request line of a server log ([] if there is none yet)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {PROGRAM}", description=__doc__.split("\n")[0])
    p.add_argument("--serve", action="append", required=True, metavar="NETNS_PATH=IP:PORT",
                   help="listen on IP:PORT inside the netns at NETNS_PATH (repeatable)")
    p.add_argument("--log", required=True, help="JSON-lines request log (appended)")
    p.add_argument("--ready-file", help="written once every listener is bound")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    server = Server(EventLog(args.log))
    try:
        for text in args.serve:
            server.add(Serve.parse(text))
    except (ServeError, OSError) as e:
        log.error("%s", e)
        server.close()
        return 1
    wake_r, wake_w = socket.socketpair()
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: server.stop())
    serving = [s.arg() for s, _ in server.listeners.values()]
    if args.ready_file:
        write_ready(args.ready_file, {"pid": os.getpid(), "serving": serving})
    log.info("serving %s", " ".join(serving))
    reason = server.serve_forever(wake_r)
    server.close()
    server.log.close()
    log.info("exit reason=%s", reason)
    return 0


if __name__ == "__main__":
    sys.exit(main())
