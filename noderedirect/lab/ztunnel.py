"""The lab's stand-in ztunnel: transparent TCP listeners that log and relay, nothing more.

Run as ``python -m noderedirect.lab.ztunnel --netns PATH --log FILE [--no-spoof]
[--ready-file FILE]``. It enters the ztunnel netns first (before any thread exists, so every
thread and socket lives there) and listens on 0.0.0.0 with ``IP_TRANSPARENT`` (TPROXY only
hands packets to transparent sockets, kernel-notes.md §4) on

- 15001 (outbound) and 15006 (inbound plaintext): the original destination of an accepted
  connection is its ``getsockname()``; it connects there from the client's own address
  (``IP_TRANSPARENT`` + ``bind((client_ip, 0))``, the "original source" of legacy-mode.md
  §5), or from its own address with ``--no-spoof``, and copies bytes both ways until both
  sides have closed;
- 15008 (HBONE): accepts, logs and resets the connection (the client sees ECONNRESET).
  There is no HBONE here.

What it does is recorded as JSON lines (one per event, flushed at once) in the log file:

- ``accept``: ``conn``, ``listener``, ``peer``, ``orig_dst``;
- ``upstream``: ``conn``, ``listener``, ``orig_dst``, ``upstream_local`` (the local address
  of the upstream socket, null on failure) and ``error`` (null or e.g. ``"ECONNREFUSED
  Connection refused"``); a failed upstream resets the client connection, as ztunnel does;
- ``close``: ``conn``, ``listener``, ``bytes_up`` (client to upstream), ``bytes_down``,
  ``error``. For a relayed connection it is written after the client already saw the end of
  the connection: wait for it (:func:`wait_events`) rather than reading the log once.

``accept`` and ``upstream`` are always written before the client can see any answer or reset.

Bounded: at most ``MAX_CONNS`` connections at a time (more are reset), a connection idle for
``--idle-timeout`` seconds (30) is closed, an upstream connect gives up after
``--connect-timeout`` seconds (2). Exits on SIGTERM/SIGINT, and by itself when the netns path
no longer names the namespace it entered (the netns was deleted).

:func:`read_log`, :func:`events`, :func:`accepts` and :func:`wait_events` read the log back.

**In-pod mode** (``--inpod POD_NETNS_PATH``, repeatable; inpod-mode.md §4.4): the process still
lives in ``--netns`` (the ztunnel pod's), but creates no listener there. For each pod netns it
keeps the netns open (as ztunnel keeps the fd the node agent hands over) and creates the
listeners 15001 / 15006 / 15008 *inside that netns*: the thread enters it, makes the socket and
comes back (:class:`PodNetns`). Every socket it makes carries ``SO_MARK`` 1337 (0x539): the
listeners, hence the connections they accept, and the upstream connections, which are made
inside the accepting pod's netns too, so the pod's own rules exempt them. The rules there
REDIRECT, so the original destination is ``SO_ORIGINAL_DST`` (``getsockname()`` only for 15008,
which is not redirected). Upstream from 15001 leaves from the pod's own address; from 15006 it
keeps the client's address (``IP_TRANSPARENT`` bind, like ztunnel's freebind), or uses the
pod's own with ``--no-spoof``. ``accept`` and ``upstream`` events then also carry ``netns`` (the
pod netns path). A pod netns that disappears loses its listeners (event ``pod_gone``). There is
no DNS proxy (15053) and no HBONE: same-node mesh traffic is captured twice, on 15001 in the
client's netns and on 15006 in the server's.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from .. import names
from .procs import (NetnsError, _setns, addr_text, enter_netns, errno_text, netns_path,
                    same_netns, write_ready)

log = logging.getLogger(__name__)

PROGRAM = "noderedirect.lab.ztunnel"
IP_TRANSPARENT = 19                # linux/in.h; not exported by the socket module
RELAY_PORTS = (names.PORT_OUTBOUND, names.PORT_INBOUND)
LOG_ONLY_PORTS = (names.PORT_HBONE,)
IDLE_TIMEOUT = 30.0
CONNECT_TIMEOUT = 2.0
MAX_CONNS = 256
CHUNK = 65536
CHECK_INTERVAL = 1.0               # seconds between "is my netns still there" checks
SO_MARK = getattr(socket, "SO_MARK", 36)          # asm-generic/socket.h
SO_ORIGINAL_DST = 80               # linux/netfilter_ipv4.h, level SOL_IP
INPOD_PORTS = (names.PORT_OUTBOUND, names.PORT_INBOUND, names.PORT_HBONE)


class EventLog:
    """The JSON-lines log; thread safe, every line flushed as it is written."""

    def __init__(self, path: str):
        self._f = open(path, "a", buffering=1, encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, event: str, **fields) -> None:
        line = json.dumps({"ts": round(time.time(), 6), "event": event, **fields})
        with self._lock:
            if self._f.closed:        # a relay that outlived shutdown has nothing to add
                return
            self._f.write(line + "\n")
            self._f.flush()

    def close(self) -> None:
        with self._lock:
            self._f.close()


def _reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0): the client sees ECONNRESET, as with a real ztunnel
    whose upstream failed."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def transparent_listener(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    s.bind(("0.0.0.0", port))
    s.listen(128)
    s.setblocking(False)
    return s


def is_own_address(ip: str) -> bool:
    """Whether ``ip`` is an address of this netns: a plain (not transparent) socket can only
    bind those."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind((ip, 0))
        except OSError:
            return False
    return True


# ---------------------------------------------------------------- in-pod mode: sockets inside pod netns


class PodNetns:
    """A pod's network namespace held open by fd, and sockets made inside it from any thread.

    :meth:`call` is ztunnel's socket factory (inpod-mode.md §4.4): the calling thread enters
    the pod's netns, runs ``fn`` (which creates a socket), and goes back to the netns it came
    from, whatever happens. A socket belongs to the netns it was created in for its whole life,
    so binding, connecting and copying happen afterwards from anywhere.
    """

    def __init__(self, path: str):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise NetnsError(f"cannot open pod netns {path}: {e.strerror}") from None
        st = os.fstat(self.fd)
        self.identity = (st.st_dev, st.st_ino)

    def call(self, fn: Callable[[], "socket.socket | bool"]):
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                _setns(self.fd)
            except OSError as e:
                raise NetnsError(f"setns into {self.path} failed: {e.strerror}") from None
            try:
                return fn()
            finally:
                # invariant: the thread never stays in the pod's netns
                _setns(home)
        finally:
            os.close(home)

    def socket(self, mark: int = names.INPOD_MARK) -> socket.socket:
        """A TCP socket inside the pod's netns, with ztunnel's mark."""
        s = self.call(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        try:
            s.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        except OSError:
            s.close()
            raise
        return s

    def owns(self, ip: str) -> bool:
        """Whether ``ip`` is an address of the pod's netns."""
        return self.call(lambda: is_own_address(ip))

    def alive(self) -> bool:
        return same_netns(self.path, self.identity)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def inpod_listener(pod: PodNetns, port: int) -> socket.socket:
    """One listener on 0.0.0.0:``port`` inside the pod's netns, marked 1337; IP_TRANSPARENT
    best effort, as ztunnel does (REDIRECT does not need it)."""
    s = pod.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with contextlib.suppress(OSError):
            s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        s.bind(("0.0.0.0", port))
        s.listen(128)
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


def listener_set(path: str) -> list[socket.socket]:
    """ztunnel's listener set for one pod (15001, 15006, 15008), made inside its netns at
    ``path``; the caller closes them. What enrolling a pod costs ztunnel."""
    pod = PodNetns(path)
    try:
        out: list[socket.socket] = []
        try:
            for port in INPOD_PORTS:
                out.append(inpod_listener(pod, port))
        except OSError:
            for s in out:
                s.close()
            raise
        return out
    finally:
        pod.close()


def original_dst(conn: socket.socket) -> tuple:
    """Where a REDIRECTed connection was going (``SO_ORIGINAL_DST``); a connection that was not
    redirected (to 15008) has no NAT binding, and its own address is the destination."""
    try:
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError:
        return conn.getsockname()
    port, addr = struct.unpack_from("!H4s", raw, 2)
    return socket.inet_ntoa(addr), port


class Relay:
    """One accepted connection: connect upstream, then copy both ways (its own thread)."""

    def __init__(self, proxy: "Ztunnel", conn_id: int, listener: int, client: socket.socket,
                 peer: tuple, orig_dst: tuple, pod: Optional[PodNetns] = None):
        self.proxy, self.id, self.listener = proxy, conn_id, listener
        self.client, self.peer, self.orig_dst = client, peer, orig_dst
        self.pod = pod                       # in-pod mode: the netns the connection came from
        self.upstream: Optional[socket.socket] = None
        self.bytes_up = self.bytes_down = 0

    def run(self) -> None:
        error, abort = None, False
        try:
            if self._connect():
                error = self._copy()
        except OSError as e:
            # a reset (or a send that timed out) on one side is passed on as a reset
            error, abort = errno_text(e), True
        except Exception as e:               # never let one connection kill the process
            error, abort = errno_text(e), True
            log.exception("conn=%d relay failed", self.id)
        finally:
            self.close(reset=abort)
            self.proxy.log.write("close", conn=self.id, listener=self.listener,
                                 bytes_up=self.bytes_up, bytes_down=self.bytes_down, error=error)
            self.proxy.done(self)

    def _connect(self) -> bool:
        if self.pod is not None:
            return self._connect_inpod()
        up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.upstream = up
        local = error = None
        try:
            if self.proxy.spoof:
                # original source: a transparent socket may bind an address that is not local
                up.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
                up.bind((self.peer[0], 0))
            up.settimeout(self.proxy.connect_timeout)
            up.connect(self.orig_dst)
            local = addr_text(up.getsockname())
        except OSError as e:
            error = errno_text(e)
        self.proxy.log.write("upstream", conn=self.id, listener=self.listener,
                             orig_dst=addr_text(self.orig_dst), upstream_local=local, error=error)
        if error:
            _reset(self.client)
            return False
        return True

    def _connect_inpod(self) -> bool:
        """Upstream from inside the pod's netns, marked 1337 so the pod's rules let it pass:
        outbound (15001) from the pod's own address, inbound (15006) from the client's."""
        assert self.pod is not None
        local = error = None
        try:
            self.upstream = up = self._inpod_socket()
            up.settimeout(self.proxy.connect_timeout)
            up.connect(self.orig_dst)
            local = addr_text(up.getsockname())
        except OSError as e:
            error = errno_text(e)
        self.proxy.log.write("upstream", conn=self.id, listener=self.listener,
                             orig_dst=addr_text(self.orig_dst), upstream_local=local, error=error,
                             netns=self.pod.path)
        if error:
            _reset(self.client)
            return False
        return True

    def _inpod_socket(self) -> socket.socket:
        assert self.pod is not None
        up = self.pod.socket()
        if self.listener != names.PORT_INBOUND or not self.proxy.spoof:
            return up
        try:
            up.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            # the client's address, and never the client's port: the redirected connection
            # (client:port -> pod:8000) is still in this netns's conntrack table, and a new
            # connection with the same tuple would be taken for it and redirected again
            for _ in range(8):
                up.bind((self.peer[0], 0))
                if up.getsockname()[1] != self.peer[1]:
                    return up
                up.close()
                up = self.pod.socket()
                up.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            raise OSError(errno.EADDRINUSE, "no source port other than the client's")
        except OSError:
            up.close()
            raise

    def _copy(self) -> Optional[str]:
        """Copy until both directions reached EOF; returns an error text or None."""
        assert self.upstream is not None
        idle = self.proxy.idle_timeout
        for s in (self.client, self.upstream):
            s.settimeout(idle)               # bounds a blocked sendall, too
        other = {self.client: self.upstream, self.upstream: self.client}
        open_in = {self.client, self.upstream}
        with selectors.DefaultSelector() as sel:
            for s in open_in:
                sel.register(s, selectors.EVENT_READ)
            while open_in:
                ready = sel.select(timeout=idle)
                if not ready:
                    return f"idle for {idle:g}s"
                for key, _ in ready:
                    src = key.fileobj
                    data = src.recv(CHUNK)
                    if data:
                        other[src].sendall(data)
                        if src is self.client:
                            self.bytes_up += len(data)
                        else:
                            self.bytes_down += len(data)
                        continue
                    # EOF one way: pass the half-close on, keep the other direction going
                    sel.unregister(src)
                    open_in.discard(src)
                    with contextlib.suppress(OSError):
                        other[src].shutdown(socket.SHUT_WR)
        return None

    def close(self, reset: bool = False) -> None:
        for s in (self.client, self.upstream):
            if s is not None:
                if reset:
                    _reset(s)
                else:
                    with contextlib.suppress(OSError):
                        s.close()

    def abort(self) -> None:
        """Wake the relay thread up by shutting its sockets (used on exit)."""
        for s in (self.client, self.upstream):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


class Ztunnel:
    """Listeners, the accept loop and the set of live relays."""

    def __init__(self, netns: str, event_log: EventLog, spoof: bool = True,
                 idle_timeout: float = IDLE_TIMEOUT, connect_timeout: float = CONNECT_TIMEOUT,
                 max_conns: int = MAX_CONNS):
        self.netns, self.log, self.spoof = netns, event_log, spoof
        self.idle_timeout, self.connect_timeout, self.max_conns = idle_timeout, connect_timeout, max_conns
        self.listeners: dict[socket.socket, int] = {}
        self.pod_of: dict[socket.socket, PodNetns] = {}    # in-pod mode: listener -> its pod
        self.pods: list[PodNetns] = []
        self.relays: set[Relay] = set()
        self._lock = threading.Lock()
        self._next_id = 0
        self._stop = False

    def listen(self) -> None:
        for port in RELAY_PORTS + LOG_ONLY_PORTS:
            self.listeners[transparent_listener(port)] = port

    @property
    def inpod(self) -> bool:
        return bool(self.pods)

    def listen_inpod(self, paths: list[str]) -> None:
        """In-pod mode: the listener set inside each pod's netns (none in our own)."""
        for path in paths:
            pod = PodNetns(path)
            self.pods.append(pod)
            for port in INPOD_PORTS:
                lsock = inpod_listener(pod, port)
                self.listeners[lsock] = port
                self.pod_of[lsock] = pod

    def done(self, relay: Relay) -> None:
        with self._lock:
            self.relays.discard(relay)

    def _accept(self, lsock: socket.socket, port: int) -> None:
        try:
            conn, peer = lsock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        conn.setblocking(True)
        self._next_id += 1
        conn_id = self._next_id
        pod = self.pod_of.get(lsock)
        if pod is None:
            orig_dst = conn.getsockname()    # TPROXY keeps the original destination
            self.log.write("accept", conn=conn_id, listener=port, peer=addr_text(peer),
                           orig_dst=addr_text(orig_dst))
        else:
            orig_dst = original_dst(conn)    # REDIRECT rewrote it; conntrack remembers
            self.log.write("accept", conn=conn_id, listener=port, peer=addr_text(peer),
                           orig_dst=addr_text(orig_dst), netns=pod.path)
        with self._lock:
            full = len(self.relays) >= self.max_conns
        # a connection made straight to a listener would be relayed to that listener again,
        # and again, until the connection limit is reached
        owns = is_own_address if pod is None else pod.owns
        to_self = orig_dst[1] in self.listeners.values() and owns(orig_dst[0])
        refusal = ("HBONE is not implemented by this stand-in" if port in LOG_ONLY_PORTS
                   else f"too many connections ({self.max_conns})" if full
                   else "addressed to the proxy itself" if to_self else None)
        if refusal:
            # logged first: once the client sees the reset, the log is complete
            self.log.write("close", conn=conn_id, listener=port, bytes_up=0, bytes_down=0,
                           error=refusal)
            _reset(conn)
            return
        relay = Relay(self, conn_id, port, conn, peer, orig_dst, pod)
        with self._lock:
            self.relays.add(relay)
        threading.Thread(target=relay.run, name=f"conn-{conn_id}", daemon=True).start()

    def stop(self) -> None:
        self._stop = True

    def serve(self, identity: tuple[int, int], wakeup: socket.socket) -> str:
        """Accept until stopped or the netns is gone; returns why it ended."""
        sel = selectors.DefaultSelector()
        for lsock, port in self.listeners.items():
            sel.register(lsock, selectors.EVENT_READ, port)
        sel.register(wakeup, selectors.EVENT_READ, None)
        next_check = time.monotonic() + CHECK_INTERVAL
        reason = "signal"
        while not self._stop:
            for key, _ in sel.select(timeout=CHECK_INTERVAL):
                if key.data is None:
                    with contextlib.suppress(OSError):
                        wakeup.recv(64)
                else:
                    self._accept(key.fileobj, key.data)
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + CHECK_INTERVAL
                if not same_netns(self.netns, identity):
                    reason = f"netns {self.netns} is gone"
                    break
                self._drop_gone_pods(sel)
        sel.close()
        return reason

    def _drop_gone_pods(self, sel: selectors.BaseSelector) -> None:
        """A deleted pod netns lives on while we hold sockets in it: let it go."""
        for pod in [p for p in self.pods if not p.alive()]:
            for lsock in [l for l, p in self.pod_of.items() if p is pod]:
                sel.unregister(lsock)
                lsock.close()
                del self.listeners[lsock], self.pod_of[lsock]
            pod.close()
            self.pods.remove(pod)
            self.log.write("pod_gone", netns=pod.path)

    def shutdown(self) -> None:
        for lsock in self.listeners:
            lsock.close()
        for pod in self.pods:
            pod.close()
        with self._lock:
            relays = list(self.relays)
        for relay in relays:
            relay.abort()
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            with self._lock:
                if not self.relays:
                    break
            time.sleep(0.01)


# ---------------------------------------------------------------- reading the log


def read_log(path: "str | Path") -> list[dict]:
    """Every event in the log, in order ([] if there is no log yet). A last line that is
    still being written is skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def events(path: "str | Path", event: str, listener: Optional[int] = None,
           conn: Optional[int] = None) -> list[dict]:
    """The events of one kind, optionally of one listener port or connection."""
    return [e for e in read_log(path) if e.get("event") == event
            and (listener is None or e.get("listener") == listener)
            and (conn is None or e.get("conn") == conn)]


def accepts(path: "str | Path", listener: Optional[int] = None) -> list[dict]:
    """The ``accept`` events, optionally of one listener port."""
    return events(path, "accept", listener=listener)


def wait_events(path: "str | Path", event: str, count: int = 1, timeout: float = 5.0,
                match: Optional[Callable[[dict], bool]] = None) -> list[dict]:
    """Wait until at least ``count`` events of a kind (matching ``match``) are logged and return
    them all; returns what there is after ``timeout``. Useful for ``close``, which is written
    after the client already has its answer."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in events(path, event) if match is None or match(e)]
        if len(found) >= count or time.monotonic() >= deadline:
            return found
        time.sleep(0.02)


# ---------------------------------------------------------------- the process


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {PROGRAM}", description=__doc__.split("\n")[0])
    p.add_argument("--netns", required=True,
                   help="the ztunnel network namespace: a path, or a name under /var/run/netns")
    p.add_argument("--log", required=True, help="JSON-lines event log (appended)")
    p.add_argument("--no-spoof", action="store_true",
                   help="connect upstream from this netns' own address, not the client's")
    p.add_argument("--ready-file", help="written once every listener is bound")
    p.add_argument("--inpod", action="append", default=[], metavar="POD_NETNS_PATH",
                   help="in-pod mode: create the listeners inside this pod's netns (repeatable) "
                        "instead of in --netns; every socket gets SO_MARK 1337")
    p.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT)
    p.add_argument("--connect-timeout", type=float, default=CONNECT_TIMEOUT)
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # first, while this is the only thread: everything created from here on lives in the netns
    try:
        identity = enter_netns(netns_path(args.netns))
    except NetnsError as e:
        log.error("cannot enter netns: %s", e)
        return 2
    event_log = EventLog(args.log)
    proxy = Ztunnel(netns_path(args.netns), event_log, spoof=not args.no_spoof,
                    idle_timeout=args.idle_timeout, connect_timeout=args.connect_timeout)
    try:
        if args.inpod:
            proxy.listen_inpod([netns_path(p) for p in args.inpod])
        else:
            proxy.listen()
    except (OSError, NetnsError) as e:
        log.error("cannot listen in netns %s: %s", args.netns,
                  errno_text(e) if isinstance(e, OSError) else e)
        return 1
    wake_r, wake_w = socket.socketpair()
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: proxy.stop())
    extra = {"inpod": [p.path for p in proxy.pods]} if proxy.inpod else {}
    ports = sorted(set(proxy.listeners.values()))
    event_log.write("start", pid=os.getpid(), netns=args.netns, spoof=proxy.spoof, ports=ports, **extra)
    if args.ready_file:
        write_ready(args.ready_file, {"pid": os.getpid(), "ports": ports, **extra})
    log.info("listening netns=%s ports=%s spoof=%s", args.netns,
             sorted(proxy.listeners.values()), proxy.spoof)
    reason = proxy.serve(identity, wake_r)
    proxy.shutdown()
    event_log.write("exit", reason=reason)
    event_log.close()
    log.info("exit reason=%s", reason)
    return 0


if __name__ == "__main__":
    sys.exit(main())
