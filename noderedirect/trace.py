"""The packet walk: a pure simulation of the rendered rules on the topology model.

Owns the tracer behind ``noderedirect trace`` and the diagrams. A connection is walked packet by
packet — the first packet, the reply, a later packet of the same connection — through every
netns it crosses, in the kernel's order:

- **arrival** on an interface: raw PREROUTING, conntrack, mangle PREROUTING, nat PREROUTING (new
  connections only; later packets take the stored NAT binding), the routing decision (policy
  rules by priority incl. ``goto``, fwmark/mask, longest-prefix match, the ``local`` table built
  from the netns's addresses), then INPUT (mangle, filter, nat) and socket delivery, or FORWARD
  (mangle, filter) and POSTROUTING (mangle, nat);
- **a local socket** sends: routing with the socket's mark, raw/mangle/nat/filter OUTPUT with a
  re-route when mangle changed the mark or nat changed the destination, POSTROUTING;
- **leaving**: a veth hands the packet to its peer netns with mark and conntrack reference
  cleared (``skb_scrub_packet``); ``lo`` loops it back with both kept; a segment hands it to
  whoever owns the next hop; a GENEVE link encapsulates it — the outer UDP packet inherits the
  inner mark for its own route lookup and passes OUTPUT/POSTROUTING, and the receiving netns
  decapsulates it on the link whose VNI matches, only if the outer source equals that link's
  ``remote`` (``geneve_lookup_skb``), so a wrong HostIP is visible as a drop;
- **TPROXY** assigns an established socket of the packet's 4-tuple, else a *transparent*
  listener on the port (xt_TPROXY), sets the mark and accepts; without one it drops;
- **conntrack**: one table per netns; an entry has a ctmark, NAT bindings and "seen reply";
  CONNMARK saves/restores act on it, so the second packet and the reply take the connmark paths.

What ztunnel does between legs (accept on 15001/15006/15008, then connect upstream, with the
original source) is :class:`ZtunnelModel`; the machines are :mod:`noderedirect.topology_model`;
the rules are interpreted by :mod:`noderedirect.trace_rules`. Nothing here does I/O: a live
node (``trace --from netns``) is read by :mod:`noderedirect.trace_live` and arrives here as a
topology whose node netns carry the kernel's objects (complete ip rule list, the kernel's local
table, foreign rules; with ``lenient``, rules outside the vocabulary show as warning hops).

Each hop records netns, stage ("mangle PREROUTING", "routing", "veth", "tunnel", "socket" …),
chain, rule id, verdict, mark before/after, ctmark, the routing decision, the tunnel crossing
and the socket — so a prediction can be compared with what a lab observes
(:func:`compare`), and pictures drawn from it (:mod:`noderedirect.diagram`).
"""

from __future__ import annotations

import copy
import ipaddress
import logging
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterable, Mapping, Optional

from . import names
from .model import IpRule, Route
from .topology_model import (TABLE_DEFAULT, TABLE_LOCAL, TABLE_MAIN, TABLE_NAMES, Iface, Listener,
                             NetnsModel, Topology)
from .trace_rules import CompiledRule, Ruleset, TraceError, View, compile_rules

log = logging.getLogger(__name__)

PACKET_KINDS = ("first", "reply", "next")
MAX_HOPS_PER_PACKET = 400      # a routing loop ends the walk instead of hanging it
MAX_LEGS = 6
CLIENT_PORT = 40000            # default source port of the traced client
UPSTREAM_PORT = 41000          # ztunnel's upstream sockets count up from here
TUNNEL_SPORT = 49152           # GENEVE picks a flow-hash source port; one fixed value here

__all__ = ["TraceError", "Hop", "Trace", "trace", "compare", "Difference", "ZtunnelModel"]


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class RouteDecision:
    priority: int
    table: str                  # "101", "main", "local"
    route: str                  # as `ip route` shows it
    type: str                   # "unicast" | "local"
    dev: Optional[str]
    via: Optional[str]
    src: Optional[str]           # the source the kernel would pick for a locally made packet
    tried: tuple[str, ...] = ()  # gotos taken, and lookups whose table had no matching route


@dataclass(frozen=True)
class TunnelCrossing:
    link: str
    vni: int
    outer_src: str
    outer_dst: str
    port: int
    peer_netns: Optional[str] = None
    peer_link: Optional[str] = None


@dataclass(frozen=True)
class SocketInfo:
    netns: str
    name: str                   # "ztunnel outbound", "test server", "client"
    owner: str                  # "ztunnel" | "app" | "client"
    port: Optional[int]         # the listener's port (None for a client socket)
    local: str                  # "10.244.1.6:8000"
    remote: str
    orig_dst: Optional[str] = None


@dataclass
class Hop:
    n: int
    netns: str
    stage: str                  # "mangle PREROUTING" | "routing" | "veth" | "lo" | "segment" |
    #                             "tunnel" | "decap" | "socket" | "conntrack" | "drop" | "NAT"
    chain: Optional[str] = None
    rule: Optional[str] = None
    rule_text: Optional[str] = None
    match: Optional[str] = None
    verdict: Optional[str] = None
    mark_before: Optional[int] = None
    mark_after: Optional[int] = None
    ctmark: Optional[int] = None
    device: Optional[str] = None
    to_netns: Optional[str] = None
    to_device: Optional[str] = None
    route: Optional[RouteDecision] = None
    tunnel: Optional[TunnelCrossing] = None
    socket: Optional[SocketInfo] = None
    packet: Optional[str] = None
    note: str = ""

    def describe(self) -> str:
        """One line, what the text output shows after the netns and stage."""
        if self.stage == "drop":
            return self.note
        if self.rule:
            s = f"{self.rule}  [{self.match}] → {self.verdict}"
            if self.mark_before != self.mark_after:
                s += f"   mark {_hex(self.mark_before)} → {_hex(self.mark_after)}"
            if self.verdict and self.verdict.startswith("CONNMARK"):
                s += f"   ctmark {_hex(self.ctmark)}"
            return s
        if self.route is not None:
            r = self.route
            misses = "".join(f"{t}; " for t in r.tried)
            s = f"{misses}{r.priority}: lookup {r.table} → {r.route}"
            return s + (f"   {self.note}" if self.note else "")
        if self.tunnel is not None:
            t = self.tunnel
            if self.stage == "tunnel":
                return (f"{t.link} → GENEVE VNI {t.vni}, outer {t.outer_src} → {t.outer_dst}:{t.port}"
                        f", mark {_hex(self.mark_after)}")
            return f"{t.peer_link} ← VNI {t.vni} from {t.outer_src} (= remote of {t.peer_link})"
        if self.socket is not None:
            s = self.socket
            what = f"{s.name} :{s.port}" if s.port else s.name
            tail = f", original destination {s.orig_dst}" if s.orig_dst else ""
            return f"{what} ({s.local} ← {s.remote}){tail}" + (f"   {self.note}" if self.note else "")
        if self.stage in ("veth", "segment", "lo"):
            s = f"{self.device} → {self.to_netns}:{self.to_device}"
            return s + (f"   {self.note}" if self.note else "")
        return self.note

    def short(self) -> str:
        """A compact label for diagrams."""
        if self.rule:
            t = self.verdict or ""
            if self.mark_before != self.mark_after and not t.startswith("TPROXY"):
                return f"{self.rule} mark {_hex(self.mark_before)}→{_hex(self.mark_after)}"
            if t.startswith("CONNMARK save"):
                return f"{self.rule} save ctmark {_hex(self.ctmark)}"
            if t.startswith("CONNMARK restore"):
                return f"{self.rule} restore mark {_hex(self.mark_after)}"
            if t.startswith("CONNMARK set"):
                return f"{self.rule} ctmark {_hex(self.ctmark)}"
            if t.startswith("TPROXY"):
                return f"{self.rule} {t.split(' mark')[0]}, mark {_hex(self.mark_after)}"
            return f"{self.rule} {t}"
        if self.route is not None:
            r = self.route
            if r.type == "local":
                return f"rule {r.priority} → table {r.table}: local"
            return f"rule {r.priority} → table {r.table} → {r.dev}"
        if self.socket is not None:
            s = self.socket
            if s.port:
                return f":{s.port} {s.name}" + (f" orig {s.orig_dst}" if s.orig_dst and s.owner == "ztunnel" else "")
            return f"{s.name} socket"
        if self.stage == "tunnel" and self.tunnel:
            return f"{self.tunnel.link} VNI {self.tunnel.vni}"
        if self.stage == "decap" and self.tunnel:
            return f"decap → {self.tunnel.peer_link}"
        if self.stage in ("veth", "segment", "lo"):
            return f"{self.device} → {self.to_device}"
        if self.stage == "conntrack":
            return f"conntrack: ctmark {_hex(self.ctmark)}"
        return self.note.split(":")[0] if self.note else self.stage

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if v is not None and v != ""}
        for k in ("mark_before", "mark_after", "ctmark"):
            if k in d:
                d[k] = _hex(d[k])
        return d


def _hex(v: Optional[int]) -> str:
    return "-" if v is None else f"{v:#x}"


@dataclass
class PacketTrace:
    leg: int
    kind: str                   # "first" | "reply" | "next"
    flags: str                  # "SYN" | "SYN-ACK" | "ACK" | "" (udp)
    tuple: str                  # "10.244.1.5:40000 → 10.244.1.6:8000 tcp"
    hops: list[Hop]
    outcome: str                # "delivered" | "dropped" | "reset" | "unreachable" | "loop"
    netns: str                  # where it ended
    socket: Optional[SocketInfo] = None
    reason: str = ""


@dataclass
class Leg:
    n: int
    label: str
    netns: str                  # the client side of this connection
    tuple: str
    packets: list[PacketTrace] = field(default_factory=list)
    accepted: Optional[SocketInfo] = None


@dataclass
class Trace:
    mode: str
    version: str
    request: str                # "10.244.1.5:40000 → 10.244.1.6:8000 tcp from sleep"
    legs: list[Leg]
    scenario: Optional[str] = None
    notes: list[str] = field(default_factory=list)
    topology: Optional[Topology] = field(default=None, repr=False, compare=False)
    # rules that traffic *around* the traced packets may match: (netns, rule id) -> why
    incidental: dict[tuple[str, str], str] = field(default_factory=dict)

    # -- views
    def packets(self) -> list[PacketTrace]:
        return [p for leg in self.legs for p in leg.packets]

    def hops(self) -> list[Hop]:
        return [h for p in self.packets() for h in p.hops]

    def packet(self, leg: int, kind: str) -> PacketTrace:
        for p in self.packets():
            if p.leg == leg and p.kind == kind:
                return p
        raise KeyError(f"leg {leg} has no {kind} packet")

    def select(self, kinds: Iterable[str]) -> "Trace":
        """Only these packet kinds, hops renumbered 1..N in order."""
        kinds = tuple(kinds)
        unknown = set(kinds) - set(PACKET_KINDS)
        if unknown:
            raise TraceError(f"unknown packet kind(s) {sorted(unknown)} (first, reply, next)")
        out = replace(self, legs=copy.deepcopy(self.legs), notes=list(self.notes))
        for leg in out.legs:
            leg.packets = [p for p in leg.packets if p.kind in kinds]
        n = 0
        for h in out.hops():
            n += 1
            h.n = n
        return out

    @property
    def capture(self) -> Optional[SocketInfo]:
        """The first ztunnel listener that accepted the client's connection, if any."""
        first = self.legs[0].accepted if self.legs else None
        return first if first is not None and first.owner == "ztunnel" else None

    @property
    def server(self) -> Optional[SocketInfo]:
        """The application socket the last leg reached (what the server saw as client)."""
        for leg in reversed(self.legs):
            if leg.accepted is not None and leg.accepted.owner == "app":
                return leg.accepted
        return None

    @property
    def ok(self) -> bool:
        return bool(self.legs) and all(p.outcome == "delivered" for p in self.packets())

    def verdict(self) -> str:
        failed = [p for p in self.packets() if p.outcome != "delivered"]
        if failed:
            p = failed[0]
            return f"fails: leg {p.leg} {p.kind} packet {p.outcome} in {p.netns}: {p.reason}"
        cap = self.capture
        srv = self.server
        seen = f"; server sees client {srv.remote.rsplit(':', 1)[0]}" if srv else ""
        if cap is not None:
            return f"captured by {cap.name} :{cap.port}, original destination {cap.orig_dst}{seen}"
        return f"not captured: delivered straight to {srv.netns if srv else '?'}{seen}"

    def rule_hits(self, kinds: Iterable[str] = PACKET_KINDS) -> dict[tuple[str, str], int]:
        """(netns, rule id) -> number of traced packets that matched the rule."""
        out: dict[tuple[str, str], int] = {}
        for p in self.packets():
            if p.kind in kinds:
                for h in p.hops:
                    if h.rule:
                        out[(h.netns, h.rule)] = out.get((h.netns, h.rule), 0) + 1
        return out

    def devices(self, kinds: Iterable[str] = PACKET_KINDS, proto: Optional[str] = None) -> dict[tuple[str, str], int]:
        """(netns, device) -> packets sent on it (veth, lo, segment, tunnel), optionally only
        the packets whose *inner* protocol is ``proto`` (a tunnel carries tcp inside udp)."""
        out: dict[tuple[str, str], int] = {}
        for p in self.packets():
            if p.kind not in kinds or (proto and not p.tuple.endswith(proto)):
                continue
            for h in p.hops:
                if h.stage in ("veth", "lo", "segment") and not h.note.startswith("outer"):
                    out[(h.netns, h.device)] = out.get((h.netns, h.device), 0) + 1
                elif h.stage == "tunnel":
                    out[(h.netns, h.device)] = out.get((h.netns, h.device), 0) + 1
        return out

    # -- output
    def to_json(self) -> dict[str, Any]:
        cap, srv = self.capture, self.server
        return {
            "mode": self.mode, "istio_version": self.version, "scenario": self.scenario,
            "request": self.request, "verdict": self.verdict(), "ok": self.ok,
            "capture": asdict(cap) if cap else None, "server": asdict(srv) if srv else None,
            "notes": self.notes,
            "incidental": [{"netns": ns, "rule": rid, "why": why}
                           for (ns, rid), why in sorted(self.incidental.items())],
            "legs": [{
                "leg": leg.n, "label": leg.label, "netns": leg.netns, "tuple": leg.tuple,
                "accepted": asdict(leg.accepted) if leg.accepted else None,
                "packets": [{"kind": p.kind, "flags": p.flags, "tuple": p.tuple, "outcome": p.outcome,
                             "netns": p.netns, "reason": p.reason,
                             "socket": asdict(p.socket) if p.socket else None,
                             "hops": [h.to_json() for h in p.hops]} for p in leg.packets],
            } for leg in self.legs],
        }

    def to_text(self) -> str:
        title = f"scenario {self.scenario}: " if self.scenario else ""
        out = [f"{title}{self.request} ({self.mode} mode, Istio {self.version})"]
        width = max([len(h.netns) for h in self.hops()] + [4])
        swidth = max([len(h.stage) for h in self.hops()] + [5])
        for leg in self.legs:
            out.append("")
            out.append(f"leg {leg.n}: {leg.tuple} — {leg.label}")
            for p in leg.packets:
                flags = f" ({p.flags})" if p.flags else ""
                out.append(f"  {p.kind} packet{flags}: {p.tuple}")
                for h in p.hops:
                    out.append(f"  {h.n:>4}  {h.netns:<{width}}  {h.stage:<{swidth}}  {h.describe()}")
                end = f"{p.outcome} in {p.netns}"
                if p.socket is not None:
                    end += f" to {p.socket.name}" + (f" :{p.socket.port}" if p.socket.port else "")
                out.append(f"        => {end}" + (f": {p.reason}" if p.reason else ""))
        out.append("")
        out.append(f"verdict: {self.verdict()}")
        out += [f"note: {n}" for n in self.notes]
        out += [f"may also match: {rid} in {ns} ({why})" for (ns, rid), why in sorted(self.incidental.items())]
        return "\n".join(out) + "\n"


# ---------------------------------------------------------------- simulation state


@dataclass
class CtEntry:
    orig: tuple                 # (proto, src, sport, dst, dport) of original-direction packets
    reply: tuple                # the same for reply-direction packets (after NAT)
    mark: int = 0
    seen_reply: bool = False
    dnat: Optional[tuple[str, int]] = None
    snat: Optional[tuple[str, int]] = None
    dst_done: bool = False      # nat PREROUTING/OUTPUT evaluated (a binding, maybe a null one)
    src_done: bool = False      # nat POSTROUTING/INPUT evaluated
    zone: int = 0
    confirmed: bool = False


@dataclass
class Sock:
    netns: str
    proto: str
    local: tuple[str, int]
    remote: Optional[tuple[str, int]]
    owner: str
    name: str
    mark: int = 0
    listener: Optional[Listener] = None     # set on listening sockets
    orig_dst: Optional[tuple[str, int]] = None
    carried: Optional[tuple[str, int]] = None  # the target an HBONE connection carries inside
    accepted_from: Optional[Listener] = None   # accepted sockets: the listener they came from

    def info(self) -> SocketInfo:
        lst = self.listener or self.accepted_from
        port = lst.port if lst else None
        return SocketInfo(netns=self.netns, name=self.name, owner=self.owner, port=port,
                          local=_ep(self.local), remote=_ep(self.remote) if self.remote else "*",
                          orig_dst=_ep(self.orig_dst) if self.orig_dst else None)


def _oif(rd: "RouteDecision") -> Optional[str]:
    """The output device netfilter sees: a local route sends through ``lo``."""
    return "lo" if rd.type == "local" else rd.dev


def _ep(ep: tuple[str, int]) -> str:
    return f"{ep[0]}:{ep[1]}"


@dataclass
class Packet:
    proto: str
    src: str
    sport: int
    dst: str
    dport: int
    flags: str = ""
    mark: int = 0
    ct: Optional[tuple[CtEntry, str]] = None    # (entry, "orig" | "reply")
    sk: Optional[Sock] = None                   # the sending socket, or the TPROXY-assigned one
    local_origin: bool = False
    iif: Optional[str] = None
    # a GENEVE outer packet carries its inner packet and what the receiver needs to decap it
    inner: Optional["Packet"] = None
    vni: Optional[int] = None
    inner_nexthop: Optional[str] = None

    @property
    def key(self) -> tuple:
        return (self.proto, self.src, self.sport, self.dst, self.dport)

    def show(self) -> str:
        return f"{self.src}:{self.sport} → {self.dst}:{self.dport} {self.proto}"


class _Stop(Exception):
    """Ends the walk of one packet: dropped, reset, delivered …"""

    def __init__(self, outcome: str, netns: str, reason: str = "", sock: Optional[Sock] = None):
        super().__init__(reason)
        self.outcome, self.netns, self.reason, self.sock = outcome, netns, reason, sock


class _View(View):
    def __init__(self, ns: NetnsModel, pkt: Packet, oif: Optional[str], members: frozenset):
        self.proto, self.src, self.dst = pkt.proto, pkt.src, pkt.dst
        self.sport, self.dport, self.mark = pkt.sport, pkt.dport, pkt.mark
        entry = pkt.ct[0] if pkt.ct else None
        self.ctmark = entry.mark if entry else 0
        self.ctstate = ("ESTABLISHED" if entry and (pkt.ct[1] == "reply" or entry.seen_reply)
                        else "NEW")
        self.iif, self.oif, self.local_origin = pkt.iif, oif, pkt.local_origin
        self._members = members

    def in_set(self, name: str, ip: str) -> bool:
        return (name, ip) in self._members


# ---------------------------------------------------------------- ztunnel's behaviour between legs


@dataclass(frozen=True)
class ZtunnelModel:
    """What ztunnel does with an accepted connection (legacy-mode.md §5, inpod-mode.md §2.1).

    - 15001 (outbound): to an enrolled pod on another node, HBONE: a connection to
      ``<pod>:15008`` carrying the original destination; otherwise (same node: the in-process
      fast path of §5.4; a non-mesh destination: passthrough) a direct connection to the
      original destination. In-pod mode always uses HBONE to an enrolled pod.
    - 15006 (plaintext inbound): a connection to the original destination.
    - 15008 (HBONE inbound): a connection to the carried target; an HBONE connection that did
      not come from a traced ztunnel has its target inside the stream and ends the walk.
    - ``original_source``: legacy ztunnel binds the client's address (IP_TRANSPARENT); with it
      off, ztunnel's own address is the source. In in-pod mode the outbound socket lives in the
      client pod's netns and uses the pod's address; inbound uses the client's address.
    """

    original_source: bool = True
    hbone: bool = True


# ---------------------------------------------------------------- the walker


class Walker:
    def __init__(self, topo: Topology, zt: ZtunnelModel = ZtunnelModel()):
        self.topo, self.zt = topo, zt
        self.rules: dict[str, Ruleset] = {}
        self.members: dict[str, frozenset] = {}
        for ns in topo.netns:
            self.members[ns.name] = frozenset(ns.ipset_members)
            label = f"{ns.name} ({ns.live})" if ns.live else ns.name
            self.rules[ns.name] = compile_rules(label, ns.rule_role, ns.iptables, frozenset(ns.ipsets),
                                                declared=ns.chains, reference=ns.rule_reference,
                                                lenient=topo.lenient)
        self.conntrack: dict[str, list[CtEntry]] = {ns.name: [] for ns in topo.netns}
        self.sockets: dict[str, list[Sock]] = {ns.name: [] for ns in topo.netns}
        for ns in topo.netns:
            for lst in ns.listeners:
                owner = "ztunnel" if lst.owner == "ztunnel" else "app"
                self.sockets[ns.name].append(Sock(netns=ns.name, proto=lst.proto, local=(lst.addr, lst.port),
                                                  remote=None, owner=owner, name=lst.name, mark=lst.mark,
                                                  listener=lst))
        self.hops: list[Hop] = []
        self._packet_start = 0
        self.next_port = UPSTREAM_PORT

    # -- hops
    def emit(self, ns: str, stage: str, **kw) -> Hop:
        if len(self.hops) - self._packet_start >= MAX_HOPS_PER_PACKET:
            raise _Stop("loop", ns, f"more than {MAX_HOPS_PER_PACKET} hops: the packet is looping")
        h = Hop(n=len(self.hops) + 1, netns=ns, stage=stage, **kw)
        self.hops.append(h)
        return h

    # -- routing
    def _rules(self, ns: NetnsModel) -> list[IpRule]:
        if ns.live:   # the kernel's list is complete: 0, 32766 and 32767 are there unless deleted
            # in the kernel's order (rules of equal priority: as inserted)
            return sorted((r for r in ns.ip_rules if r.family == 4), key=lambda r: r.priority)
        rules = [IpRule(priority=0, action="lookup", table=TABLE_LOCAL)]
        rules += sorted(r for r in ns.ip_rules if r.family == 4)
        if not any(r.priority == names.PRIO_MAIN for r in ns.ip_rules):
            rules.append(IpRule(priority=names.PRIO_MAIN, action="lookup", table=TABLE_MAIN))
        rules.append(IpRule(priority=32767, action="lookup", table=TABLE_DEFAULT))
        return rules

    def _table(self, ns: NetnsModel, table: int) -> list[Route]:
        if table == TABLE_LOCAL and ns.live:
            return [r for r in ns.routes if r.table == TABLE_LOCAL and r.type == "local" and r.family == 4]
        if table == TABLE_LOCAL:
            out = []
            for iface in ns.ifaces:
                for addr in iface.addrs:
                    ip = addr.split("/")[0]
                    out.append(Route(table=TABLE_LOCAL, dst=f"{ip}/32", type="local", dev=iface.name, src=ip))
                    if iface.kind == "lo":
                        out.append(Route(table=TABLE_LOCAL, dst=str(ipaddress.ip_interface(addr).network),
                                         type="local", dev="lo", src=ip))
            return out
        return [r for r in ns.routes if r.table == table and r.family == 4]

    def route(self, ns: NetnsModel, dst: str, mark: int) -> Optional[RouteDecision]:
        """Policy routing: rules by priority, ``goto`` to an exact priority (unresolved: skip),
        a ``lookup`` whose table has no matching route falls through to the next rule."""
        rules = self._rules(ns)
        addr = ipaddress.ip_address(dst)
        tried: list[str] = []
        i = 0
        steps = 0
        while i < len(rules):
            steps += 1
            if steps > 100:
                raise TraceError(f"netns {ns.name}: ip rules loop (goto)")
            r = rules[i]
            mask = r.fwmask if r.fwmask is not None else names.MARK_WHOLE
            if r.fwmark is not None and (mark & mask) != r.fwmark:
                i += 1
                continue
            if r.action == "goto":
                target = next((j for j, x in enumerate(rules) if x.priority == r.goto), None)
                tried.append(f"{r.priority}: goto {r.goto}" + ("" if target is not None else
                                                                 " (no such rule: skipped)"))
                i = target if target is not None else i + 1
                continue
            best: Optional[Route] = None
            best_len = -1
            for rt in self._table(ns, r.table):
                net = ipaddress.ip_network(rt.dst)
                if addr in net and net.prefixlen > best_len:
                    best, best_len = rt, net.prefixlen
            tname = TABLE_NAMES.get(r.table, str(r.table))
            if best is None:
                if r.table not in (TABLE_LOCAL, TABLE_DEFAULT):
                    tried.append(f"{r.priority}: lookup {tname}: no route")
                i += 1
                continue
            src = best.src or self._dev_src(ns, best.dev)
            return RouteDecision(priority=r.priority, table=tname, route=best.show(), type=best.type,
                                 dev=best.dev, via=best.via, src=src, tried=tuple(tried))
        return None

    def _dev_src(self, ns: NetnsModel, dev: Optional[str]) -> Optional[str]:
        if dev and ns.has_iface(dev) and ns.iface(dev).ips:
            return ns.iface(dev).ips[0]
        for i in ns.ifaces:
            if i.kind != "lo" and i.ips:
                return i.ips[0]
        return None

    def _route_or_stop(self, ns: NetnsModel, pkt: Packet, note: str = "") -> RouteDecision:
        rd = self.route(ns, pkt.dst, pkt.mark)
        if rd is None:
            self.emit(ns.name, "drop", note=f"no route to {pkt.dst} (mark {pkt.mark:#x})")
            raise _Stop("unreachable", ns.name, f"no route to {pkt.dst}")
        self.emit(ns.name, "routing", route=rd, mark_before=pkt.mark, mark_after=pkt.mark,
                  ctmark=self._ctmark(pkt), note=note)
        return rd

    # -- conntrack
    @staticmethod
    def _ctmark(pkt: Packet) -> Optional[int]:
        return pkt.ct[0].mark if pkt.ct else None

    def ct_attach(self, ns: NetnsModel, pkt: Packet) -> None:
        """Find or create the packet's conntrack entry (kept across ``lo``)."""
        if pkt.ct is not None:
            return
        for e in self.conntrack[ns.name]:
            if e.orig == pkt.key:
                pkt.ct = (e, "orig")
                break
            if e.reply == pkt.key:
                pkt.ct = (e, "reply")
                e.seen_reply = True
                break
        else:
            e = CtEntry(orig=pkt.key, reply=(pkt.proto, pkt.dst, pkt.dport, pkt.src, pkt.sport))
            self.conntrack[ns.name].append(e)
            pkt.ct = (e, "orig")
            return
        e = pkt.ct[0]
        if e.mark:
            self.emit(ns.name, "conntrack", ctmark=e.mark, mark_before=pkt.mark, mark_after=pkt.mark,
                      note=f"{'reply of' if pkt.ct[1] == 'reply' else 'packet of'} a known connection, "
                           f"ctmark {e.mark:#x}")

    def ct_confirm(self, pkt: Packet) -> None:
        if pkt.ct:
            pkt.ct[0].confirmed = True

    def ct_forget_unconfirmed(self, ns: str, pkt: Packet) -> None:
        if pkt.ct and not pkt.ct[0].confirmed and pkt.ct[0] in self.conntrack.get(ns, []):
            self.conntrack[ns].remove(pkt.ct[0])

    # -- netfilter
    def run_hook(self, ns: NetnsModel, table: str, hook: str, pkt: Packet,
                 oif: Optional[str] = None) -> str:
        """Evaluate a built-in chain; returns "ACCEPT" or raises _Stop on DROP."""
        rs = self.rules[ns.name]
        if not rs.chain(table, hook):
            return "ACCEPT"
        verdict = self._chain(ns, rs, table, hook, hook, pkt, oif, depth=0)
        if verdict == "DROP":
            raise _Stop("dropped", ns.name, f"dropped in {table} {hook}")
        return "ACCEPT"

    def _chain(self, ns: NetnsModel, rs: Ruleset, table: str, hook: str, chain: str, pkt: Packet,
               oif: Optional[str], depth: int) -> Optional[str]:
        if depth > 16:
            raise TraceError(f"netns {ns.name}: chain recursion in {table} {chain}")
        for rule in rs.chain(table, chain):
            if rule.skipped is not None:
                self.emit(ns.name, f"{table} {hook}", chain=rule.chain, rule_text=rule.text,
                          verdict="skipped", mark_before=pkt.mark, mark_after=pkt.mark,
                          packet=pkt.show(), note=f"warning: {rule.rid} not interpreted ({rule.skipped}), "
                                                  f"treated as non-matching: {rule.text}")
                continue
            view = _View(ns, pkt, oif, self.members[ns.name])
            if not rule.matches_view(view):
                continue
            if rule.target.kind == "chain":
                verdict = self._chain(ns, rs, table, hook, rule.target.chain, pkt, oif, depth + 1)
                if verdict is not None:
                    return verdict
                continue
            verdict = self._apply(ns, rule, table, hook, pkt, oif)
            if verdict is not None:
                return verdict
        return "ACCEPT" if chain == hook else None

    def _apply(self, ns: NetnsModel, rule: CompiledRule, table: str, hook: str, pkt: Packet,
               oif: Optional[str]) -> Optional[str]:
        t = rule.target
        before = pkt.mark
        entry = pkt.ct[0] if pkt.ct else None
        result: Optional[str] = None
        shown = t.short()
        note = ""
        if t.kind == "RETURN":
            result = "ACCEPT" if rule.chain == hook else "RETURN"
        elif t.kind in ("ACCEPT", "DROP"):
            result = t.kind
        elif t.kind == "MARK":
            pkt.mark = (pkt.mark & ~t.mask & 0xFFFFFFFF) ^ t.value
        elif t.kind == "CONNMARK-SET" and entry:
            entry.mark = (entry.mark & ~t.mask & 0xFFFFFFFF) ^ t.value
        elif t.kind == "CONNMARK-SAVE" and entry:
            entry.mark = (entry.mark & ~t.ctmask & 0xFFFFFFFF) ^ (pkt.mark & t.nfmask)
        elif t.kind == "CONNMARK-RESTORE" and entry:
            pkt.mark = (pkt.mark & ~t.nfmask & 0xFFFFFFFF) ^ (entry.mark & t.ctmask)
        elif t.kind == "CT":
            if entry:
                entry.zone = t.zone or 0
        elif t.kind == "TPROXY":
            sock = self._tproxy_socket(ns, pkt, t.ip, t.port)
            if sock is None:
                result = "DROP"
                note = f"no transparent socket on :{t.port}: xt_TPROXY drops"
            else:
                pkt.mark = (pkt.mark & ~t.mask & 0xFFFFFFFF) ^ t.value
                pkt.sk = sock
                result = "ACCEPT"
                note = f"socket {sock.name} {_ep(sock.local)}"
        elif t.kind in ("REDIRECT", "DNAT"):
            if t.kind == "REDIRECT":
                new_ip = "127.0.0.1" if hook == "OUTPUT" or pkt.iif == "lo" else self._primary(ns, pkt.iif)
            else:
                new_ip = t.ip
            self._dnat(pkt, new_ip, t.port or pkt.dport)
            result = "ACCEPT"
            note = f"destination → {new_ip}:{t.port or pkt.dport}"
        elif t.kind == "SNAT":
            self._snat(pkt, t.ip, t.port or pkt.sport)
            result = "ACCEPT"
            note = f"source → {t.ip}"
        self.emit(ns.name, f"{table} {hook}", chain=rule.chain, rule=rule.rid, rule_text=rule.text,
                  match=rule.match_short, verdict=shown, mark_before=before, mark_after=pkt.mark,
                  ctmark=entry.mark if entry else None, device=pkt.iif or oif, packet=pkt.show(),
                  note=note)
        return result

    def _primary(self, ns: NetnsModel, ifname: Optional[str]) -> str:
        if ifname and ns.has_iface(ifname) and ns.iface(ifname).ips:
            return ns.iface(ifname).ips[0]
        raise TraceError(f"netns {ns.name}: REDIRECT on {ifname!r}, which has no address")

    def _dnat(self, pkt: Packet, ip: str, port: int) -> None:
        e, _ = pkt.ct
        e.dnat = (ip, port)
        e.reply = (e.orig[0], ip, port, e.snat[0] if e.snat else e.orig[1], e.orig[2])
        pkt.dst, pkt.dport = ip, port

    def _snat(self, pkt: Packet, ip: str, port: int) -> None:
        e, _ = pkt.ct
        e.snat = (ip, port)
        e.reply = (e.orig[0], e.reply[1], e.reply[2], ip, port)
        pkt.src, pkt.sport = ip, port

    def _tproxy_socket(self, ns: NetnsModel, pkt: Packet, on_ip: Optional[str], port: int) -> Optional[Sock]:
        est = self._established(ns.name, pkt)
        if est is not None:
            return est
        laddr = on_ip or (self._primary(ns, pkt.iif) if pkt.iif else pkt.dst)
        for s in self.sockets[ns.name]:
            lst = s.listener
            if (lst and lst.transparent and lst.proto == pkt.proto and lst.port == port
                    and lst.addr in ("0.0.0.0", laddr)):
                return s
        return None

    def _established(self, ns: str, pkt: Packet) -> Optional[Sock]:
        for s in self.sockets[ns]:
            if (s.listener is None and s.proto == pkt.proto and s.local == (pkt.dst, pkt.dport)
                    and s.remote == (pkt.src, pkt.sport)):
                return s
        return None

    # NAT at the DST hooks (PREROUTING, OUTPUT) and SRC hooks (POSTROUTING, INPUT)
    def nat_dst(self, ns: NetnsModel, hook: str, pkt: Packet, oif: Optional[str] = None) -> None:
        e, d = pkt.ct
        if d == "orig" and not e.dst_done:
            self.run_hook(ns, "nat", hook, pkt, oif)
            e.dst_done = True
        elif d == "orig" and e.dnat and (pkt.dst, pkt.dport) != e.dnat:
            pkt.dst, pkt.dport = e.dnat
            self.emit(ns.name, "NAT", note=f"conntrack NAT binding: destination → {_ep(e.dnat)}")
        elif d == "reply" and e.snat and (pkt.dst, pkt.dport) != (e.orig[1], e.orig[2]):
            pkt.dst, pkt.dport = e.orig[1], e.orig[2]
            self.emit(ns.name, "NAT", note=f"conntrack reverse SNAT: destination → {e.orig[1]}:{e.orig[2]}")

    def nat_src(self, ns: NetnsModel, hook: str, pkt: Packet, oif: Optional[str] = None) -> None:
        e, d = pkt.ct
        if d == "orig" and not e.src_done:
            self.run_hook(ns, "nat", hook, pkt, oif)
            e.src_done = True
        elif d == "orig" and e.snat and (pkt.src, pkt.sport) != e.snat:
            pkt.src, pkt.sport = e.snat
            self.emit(ns.name, "NAT", note=f"conntrack NAT binding: source → {e.snat[0]}")
        elif d == "reply" and e.dnat and (pkt.src, pkt.sport) != (e.orig[3], e.orig[4]):
            pkt.src, pkt.sport = e.orig[3], e.orig[4]
            self.emit(ns.name, "NAT", note=f"conntrack reverse NAT: source → {e.orig[3]}:{e.orig[4]}")

    # -- the paths
    def output(self, ns: NetnsModel, pkt: Packet, rd: Optional[RouteDecision] = None,
               note: str = "") -> None:
        """A locally generated packet (from ``pkt.sk``, or a tunnel's outer packet)."""
        if rd is None:
            rd = self._route_or_stop(ns, pkt, note)
        self.run_hook(ns, "raw", "OUTPUT", pkt, _oif(rd))
        self.ct_attach(ns, pkt)
        mark, dst = pkt.mark, pkt.dst
        self.run_hook(ns, "mangle", "OUTPUT", pkt, _oif(rd))
        if pkt.mark != mark or pkt.dst != dst:
            rd = self._route_or_stop(ns, pkt, "re-route: mangle OUTPUT changed the mark")
        dst = pkt.dst
        self.nat_dst(ns, "OUTPUT", pkt, _oif(rd))
        if pkt.dst != dst:
            rd = self._route_or_stop(ns, pkt, "re-route: nat OUTPUT changed the destination")
        self.run_hook(ns, "filter", "OUTPUT", pkt, _oif(rd))
        self.postrouting(ns, pkt, rd)

    def receive(self, ns: NetnsModel, ifname: str, pkt: Packet) -> None:
        pkt.iif = ifname
        self.run_hook(ns, "raw", "PREROUTING", pkt)
        self.ct_attach(ns, pkt)
        self.run_hook(ns, "mangle", "PREROUTING", pkt)
        self.nat_dst(ns, "PREROUTING", pkt)
        rd = self._route_or_stop(ns, pkt)
        if rd.type == "local":
            self.local_in(ns, pkt)
            return
        if not ns.forwarding:
            self.emit(ns.name, "drop", note="not a local address and ip_forward=0")
            raise _Stop("dropped", ns.name, "ip_forward=0")
        self.run_hook(ns, "mangle", "FORWARD", pkt, rd.dev)
        self.run_hook(ns, "filter", "FORWARD", pkt, rd.dev)
        self.postrouting(ns, pkt, rd)

    def postrouting(self, ns: NetnsModel, pkt: Packet, rd: RouteDecision) -> None:
        self.run_hook(ns, "mangle", "POSTROUTING", pkt, _oif(rd))
        self.nat_src(ns, "POSTROUTING", pkt, _oif(rd))
        self.ct_confirm(pkt)
        self.transmit(ns, pkt, rd)

    def local_in(self, ns: NetnsModel, pkt: Packet) -> None:
        self.run_hook(ns, "mangle", "INPUT", pkt)
        self.run_hook(ns, "filter", "INPUT", pkt)
        self.nat_src(ns, "INPUT", pkt)
        self.ct_confirm(pkt)
        if pkt.inner is not None:
            self.decap(ns, pkt)
            return
        self.deliver(ns, pkt)

    def deliver(self, ns: NetnsModel, pkt: Packet) -> None:
        sock = pkt.sk if pkt.sk is not None and pkt.sk.netns == ns.name else None
        if sock is None:
            sock = self._established(ns.name, pkt)
        if sock is None and (pkt.proto == "udp" or pkt.flags == "SYN"):
            local = pkt.dst in ns.local_ips
            for s in self.sockets[ns.name]:
                lst = s.listener
                if (lst and lst.proto == pkt.proto and lst.port == pkt.dport
                        and (lst.addr == pkt.dst or (lst.addr == "0.0.0.0" and local))):
                    sock = s
                    break
        if sock is None:
            what = "TCP reset (no socket)" if pkt.proto == "tcp" else "ICMP port unreachable"
            self.emit(ns.name, "drop", note=f"{what}: nothing listens on {pkt.dst}:{pkt.dport}")
            raise _Stop("reset" if pkt.proto == "tcp" else "unreachable", ns.name,
                        f"no socket for {pkt.dst}:{pkt.dport}")
        if sock.listener is not None:
            sock = self._accept(ns, sock, pkt)
        self.emit(ns.name, "socket", socket=sock.info(), mark_before=pkt.mark, mark_after=pkt.mark,
                  ctmark=self._ctmark(pkt), device=pkt.iif)
        raise _Stop("delivered", ns.name, "", sock)

    def _accept(self, ns: NetnsModel, lst_sock: Sock, pkt: Packet) -> Sock:
        e = pkt.ct[0] if pkt.ct else None
        # what getsockname()/SO_ORIGINAL_DST tell ztunnel; an app is not asked
        if e and e.dnat:
            orig: Optional[tuple[str, int]] = (e.orig[3], e.orig[4])
        else:
            orig = (pkt.dst, pkt.dport) if lst_sock.owner == "ztunnel" else None
        child = Sock(netns=ns.name, proto=pkt.proto, local=(pkt.dst, pkt.dport), remote=(pkt.src, pkt.sport),
                     owner=lst_sock.owner, name=lst_sock.name, mark=lst_sock.mark,
                     listener=None, orig_dst=orig, accepted_from=lst_sock.listener)
        self.sockets[ns.name].append(child)
        return child

    # -- leaving a netns
    def transmit(self, ns: NetnsModel, pkt: Packet, rd: RouteDecision) -> None:
        if rd.type == "local":   # a locally generated packet to a local address: through lo
            self.emit(ns.name, "lo", device="lo", to_netns=ns.name, to_device="lo", packet=pkt.show(),
                      mark_before=pkt.mark, mark_after=pkt.mark)
            pkt.sk = None          # loopback_xmit orphans the skb
            pkt.local_origin = False
            self.receive(ns, "lo", pkt)
            return
        iface = ns.iface(rd.dev) if rd.dev and ns.has_iface(rd.dev) else None
        if iface is None:
            raise TraceError(f"netns {ns.name}: route {rd.route} uses device {rd.dev}, which the "
                             "topology does not have")
        if iface.kind == "tunnel":
            self.encap(ns, iface, pkt, rd)
            return
        if iface.kind == "lo":
            self.emit(ns.name, "lo", device="lo", to_netns=ns.name, to_device="lo", packet=pkt.show())
            pkt.local_origin = False
            self.receive(ns, "lo", pkt)
            return
        if iface.kind == "veth":
            peer_ns, peer_if = iface.peer
            target = self.topo.get(peer_ns)
        else:   # segment: whoever holds the next hop
            nexthop = rd.via or pkt.dst
            found = [(n, i) for n, i in self.topo.segment_members(iface.segment)
                     if nexthop in i.ips and n.name != ns.name]
            if not found:
                self.emit(ns.name, "drop", device=iface.name, note=f"nobody on {iface.segment} answers ARP for {nexthop}")
                raise _Stop("unreachable", ns.name, f"no neighbour {nexthop}")
            target, peer_if_obj = found[0]
            peer_if = peer_if_obj.name
        note = f"mark {pkt.mark:#x} cleared (netns crossing)" if pkt.mark else ""
        if pkt.inner is not None:
            note = ("outer packet; " + note).rstrip("; ")
        self.emit(ns.name, "segment" if iface.kind == "segment" else "veth", device=iface.name,
                  to_netns=target.name, to_device=peer_if, packet=pkt.show(), mark_before=pkt.mark,
                  mark_after=0, note=note)
        moved = replace(pkt, mark=0, ct=None, sk=None, local_origin=False, iif=None)
        self.receive(target, peer_if, moved)

    def encap(self, ns: NetnsModel, iface: Iface, pkt: Packet, rd: RouteDecision) -> None:
        link = iface.link
        outer_rd = self.route(ns, link.remote, pkt.mark)
        if outer_rd is None:
            self.emit(ns.name, "drop", device=iface.name, note=f"no route to the tunnel remote {link.remote}")
            raise _Stop("unreachable", ns.name, f"{iface.name}: no route to {link.remote}")
        if outer_rd.dev == iface.name:
            self.emit(ns.name, "drop", device=iface.name, route=outer_rd,
                      note=f"routing loop: the outer packet to {link.remote} would re-enter {iface.name}")
            raise _Stop("dropped", ns.name, f"{iface.name}: outer packet routed into itself")
        outer = Packet(proto="udp", src=outer_rd.src, sport=TUNNEL_SPORT, dst=link.remote, dport=link.dstport,
                       mark=pkt.mark, local_origin=pkt.local_origin, inner=replace(pkt, ct=None, sk=None),
                       vni=link.vni, inner_nexthop=rd.via or pkt.dst)
        self.emit(ns.name, "tunnel", device=iface.name, mark_before=pkt.mark, mark_after=outer.mark,
                  tunnel=TunnelCrossing(link=iface.name, vni=link.vni, outer_src=outer.src,
                                        outer_dst=link.remote, port=link.dstport),
                  packet=pkt.show(), note="the outer packet keeps the inner mark for its route lookup")
        self.output(ns, outer, note=f"outer packet of {iface.name}")

    def decap(self, ns: NetnsModel, outer: Packet) -> None:
        links = [i for i in ns.ifaces if i.kind == "tunnel" and i.link.dstport == outer.dport
                 and i.link.vni == outer.vni]
        if not links:
            self.emit(ns.name, "drop", note=f"UDP :{outer.dport} VNI {outer.vni}: no tunnel link here")
            raise _Stop("dropped", ns.name, f"no tunnel with VNI {outer.vni}")
        iface = links[0]
        crossing = TunnelCrossing(link=iface.name, vni=outer.vni, outer_src=outer.src, outer_dst=outer.dst,
                                  port=outer.dport, peer_netns=ns.name, peer_link=iface.name)
        if iface.link.remote != outer.src:
            self.emit(ns.name, "drop", tunnel=crossing,
                      note=f"GENEVE decap refused: outer source {outer.src} ≠ remote {iface.link.remote} of {iface.name}")
            raise _Stop("dropped", ns.name, f"{iface.name}: outer source {outer.src} is not its remote "
                        f"{iface.link.remote}")
        if outer.inner_nexthop not in iface.ips and outer.inner_nexthop != outer.inner.dst:
            self.emit(ns.name, "drop", tunnel=crossing,
                      note=f"next hop {outer.inner_nexthop} is not an address of {iface.name}: no neighbour")
            raise _Stop("unreachable", ns.name, f"tunnel next hop {outer.inner_nexthop}")
        self._fill_peer(crossing)
        inner = replace(outer.inner, mark=outer.mark, ct=None, sk=None, local_origin=False, iif=None)
        self.emit(ns.name, "decap", device=iface.name, tunnel=crossing, mark_before=outer.mark,
                  mark_after=inner.mark, packet=inner.show())
        self.receive(ns, iface.name, inner)

    def neighbour_traffic(self) -> dict[tuple[str, str], str]:
        """Rules that tunnel traffic *outside* any connection meets: GENEVE carries Ethernet, so
        the kernel resolves (and later re-checks) each tunnel's inner next hop with ARP across
        the tunnel, whenever it likes. For every tunnel link, its outer ARP packet is walked
        out of its netns (OUTPUT, POSTROUTING) and the peer's answer in (PREROUTING, INPUT);
        the rules they match may move during any request (kernel-notes.md §11: stray tunnel
        UDP on veth-zt)."""
        out: dict[tuple[str, str], str] = {}
        for ns in self.topo.netns:
            for iface in ns.ifaces:
                if iface.kind != "tunnel":
                    continue
                link = iface.link
                rd = self.route(ns, link.remote, 0)
                if rd is None or not rd.dev or not ns.has_iface(rd.dev) or ns.iface(rd.dev).kind != "veth":
                    continue
                own = ipaddress.ip_interface(iface.addrs[0])
                peer_ip = next((str(a) for a in own.network.hosts() if a != own.ip), "?")   # the /30's other end
                why = (f"ARP for {peer_ip} over {iface.name}, whenever the kernel resolves or re-checks "
                       f"it: GENEVE UDP :{link.dstport} between {rd.src} and {link.remote}")
                request = Packet(proto="udp", src=rd.src, sport=link.dstport, dst=link.remote,
                                 dport=link.dstport)
                answer = Packet(proto="udp", src=link.remote, sport=link.dstport, dst=rd.src,
                                dport=link.dstport, iif=rd.dev)
                for pkt, hooks in ((request, (("raw", "OUTPUT"), ("mangle", "OUTPUT"), ("nat", "OUTPUT"),
                                              ("filter", "OUTPUT"), ("mangle", "POSTROUTING"),
                                              ("nat", "POSTROUTING"))),
                                   (answer, (("raw", "PREROUTING"), ("mangle", "PREROUTING"),
                                             ("nat", "PREROUTING"), ("mangle", "INPUT"),
                                             ("filter", "INPUT"), ("nat", "INPUT")))):
                    for rid in self._side_rules(ns, pkt, hooks, None if pkt is answer else rd.dev):
                        out.setdefault((ns.name, rid), why)
        return out

    def _side_rules(self, ns: NetnsModel, pkt: Packet, hooks, oif: Optional[str]) -> list[str]:
        """The rules ``pkt`` matches in ``hooks``, without touching the walk's hops or conntrack."""
        pkt.ct = (CtEntry(orig=pkt.key, reply=pkt.key), "orig")
        saved, start = self.hops, self._packet_start
        self.hops, self._packet_start = [], 0
        try:
            for table, hook in hooks:
                self.run_hook(ns, table, hook, pkt, oif)
        except _Stop:
            pass
        finally:
            side, self.hops, self._packet_start = self.hops, saved, start
        return [h.rule for h in side if h.rule]

    def _fill_peer(self, crossing: TunnelCrossing) -> None:
        """Tell the encap hop where its packet came out."""
        for h in reversed(self.hops):
            if h.stage == "tunnel" and h.tunnel and h.tunnel.vni == crossing.vni and h.tunnel.peer_netns is None:
                h.tunnel = replace(h.tunnel, peer_netns=crossing.peer_netns, peer_link=crossing.peer_link)
                return

    # -- one packet
    def send(self, ns: NetnsModel, sock: Sock, flags: str, kind: str, leg: int) -> PacketTrace:
        pkt = Packet(proto=sock.proto, src=sock.local[0], sport=sock.local[1], dst=sock.remote[0],
                     dport=sock.remote[1], flags=flags, mark=sock.mark, sk=sock, local_origin=True)
        start = self._packet_start = len(self.hops)
        shown = pkt.show()
        try:
            self.output(ns, pkt)
            raise TraceError("internal: a packet walk ended without an outcome")
        except _Stop as stop:
            if stop.outcome != "delivered":
                self.ct_forget_unconfirmed(stop.netns, pkt)
            hops = self.hops[start:]
            return PacketTrace(leg=leg, kind=kind, flags=flags, tuple=shown, hops=hops,
                               outcome=stop.outcome, netns=stop.netns,
                               socket=stop.sock.info() if stop.sock else None, reason=stop.reason)

    def connect(self, ns: NetnsModel, src: Optional[str], sport: int, dst: str, dport: int, proto: str,
                mark: int = 0, name: str = "client", owner: str = "client",
                carried: Optional[tuple[str, int]] = None) -> Sock:
        if src is None:
            rd = self.route(ns, dst, mark)
            if rd is None:
                raise TraceError(f"netns {ns.name}: no route to {dst}, cannot pick a source address")
            src = rd.src
        sock = Sock(netns=ns.name, proto=proto, local=(src, sport), remote=(dst, dport), owner=owner,
                    name=name, mark=mark, carried=carried)
        self.sockets[ns.name].append(sock)
        return sock

    def find_sock(self, info: SocketInfo) -> Sock:
        for s in self.sockets[info.netns]:
            if s.listener is None and _ep(s.local) == info.local and s.remote and _ep(s.remote) == info.remote:
                return s
        raise TraceError(f"internal: socket {info} vanished")

    def leg(self, n: int, label: str, client: Sock) -> Leg:
        """first → reply → next of one connection."""
        ns = self.topo.get(client.netns)
        proto = client.proto
        leg = Leg(n=n, label=label, netns=ns.name,
                  tuple=f"{_ep(client.local)} → {_ep(client.remote)} {proto}")
        first = self.send(ns, client, "SYN" if proto == "tcp" else "", "first", n)
        leg.packets.append(first)
        if first.outcome != "delivered":
            return leg
        server = self.find_sock(first.socket)
        if client.carried and server.owner == "ztunnel":
            server.carried = client.carried
        leg.accepted = server.info()
        reply = self.send(self.topo.get(server.netns), server, "SYN-ACK" if proto == "tcp" else "", "reply", n)
        leg.packets.append(reply)
        if reply.outcome != "delivered":
            return leg
        if reply.socket is None or reply.socket.local != _ep(client.local) or reply.socket.netns != client.netns:
            reply.outcome = "misdelivered"
            reply.reason = f"the reply reached {reply.socket.name if reply.socket else '?'} in {reply.netns}, not the client"
            return leg
        nxt = self.send(ns, client, "ACK" if proto == "tcp" else "", "next", n)
        leg.packets.append(nxt)
        if nxt.outcome == "delivered" and nxt.socket and nxt.socket.local != _ep(server.local):
            nxt.outcome = "misdelivered"
            nxt.reason = f"the later packet reached {nxt.socket.name} in {nxt.netns}, not {server.name}"
        return leg

    def upstream(self, accepted: Sock) -> tuple[Optional[Sock], str, str]:
        """The connection ztunnel opens after accepting ``accepted``: (socket, label, note)."""
        ns = self.topo.get(accepted.netns)
        port = accepted.accepted_from.port if accepted.accepted_from else None
        orig = accepted.orig_dst
        client_ip = accepted.remote[0]
        inpod = self.topo.mode == "inpod"
        mark = names.INPOD_MARK if inpod else 0
        target: Optional[tuple[str, int]] = None
        carried = None
        label = ""
        if port == names.PORT_OUTBOUND:
            dest_pod = self.topo.mesh_pod(orig[0])
            remote = dest_pod is not None and (inpod or dest_pod.node != ns.node)
            if self.zt.hbone and remote:
                target, carried = (orig[0], names.PORT_HBONE), orig
                label = f"ztunnel: HBONE to {orig[0]}:{names.PORT_HBONE} carrying {_ep(orig)}"
            else:
                target = orig
                label = ("ztunnel: passthrough to the original destination" if dest_pod is None
                         else "ztunnel: same-node fast path to the original destination" if not remote
                         else "ztunnel: straight to the original destination (no HBONE)")
            src = ns.ip if inpod else (client_ip if self.zt.original_source else ns.ip)
        elif port == names.PORT_INBOUND:
            target = orig
            label = "ztunnel: plaintext inbound, connects to the original destination"
            src = client_ip if (inpod or self.zt.original_source) else ns.ip
        elif port == names.PORT_HBONE:
            if accepted.carried is None:
                return None, "", ("HBONE connection: its CONNECT target is inside the stream, "
                                  "not visible to the tracer; the walk ends at ztunnel's :15008")
            target = accepted.carried
            label = f"ztunnel: HBONE terminated, connects to {_ep(target)}"
            src = client_ip if (inpod or self.zt.original_source) else ns.ip
        else:
            return None, "", f"listener :{port} has no ztunnel behaviour"
        if not (inpod or self.zt.original_source) or src == ns.ip:
            label += f", source {src}"
        else:
            label += f", original source {src}"
        sport = self.next_port
        self.next_port += 1
        sock = self.connect(ns, src, sport, target[0], target[1], accepted.proto, mark=mark,
                            name="ztunnel upstream", owner="ztunnel", carried=carried)
        return sock, label, ""


# ---------------------------------------------------------------- entry points


def resolve_src(topo: Topology, src: str) -> tuple[NetnsModel, str]:
    """The netns a client address lives in; ``HostIP``/``InternalIP`` name the traced node's."""
    node = topo.get(topo.nodes[0])
    vals = topo.node_values[0] if topo.node_values else None
    if src == "HostIP" and vals is not None:
        return node, vals.node.host_ip
    if src == "InternalIP" and vals is not None:
        return node, vals.node.internal_ip
    try:
        ipaddress.IPv4Address(src)
    except ValueError:
        raise TraceError(f"--src {src!r} is not an IPv4 address (or HostIP/InternalIP)") from None
    try:
        return topo.owner_of(src), src
    except KeyError:
        raise TraceError(f"no netns of the topology has the address {src}; known: "
                         + ", ".join(f"{n.name} {n.ip}" for n in topo.netns if n.ip)) from None


def trace(topo: Topology, src: str, dst: str, dport: int, proto: str = "tcp",
          sport: int = CLIENT_PORT, scenario: Optional[str] = None,
          zt: ZtunnelModel = ZtunnelModel()) -> Trace:
    """Walk a connection from ``src`` (an address, HostIP or InternalIP) to ``dst:dport``."""
    if proto not in ("tcp", "udp"):
        raise TraceError(f"protocol {proto!r}: only tcp and udp are traced")
    ipaddress.IPv4Address(dst)
    w = Walker(topo, zt)
    client_ns, src_ip = resolve_src(topo, src)
    client = w.connect(client_ns, src_ip, sport, dst, dport, proto)
    request = f"{src_ip}:{sport} → {dst}:{dport} {proto} from {client_ns.name}"
    legs: list[Leg] = []
    notes: list[str] = []
    label = f"{client_ns.name} connects to {dst}:{dport}"
    sock: Optional[Sock] = client
    while sock is not None and len(legs) < MAX_LEGS:
        leg = w.leg(len(legs) + 1, label, sock)
        legs.append(leg)
        if not all(p.outcome == "delivered" for p in leg.packets) or leg.accepted is None:
            break
        if leg.accepted.owner != "ztunnel":
            break
        sock, label, note = w.upstream(w.find_sock(leg.accepted))
        if note:
            notes.append(note)
    log.debug("trace request=%r mode=%s legs=%d hops=%d", request, topo.mode, len(legs),
              sum(len(p.hops) for leg in legs for p in leg.packets))
    incidental = {k: v for k, v in w.neighbour_traffic().items()
                  if not any(h.rule == k[1] and h.netns == k[0] for leg in legs for p in leg.packets
                             for h in p.hops)}
    return Trace(mode=topo.mode, version=topo.version, request=request, legs=legs, scenario=scenario,
                 notes=list(topo.notes) + notes, topology=topo, incidental=incidental)


def trace_scenario(values, mode: str, name: str, rules=None,
                   zt: ZtunnelModel = ZtunnelModel(), live=None) -> Trace:
    """One of the named lab scenarios (:data:`topology_model.SCENARIOS`); ``live``
    (:class:`topology_model.Live`): on the kernel's state of the traced node instead of the
    rendered one."""
    from .topology_model import scenario as find, topology_for
    sc = find(name)
    topo = topology_for(values, mode, sc, rules=rules, live=live)
    server = topo.get(sc.server)
    src = sc.src or topo.get(sc.client).ip
    return trace(topo, src, server.ip, sc.port, scenario=f"{sc.number} {sc.name}", zt=zt)


# ---------------------------------------------------------------- prediction vs observation


@dataclass(frozen=True)
class Difference:
    hop: Optional[int]          # the first predicted hop that disagrees (None: not tied to a hop)
    what: str

    def __str__(self) -> str:
        return f"hop {self.hop}: {self.what}" if self.hop is not None else self.what


def compare(trace_: Trace, rules_hit: Mapping[str, Iterable[str]],
            listener: Optional[int] = None, orig_dst: Optional[str] = None,
            tunnel_tcp: Optional[Mapping[str, int]] = None,
            netns_map: Optional[Mapping[str, str]] = None,
            ignore: Iterable[tuple[str, str]] = ()) -> list[Difference]:
    """Compare a trace with what a lab observed, in hop order.

    ``rules_hit``: netns -> ids of the rules whose counters moved (owned chains only; hooks
    ignored). ``listener``/``orig_dst``: what the stand-in ztunnel logged (None: nothing was
    accepted). ``tunnel_tcp``: (netns, tunnel device) -> TCP packets sent into it. ``netns_map`` maps the
    trace's netns names to the observer's; ``ignore``: (observer netns, rule id) pairs whose
    counters the observer cannot attribute. Rules the trace lists as incidental may move or not.
    The first difference names the first hop that differs.
    """
    m = dict(netns_map or {})
    name = lambda ns: m.get(ns, ns)   # noqa: E731
    skip = set(ignore)
    observed = {(ns, r) for ns, ids in rules_hit.items() for r in ids if r != "hook"} - skip
    allowed = {(name(ns), r) for (ns, r) in trace_.incidental}
    diffs: list[Difference] = []
    predicted: set[tuple[str, str]] = set()
    for h in trace_.hops():
        if h.rule and h.rule != "hook":
            key = (name(h.netns), h.rule)
            predicted.add(key)
            if key not in observed and key not in skip:
                diffs.append(Difference(h.n, f"{h.rule} in {h.netns} predicted ({h.describe()}), "
                                             "its counter did not move"))
    for ns, rid in sorted(observed - predicted - allowed):
        diffs.append(Difference(None, f"{rid} in {ns} was hit, the trace does not predict it"))
    cap = trace_.capture
    if listener is not None or cap is not None:
        if cap is None:
            diffs.append(Difference(None, f"ztunnel accepted on :{listener}, the trace predicts no capture"))
        else:
            hop = next((h.n for h in trace_.hops() if h.socket and h.socket.port == cap.port), None)
            if listener != cap.port:
                diffs.append(Difference(hop, f"predicted ztunnel listener :{cap.port}, observed {listener}"))
            elif orig_dst is not None and orig_dst != cap.orig_dst:
                diffs.append(Difference(hop, f"predicted original destination {cap.orig_dst}, observed {orig_dst}"))
    if tunnel_tcp is not None:
        pred = {(name(ns), d): c for (ns, d), c in trace_.devices(proto="tcp").items()}
        for (ns, dev), count in sorted(tunnel_tcp.items()):
            hop = next((h.n for h in trace_.hops() if h.stage == "tunnel" and h.device == dev
                        and name(h.netns) == ns), None)
            expect = pred.get((ns, dev), 0)
            if (count > 0) != (expect > 0):
                diffs.append(Difference(hop, f"{dev} in {ns}: predicted {expect} TCP packet(s) of the "
                                             f"traced packets, observed {count}"))
    diffs.sort(key=lambda d: (d.hop is None, d.hop or 0))
    return diffs
