"""The side-effect layer: every read and write of one network namespace's kernel state.

This module (with ``noderedirect/tunnels/``) is the only place that imports pyroute2 or runs a
subprocess. One :class:`Host` per network namespace; the netns is always a parameter, never
the implicit "current" one.

How the netns is entered, and why:

- Everything bound to a netns when it is *created* (netlink sockets, the libnftables context,
  the ``/proc/sys/net`` view, a child process) is created and used on one worker thread per
  Host that has ``setns()``-ed into the namespace. Network namespaces are per thread, so the
  rest of the process stays where it is (pyroute2's own ``netns=`` support forks a child per
  socket instead, which can deadlock a threaded process). The thread also serialises all
  netlink, nft and command calls of a Host. It checks, before doing anything, that it really
  is inside the target namespace.
- Commands (``iptables-restore``, ``iptables-save``, ``ipset``) are started from that thread,
  so they are born inside the netns: no ``nsenter`` in between (which cost one more exec, ~1 ms,
  per command). :meth:`Host.start` returns at once, so the thread goes on with netlink reads
  while a command runs.
- Hot paths avoid per-message Python objects: link and route dumps, route batches (many
  requests per datagram), prefix deletes, tunnel links, addresses, MTU, ``ip route get`` and
  ip rule adds go through :mod:`noderedirect._netlink` (the kernel filters dumps by table);
  ipset members are added/removed one by one with pyroute2's ``IPSet`` on the worker thread,
  and sets are read and the planner's ipset script written on a bare socket
  (:mod:`noderedirect._ipset_nl`).
  A route message or set member the previous read already decoded (same bytes, same interface
  names) is not decoded again: a plan or verify at thousands of pods mostly re-reads what it
  read before.

Values are printed and parsed so that an observed object compares equal to the rendered one
from :mod:`noderedirect.model` (``Route``, ``IpRule``, ``IptRule``, ``IpsetSet`` …).
Kernel-only details (route protocol, metrics, ipset bucketsize/initval) are dropped.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import errno
import fcntl
import functools
import ipaddress
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, TypeVar

from pyroute2 import IPRoute, IPSet
from pyroute2.netlink.exceptions import IPSetError, NetlinkError

from . import _ipset_nl, _netlink, names
from .model import IpRule, IpsetEntry, IpsetSet, IptRule, Route

log = logging.getLogger(__name__)

T = TypeVar("T")

NETNS_DIR = "/var/run/netns"
CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703          # ioctl on an nsfs file: which kind of namespace it is
IFF_UP = 0x1
IFF_LOOPBACK = 0x8
RTNH_F_ONLINK = 0x4
FIB_RULE_INVERT = 0x2
IPTABLES_WAIT = "10"            # seconds to wait for the xtables lock (shared by all netns)

ROUTE_TYPES = {1: "unicast", 2: "local", 3: "broadcast", 4: "anycast", 5: "multicast",
               6: "blackhole", 7: "unreachable", 8: "prohibit", 9: "throw", 10: "nat"}
ROUTE_SCOPES = {0: None, 200: "site", 253: "link", 254: "host", 255: "nowhere"}
ROUTE_PROTOS = {0: "unspec", 1: "redirect", 2: "kernel", 3: "boot", 4: "static"}
TUN_MODES = {1: "tun", 2: "tap"}      # IFLA_TUN_TYPE
RULE_ACTIONS = {1: "lookup", 2: "goto", 3: "nop", 6: "blackhole", 7: "unreachable", 8: "prohibit"}
RULE_ACTION_IDS = {v: k for k, v in RULE_ACTIONS.items()}
# attributes of an ip rule that are not selectors; any other one makes the rule "not plain"
_RULE_PLAIN_ATTRS = frozenset({"FRA_UNSPEC", "FRA_PRIORITY", "FRA_TABLE", "FRA_FWMARK",
                               "FRA_FWMASK", "FRA_GOTO", "FRA_PROTOCOL"})

IPTABLES_VARIANTS = ("nft", "legacy")
IPTABLES_TABLES = ("raw", "mangle", "nat", "filter", "security")

_NETNS_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@:+-]{0,254}$")
_IFNAME = re.compile(r"^[^\s/:]{1,15}$")
_SYSCTL_KEY = re.compile(r"^net/[A-Za-z0-9_.@:+/-]+$")


# ---------------------------------------------------------------- errors


class HostError(Exception):
    """Anything that went wrong while reading or changing a network namespace."""


class InvalidValue(HostError, ValueError):
    """A value that must not reach the kernel (bad address, interface name, key …)."""


class CommandError(HostError):
    """A command run inside a netns failed: the command, exit code and stderr are kept."""

    def __init__(self, cmd: Sequence[str], returncode: int, stderr: str, netns: str,
                 stdout: str = ""):
        self.cmd = list(cmd)
        self.returncode = returncode
        self.stderr = stderr or ""
        self.stdout = stdout or ""
        self.netns = netns
        super().__init__(self.headline())

    def first_error_line(self) -> str:
        for line in self.stderr.splitlines():
            if line.strip():
                return line.strip()
        return "(no error output)"

    def headline(self) -> str:
        return (f"`{shlex.join(self.cmd)}` in netns {self.netns} exited {self.returncode}: "
                f"{self.first_error_line()}")

    def __str__(self) -> str:
        return self.headline()


class RestoreError(CommandError):
    """A batch input (iptables-restore, ipset restore) failed at a known line.

    ``table`` is the iptables table the line belongs to (None for ipset / ip batches),
    ``lineno`` is 1-based in the text that was fed, ``context`` holds ``'NN: text'`` lines
    around it (the failing one marked with ``>``).
    """

    def __init__(self, cmd: Sequence[str], returncode: int, stderr: str, netns: str,
                 text: str, lineno: Optional[int], table: Optional[str] = None):
        self.text = text
        self.lineno = lineno
        self.table = table
        self.context = context_lines(text, lineno) if lineno else []
        super().__init__(cmd, returncode, stderr, netns)

    def __str__(self) -> str:
        where = f"line {self.lineno}" if self.lineno else "an unknown line"
        if self.table:
            where = f"table {self.table}, {where}"
        body = "".join(f"\n    {c}" for c in self.context)
        return f"{self.headline()}\n  failed at {where} of the input:{body}"


class RoutesRefused(HostError):
    """The kernel refused some routes of a batch; the others were applied.

    ``refused`` holds ``(op, route, errno, reason)`` per refused route, in request order.
    """

    def __init__(self, netns: str, total: int, refused: list):
        self.netns, self.total, self.refused = netns, total, refused
        lines = "".join(f"\n    {op} '{r.show_with_table()}': {reason}" for op, r, _, reason in refused)
        super().__init__(f"netns {netns}: the kernel refused {len(refused)} of {total} route "
                         f"changes (the others were applied):{lines}")


class MissingFeature(HostError):
    """A kernel or userspace feature is not available; the message says what to use instead."""

    def __init__(self, feature: str, netns: str, detail: str = ""):
        self.feature, self.netns, self.detail = feature, netns, detail
        what, instead = FEATURE_HELP.get(feature, (feature, "no alternative known"))
        why = f" ({detail})" if detail else ""
        super().__init__(f"{what} not available in netns {netns}{why}; {instead}")


class NetnsNotFound(HostError):
    """The named network namespace does not exist (it is never created on demand)."""


class NetlinkFailed(HostError):
    """A netlink request was refused by the kernel."""

    def __init__(self, what: str, code: int, message: str, netns: str):
        self.what, self.code, self.netns = what, code, netns
        name = errno.errorcode.get(code, str(code))
        super().__init__(f"{what} in netns {netns} failed: {message} ({name})")


class NftError(HostError):
    """libnftables refused a script; ``error`` is its full text (with the caret lines)."""

    def __init__(self, script: str, rc: int, error: str, netns: str):
        self.script, self.rc, self.error, self.netns = script, rc, error or "", netns
        first = next((l.strip() for l in self.error.splitlines() if l.strip()), "(no error text)")
        super().__init__(f"nft in netns {netns} failed (rc {rc}): {first}")

    def __str__(self) -> str:
        # the first error line is in the headline; the rest shows the script and the caret
        rest = self.error.strip().splitlines()[1:]
        return "\n".join([self.args[0], *rest])


FEATURE_HELP: dict[str, tuple[str, str]] = {
    "geneve": ("kernel GENEVE links are",
               "use --tunnel usergeneve (GENEVE over TAP in user space) or --tunnel vxlan"),
    "vxlan": ("kernel VXLAN links are", "use --tunnel usergeneve or --tunnel geneve"),
    "tuntap": ("TUN/TAP devices are", "use --tunnel geneve or --tunnel vxlan"),
    "ipset": ("ipset (the kernel ip_set module or the ipset tool) is",
              "install ipset, or use the native nft rules, which need no ipset"),
    "iptables_nft": ("iptables-nft is", "use the iptables-legacy variant or the native nft rules"),
    "iptables_legacy": ("iptables-legacy is", "use the iptables-nft variant or the native nft rules"),
    "ip6tables": ("ip6tables (IPv6 netfilter, for inpod.ipv6: true) is",
                  "install ip6tables of the chosen variant on a kernel with IPv6, or set inpod.ipv6: false"),
    "nft_bindings": ("the nftables Python bindings (libnftables1) are",
                     "install Debian's libnftables1, or use iptables rules"),
    "tproxy": ("TPROXY is", "nothing can replace it on the ztunnel side; use a kernel with "
               "NFT_TPROXY/NETFILTER_XT_TARGET_TPROXY"),
}


def context_lines(text: str, lineno: int, around: int = 2) -> list[str]:
    """``'NN: text'`` lines around ``lineno`` (1-based); the failing line is marked ``>``."""
    lines = text.splitlines()
    lo, hi = max(1, lineno - around), min(len(lines), lineno + around)
    width = len(str(hi))
    return [f"{'>' if n == lineno else ' '}{n:>{width}}: {lines[n - 1]}" for n in range(lo, hi + 1)]


# ---------------------------------------------------------------- value checks


def check_ifname(name: str) -> str:
    if not isinstance(name, str) or not _IFNAME.fullmatch(name) or name in (".", ".."):
        raise InvalidValue(f"{name!r} is not an interface name (1-15 characters, no space, '/' or ':')")
    return name


def check_ip(addr: str, family: Optional[int] = None) -> str:
    if family in (None, 4) and _is_v4(addr):
        return addr
    try:
        ip = ipaddress.ip_address(addr)
    except (ValueError, TypeError):
        raise InvalidValue(f"{addr!r} is not an IP address") from None
    if family and ip.version != family:
        raise InvalidValue(f"{addr!r} is not an IPv{family} address")
    return str(ip)


def _is_v4(addr: Any) -> bool:
    """A canonical dotted quad? inet_pton (C) takes exactly those: four decimal numbers 0-255
    without leading zeros. The fast path for the thousands of addresses of a bulk change."""
    try:
        socket.inet_pton(socket.AF_INET, addr)
    except (OSError, TypeError):
        return False
    return True


def _v4_prefix_text(prefix: Any) -> Optional[str]:
    """``prefix`` itself if it is a canonical IPv4 ``a.b.c.d/nn`` with host bits zero, else
    None (then :func:`check_prefix` decides, and says what is wrong)."""
    if not isinstance(prefix, str):
        return None
    addr, sep, plen = prefix.partition("/")
    if not sep or not plen.isascii() or not plen.isdigit() or plen != str(int(plen)) or int(plen) > 32:
        return None
    try:
        packed = socket.inet_pton(socket.AF_INET, addr)
    except OSError:
        return None
    host_bits = (1 << (32 - int(plen))) - 1
    return prefix if not int.from_bytes(packed, "big") & host_bits else None


def check_prefix(prefix: str) -> ipaddress._BaseNetwork:
    try:
        return ipaddress.ip_network(prefix, strict=True)
    except (ValueError, TypeError):
        raise InvalidValue(f"{prefix!r} is not a network prefix (a.b.c.d/nn, host bits zero)") from None


def check_interface(cidr: str) -> ipaddress._BaseInterface:
    try:
        iface = ipaddress.ip_interface(cidr)
    except (ValueError, TypeError):
        raise InvalidValue(f"{cidr!r} is not an address/prefix") from None
    if "/" not in str(cidr):
        raise InvalidValue(f"{cidr!r} lacks a prefix length")
    return iface


def check_sysctl_key(key: str) -> str:
    """Only per-netns keys under net/ are allowed: anything else would change the machine."""
    if not isinstance(key, str) or not _SYSCTL_KEY.fullmatch(key) or ".." in key.split("/") \
            or "//" in key or key.endswith("/"):
        raise InvalidValue(f"{key!r} is not a sysctl key under net/ (write it with slashes: "
                           "net/ipv4/conf/eth0/rp_filter)")
    return key


def _check_text_arg(arg: str) -> str:
    if not isinstance(arg, str) or "\n" in arg or "\0" in arg:
        raise InvalidValue(f"{arg!r} cannot be a command argument (newline or NUL)")
    return arg


# ---------------------------------------------------------------- netns references


def _ns_identity(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


@dataclass(frozen=True)
class NetnsRef:
    """A network namespace by name (``/var/run/netns/NAME``) or by path (``/proc/PID/ns/net``)."""

    spec: str
    path: str

    @classmethod
    def resolve(cls, spec: "str | NetnsRef") -> "NetnsRef":
        if isinstance(spec, NetnsRef):
            return spec
        if not isinstance(spec, str) or not spec:
            raise NetnsNotFound(f"{spec!r} is not a netns name or path")
        if "/" in spec:
            path = spec
            if not os.path.isabs(path):
                raise NetnsNotFound(f"netns path {spec!r} is not absolute")
        else:
            if not _NETNS_NAME.fullmatch(spec) or spec in (".", ".."):
                raise NetnsNotFound(f"{spec!r} is not a valid netns name")
            path = os.path.join(NETNS_DIR, spec)
        _check_is_netns(spec, path)
        return cls(spec=spec, path=path)

    @classmethod
    def current(cls) -> "NetnsRef":
        """The namespace this process runs in (read it; tests never write to it)."""
        return cls.resolve("/proc/self/ns/net")

    @property
    def identity(self) -> tuple[int, int]:
        return _ns_identity(self.path)

    def __str__(self) -> str:
        return self.spec


def _check_is_netns(spec: str, path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsNotFound(f"no network namespace {spec!r} ({path} does not exist; "
                            "create it first, e.g. `ip netns add NAME`)") from None
    except OSError as e:
        raise NetnsNotFound(f"cannot open network namespace {spec!r} at {path}: {e.strerror}") from None
    try:
        try:
            kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
        except OSError:
            raise NetnsNotFound(f"{path} is not a namespace file (stale entry of a deleted netns?)") from None
        if kind != CLONE_NEWNET:
            raise NetnsNotFound(f"{path} is a namespace, but not a network namespace")
    finally:
        os.close(fd)


_libc: Optional[ctypes.CDLL] = None


def _setns(fd: int) -> None:
    global _libc
    if hasattr(os, "setns"):
        os.setns(fd, CLONE_NEWNET)
        return
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _enter_netns(ns: NetnsRef) -> None:
    """Move the calling thread (only) into ``ns`` and prove it."""
    fd = os.open(ns.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(fd)
    finally:
        os.close(fd)
    # invariant: from here on this thread sees only the target netns
    if _ns_identity("/proc/thread-self/ns/net") != ns.identity:
        raise HostError(f"setns into {ns.path} did not take effect; refusing to continue")


# ---------------------------------------------------------------- observed value types


@dataclass(frozen=True)
class LinkInfo:
    name: str
    index: int
    kind: Optional[str]                 # 'veth', 'vxlan', 'geneve', 'tun', 'loopback', … or None
    up: bool
    addresses: tuple[str, ...] = ()     # IPv4 'a.b.c.d/nn', kernel order
    vni: Optional[int] = None
    remote: Optional[str] = None
    dstport: Optional[int] = None
    external: bool = False              # collect_metadata (flow-based) tunnel
    peer_ifindex: Optional[int] = None  # veth: the peer's ifindex (in the peer's netns)
    mtu: Optional[int] = None
    tun_mode: Optional[str] = None      # kind 'tun': 'tun' or 'tap'


@dataclass(frozen=True)
class ObservedIpRule:
    """An ip rule as found. ``plain`` is False when it has selectors beyond fwmark/mask
    (from/to/iif/oif/uidrange/tos/ports/not …), which :class:`IpRule` cannot express."""

    rule: IpRule
    plain: bool
    text: str


@dataclass(frozen=True)
class ObservedRoute:
    """A route as found. ``protocol`` is the kernel's (``kernel`` = made by the kernel itself,
    e.g. the connected route of an address)."""

    route: Route
    protocol: str
    metric: Optional[int] = None
    multipath: bool = False

    @property
    def kernel(self) -> bool:
        return self.protocol == "kernel"


@dataclass(frozen=True)
class SavedChain:
    """A chain declared in iptables-save output (``:NAME POLICY [p:b]``)."""

    table: str
    chain: str
    policy: Optional[str]               # None for user chains ('-')
    family: int = 4

    @property
    def builtin(self) -> bool:
        return self.policy is not None


@dataclass(frozen=True)
class Features:
    """What this netns can do, probed from inside it. ``tproxy`` is None when unknown."""

    netns: str
    geneve: bool
    vxlan: bool
    tuntap: bool
    ipset: bool
    iptables_nft: bool
    iptables_legacy: bool
    nft_bindings: bool
    tproxy: Optional[bool]
    reasons: tuple[tuple[str, str], ...] = ()   # (feature, why it is missing)

    def reason(self, feature: str) -> str:
        return dict(self.reasons).get(feature, "")

    def require(self, feature: str) -> None:
        """Raise :class:`MissingFeature` (one line, with the alternative) unless present."""
        if feature not in FEATURES:
            raise ValueError(f"unknown feature {feature!r} (one of {', '.join(FEATURES)})")
        if getattr(self, feature) is not True:
            detail = self.reason(feature) or ("could not be probed" if getattr(self, feature) is None else "")
            raise MissingFeature(feature, self.netns, detail)


FEATURES = ("geneve", "vxlan", "tuntap", "ipset", "iptables_nft", "iptables_legacy",
            "nft_bindings", "tproxy")


# ---------------------------------------------------------------- pure parsers


def parse_iptables_save(text: str, family: int = 4) -> list[IptRule]:
    """Every ``-A CHAIN ARGS`` line as ``IptRule(table, chain, args, '-A')``, in order.

    Counters (``-c``: ``[p:b] -A …``) are dropped; the arguments are kept verbatim.
    """
    rules: list[IptRule] = []
    table: Optional[str] = None
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("[") and "]" in line:
            line = line.split("]", 1)[1].strip()
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith("-A ") and table:
            _, chain, *rest = line.split(" ", 2)
            rules.append(IptRule(table=table, chain=chain, args=rest[0] if rest else "",
                                 op="-A", family=family))
    return rules


def parse_iptables_chains(text: str, family: int = 4) -> list[SavedChain]:
    """Every chain declared in iptables-save output (built-in with policy, user with None)."""
    chains: list[SavedChain] = []
    table: Optional[str] = None
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith(":") and table:
            name, policy, *_ = line[1:].split() + ["-"]
            chains.append(SavedChain(table=table, chain=name,
                                     policy=None if policy == "-" else policy, family=family))
    return chains


def _save_tokens(line: str) -> list[str]:
    """Split one ``ipset save`` line as a shell would. Lines are plain words, at most one
    double-quoted comment: those are split directly (shlex costs ~50 µs a line, i.e. 50 ms
    for 1000 members); anything else (escapes, single quotes, more quotes) goes to shlex."""
    if "\\" not in line and "'" not in line:
        quotes = line.count('"')
        if quotes == 0:
            return line.split()
        if quotes == 2:
            head, _, rest = line.partition('"')
            inner, _, tail = rest.partition('"')
            if head[-1:] in ("", " ") and tail[:1] in ("", " "):
                return head.split() + [inner] + tail.split()
    return shlex.split(line)


def parse_ipset_save(text: str, only: Optional[Callable[[str], bool]] = None,
                     known: Optional[dict[str, IpsetEntry]] = None
                     ) -> dict[str, tuple[IpsetSet, list[IpsetEntry]]]:
    """``ipset save`` output -> {name: (set, entries)}. Kernel-only options (bucketsize,
    initval) and options the model does not carry (timeout, counters …) are dropped.
    ``only(name)`` picks the sets to parse; the members of the others are skipped unsplit.
    ``known`` maps member lines parsed before to their entry (the same line is the same
    entry); lines parsed now are added to it."""
    sets: dict[str, tuple[IpsetSet, list[IpsetEntry]]] = {}
    for raw in text.splitlines():
        if known is not None:
            entry = known.get(raw)
            if entry is not None:
                if entry.set in sets:
                    sets[entry.set][1].append(entry)
                continue
        if not raw.strip():
            continue
        if only is not None:
            words = raw.split(None, 2)
            if len(words) >= 2 and words[0] in ("create", "add") and not only(words[1]):
                continue
        toks = _save_tokens(raw)
        if toks[0] == "create" and len(toks) >= 3:
            opts: dict[str, Any] = {}
            flags = set()
            i = 3
            while i < len(toks):
                if toks[i] in ("family", "hashsize", "maxelem", "bucketsize", "initval", "timeout",
                               "netmask", "markmask", "size", "range") and i + 1 < len(toks):
                    opts[toks[i]] = toks[i + 1]
                    i += 2
                else:
                    flags.add(toks[i])
                    i += 1
            kw: dict[str, Any] = {"name": toks[1], "type": toks[2], "comment": "comment" in flags}
            if "family" in opts:
                kw["family"] = opts["family"]
            for k in ("hashsize", "maxelem"):
                if k in opts:
                    kw[k] = int(opts[k], 0)
            sets[toks[1]] = (IpsetSet(**kw), [])
        elif toks[0] == "add" and len(toks) >= 3 and toks[1] in sets:
            comment = None
            if "comment" in toks[3:]:
                at = toks.index("comment", 3)
                comment = toks[at + 1] if at + 1 < len(toks) else ""
            entry = IpsetEntry(set=toks[1], ip=toks[2], comment=comment)
            sets[toks[1]][1].append(entry)
            if known is not None:
                known[raw] = entry
    return sets


def route_args(r: Route) -> list[str]:
    """A Route as ``ip route`` arguments, validated, every field spelled out (type, scope), so
    that adding and deleting by these arguments means exactly this route."""
    dst = _v4_prefix_text(r.dst) if r.family == 4 else None
    if dst is None:
        net = check_prefix(r.dst)
        if net.version != r.family:
            raise InvalidValue(f"route {r.dst} is IPv{net.version} but family is {r.family}")
        dst = str(net)
    if r.type not in ROUTE_TYPES.values():
        raise InvalidValue(f"route type {r.type!r}")
    if r.scope not in (None, "link", "host", "site"):
        raise InvalidValue(f"route scope {r.scope!r}")
    args = [r.type, dst]
    if r.via:
        args += ["via", check_ip(r.via, r.family)]
    if r.dev:
        args += ["dev", check_ifname(r.dev)]
    if r.src:
        args += ["src", check_ip(r.src, r.family)]
    args += ["scope", r.scope or "global"]
    if r.onlink:
        args.append("onlink")
    args += ["table", str(int(r.table))]
    return args


_RT_TYPES = {name: num for num, name in ROUTE_TYPES.items()}
_RT_SCOPES = {None: 0, "site": 200, "link": 253, "host": 254}
RTPROT_BOOT = 3

# (family, dst packed, dst_len, table, type, scope, rtm_flags, gateway, prefsrc, dev name)
RouteSpec = tuple


def _route_spec(r: Route) -> RouteSpec:
    """A Route validated (every field, as :func:`route_args` does) and packed for netlink.
    The shape of a per-pod route (IPv4, canonical ``a.b.c.d/32``) is checked on a short path
    (~1 µs); anything else goes through :func:`route_args`."""
    fast = _route_spec_v4(r) if r.family == 4 else None
    if fast is not None:
        return fast
    route_args(r)
    af = socket.AF_INET if r.family == 4 else socket.AF_INET6
    addr, _, plen = str(check_prefix(r.dst)).partition("/")
    return (af, socket.inet_pton(af, addr), int(plen), int(r.table), _RT_TYPES[r.type],
            _RT_SCOPES[r.scope], RTNH_F_ONLINK if r.onlink else 0,
            socket.inet_pton(af, r.via) if r.via else None,
            socket.inet_pton(af, r.src) if r.src else None, r.dev)


def _route_spec_v4(r: Route) -> Optional[RouteSpec]:
    """None unless every field is in a shape whose check is cheap and certain: a dotted quad
    (inet_pton takes only canonical ones), a prefix length written canonically with host bits
    zero, known type and scope, an integer table and a valid interface name."""
    addr, sep, plen = r.dst.partition("/") if isinstance(r.dst, str) else ("", "", "")
    if plen not in _V4_PLENS or r.type not in _RT_TYPES or r.scope not in _RT_SCOPES \
            or type(r.table) is not int or not 0 <= r.table < 1 << 32 or type(r.onlink) is not bool:
        return None
    try:
        dst = socket.inet_pton(socket.AF_INET, addr)
        via = _packed_v4(r.via) if r.via else None
        src = _packed_v4(r.src) if r.src else None
    except (OSError, TypeError):
        return None
    bits = _V4_PLENS[plen]
    if int.from_bytes(dst, "big") & ((1 << (32 - bits)) - 1):
        return None
    if r.dev is not None and r.dev not in _GOOD_IFNAMES:
        check_ifname(r.dev)
        if len(_GOOD_IFNAMES) < 4096:
            _GOOD_IFNAMES.add(r.dev)
    return (socket.AF_INET, dst, bits, r.table, _RT_TYPES[r.type], _RT_SCOPES[r.scope],
            RTNH_F_ONLINK if r.onlink else 0, via, src, r.dev)


_V4_PLENS = {str(n): n for n in range(33)}
_GOOD_IFNAMES: set[str] = set()


@functools.lru_cache(maxsize=1024)
def _packed_v4(addr: str) -> bytes:
    """Next hops and sources repeat across thousands of routes: checked and packed once."""
    return socket.inet_pton(socket.AF_INET, addr)


@functools.lru_cache(maxsize=256)
def _route_parts(op: str, af: int, dst_len: int, table: int, rtype: int, scope: int, flags: int,
                 gateway: Optional[bytes], prefsrc: Optional[bytes], oif: Optional[int]
                 ) -> tuple[int, int, bytes, bytes]:
    if op == "add":
        mtype, mflags, proto = _netlink.RTM_NEWROUTE, _netlink.NLM_F_CREATE | _netlink.NLM_F_EXCL, RTPROT_BOOT
    elif op == "replace":
        mtype, mflags, proto = _netlink.RTM_NEWROUTE, _netlink.NLM_F_CREATE | _netlink.NLM_F_REPLACE, RTPROT_BOOT
    else:
        mtype, mflags, proto = _netlink.RTM_DELROUTE, 0, 0
    head, tail = _netlink.route_request_around_dst(af, dst_len, table, rtype, scope, proto, flags,
                                                   gateway, oif, prefsrc)
    return mtype, mflags, head, tail


def _route_message(op: str, spec: RouteSpec, oif: Optional[int]) -> tuple[int, int, bytes]:
    """``(type, flags, payload)`` of one route add (``ip route add``: proto boot, fails if it
    exists), replace (``ip route replace``) or delete (any protocol; every other field must
    match)."""
    af, dst, dst_len, table, rtype, scope, flags, gateway, prefsrc, _ = spec
    mtype, mflags, head, tail = _route_parts(op, af, dst_len, table, rtype, scope, flags, gateway,
                                             prefsrc, oif)
    return mtype, mflags, (head + dst + tail) if dst_len else head


_VXLAN_ATTRS = {"vxlan_id", "vxlan_group", "vxlan_port", "vxlan_learning"}
_GENEVE_ATTRS = {"geneve_id", "geneve_remote", "geneve_port"}


def _tunnel_link_data(kind: str, attrs: dict) -> Optional[bytes]:
    """IFLA_INFO_DATA for a VXLAN or GENEVE device given as pyroute2-style attributes; None
    for anything else (pyroute2 then builds the request)."""
    def v4(addr: Optional[str]) -> Optional[bytes]:
        return ipaddress.IPv4Address(check_ip(addr, 4)).packed if addr is not None else None
    if kind == "vxlan" and set(attrs) <= _VXLAN_ATTRS and "vxlan_id" in attrs:
        learning = attrs.get("vxlan_learning")
        return _netlink.vxlan_data(int(attrs["vxlan_id"]), v4(attrs.get("vxlan_group")),
                                   attrs.get("vxlan_port"), int(learning) if learning is not None else None)
    if kind == "geneve" and set(attrs) <= _GENEVE_ATTRS and "geneve_id" in attrs:
        return _netlink.geneve_data(int(attrs["geneve_id"]), v4(attrs.get("geneve_remote")),
                                    attrs.get("geneve_port"))
    return None


class Running:
    """A command started by :meth:`Host.start`."""

    def __init__(self, netns: str, argv: list[str], proc: Any, input: Optional[str], timeout: float,
                 started: float):
        self.netns, self.argv, self._proc, self._input = netns, argv, proc, input
        self._timeout, self._started = timeout, started
        self._done: Optional[subprocess.CompletedProcess] = None

    def result(self, check: bool = True) -> subprocess.CompletedProcess:
        """Wait for it; like :meth:`Host.run`'s answer (CommandError when ``check`` and it failed)."""
        if self._done is None:
            if isinstance(self._proc, subprocess.CompletedProcess):
                self._done = self._proc
            else:
                try:
                    out, err = self._proc.communicate(self._input, timeout=self._timeout)
                except subprocess.TimeoutExpired as e:
                    self._proc.kill()
                    self._proc.communicate()
                    raise CommandError(self.argv, -1, f"timed out after {self._timeout}s", self.netns) from e
                self._done = subprocess.CompletedProcess(self.argv, self._proc.returncode, out, err)
            log.debug("run netns=%s cmd=%r rc=%s ms=%.1f", self.netns, shlex.join(self.argv),
                      self._done.returncode, (time.monotonic() - self._started) * 1000)
        cp = self._done
        if check and cp.returncode != 0:
            raise CommandError(self.argv, cp.returncode, cp.stderr, self.netns, cp.stdout)
        return cp


# ---------------------------------------------------------------- hosts lent to others

_LENT: dict[str, list["Host"]] = {}
_LENT_LOCK = threading.Lock()


@contextlib.contextmanager
def lend(host: "Host") -> Iterator["Host"]:
    """While inside, :func:`borrowed` of ``host``'s netns path hands out ``host`` itself: the
    tunnel drivers (which take netns paths) then use the engine's thread and sockets instead
    of starting their own (~2-5 ms per use, several uses per apply)."""
    with _LENT_LOCK:
        _LENT.setdefault(host.ns.path, []).append(host)
    try:
        yield host
    finally:
        with _LENT_LOCK:
            lent = _LENT.get(host.ns.path, [])
            if host in lent:
                lent.remove(host)
            if not lent:
                _LENT.pop(host.ns.path, None)


@contextlib.contextmanager
def borrowed(ns: "NetnsRef | str") -> Iterator["Host"]:
    """A Host for ``ns``: one lent by :func:`lend` (left open), else a new one closed on exit."""
    path = ns.path if isinstance(ns, NetnsRef) else ns
    with _LENT_LOCK:
        lent = _LENT.get(path)
        host = lent[-1] if lent else None
    if host is not None:
        yield host
        return
    with Host(ns) as fresh:
        yield fresh


# ---------------------------------------------------------------- the host


class Host:
    """One network namespace. Use as a context manager, or call :meth:`close`."""

    def __init__(self, ns: "NetnsRef | str"):
        self.ns = NetnsRef.resolve(ns)
        self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._worker_ident: Optional[int] = None
        self._lock = threading.Lock()
        self._features: Optional[Features] = None
        # created and used on the worker thread only
        self._ipr: Optional[IPRoute] = None
        self._nft: Any = None
        self._rtnl: Optional[_netlink.Socket] = None      # route dumps / prefix deletes
        self._nfnl: Optional[_netlink.Socket] = None      # ipset listing of one set
        self._ipset: Optional[IPSet] = None               # ipset add / del of one member
        # what the last reads decoded, keyed by the kernel's own bytes/text: an unchanged route
        # or member is not decoded again (most of a read's cost at thousands of pods)
        self._route_memo: dict[tuple[int, int], tuple[dict[int, str], dict[bytes, ObservedRoute]]] = {}
        # ipset protocol and type revisions negotiated with the kernel, and the members the
        # last read decoded (an unchanged member is not decoded again)
        self._ipset_nl = _ipset_nl.Client()

    def __repr__(self) -> str:
        return f"Host({self.ns.spec!r})"

    def __enter__(self) -> "Host":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ running inside the netns

    def _started(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                ex = concurrent.futures.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix=f"netns-{self.ns.spec}")
                try:
                    ex.submit(self._worker_init).result()
                except BaseException:
                    ex.shutdown(wait=True)
                    raise
                self._executor = ex
            return self._executor

    def _worker_init(self) -> None:
        try:
            _enter_netns(self.ns)
        except FileNotFoundError:
            raise NetnsNotFound(f"network namespace {self.ns.spec!r} is gone ({self.ns.path})") from None
        self._worker_ident = threading.get_ident()
        log.debug("netns worker started netns=%s", self.ns.spec)

    def in_netns(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on this Host's thread, which lives inside the netns.

        Sockets and file descriptors made there (a UDP socket, an open ``/dev/net/tun``) belong
        to the netns and can be used from any thread afterwards. Calls are serialised: keep
        ``fn`` short.
        """
        if self._worker_ident == threading.get_ident():
            return fn(*args, **kwargs)
        return self._started().submit(fn, *args, **kwargs).result()

    def _iproute(self) -> IPRoute:
        # invariant: only ever touched on the worker thread (pyroute2 state is thread-local)
        assert self._worker_ident == threading.get_ident(), "IPRoute used off the netns thread"
        if self._ipr is None:
            self._ipr = IPRoute(ext_ack=True)
        return self._ipr

    def netlink(self, fn: Callable[[IPRoute], T], what: str = "netlink request") -> T:
        """Run ``fn(ipr)`` with this netns's pyroute2 ``IPRoute`` (which must not escape ``fn``).
        Kernel refusals become :class:`NetlinkFailed` naming ``what``."""
        def call() -> T:
            try:
                return fn(self._iproute())
            except NetlinkError as e:
                raise NetlinkFailed(what, e.code, _netlink_message(e), self.ns.spec) from None
        return self.in_netns(call)

    def close(self) -> None:
        if self._worker_ident == threading.get_ident():
            raise HostError("Host.close() called from inside in_netns(); it would wait for itself")
        with self._lock:
            ex, self._executor = self._executor, None
        if ex is None:
            return
        try:
            ex.submit(self._worker_close).result()
        finally:
            ex.shutdown(wait=True)
            self._worker_ident = None

    def _worker_close(self) -> None:
        self._nft = None
        for attr in ("_ipr", "_ipset", "_rtnl", "_nfnl"):
            sock = getattr(self, attr)
            setattr(self, attr, None)
            if sock is not None:
                try:
                    sock.close()
                except OSError as e:   # closing must not stop the others from closing
                    log.warning("closing %s of netns %s: %s", attr, self.ns.spec, e)

    def _raw(self, attr: str, protocol: int) -> _netlink.Socket:
        assert self._worker_ident == threading.get_ident(), "netlink socket used off the netns thread"
        sock = getattr(self, attr)
        if sock is None:
            sock = _netlink.Socket(protocol, strict=True)
            setattr(self, attr, sock)
        return sock

    def _raw_request(self, attr: str, protocol: int, mtype: int, flags: int, payload: bytes,
                     what: str) -> list[_netlink.Message]:
        """One request on a bare netlink socket (worker thread only); refusals become
        :class:`NetlinkFailed` naming ``what``."""
        try:
            return self._raw(attr, protocol).request(mtype, flags, payload)
        except _netlink.NetlinkReplyError as e:
            raise NetlinkFailed(what, e.code, e.strerror, self.ns.spec) from None

    # ------------------------------------------------------------ commands

    def run(self, argv: Sequence[str], input: "str | bytes | None" = None, check: bool = True,
            timeout: float = 30) -> subprocess.CompletedProcess:
        """Run ``argv`` inside the netns. Output is text.

        The child is started from the worker thread, and a new process starts in the network
        namespace of the thread that made it. Only the network namespace differs from the rest
        of the process (as with ``nsenter --net``): same mounts, same ``/run/xtables.lock``.
        """
        argv = [_check_text_arg(a) for a in argv]
        if not argv:
            raise InvalidValue("empty command")
        if isinstance(input, bytes):
            input = input.decode()

        def spawn() -> subprocess.CompletedProcess:
            try:
                return subprocess.run(argv, input=input, capture_output=True, text=True,
                                      errors="replace", timeout=timeout)
            except subprocess.TimeoutExpired as e:
                raise CommandError(argv, -1, f"timed out after {timeout}s", self.ns.spec) from e
            except (FileNotFoundError, PermissionError) as e:
                # what a shell (or nsenter) reports for a command it cannot execute
                return subprocess.CompletedProcess(argv, 127, "", f"{argv[0]}: {e.strerror}")

        start = time.monotonic()
        cp = self.in_netns(spawn)
        log.debug("run netns=%s cmd=%r rc=%s ms=%.1f", self.ns.spec, shlex.join(argv),
                  cp.returncode, (time.monotonic() - start) * 1000)
        if check and cp.returncode != 0:
            raise CommandError(argv, cp.returncode, cp.stderr, self.ns.spec, cp.stdout)
        return cp

    def start(self, argv: Sequence[str], input: Optional[str] = None,
              timeout: float = 30) -> "Running":
        """Start ``argv`` inside the netns and return at once; :meth:`Running.result` waits.
        The worker thread only forks: reads on this Host go on while the command runs."""
        argv = [_check_text_arg(a) for a in argv]
        if not argv:
            raise InvalidValue("empty command")

        def spawn() -> "subprocess.Popen[str] | subprocess.CompletedProcess":
            try:
                return subprocess.Popen(argv, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        errors="replace")
            except (FileNotFoundError, PermissionError) as e:
                return subprocess.CompletedProcess(argv, 127, "", f"{argv[0]}: {e.strerror}")
        return Running(self.ns.spec, argv, self.in_netns(spawn), input, timeout, time.monotonic())

    # ------------------------------------------------------------ links and addresses

    def links(self) -> list[LinkInfo]:
        """Every link with its IPv4 addresses: two dumps on a bare netlink socket (~0.3 ms;
        pyroute2 objects took ~2.5 ms, and every plan reads the links of both netns)."""
        def read() -> list[LinkInfo]:
            addrs: dict[int, list[str]] = {}
            for m in self._raw_request("_rtnl", _netlink.NETLINK_ROUTE, _netlink.RTM_GETADDR,
                                       _netlink.NLM_F_REQUEST | _netlink.NLM_F_DUMP,
                                       _netlink.addr_dump_request(socket.AF_INET), "list addresses"):
                if m.type == _netlink.RTM_NEWADDR:
                    index, addr = _netlink.decode_addr(m)
                    addrs.setdefault(index, []).append(addr)
            msgs = self._raw_request("_rtnl", _netlink.NETLINK_ROUTE, _netlink.RTM_GETLINK,
                                     _netlink.NLM_F_REQUEST | _netlink.NLM_F_DUMP,
                                     _netlink.link_dump_request(), "list links")
            return [_link_from_raw(_netlink.decode_link(m), addrs) for m in msgs
                    if m.type == _netlink.RTM_NEWLINK]
        return self.in_netns(read)

    def link(self, name: str) -> Optional[LinkInfo]:
        return next((l for l in self.links() if l.name == name), None)

    def _ifindex_here(self, name: str) -> int:
        """ifindex of ``name``, on the worker thread: one ioctl instead of a netlink dump."""
        try:
            return socket.if_nametoindex(name)
        except OSError:
            raise HostError(f"no link {name!r} in netns {self.ns.spec}") from None

    def ifindex(self, name: str) -> int:
        check_ifname(name)
        return self.in_netns(self._ifindex_here, name)

    def link_add(self, name: str, kind: str, **attrs: Any) -> None:
        """Create a link (``kind`` + its pyroute2-style attributes, e.g. ``vxlan_id=1000``).
        VXLAN and GENEVE devices go out as one bare netlink request; other kinds through
        pyroute2. A kernel without that link type gives :class:`MissingFeature`, not a
        netlink error."""
        check_ifname(name)
        what = f"add {kind} link {name}"
        data = _tunnel_link_data(kind, attrs)

        def missing(code: int) -> MissingFeature:
            # the kernel has no driver for this kind: retrying cannot help
            return MissingFeature(kind, self.ns.spec, f"creating {name!r}: the kernel answered "
                                                      f"'{os.strerror(code)}'")
        if data is not None:
            payload = _netlink.link_create_request(name, kind, data)
            try:
                self._rtnl_ack(_netlink.RTM_NEWLINK, _netlink.NLM_F_CREATE | _netlink.NLM_F_EXCL,
                               payload, what)
            except NetlinkFailed as e:
                if e.code == errno.EOPNOTSUPP and kind in FEATURE_HELP:
                    raise missing(e.code) from None
                raise
        else:
            def add(ipr: IPRoute) -> None:
                try:
                    ipr.link("add", ifname=name, kind=kind, **attrs)
                except NetlinkError as e:
                    if e.code == errno.EOPNOTSUPP and kind in FEATURE_HELP:
                        raise missing(e.code) from None
                    raise
            self.netlink(add, what)
        log.info("link added netns=%s name=%s kind=%s", self.ns.spec, name, kind)

    def _rtnl_ack(self, mtype: int, flags: int, payload: bytes, what: str) -> None:
        """One route-netlink request answered by an ACK, on the worker thread."""
        self.in_netns(self._raw_request, "_rtnl", _netlink.NETLINK_ROUTE, mtype,
                      _netlink.NLM_F_REQUEST | _netlink.NLM_F_ACK | flags, payload, what)

    def _link_set(self, name: str, what: str, **kw: Any) -> None:
        check_ifname(name)

        def change() -> None:
            self._raw_request("_rtnl", _netlink.NETLINK_ROUTE, _netlink.RTM_NEWLINK,
                              _netlink.NLM_F_REQUEST | _netlink.NLM_F_ACK,
                              _netlink.link_set_request(self._ifindex_here(name), **kw), what)
        self.in_netns(change)

    def link_up(self, name: str) -> None:
        self._link_set(name, f"set link {name} up", flags=_netlink.IFF_UP, change=_netlink.IFF_UP)

    def link_down(self, name: str) -> None:
        self._link_set(name, f"set link {name} down", flags=0, change=_netlink.IFF_UP)

    def link_set_mtu(self, name: str, mtu: int) -> None:
        if type(mtu) is not int or not 68 <= mtu <= 65535:
            raise InvalidValue(f"MTU {mtu!r} (68-65535)")
        self._link_set(name, f"set mtu {mtu} on {name}", mtu=mtu)

    def link_set_remote(self, name: str, kind: str, remote: str) -> None:
        """Point the VXLAN or GENEVE device ``name`` at another remote, in place: the device,
        its addresses and every route through it stay (re-creating it would drop the routes).
        A kernel that cannot change it gives :class:`NetlinkFailed` (EOPNOTSUPP …)."""
        if kind not in ("vxlan", "geneve"):
            raise InvalidValue(f"link kind {kind!r}: only vxlan and geneve remotes change in place")
        check_ifname(name)
        data = _netlink.tunnel_remote_data(kind, ipaddress.IPv4Address(check_ip(remote, 4)).packed)
        what = f"set remote {remote} on {kind} link {name}"

        def change() -> None:
            self._raw_request("_rtnl", _netlink.NETLINK_ROUTE, _netlink.RTM_NEWLINK,
                              _netlink.NLM_F_REQUEST | _netlink.NLM_F_ACK,
                              _netlink.link_change_request(self._ifindex_here(name), kind, data), what)
        self.in_netns(change)
        log.info("link remote changed netns=%s name=%s remote=%s", self.ns.spec, name, remote)

    def link_del(self, name: str) -> None:
        idx = self.ifindex(name)
        self.netlink(lambda ipr: ipr.link("del", index=idx), f"delete link {name}")
        log.info("link deleted netns=%s name=%s", self.ns.spec, name)

    def addr_add(self, name: str, cidr: str) -> None:
        """Add an address; IPv4 gets the broadcast address of its prefix (like the original,
        which went through vishvananda/netlink's AddrAdd)."""
        self._addr("add", name, cidr)

    def addr_del(self, name: str, cidr: str) -> None:
        self._addr("del", name, cidr)

    def _addr(self, op: str, name: str, cidr: str) -> None:
        iface = check_interface(cidr)
        check_ifname(name)
        af = _af(iface.version)
        broadcast = None
        if op == "add" and iface.version == 4 and iface.network.prefixlen < 31:
            broadcast = iface.network.broadcast_address.packed
        what = (f"add address {cidr} to {name}" if op == "add" else f"delete address {cidr} from {name}")
        mtype, flags = ((_netlink.RTM_NEWADDR, _netlink.NLM_F_CREATE | _netlink.NLM_F_EXCL) if op == "add"
                        else (_netlink.RTM_DELADDR, 0))

        def change() -> None:
            payload = _netlink.addr_request(af, self._ifindex_here(name), iface.ip.packed,
                                            iface.network.prefixlen, broadcast)
            self._raw_request("_rtnl", _netlink.NETLINK_ROUTE, mtype,
                              _netlink.NLM_F_REQUEST | _netlink.NLM_F_ACK | flags, payload, what)
        self.in_netns(change)

    def route_get(self, dst: str) -> Optional[tuple[Optional[int], Optional[str]]]:
        """How the kernel routes to ``dst`` now (``ip route get``): (output ifindex, source
        address), or None when it has no route."""
        ip = ipaddress.ip_address(check_ip(dst))
        af = _af(ip.version)

        def ask() -> Optional[tuple[Optional[int], Optional[str]]]:
            try:
                msgs = self._raw_request("_rtnl", _netlink.NETLINK_ROUTE, _netlink.RTM_GETROUTE,
                                         _netlink.NLM_F_REQUEST | _netlink.NLM_F_ACK,
                                         _netlink.route_get_request(af, ip.packed),
                                         f"route get {dst}")
            except NetlinkFailed:
                return None            # ENETUNREACH and friends: no route
            for m in msgs:
                if m.type == _netlink.RTM_NEWROUTE:
                    r = _netlink.decode_route(m)
                    return r.oif, r.prefsrc
            return None
        return self.in_netns(ask)

    # ------------------------------------------------------------ ip rules

    def ip_rules(self, family: int = 4) -> list[ObservedIpRule]:
        af = _af(family)
        msgs = self.netlink(lambda ipr: list(ipr.get_rules(family=af)), "list ip rules")
        return [_observed_rule(m, family) for m in msgs]

    def rule_add(self, r: IpRule) -> None:
        """Add one ip rule (``ip rule add``: the kernel refuses an identical one with EEXIST)."""
        kw = _rule_request(r)
        payload = _netlink.rule_request(kw["family"], kw["priority"], kw["action"], kw.get("table"),
                                        kw.get("goto"), kw.get("fwmark"), kw.get("fwmask"))
        self._rtnl_ack(_netlink.RTM_NEWRULE, _netlink.NLM_F_CREATE | _netlink.NLM_F_EXCL, payload,
                       f"add ip rule '{r.show()}'")
        log.info("ip rule added netns=%s rule=%r", self.ns.spec, r.show())

    def rule_del(self, r: IpRule) -> None:
        """Delete exactly this rule. The kernel treats attributes left out of a delete request
        as wildcards and removes the first rule that matches, so when another rule at the same
        priority could match too (more selectors, or a mark where ``r`` has none) the delete is
        refused instead."""
        found = [o for o in self.ip_rules(r.family) if o.rule.priority == r.priority]
        if not any(o.plain and o.rule == r for o in found):
            raise HostError(f"ip rule '{r.show()}' not found in netns {self.ns.spec}")
        lookalikes = [o for o in found
                      if _kernel_would_match(r, o.rule) and not (o.plain and o.rule == r)]
        if lookalikes:
            raise HostError(f"refusing to delete ip rule '{r.show()}' in netns {self.ns.spec}: "
                            f"the kernel could match '{lookalikes[0].text}' instead")
        kw = _rule_request(r)
        self.netlink(lambda ipr: ipr.rule("del", **kw), f"delete ip rule '{r.show()}'")
        log.info("ip rule deleted netns=%s rule=%r", self.ns.spec, r.show())

    # ------------------------------------------------------------ routes

    def routes_detailed(self, table: int, family: int = 4) -> list[ObservedRoute]:
        """Every route of ``table``, kernel order. One dump the kernel filters by table (a bare
        netlink socket: 1000 routes in ~3 ms, where pyroute2 objects took ~150 ms)."""
        af = _af(family)
        table = int(table)
        what = f"list routes of table {table}"

        def dump() -> list[ObservedRoute]:
            try:
                msgs = self._raw_request("_rtnl", _netlink.NETLINK_ROUTE, _netlink.RTM_GETROUTE,
                                         _netlink.NLM_F_REQUEST | _netlink.NLM_F_DUMP,
                                         _netlink.route_dump_request(af, table), what)
            except NetlinkFailed as e:
                if e.code == errno.ENOENT:     # strict dumps refuse a table that does not exist
                    return []
                raise
            # a route is a function of its message bytes and of the interface names; what the
            # previous dump of this table decoded is reused while those names are unchanged
            ifnames = dict(socket.if_nameindex())
            names_then, before = self._route_memo.get((table, family), (None, {}))
            if names_then != ifnames:
                before = {}
            now: dict[bytes, ObservedRoute] = {}
            shapes: dict[bytes, ObservedRoute] = {}
            out = []
            for m in msgs:
                key = m.data[m.start:m.end]
                obs = before.get(key)
                if obs is None:
                    obs = _route_like_another(key, shapes)
                if obs is None:
                    obs = _route_from_raw(_netlink.decode_route(m), family, ifnames)
                    shape = _v4_route_shape(key)
                    if shape is not None:
                        shapes[shape] = obs
                now[key] = obs
                if obs.route.table == table:
                    out.append(obs)
            self._route_memo[(table, family)] = (ifnames, now)
            return out
        return self.in_netns(dump)

    def routes(self, table: int, family: int = 4) -> list[Route]:
        """Every route of ``table`` (kernel-made ones too: see :meth:`routes_detailed`)."""
        return [o.route for o in self.routes_detailed(table, family)]

    def route_add(self, r: Route) -> None:
        self._route("add", r)

    def route_replace(self, r: Route) -> None:
        self._route("replace", r)

    def route_del(self, r: Route) -> None:
        self._route("del", r)

    def route_del_prefix(self, table: int, dst: str) -> list[Route]:
        """Delete every route of exactly the prefix ``dst`` in ``table``, whatever its other
        attributes, and return what was deleted. No dump: each delete request leaves type,
        scope and next hop open, and the kernel echoes the route it removed."""
        net = check_prefix(dst)
        af, table = _af(net.version), int(table)
        payload = _netlink.route_delete_request(af, net.network_address.packed, net.prefixlen, table)
        what = f"delete routes to {net} in table {table}"

        def delete() -> list[Route]:
            gone: list[_netlink.RawRoute] = []
            # one route per request; more than a handful for one prefix means something is off
            for _ in range(64):
                try:
                    msgs = self._raw_request("_rtnl", _netlink.NETLINK_ROUTE, _netlink.RTM_DELROUTE,
                                             _netlink.NLM_F_REQUEST | _netlink.NLM_F_ACK
                                             | _netlink.NLM_F_ECHO, payload, what)
                except NetlinkFailed as e:
                    if e.code == errno.ESRCH:      # none (left)
                        break
                    raise
                gone += [_netlink.decode_route(m) for m in msgs if m.type == _netlink.RTM_DELROUTE]
            else:
                raise HostError(f"{what} in netns {self.ns.spec}: still routes after 64 deletes")
            ifnames = dict(socket.if_nameindex()) if any(r.oif for r in gone) else {}
            return [_route_from_raw(r, net.version, ifnames).route for r in gone]
        deleted = self.in_netns(delete)
        for r in deleted:
            log.info("route del netns=%s route=%r", self.ns.spec, r.show_with_table())
        return deleted

    def _route(self, op: str, r: Route) -> None:
        """One route ``add`` / ``replace`` / ``del`` on the bare netlink socket (adds and
        replaces with proto boot, as ``ip route add`` sets it; a delete leaves the protocol
        open and names every other field)."""
        spec = _route_spec(r)      # validates every field
        what = f"route {op} '{r.show_with_table()}'"

        def change() -> None:
            oif = self._ifindex_here(r.dev) if r.dev else None
            mtype, flags, payload = _route_message({"del": "delete"}.get(op, op), spec, oif)
            self._raw_request("_rtnl", _netlink.NETLINK_ROUTE, mtype,
                              _netlink.NLM_F_REQUEST | _netlink.NLM_F_ACK | flags, payload, what)
        self.in_netns(change)
        log.info("route %s netns=%s route=%r", op, self.ns.spec, r.show_with_table())

    def routes_batch(self, add: Iterable[Route] = (), delete: Iterable[Route] = ()) -> None:
        """Delete ``delete``, then add ``add``, as netlink requests sent a few hundred to a
        datagram (1000 routes: ~4 ms; ``ip -batch`` took ~20 ms, most of it its own start).

        Every route is validated first: a bad value raises :class:`InvalidValue` before
        anything is sent. Not atomic: the kernel handles each route on its own, so a refused
        one (e.g. an add of a route that exists) does not stop the others; every refusal is
        then named in one :class:`RoutesRefused`. An add is ``ip route add`` (proto boot,
        fails if the route exists); a delete names every field, so it removes exactly that
        route or fails.
        """
        work = [("delete", r) for r in delete] + [("add", r) for r in add]
        if not work:
            return
        specs = [_route_spec(r) for _, r in work]       # validated before anything is sent

        def send() -> list[tuple[int, _netlink.NetlinkReplyError]]:
            index: dict[str, Optional[int]] = {}
            requests, sent, refused = [], [], []
            for i, ((op, _), spec) in enumerate(zip(work, specs)):
                dev, oif = spec[-1], None
                if dev is not None:
                    if dev not in index:
                        index[dev] = self._ifindex_or_none(dev)
                    oif = index[dev]
                    if oif is None:
                        # never sent without its device: the kernel would pick one itself
                        refused.append((i, _netlink.NetlinkReplyError(errno.ENODEV, f"no device {dev}")))
                        continue
                requests.append(_route_message(op, spec, oif))
                sent.append(i)
            if requests:
                refused += [(sent[j], e) for j, e in
                            self._raw("_rtnl", _netlink.NETLINK_ROUTE).batch(requests)]
            return sorted(refused, key=lambda x: x[0])
        refused = self.in_netns(send)
        for op, r in work:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("route %s netns=%s route=%r", op, self.ns.spec, r.show_with_table())
        log.info("routes netns=%s deleted=%d added=%d refused=%d", self.ns.spec,
                 sum(1 for op, _ in work if op == "delete"), sum(1 for op, _ in work if op == "add"),
                 len(refused))
        if refused:
            raise RoutesRefused(self.ns.spec, len(work),
                                [(work[i][0], work[i][1], e.code, e.strerror) for i, e in refused])

    @staticmethod
    def _ifindex_or_none(dev: str) -> Optional[int]:
        """The ifindex of ``dev`` in the calling thread's netns (the worker's), or None."""
        try:
            return socket.if_nametoindex(dev)
        except OSError:
            return None

    # ------------------------------------------------------------ ipset

    def ipsets(self, only: Optional[Callable[[str], bool]] = None
               ) -> dict[str, tuple[IpsetSet, list[IpsetEntry]]]:
        """Every set ``only(name)`` accepts (every set without it) with its members, as
        ``parse_ipset_save`` makes of ``ipset save``, in that order.

        Read on the bare netlink socket: the names first, then one dump per wanted set, so a
        large foreign set costs its name only (1000 members: ~1 ms, ``ipset save`` + parsing
        took ~11 ms). A set that is not hash:ip inet/inet6 is read with ``ipset save NAME``.
        """
        def read() -> dict[str, tuple[IpsetSet, list[IpsetEntry]]]:
            try:
                found = self._ipset_nl.read_sets(self._raw("_nfnl", _netlink.NETLINK_NETFILTER), only)
            except _netlink.NetlinkReplyError as e:
                raise NetlinkFailed("ipset list", e.code, e.strerror, self.ns.spec) from None
            except ValueError as e:         # a dump this program cannot make sense of
                raise HostError(f"ipset list in netns {self.ns.spec}: {e}") from None
            out: dict[str, tuple[IpsetSet, list[IpsetEntry]]] = {}
            for name, got in found.items():
                got = got if got is not None else self._ipset_saved(name)
                if got is not None:
                    out[name] = got
            return out
        return self.in_netns(read)

    def _ipset_saved(self, name: str) -> Optional[tuple[IpsetSet, list[IpsetEntry]]]:
        """One set through ``ipset save NAME``; None if it is gone."""
        cp = self.run(["ipset", "save", name], check=False)
        if cp.returncode != 0:
            if "does not exist" in cp.stderr:
                return None
            raise CommandError(["ipset", "save", name], cp.returncode, cp.stderr, self.ns.spec)
        return parse_ipset_save(cp.stdout).get(name)

    def _ipset_sock(self) -> IPSet:
        assert self._worker_ident == threading.get_ident(), "IPSet used off the netns thread"
        if self._ipset is None:
            self._ipset = IPSet()
        return self._ipset

    def ipset_add(self, name: str, ip: str, comment: Optional[str] = None) -> None:
        """Add (or re-comment) one member, like ``ipset -exist add``: one netlink request.
        A missing set is :class:`NetlinkFailed` with code ENOENT."""
        ip = check_ip(ip)
        if comment is not None:
            _check_text_arg(comment)
        what = f"ipset add {name} {ip}" + (f' comment "{comment}"' if comment is not None else "")

        def add() -> None:
            try:
                self._ipset_sock().add(name, ip, family=_af(ipaddress.ip_address(ip).version),
                                       etype="ip", comment=comment, exclusive=False)
            except IPSetError as e:
                raise NetlinkFailed(what, e.code, _ipset_message(e), self.ns.spec) from None
        self.in_netns(add)
        log.info("ipset member added netns=%s set=%s ip=%s", self.ns.spec, name, ip)

    def ipset_del(self, name: str, ip: str) -> bool:
        """Remove one member; False when it (or the set) was not there."""
        ip = check_ip(ip)

        def delete() -> bool:
            try:
                self._ipset_sock().delete(name, ip, family=_af(ipaddress.ip_address(ip).version),
                                          etype="ip", exclusive=True)
            except IPSetError as e:
                if e.code in (IPSET_ERR_EXIST, errno.ENOENT):
                    return False
                raise NetlinkFailed(f"ipset del {name} {ip}", e.code, _ipset_message(e),
                                    self.ns.spec) from None
            return True
        removed = self.in_netns(delete)
        if removed:
            log.info("ipset member removed netns=%s set=%s ip=%s", self.ns.spec, name, ip)
        return removed

    def ipset_entry(self, name: str, ip: str) -> Optional[IpsetEntry]:
        """One member with its comment, or None (not a member, or no such set).

        The kernel has no per-member lookup that returns the comment, so the set is listed
        on a bare netlink socket and only the matching member is decoded (1000 members:
        ~1 ms, where ``ipset save`` + parsing took ~35 ms).
        """
        packed = ipaddress.ip_address(check_ip(ip)).packed
        mtype, payload = _netlink.ipset_list_request(name)

        def find() -> Optional[IpsetEntry]:
            try:
                msgs = self._raw_request("_nfnl", _netlink.NETLINK_NETFILTER, mtype,
                                         _netlink.NLM_F_REQUEST | _netlink.NLM_F_DUMP, payload,
                                         f"ipset list {name}")
            except NetlinkFailed as e:
                if e.code == errno.ENOENT:
                    return None
                raise
            found = _netlink.ipset_find(msgs, packed)
            return IpsetEntry(set=name, ip=ip, comment=found[1]) if found else None
        return self.in_netns(find)

    def ipset_restore(self, text: str, exist: bool = False) -> None:
        """``ipset restore`` with ``text`` (``-exist`` when asked); errors name the line."""
        cmd = ["ipset", "restore"] + (["-exist"] if exist else [])
        self._batch(cmd, text, re.compile(r"Error in line (\d+)"))

    def ipset_apply_script(self, text: str, exist: bool = True) -> None:
        """Apply a script of the planner's ipset lines (create/add/del/flush/swap/destroy) over
        netlink, as ``ipset -exist restore`` would (``exist=False``: as ``ipset restore``).

        Stops at the first refused or unparsable line with :class:`IpsetScriptError`; the lines
        before it are applied, it and the lines after are not (as with the tool). Consecutive
        adds to one set go in one message: 1000 adds are one or two requests.
        """
        def write() -> int:
            try:
                return self._ipset_nl.run_script(self._raw("_nfnl", _netlink.NETLINK_NETFILTER), text, exist)
            except _ipset_nl.ScriptError as e:
                raise IpsetScriptError(self.ns.spec, text, e) from None
            except _netlink.NetlinkReplyError as e:
                raise NetlinkFailed("ipset restore over netlink", e.code, e.strerror, self.ns.spec) from None
        start = time.monotonic()
        sent = self.in_netns(write)
        log.debug("ipset script ok netns=%s lines=%d messages=%d ms=%.1f", self.ns.spec,
                  text.count("\n"), sent, (time.monotonic() - start) * 1000)

    # ------------------------------------------------------------ iptables

    def _ipt_bin(self, variant: str, family: int, suffix: str = "") -> str:
        if variant not in IPTABLES_VARIANTS:
            raise InvalidValue(f"iptables variant {variant!r} (one of {', '.join(IPTABLES_VARIANTS)})")
        base = {4: "iptables", 6: "ip6tables"}.get(family)
        if base is None:
            raise InvalidValue(f"family {family!r} (4 or 6)")
        return f"{base}-{variant}{suffix}"

    def iptables_save(self, variant: str, family: int = 4, table: Optional[str] = None,
                      counters: bool = False) -> str:
        return self.iptables_save_start(variant, family, table, counters).result().stdout

    def iptables_save_start(self, variant: str, family: int = 4, table: Optional[str] = None,
                            counters: bool = False) -> Running:
        """:meth:`iptables_save` started: ``.result().stdout`` is its text."""
        cmd = [self._ipt_bin(variant, family, "-save")]
        if table is not None:
            if table not in IPTABLES_TABLES:
                raise InvalidValue(f"iptables table {table!r}")
            cmd += ["-t", table]
        if counters:
            cmd.append("-c")
        return self.start(cmd)

    def iptables_restore(self, text: str, variant: str, family: int = 4, noflush: bool = True) -> None:
        """One ``iptables-restore`` call. Atomic per table, not per input (kernel-notes §5)."""
        cmd = [self._ipt_bin(variant, family, "-restore"), "-w", IPTABLES_WAIT]
        if noflush:
            cmd.append("--noflush")
        line_re = re.compile(r"(?:Error occurred at line: (\d+))|(?:line (\d+) failed)|(?:at line (\d+))")
        self._batch(cmd, text, line_re, tables=True)

    def iptables(self, variant: str, args: Sequence[str], family: int = 4,
                 check: bool = True) -> subprocess.CompletedProcess:
        cmd = [self._ipt_bin(variant, family), "-w", IPTABLES_WAIT, *args]
        return self.run(cmd, check=check)

    def _batch(self, cmd: list[str], text: str, line_re: re.Pattern, tables: bool = False) -> None:
        start = time.monotonic()
        cp = self.run(cmd, input=text, check=False)
        ms = (time.monotonic() - start) * 1000
        if cp.returncode == 0:
            log.debug("batch ok netns=%s cmd=%r lines=%d ms=%.1f", self.ns.spec, cmd[0],
                      text.count("\n"), ms)
            return
        lineno = None
        for m in line_re.finditer(cp.stderr):
            lineno = int(next(g for g in m.groups() if g))
            break
        table = _table_at(text, lineno) if (tables and lineno) else None
        raise RestoreError(cmd, cp.returncode, cp.stderr, self.ns.spec, text, lineno, table)

    # ------------------------------------------------------------ nftables

    def _nft_ctx(self) -> Any:
        assert self._worker_ident == threading.get_ident(), "nft used off the netns thread"
        if self._nft is None:
            try:
                import nftables
                self._nft = nftables.Nftables()
            except (ImportError, OSError) as e:
                raise MissingFeature("nft_bindings", self.ns.spec, str(e)) from None
        return self._nft

    def nft(self, script: str) -> str:
        """Run an nft script as one transaction (libnftables, inside the netns)."""
        def call() -> str:
            ctx = self._nft_ctx()
            ctx.set_json_output(False)
            rc, out, err = ctx.cmd(script)
            if rc != 0:
                raise NftError(script, rc, err, self.ns.spec)
            return out
        return self.in_netns(call)

    def nft_json(self, cmd: "str | Mapping[str, Any]") -> dict:
        """An nft command (text, or a JSON document) with JSON output, parsed."""
        def call() -> dict:
            ctx = self._nft_ctx()
            ctx.set_json_output(True)
            try:
                text = cmd if isinstance(cmd, str) else json.dumps(cmd)
                rc, out, err = ctx.cmd(text)
            finally:
                ctx.set_json_output(False)
            if rc != 0:
                raise NftError(text, rc, err, self.ns.spec)
            return json.loads(out) if out.strip() else {}
        return self.in_netns(call)

    # ------------------------------------------------------------ sysctls

    def sysctl_get(self, keys: Iterable[str]) -> dict[str, Optional[str]]:
        """Values as the files show them (stripped); None when the file does not exist."""
        keys = [check_sysctl_key(k) for k in keys]

        def read() -> dict[str, Optional[str]]:
            out: dict[str, Optional[str]] = {}
            for k in keys:
                try:
                    with open(f"/proc/sys/{k}", encoding="ascii") as f:
                        out[k] = f.read().strip()
                except FileNotFoundError:
                    out[k] = None
                except OSError as e:
                    raise HostError(f"sysctl {k} in netns {self.ns.spec}: {e.strerror}") from None
            return out
        return self.in_netns(read)

    def sysctl_set(self, values: Mapping[str, str]) -> dict[str, Optional[str]]:
        """Write each key (inside the netns); returns the previous values."""
        items = [(check_sysctl_key(k), _check_text_arg(str(v))) for k, v in values.items()]

        def write() -> dict[str, Optional[str]]:
            old: dict[str, Optional[str]] = {}
            for k, v in items:
                path = f"/proc/sys/{k}"
                try:
                    with open(path, encoding="ascii") as f:
                        old[k] = f.read().strip()
                    with open(path, "w", encoding="ascii") as f:
                        f.write(v)
                except OSError as e:
                    raise HostError(f"sysctl {k} = {v} in netns {self.ns.spec}: {e.strerror}") from None
            return old
        old = self.in_netns(write)
        log.info("sysctls set netns=%s %s", self.ns.spec,
                 " ".join(f"{k}={v}" for k, v in items))
        return old

    # ------------------------------------------------------------ features

    def features(self, refresh: bool = False) -> Features:
        """Probe once per Host; every probe object is removed at once."""
        if self._features is None or refresh:
            self._features = _probe_features(self)
        return self._features

    def require(self, feature: str) -> None:
        self.features().require(feature)


# ---------------------------------------------------------------- nftables in a throwaway netns


def nft_scratch_json(script: str, query: str) -> dict:
    """Load ``script`` into a brand-new, anonymous network namespace and return ``query``'s JSON
    output from there: the kernel's own canonical form of a ruleset, learned without touching
    any real namespace.

    The namespace is made by ``unshare(CLONE_NEWNET)`` on a thread of its own, so it has no
    name, nothing else can enter it, and it disappears with that thread once the libnftables
    context (its only other reference) is freed. Needs CAP_SYS_ADMIN, like everything here.
    """
    box: dict[str, Any] = {}

    def run() -> None:
        global _libc
        try:
            before = _ns_identity("/proc/thread-self/ns/net")
            if _libc is None:
                _libc = ctypes.CDLL(None, use_errno=True)
            if _libc.unshare(CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise HostError(f"cannot make a scratch network namespace: {os.strerror(err)}")
            # invariant: the script below only ever lands in the namespace made just now
            if _ns_identity("/proc/thread-self/ns/net") == before:
                raise HostError("unshare(CLONE_NEWNET) did not take effect; refusing to load")
            import nftables
            ctx = nftables.Nftables()
            try:
                rc, _, err_text = ctx.cmd(script)
                if rc != 0:
                    raise NftError(script, rc, err_text, "(scratch)")
                ctx.set_json_output(True)
                rc, out, err_text = ctx.cmd(query)
                if rc != 0:
                    raise NftError(query, rc, err_text, "(scratch)")
                box["out"] = json.loads(out) if out.strip() else {}
            finally:
                del ctx      # closes the netlink socket: the namespace's last reference but ours
        except (ImportError, OSError) as e:
            box["error"] = MissingFeature("nft_bindings", "(scratch)", str(e))
        except BaseException as e:      # handed to the caller's thread
            box["error"] = e

    start = time.monotonic()
    t = threading.Thread(target=run, name="nft-scratch", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    log.debug("nft scratch load+list ms=%.1f", (time.monotonic() - start) * 1000)
    return box["out"]


# ---------------------------------------------------------------- helpers (netlink decoding)


def _af(family: int) -> int:
    if family == 4:
        return socket.AF_INET
    if family == 6:
        return socket.AF_INET6
    raise InvalidValue(f"family {family!r} (4 or 6)")


IPSET_ERR_EXIST = 4103      # add: already a member; del/test: not a member
IPSET_ERR_COMMENT = 4112    # the set was created without comment support
_IPSET_MESSAGES = {
    errno.ENOENT: "the set does not exist",
    IPSET_ERR_EXIST: "not a member",
    IPSET_ERR_COMMENT: "the set was created without comment support",
}


def _ipset_message(e: IPSetError) -> str:
    # pyroute2's own texts are per command and sometimes wrong (4112 is "too long" there)
    return _IPSET_MESSAGES.get(e.code) or _netlink_message(e)


class IpsetScriptError(HostError):
    """A line of an ipset script was refused by the kernel (``code`` set) or could not be
    parsed (``code`` None). Lines before ``lineno`` are applied; it and those after are not.
    ``context`` holds ``'NN: text'`` lines around it (the failing one marked with ``>``)."""

    def __init__(self, netns: str, text: str, err: "_ipset_nl.ScriptError"):
        self.netns, self.text = netns, text
        self.lineno, self.line, self.reason, self.code = err.lineno, err.line, err.reason, err.code
        self.context = context_lines(text, err.lineno)
        code = "" if err.code is None else f" ({errno.errorcode.get(err.code, f'ipset error {err.code}')})"
        body = "".join(f"\n    {c}" for c in self.context)
        super().__init__(f"ipset script in netns {netns} failed at line {err.lineno} ({err.line!r}): "
                         f"{err.reason}{code}; the lines before it are applied, it and the rest "
                         f"are not:{body}")


def _netlink_message(e: NetlinkError) -> str:
    msg = e.args[1] if len(e.args) > 1 and e.args[1] else os.strerror(e.code)
    return str(msg)


def _link_from_raw(r: _netlink.RawLink, addrs: Mapping[int, list[str]]) -> LinkInfo:
    kind = r.kind
    if kind is None and r.flags & IFF_LOOPBACK:
        kind = "loopback"
    kw: dict[str, Any] = {}
    if kind in ("vxlan", "geneve"):
        kw = {"vni": r.vni, "remote": r.remote, "dstport": r.dstport, "external": r.external}
    elif kind == "veth":
        kw = {"peer_ifindex": r.link}
    elif kind == "tun":
        kw = {"tun_mode": TUN_MODES.get(r.tun_type)}
    return LinkInfo(name=r.name, index=r.index, kind=kind, up=bool(r.flags & IFF_UP),
                    addresses=tuple(addrs.get(r.index, ())), mtu=r.mtu, **kw)


# An IPv4 route message as the kernel dumps it starts with rtmsg (12 bytes), RTA_TABLE (8),
# RTA_DST (8: header + address). Messages equal but for those 4 address bytes (one route per
# pod) decode to routes equal but for dst: the first is decoded, the others copy it.
_V4_DST_AT = 12 + 8 + 4
_TABLE_THEN_DST = (_netlink.nla(_netlink.RTA_TABLE, bytes(4))[:4], _netlink.nla(_netlink.RTA_DST, bytes(4))[:4])


def _v4_route_shape(key: bytes) -> Optional[bytes]:
    """The message without its destination address, when it has the layout above."""
    if key[0] != socket.AF_INET or key[12:16] != _TABLE_THEN_DST[0] or key[20:24] != _TABLE_THEN_DST[1]:
        return None
    return key[:_V4_DST_AT] + key[_V4_DST_AT + 4:]


def _route_like_another(key: bytes, shapes: Mapping[bytes, ObservedRoute]) -> Optional[ObservedRoute]:
    if not shapes:
        return None
    shape = _v4_route_shape(key)
    seen = shapes.get(shape) if shape is not None else None
    if seen is None:
        return None
    r = seen.route
    dst = f"{socket.inet_ntoa(key[_V4_DST_AT:_V4_DST_AT + 4])}/{key[1]}"
    return ObservedRoute(route=Route(table=r.table, dst=dst, type=r.type, via=r.via, dev=r.dev,
                                     src=r.src, scope=r.scope, onlink=r.onlink, family=4),
                         protocol=seen.protocol, metric=seen.metric, multipath=seen.multipath)


def _route_from_raw(r: _netlink.RawRoute, family: int, ifnames: Mapping[int, str]) -> ObservedRoute:
    """A decoded route message as the model's Route. A multipath route shows its first hop
    (the model has none) and says so in ``multipath``."""
    if family == 4:
        dst = f"{r.dst}/{r.dst_len}"        # the kernel keeps FIB keys with host bits zero
    else:
        dst = str(ipaddress.ip_network(f"{r.dst}/{r.dst_len}", strict=False))
    route = Route(table=r.table, dst=dst, type=ROUTE_TYPES.get(r.type, str(r.type)), via=r.gateway,
                  dev=ifnames.get(r.oif) if r.oif is not None else None, src=r.prefsrc,
                  scope=ROUTE_SCOPES.get(r.scope, str(r.scope)),
                  onlink=bool(r.flags & RTNH_F_ONLINK), family=family)
    return ObservedRoute(route=route, protocol=ROUTE_PROTOS.get(r.protocol, str(r.protocol)),
                         metric=r.priority, multipath=r.multipath)


def _observed_rule(m: Any, family: int) -> ObservedIpRule:
    action = RULE_ACTIONS.get(m["action"], f"action-{m['action']}")
    table = m.get_attr("FRA_TABLE")
    if table is None:
        table = m["table"]
    fwmark, fwmask = m.get_attr("FRA_FWMARK"), m.get_attr("FRA_FWMASK")
    rule = IpRule(priority=m.get_attr("FRA_PRIORITY") or 0, action=action,
                  table=table if action == "lookup" else None,
                  goto=m.get_attr("FRA_GOTO") if action == "goto" else None,
                  fwmark=fwmark, fwmask=fwmask if fwmark is not None or fwmask else None,
                  family=family)
    # selectors the model cannot express; any of them makes the rule "not plain"
    extra: list[str] = []
    if m["flags"] & FIB_RULE_INVERT:
        extra.append("not")
    src = f"{m.get_attr('FRA_SRC')}/{m['src_len']}" if m["src_len"] else "all"
    if m["src_len"]:
        extra.append("from")
    if m["dst_len"]:
        extra.append(f"to {m.get_attr('FRA_DST')}/{m['dst_len']}")
    if m["tos"]:
        extra.append(f"tos {m['tos']:#x}")
    for name, value in ((a[0], a[1]) for a in m["attrs"]):
        if name in _RULE_PLAIN_ATTRS or name in ("FRA_SRC", "FRA_DST"):
            continue
        if name in ("FRA_SUPPRESS_PREFIXLEN", "FRA_SUPPRESS_IFGROUP") and value in (-1, 0xFFFFFFFF):
            continue
        extra.append(f"{name[4:].lower()} {value}")
    words = [f"{rule.priority}:\t" + ("not " if m["flags"] & FIB_RULE_INVERT else "") + f"from {src}"]
    words += [e for e in extra if e not in ("not", "from")]
    if fwmark is not None:
        words.append(f"fwmark {fwmark:#x}" + (f"/{fwmask:#x}" if fwmask not in (None, names.MARK_WHOLE) else ""))
    words.append({"lookup": f"lookup {table}", "goto": f"goto {rule.goto}"}.get(action, action))
    text = " ".join(words)
    return ObservedIpRule(rule=rule, plain=not extra, text=text)


def _rule_request(r: IpRule) -> dict[str, Any]:
    if r.action not in ("lookup", "goto"):
        raise InvalidValue(f"ip rule action {r.action!r} (lookup or goto)")
    kw: dict[str, Any] = {"priority": int(r.priority), "family": _af(r.family),
                          "action": RULE_ACTION_IDS[r.action]}
    if r.action == "lookup":
        if r.table is None:
            raise InvalidValue(f"ip rule {r.priority}: lookup without a table")
        kw["table"] = int(r.table)
    else:
        if r.goto is None:
            raise InvalidValue(f"ip rule {r.priority}: goto without a target")
        kw["goto"] = int(r.goto)
    if r.fwmark is not None:
        kw["fwmark"] = int(r.fwmark)
        kw["fwmask"] = int(r.fwmask if r.fwmask is not None else names.MARK_WHOLE)
    return kw


def _kernel_would_match(req: IpRule, got: IpRule) -> bool:
    """Would a delete request for ``req`` match ``got`` (fib_rules.c rule_find: a field that is
    zero/absent in the request matches anything)?"""
    if got.action != req.action:
        return False
    if req.action == "lookup" and got.table != req.table:
        return False
    if req.action == "goto" and got.goto != req.goto:
        return False
    if req.fwmark and got.fwmark != req.fwmark:
        return False
    if req.fwmark is not None and req.fwmask and got.fwmask != req.fwmask:
        return False
    return True


def _table_at(text: str, lineno: int) -> Optional[str]:
    table = None
    for n, line in enumerate(text.splitlines(), 1):
        if n > lineno:
            break
        if line.startswith("*"):
            table = line[1:].strip()
    return table


# ---------------------------------------------------------------- feature probes


def _probe_name() -> str:
    return "nrp" + secrets.token_hex(4)       # 11 characters, unique, obviously a probe


def _probe_link(host: Host, kind: str, **attrs: Any) -> tuple[bool, str]:
    name = _probe_name()

    def probe(ipr: IPRoute) -> tuple[bool, str]:
        try:
            ipr.link("add", ifname=name, kind=kind, **attrs)
        except NetlinkError as e:
            return False, f"the kernel answered '{_netlink_message(e)}' to a {kind} link"
        finally:
            # whatever happened, leave nothing behind
            for idx in ipr.link_lookup(ifname=name):
                ipr.link("del", index=idx)
        return True, ""
    try:
        return host.netlink(probe, f"probe {kind}")
    except (HostError, OSError) as e:
        return False, str(e)


def _probe_cmd(host: Host, argv: list[str], input: Optional[str] = None) -> tuple[bool, str]:
    if shutil.which(argv[0]) is None:
        return False, f"{argv[0]} is not installed"
    cp = host.run(argv, input=input, check=False, timeout=10)
    if cp.returncode != 0:
        first = next((l for l in cp.stderr.splitlines() if l.strip()), f"exit {cp.returncode}")
        return False, f"`{shlex.join(argv)}`: {first.strip()}"
    return True, ""


def _probe_nft(host: Host) -> tuple[tuple[bool, str], tuple[Optional[bool], str]]:
    table = _probe_name()
    # one transaction that creates and deletes its own table: nothing is left either way
    script = (f"add table ip {table}\n"
              f"add chain ip {table} p {{ type filter hook prerouting priority -150; }}\n"
              f"add rule ip {table} p meta l4proto tcp tproxy to 127.0.0.1:9 accept\n"
              f"delete table ip {table}\n")
    try:
        host.nft("list tables")
    except MissingFeature as e:
        return (False, e.detail), (None, "needs the nftables bindings to probe")
    except NftError as e:
        return (False, e.error.strip().splitlines()[0] if e.error.strip() else str(e)), (None, "")
    try:
        host.nft(script)
    except NftError as e:
        return (True, ""), (False, e.error.strip().splitlines()[0] if e.error.strip() else str(e))
    return (True, ""), (True, "")


def _probe_features(host: Host) -> Features:
    results: dict[str, tuple[Optional[bool], str]] = {
        "geneve": _probe_link(host, "geneve", geneve_id=1, geneve_remote="127.0.0.1"),
        "vxlan": _probe_link(host, "vxlan", vxlan_id=1, vxlan_port=4789),
        "tuntap": _probe_link(host, "tuntap", mode="tap"),
    }
    probe_set = _probe_name()
    results["ipset"] = _probe_cmd(host, ["ipset", "restore"],
                                  f"create {probe_set} hash:ip comment\ndestroy {probe_set}\n")
    # listing never creates a table, so these probes leave nothing behind
    results["iptables_nft"] = _probe_cmd(host, ["iptables-nft", "-w", IPTABLES_WAIT, "-t", "filter", "-S"])
    results["iptables_legacy"] = _probe_cmd(host, ["iptables-legacy-save"])
    results["nft_bindings"], results["tproxy"] = _probe_nft(host)
    reasons = tuple((k, why) for k, (ok, why) in results.items() if ok is not True and why)
    feats = Features(netns=host.ns.spec, reasons=reasons,
                     **{k: ok for k, (ok, _) in results.items()})
    log.info("features netns=%s %s", host.ns.spec,
             " ".join(f"{k}={getattr(feats, k)}" for k in results))
    return feats
