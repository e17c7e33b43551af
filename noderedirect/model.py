"""Frozen value types that flow through the pure core.

Values in, values out: nothing here does I/O. Each kernel object knows how to print itself the
way the kernel's own tools show it (``ip rule``, ``ip route``, ``ipset save``, ``iptables-save``),
so rendered and observed state can be compared as text as well as by value.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Optional

from . import names


def _canonical_v4(addr: str) -> bool:
    """Four decimal numbers 0-255 without leading zeros (what ``str(IPv4Address)`` prints)."""
    try:
        return socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, addr)) == addr
    except (OSError, TypeError):
        return False


class Version(tuple):
    """An Istio minor version such as 1.20, comparable with strings: ``Version("1.20") >= "1.19"``."""

    def __new__(cls, text):
        if isinstance(text, Version):
            return text
        parts = str(text).strip().split(".")
        if len(parts) < 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"not a version: {text!r}")
        return super().__new__(cls, (int(parts[0]), int(parts[1])))

    def _other(self, other):
        return Version(other) if not isinstance(other, Version) else other

    def __lt__(self, other):
        return tuple.__lt__(self, self._other(other))

    def __le__(self, other):
        return tuple.__le__(self, self._other(other))

    def __gt__(self, other):
        return tuple.__gt__(self, self._other(other))

    def __ge__(self, other):
        return tuple.__ge__(self, self._other(other))

    def __eq__(self, other):
        try:
            return tuple.__eq__(self, self._other(other))
        except ValueError:
            return False

    def __ne__(self, other):
        return not self == other

    def __hash__(self):
        return tuple.__hash__(self)

    def __str__(self):
        return f"{self[0]}.{self[1]}"

    __repr__ = __str__


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True, order=True)
class Pod:
    namespace: str
    name: str
    uid: str
    ip: str
    # in-pod per-pod knobs (annotations in the real design); None = node default
    dns_capture: Optional[bool] = None
    ingress: bool = False                       # ambient.istio.io/bypass-inbound-capture
    virtual_interfaces: tuple[str, ...] = ()    # istio.io/reroute-virtual-interfaces
    ip6: Optional[str] = None
    veth: Optional[str] = None                  # host-side device, when known

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class NodeParams:
    """Everything about one node that reaches a template, validated (see values.py)."""

    node_name: str
    pod_cidr: str
    internal_ip: str
    host_ip: str
    host_ip_source: str          # "values" or "derived: first address of podCIDR"
    ztunnel_ip: str
    ztunnel_veth: str
    ztunnel_if: str
    tun_host_ip: str
    geneve_port: int
    dns_capture: bool
    istio_version: Version
    ipset_comments: bool
    inpod_version: Version
    inpod_ipv6: bool
    probe_snat_v4: str
    probe_snat_v6: str
    tun_host_ip_explicit: bool = False     # ztunnel.tunnelHostIP given: never re-derived
    geneve_port_explicit: bool = False     # geneve.dstPort given: no port selection


@dataclass(frozen=True)
class Values:
    node: NodeParams
    pods: tuple[Pod, ...]
    source: str = "<values>"


# ---------------------------------------------------------------- kernel objects


@dataclass(frozen=True, order=True)
class IpsetSet:
    name: str
    type: str = "hash:ip"
    family: str = "inet"
    hashsize: int = 1024
    maxelem: int = 65536
    comment: bool = True

    def show(self) -> str:
        tail = " comment" if self.comment else ""
        return (f"create {self.name} {self.type} family {self.family} "
                f"hashsize {self.hashsize} maxelem {self.maxelem}{tail}")


@dataclass(frozen=True, order=True)
class IpsetEntry:
    set: str
    ip: str
    comment: Optional[str] = None

    def show(self) -> str:
        tail = f' comment "{self.comment}"' if self.comment is not None else ""
        return f"add {self.set} {self.ip}{tail}"


@dataclass(frozen=True)
class IptRule:
    """One rule as it is issued: ``-t TABLE -A CHAIN ARGS`` (or ``-I CHAIN [POS] ARGS``).

    ``args`` is kept verbatim. Legacy templates spell it in iptables-save canonical form so
    rendered and saved text compare directly; in-pod templates keep upstream's spelling so
    the restore file matches the upstream goldens byte for byte.
    """

    table: str
    chain: str
    args: str
    op: str = "-A"          # "-A", "-I" or "-I <pos>"
    family: int = 4

    @property
    def target(self) -> Optional[str]:
        toks = self.args.split()
        for i, t in enumerate(toks[:-1]):
            if t in ("-j", "-g"):
                return toks[i + 1]
        return None

    @property
    def is_hook(self) -> bool:
        """A jump from a built-in chain into an owned chain."""
        t = self.target
        return (self.chain in names.BUILTIN_CHAINS.get(self.table, ())
                and t is not None and names.is_owned_chain(t))

    def restore_line(self) -> str:
        # "-I <pos>" is stored as one op, but iptables spells it "-I CHAIN POS"
        op, _, pos = self.op.partition(" ")
        if pos:
            return f"{op} {self.chain} {pos} {self.args}"
        return f"{op} {self.chain} {self.args}"

    def save_line(self) -> str:
        return f"-A {self.chain} {self.args}"


@dataclass(frozen=True, order=True)
class IpRule:
    priority: int
    action: str                   # "lookup" | "goto"
    table: Optional[int] = None   # for lookup
    goto: Optional[int] = None    # for goto
    fwmark: Optional[int] = None
    fwmask: Optional[int] = None
    family: int = 4

    def show(self) -> str:
        sel = "from all"
        if self.fwmark is not None:
            sel += f" fwmark {names.hexmark(self.fwmark)}"
            if self.fwmask is not None and self.fwmask != names.MARK_WHOLE:
                sel += f"/{names.hexmark(self.fwmask)}"
        act = f"lookup {self.table}" if self.action == "lookup" else f"goto {self.goto}"
        return f"{self.priority}:\t{sel} {act}"


@dataclass(frozen=True, order=True)
class Route:
    table: int
    dst: str                      # prefix, "0.0.0.0/0" for default
    type: str = "unicast"         # "unicast" | "local"
    via: Optional[str] = None
    dev: Optional[str] = None
    src: Optional[str] = None
    scope: Optional[str] = None   # None = universe/global
    onlink: bool = False
    family: int = 4

    def show(self) -> str:
        """As ``ip route show table N`` prints it."""
        addr, _, plen = self.dst.partition("/")
        if self.family == 4 and plen == "32" and _canonical_v4(addr):
            dst = addr      # the per-pod shape: no network parse (it dominated planning at scale)
        else:
            net = ipaddress.ip_network(self.dst)
            if net.prefixlen == 0:
                dst = "default"
            elif net.prefixlen == net.max_prefixlen:
                dst = str(net.network_address)
            else:
                dst = str(net)
        parts = []
        if self.type != "unicast":
            parts.append(self.type)
        parts.append(dst)
        if self.via:
            parts += ["via", self.via]
        if self.dev:
            parts += ["dev", self.dev]
        if self.scope:
            parts += ["scope", self.scope]
        if self.src:
            parts += ["src", self.src]
        if self.onlink:
            parts.append("onlink")
        return " ".join(parts)

    def show_with_table(self) -> str:
        return f"{self.show()} table {self.table}"


@dataclass(frozen=True, order=True)
class Link:
    name: str
    kind: str                     # "geneve" (the stand-in drivers keep this shape)
    vni: int
    remote: str
    dstport: int
    address: str                  # "192.168.126.1/30"
    up: bool = True

    def show(self) -> str:
        state = "up" if self.up else "down"
        return (f"{self.name}: {self.kind} id {self.vni} remote {self.remote} "
                f"dstport {self.dstport} address {self.address} {state}")


@dataclass(frozen=True, order=True)
class Sysctl:
    key: str                      # "net.ipv4.conf.all.rp_filter"
    value: str

    @property
    def path(self) -> str:
        return "/proc/sys/" + self.key.replace(".", "/")

    def show(self) -> str:
        return f"{self.key} = {self.value}"


KINDS = ("ipsets", "iptables", "ip_rules", "routes", "links", "sysctls")


@dataclass(frozen=True)
class NetnsState:
    """Everything one network namespace should hold, by object kind."""

    role: str                                   # "node", "ztunnel", "pod:<ns>/<name>"
    ipsets: tuple[IpsetSet, ...] = ()
    ipset_entries: tuple[IpsetEntry, ...] = ()
    iptables: tuple[IptRule, ...] = ()          # v4 and v6 rules (IptRule.family), issue order
    ip_rules: tuple[IpRule, ...] = ()
    routes: tuple[Route, ...] = ()
    links: tuple[Link, ...] = ()
    sysctls: tuple[Sysctl, ...] = ()

    def rules_for(self, family: int = 4) -> tuple[IptRule, ...]:
        return tuple(r for r in self.iptables if r.family == family)


@dataclass(frozen=True)
class Rendered:
    mode: str                                   # "legacy" | "inpod"
    version: Version
    netns: tuple[NetnsState, ...] = field(default_factory=tuple)
    nft: tuple[tuple[str, str], ...] = ()       # (role, nft script) when backend is nft

    def get(self, role: str) -> NetnsState:
        for ns in self.netns:
            if ns.role == role:
                return ns
        raise KeyError(role)

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(ns.role for ns in self.netns)
