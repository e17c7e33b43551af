"""The user-space GENEVE bridge: one process per network namespace, RFC 8926 over TAP devices.

Owns the wire format (8-byte GENEVE header, Ethernet payload, UDP), the per-netns state files
(pidfile, status file, JSON-lines log under the state directory) and the process itself.
The driver in ``usergeneve.py`` creates the persistent TAP devices and starts this process;
this process only attaches to them, so the devices keep their real names (``istioin`` …) and
survive a restart of the bridge.

Run as ``python -m noderedirect.tunnels.usergeneve_main --netns PATH --link NAME,VNI,REMOTE,PORT …``.
With ``--daemon`` it detaches (double fork, new session, stdio on /dev/null) and reports one
line on its original stdout: ``ready <pid>`` once every TAP is attached and every UDP port is
bound, or ``error <message>``.

Lifetime is tied to what it serves, so it can never outlive its purpose: it exits when a TAP it
attached to disappears (or is replaced), when the netns path no longer names the netns it
entered, or on SIGTERM/SIGINT. SIGUSR1 writes the status file at once (it is also written every
second). This module uses the standard library only: it runs inside the target netns.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import hashlib
import ipaddress
import json
import logging
import os
import selectors
import signal
import socket
import struct
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- wire format (RFC 8926 §3.4)
HEADER = struct.Struct("!BBHI")   # ver(2)|optlen(6), O|C|rsvd(6), protocol, VNI(24)|rsvd(8)
HEADER_LEN = HEADER.size
VERSION = 0
PROTO_ETHERNET = 0x6558           # Transparent Ethernet Bridging: the payload is an Ethernet frame
FLAG_OAM = 0x80
FLAG_CRITICAL = 0x40
MAX_VNI = (1 << 24) - 1
# outer IPv4 + UDP + GENEVE + inner Ethernet: the kernel's GENEVE_IPV4_HLEN + ETH_HLEN
OVERHEAD = 20 + 8 + HEADER_LEN + 14

# Linux socket option: send IPv4 UDP without a checksum, as the kernel GENEVE device does by
# default (``noudpcsum`` in ``ip -d link``). Not exported by the socket module.
SO_NO_CHECK = 11

# ---------------------------------------------------------------- TAP (linux/if_tun.h)
TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFNAMSIZ = 16

CLONE_NEWNET = 0x40000000
PROGRAM = "noderedirect.tunnels.usergeneve_main"
STATE_DIR_ENV = "NODEREDIRECT_STATE_DIR"
DEFAULT_STATE_DIR = "/run/noderedirect"
STATUS_INTERVAL = 1.0             # seconds between status writes and liveness checks
READ_BATCH = 64                   # frames read per readiness event before yielding


class Drop(Exception):
    """A received packet that is not delivered; ``reason`` names the counter."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class SetupError(Exception):
    """The bridge could not start (netns, TAP or UDP port); nothing is left running."""


def encap(vni: int, frame: bytes) -> bytes:
    """One GENEVE packet: header without options, then the Ethernet frame."""
    return HEADER.pack(VERSION, 0, PROTO_ETHERNET, vni << 8) + frame


def decap(packet: bytes) -> tuple[int, bytes]:
    """(VNI, Ethernet frame) of a GENEVE packet, or Drop with the reason.

    Non-critical options are skipped (RFC 8926 §3.5: a receiver ignores options it does not
    understand unless the C bit says one is critical); OAM packets are not data and are dropped.
    """
    if len(packet) < HEADER_LEN:
        raise Drop("short")
    first, flags, proto, vni_word = HEADER.unpack_from(packet)
    if first >> 6 != VERSION:
        raise Drop("version")
    if proto != PROTO_ETHERNET:
        raise Drop("protocol")
    if flags & FLAG_OAM:
        raise Drop("oam")
    if flags & FLAG_CRITICAL:
        raise Drop("critical_option")
    start = HEADER_LEN + (first & 0x3F) * 4
    if len(packet) < start + 14:
        raise Drop("short")
    return vni_word >> 8, packet[start:]


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True, order=True)
class LinkSpec:
    """One tunnel as the bridge sees it: TAP name, VNI, peer address, UDP port."""

    name: str
    vni: int
    remote: str
    port: int

    def __post_init__(self):
        if not self.name or len(self.name) >= IFNAMSIZ or "/" in self.name or "," in self.name:
            raise ValueError(f"bad interface name {self.name!r}")
        if not 0 < self.vni <= MAX_VNI:
            raise ValueError(f"{self.name}: VNI {self.vni} out of range 1..{MAX_VNI}")
        ipaddress.IPv4Address(self.remote)
        if not 0 < self.port < 65536:
            raise ValueError(f"{self.name}: port {self.port} out of range")

    @classmethod
    def parse(cls, text: str) -> "LinkSpec":
        """``NAME,VNI,REMOTE,PORT`` as given on the command line."""
        parts = text.split(",")
        if len(parts) != 4:
            raise ValueError(f"expected NAME,VNI,REMOTE,PORT, got {text!r}")
        name, vni, remote, port = parts
        return cls(name=name, vni=int(vni), remote=remote, port=int(port))

    def arg(self) -> str:
        return f"{self.name},{self.vni},{self.remote},{self.port}"


def config_hash(specs: Sequence[LinkSpec]) -> str:
    """Identity of a bridge configuration; equal hash = the running process can stay."""
    text = json.dumps([asdict(s) for s in sorted(specs)], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def validate(specs: Sequence[LinkSpec]) -> None:
    """One TAP per name and one link per (port, VNI): incoming packets must map to one TAP."""
    seen_names, seen_keys = set(), set()
    for s in specs:
        if s.name in seen_names:
            raise ValueError(f"link {s.name} given twice")
        if (s.port, s.vni) in seen_keys:
            raise ValueError(f"VNI {s.vni} on port {s.port} given twice")
        seen_names.add(s.name)
        seen_keys.add((s.port, s.vni))
    if not specs:
        raise ValueError("no links")


# ---------------------------------------------------------------- state files


def state_dir() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)


@dataclass(frozen=True)
class StatePaths:
    """The files of the bridge of one netns, keyed by the netns inode (stable while it lives)."""

    base: Path
    inode: int

    def _file(self, suffix: str) -> Path:
        return self.base / f"usergeneve-{self.inode}.{suffix}"

    @property
    def pidfile(self) -> Path:
        return self._file("pid")

    @property
    def status(self) -> Path:
        return self._file("status.json")

    @property
    def log(self) -> Path:
        return self._file("log")

    @property
    def lock(self) -> Path:
        return self._file("lock")


def write_json_atomic(path: Path, data: dict) -> None:
    """Readers never see a half-written file: write aside, then rename over."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, sort_keys=True) + "\n")
    os.replace(tmp, path)


class JsonLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                 "pid": record.process, "msg": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["error"] = "".join(traceback.format_exception(*record.exc_info)).strip()
        return json.dumps(entry, sort_keys=True)


# ---------------------------------------------------------------- kernel plumbing


def enter_netns(path: str) -> int:
    """Move this (single-threaded) process into the netns at ``path``; returns its inode.

    Must happen before any socket or TAP is opened: both bind to the netns current at creation.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        inode = os.fstat(fd).st_ino
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise SetupError(f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)
    return inode


def attach_tap(name: str) -> tuple[int, int]:
    """Attach to the existing TAP ``name`` without packet-info header; (fd, ifindex).

    TUNSETIFF on a name that does not exist would create a new, non-persistent device; the
    driver owns creation, so the device must already be there.
    """
    try:
        ifindex = socket.if_nametoindex(name)
    except OSError:
        raise SetupError(f"TAP device {name} does not exist in this netns") from None
    fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        ifr = struct.pack(f"{IFNAMSIZ}sH", name.encode(), IFF_TAP | IFF_NO_PI)
        fcntl.ioctl(fd, TUNSETIFF, ifr)
    except OSError as e:
        os.close(fd)
        raise SetupError(f"attach to TAP {name}: {e.strerror} (is it a TAP device?)") from None
    if socket.if_nametoindex(name) != ifindex:
        os.close(fd)
        raise SetupError(f"TAP {name} was replaced while attaching")
    return fd, ifindex


def bind_udp(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
    try:
        sock.bind(("0.0.0.0", port))
    except OSError as e:
        sock.close()
        raise SetupError(f"bind UDP port {port}: {e.strerror}") from None
    sock.setblocking(False)
    return sock


# ---------------------------------------------------------------- the bridge


@dataclass
class LinkCounters:
    tx_frames: int = 0      # TAP -> UDP
    tx_bytes: int = 0
    rx_frames: int = 0      # UDP -> TAP
    rx_bytes: int = 0


@dataclass
class Tap:
    spec: LinkSpec
    fd: int
    ifindex: int
    counters: LinkCounters = field(default_factory=LinkCounters)


class Bridge:
    """Moves frames between TAP devices and UDP sockets until told or forced to stop."""

    def __init__(self, specs: Sequence[LinkSpec], netns_path: str, inode: int, paths: StatePaths):
        self.specs = tuple(sorted(specs))
        self.netns_path = netns_path
        self.inode = inode
        self.paths = paths
        self.hash = config_hash(self.specs)
        self.taps: list[Tap] = []
        self.socks: dict[int, socket.socket] = {}
        self.by_vni: dict[tuple[int, int], Tap] = {}     # (port, VNI) -> TAP
        self.drops: dict[str, int] = {}
        self.seq = 0
        self.started = time.time()
        self.stop_reason: Optional[str] = None
        self.status_requested = False
        self.sel = selectors.DefaultSelector()

    # -- setup
    def open(self) -> None:
        try:
            for spec in self.specs:
                fd, ifindex = attach_tap(spec.name)
                tap = Tap(spec, fd, ifindex)
                self.taps.append(tap)
                self.by_vni[(spec.port, spec.vni)] = tap
                self.sel.register(fd, selectors.EVENT_READ, ("tap", tap))
            for port in sorted({s.port for s in self.specs}):
                sock = bind_udp(port)
                self.socks[port] = sock
                self.sel.register(sock, selectors.EVENT_READ, ("udp", port))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for tap in self.taps:
            os.close(tap.fd)
        for sock in self.socks.values():
            sock.close()
        self.taps, self.socks = [], {}
        self.sel.close()

    # -- data path
    def drop(self, reason: str, **fields) -> None:
        first = reason not in self.drops
        self.drops[reason] = self.drops.get(reason, 0) + 1
        if first:   # one line per reason; the counters carry the rest
            log.warning("first drop", extra={"fields": {"reason": reason, **fields}})

    def from_tap(self, tap: Tap) -> None:
        # sent from the bound port (source port = destination port): a veth has no ECMP that
        # would need the per-flow source ports RFC 8926 recommends for entropy
        sock = self.socks[tap.spec.port]
        dest = (tap.spec.remote, tap.spec.port)
        for _ in range(READ_BATCH):
            try:
                frame = os.read(tap.fd, 65536)
            except BlockingIOError:
                return
            except OSError as e:
                # EBADFD/EIO: the device was deleted under us
                self.stop_reason = f"TAP {tap.spec.name} gone ({e.strerror})"
                return
            try:
                sock.sendto(encap(tap.spec.vni, frame), dest)
            except OSError as e:
                self.drop("send_error", link=tap.spec.name, error=e.strerror)
                continue
            tap.counters.tx_frames += 1
            tap.counters.tx_bytes += len(frame)

    def from_udp(self, port: int) -> None:
        sock = self.socks[port]
        for _ in range(READ_BATCH):
            try:
                packet, (src, _sport) = sock.recvfrom(65536)
            except BlockingIOError:
                return
            except OSError as e:    # e.g. ICMP port unreachable reported on the socket
                self.drop("socket_error", port=port, error=e.strerror)
                continue
            try:
                vni, frame = decap(packet)
                tap = self.by_vni.get((port, vni))
                if tap is None:
                    raise Drop("unknown_vni")
                # a non-external kernel GENEVE device accepts only its (remote, VNI) pair
                if src != tap.spec.remote:
                    raise Drop("wrong_source")
            except Drop as d:
                self.drop(d.reason, source=src, port=port)
                continue
            try:
                os.write(tap.fd, frame)
            except OSError as e:
                self.drop("tap_write", link=tap.spec.name, error=e.strerror)
                continue
            tap.counters.rx_frames += 1
            tap.counters.rx_bytes += len(frame)

    # -- housekeeping
    def check_alive(self) -> None:
        """Stop when what this process serves is gone, so it can never become an orphan."""
        try:
            st = os.stat(self.netns_path)
            if st.st_ino != self.inode:
                self.stop_reason = f"{self.netns_path} now names another netns"
                return
        except OSError:
            self.stop_reason = f"netns {self.netns_path} is gone"
            return
        for tap in self.taps:
            try:
                current = socket.if_nametoindex(tap.spec.name)
            except OSError:
                current = None
            if current != tap.ifindex:
                self.stop_reason = f"TAP {tap.spec.name} gone or replaced"
                return

    def status(self) -> dict:
        self.seq += 1
        return {
            "pid": os.getpid(), "seq": self.seq, "updated": round(time.time(), 3),
            "started": round(self.started, 3), "config": self.hash, "netns": self.netns_path,
            "netns_inode": self.inode,
            "links": {t.spec.name: {**asdict(t.spec), "ifindex": t.ifindex, **asdict(t.counters)}
                      for t in self.taps},
            "drops": dict(sorted(self.drops.items())),
        }

    def write_status(self) -> None:
        write_json_atomic(self.paths.status, self.status())

    def write_pidfile(self) -> None:
        write_json_atomic(self.paths.pidfile, {
            "pid": os.getpid(), "config": self.hash, "netns": self.netns_path,
            "netns_inode": self.inode, "links": [s.arg() for s in self.specs],
            "started": round(self.started, 3),
        })

    def remove_own_files(self) -> None:
        """Delete the pidfile and status file if they still describe this process."""
        try:
            owner = json.loads(self.paths.pidfile.read_text()).get("pid")
        except (OSError, ValueError):
            owner = None
        if owner == os.getpid():
            for p in (self.paths.pidfile, self.paths.status):
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass

    # -- main loop
    def run(self, wakeup_fd: int) -> str:
        self.sel.register(wakeup_fd, selectors.EVENT_READ, ("signal", None))
        next_tick = 0.0
        while self.stop_reason is None:
            now = time.monotonic()
            if now >= next_tick or self.status_requested:
                self.status_requested = False
                self.check_alive()
                self.write_status()
                next_tick = now + STATUS_INTERVAL
            for key, _ in self.sel.select(timeout=max(0.0, next_tick - time.monotonic())):
                what, obj = key.data
                if what == "tap":
                    self.from_tap(obj)
                elif what == "udp":
                    self.from_udp(obj)
                else:
                    try:
                        os.read(wakeup_fd, 512)
                    except BlockingIOError:
                        pass
        return self.stop_reason


# ---------------------------------------------------------------- process


def _setup_logging(paths: StatePaths) -> None:
    handler = logging.FileHandler(paths.log)
    handler.setFormatter(JsonLineFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def _detach() -> None:
    """Double fork: the caller reaps the intermediate child at once, the bridge is re-parented
    to init (never a zombie of a long-lived caller) and leads no terminal session."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")


def _release_stdio() -> None:
    """Stop holding the caller's pipes: after this, the caller reading our stdout sees EOF."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _report(line: str) -> None:
    try:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    except OSError:
        pass


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {PROGRAM}",
                                description="User-space GENEVE (RFC 8926) between TAP devices and UDP.")
    p.add_argument("--netns", required=True, metavar="PATH", help="netns file to enter, e.g. /run/netns/node")
    p.add_argument("--link", action="append", required=True, type=LinkSpec.parse,
                   metavar="NAME,VNI,REMOTE,PORT", help="one TAP device to bridge (repeatable)")
    p.add_argument("--state-dir", type=Path, default=None,
                   help=f"pidfile/status/log folder (default: ${STATE_DIR_ENV} or {DEFAULT_STATE_DIR})")
    p.add_argument("--daemon", action="store_true",
                   help="detach and print 'ready <pid>' or 'error <message>' once")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        validate(args.link)
    except ValueError as e:
        _report(f"error {e}")
        return 2
    if args.daemon:
        _detach()
    base = args.state_dir or state_dir()
    bridge: Optional[Bridge] = None
    try:
        base.mkdir(parents=True, exist_ok=True)
        inode = enter_netns(args.netns)
        paths = StatePaths(base, inode)
        _setup_logging(paths)
        bridge = Bridge(args.link, args.netns, inode, paths)
        bridge.open()
    except (SetupError, OSError) as e:
        _report(f"error {e}")
        if bridge is not None:
            log.error("setup failed", extra={"fields": {"error": str(e)}})
        return 1

    rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wfd)

    def on_stop(signum, _frame):
        bridge.stop_reason = f"signal {signal.Signals(signum).name}"

    def on_status(_signum, _frame):
        bridge.status_requested = True

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGUSR1, on_status)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    bridge.write_status()
    bridge.write_pidfile()
    log.info("started", extra={"fields": {"config": bridge.hash, "netns": args.netns,
                                          "links": [s.arg() for s in bridge.specs]}})
    _report(f"ready {os.getpid()}")
    if args.daemon:
        _release_stdio()
    try:
        reason = bridge.run(rfd)
    except Exception:
        log.exception("bridge failed")
        reason = "error"
    log.info("stopped", extra={"fields": {"reason": reason, "drops": bridge.drops,
                                          "links": {t.spec.name: asdict(t.counters)
                                                    for t in bridge.taps}}})
    bridge.remove_own_files()
    bridge.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
