"""Watching one request cross the lab, and telling its path as numbered hops.

Owns the lab's instrumentation and what is read from it. Nothing here is inferred from the
rules alone: every hop is backed by something the kernel or a lab process reported while
the request ran.

- **rule counters** of our own rules in each node and ztunnel netns (``iptables-save -c`` of
  the backend's variant, or the counters of our nft tables), named by rule id (P1-P15, F1-F2,
  I1-I2, O1, N1, NP1, FF1, T1…, Z1-Z4: the position of the rendered rule in its chain, as
  legacy-mode.md §1.3/§2.5 number them; T is the VXLAN stand-in's outer-source check);
- **TCP packet counts per device and direction** from a small nft table of the lab's own
  (``table ip noderedirect-lab``, :func:`install_counters`) on istioin/istioout/veth-zt/eth0 in
  each node and pistioin/pistioout/eth0 in each ztunnel netns (tunnel UDP is not TCP, so only
  the inner packets count);
- the **stand-in ztunnel's log** (listener, original destination, upstream local address) and
  the **test server's log** (the client address it saw);
- **conntrack marks** (``conntrack -L``) of the client and upstream connections, and
  ``ip route get`` for the routing decisions a mark leads to.

:func:`trace_request` snapshots all counters, sends one request, snapshots again and returns a
:class:`Trace` of the differences; :meth:`Trace.hops` turns it into the numbered path.

In an in-pod lab the capture happens inside the pods, so the observer also reads each mesh
pod's netns (keyed by pod name): the counters of its ``ISTIO_*`` rules, numbered as the packet
tracer numbers them (``NOUT4`` = 4th rule of nat ``ISTIO_OUTPUT``, ``NPR2``, ``MPR1``,
``MOUT1``; ``HPOST1`` is the node's probe SNAT, :data:`noderedirect.trace_rules.INPOD_RULE_IDS`),
and TCP packets on its ``eth0`` and ``lo``. The ztunnel log says in which pod's netns each
connection was accepted.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Optional

from .. import names
from ..host import Host, HostError
from ..model import IptRule
from ..trace_rules import rule_prefix
from . import client, procs, server as server_mod, ztunnel as ztunnel_mod
from .topology import Endpoint, Lab, LabError, Record, ZTUNNEL_VETH, engine_for

log = logging.getLogger(__name__)

OBS_TABLE = "noderedirect-lab"
NODE_DEVICES = (names.LINK_IN, names.LINK_OUT, ZTUNNEL_VETH, "eth0")
ZTUNNEL_DEVICES = (names.PLINK_IN, names.PLINK_OUT, "eth0")
IPT_VARIANT = {"iptables": "nft", "iptables-legacy": "legacy", "nft": None}
# rule-id letter per (role, iptables table, chain): legacy-mode.md's numbering, plus the
# VXLAN stand-in's tunnel chain
RULE_PREFIXES = {
    **names.RULE_ID_PREFIXES,
    ("node", "filter", names.CHAIN_TUNNEL): names.TUNNEL_RULE_PREFIX,
    ("ztunnel", "filter", names.CHAIN_TUNNEL): names.TUNNEL_RULE_PREFIX,
}
_SAVE_RULE = re.compile(r"^\[(\d+):(\d+)\] -A (\S+) (.*)$")
_CT_MARK = re.compile(r"\bmark=(\d+)")
SETTLE = 0.05     # seconds for the last packets of a finished exchange to be counted


# ---------------------------------------------------------------- instrumentation


def counters_script(devices: tuple[str, ...]) -> str:
    """One transaction that (re)creates the lab's counting table: TCP packets per device, in
    (prerouting) and out (postrouting), at priorities that see every packet first and last."""
    lines = [f"table ip {OBS_TABLE}", f"delete table ip {OBS_TABLE}", f"table ip {OBS_TABLE} {{",
             "\tchain in {", "\t\ttype filter hook prerouting priority -400; policy accept;"]
    lines += [f'\t\tiifname "{d}" meta l4proto tcp counter comment "in {d}"' for d in devices]
    lines += ["\t}", "\tchain out {", "\t\ttype filter hook postrouting priority 400; policy accept;"]
    lines += [f'\t\toifname "{d}" meta l4proto tcp counter comment "out {d}"' for d in devices]
    lines += ["\t}", "}"]
    return "\n".join(lines) + "\n"


def install_counters(netns: str, devices: tuple[str, ...]) -> None:
    with Host(netns) as h:
        h.nft(counters_script(devices))


def _nft_counters(doc: dict) -> list[tuple[str, str, int]]:
    """(chain, comment, packets) of every rule with a counter and a comment."""
    out = []
    for item in doc.get("nftables", []):
        rule = item.get("rule")
        if not rule or "comment" not in rule:
            continue
        packets = next((e["counter"]["packets"] for e in rule.get("expr", [])
                        if isinstance(e, dict) and "counter" in e), None)
        if packets is not None:
            out.append((rule["chain"], rule["comment"], int(packets)))
    return out


# ---------------------------------------------------------------- rule ids


def inpod_rule_ids(role: str, rules: tuple[IptRule, ...]) -> dict[str, IptRule]:
    """In-pod: id -> rule, the packet tracer's numbering (the n-th non-jump rule of a chain);
    ``role`` is "node" or "pod:…"."""
    kind = "pod" if role.startswith("pod:") else "node"
    ids: dict[str, IptRule] = {}
    count: dict[tuple[str, str], int] = {}
    for r in rules:
        if r.family != 4 or r.is_hook:
            continue
        prefix = rule_prefix(kind, r.table, r.chain)
        if prefix is None:
            continue
        n = count[(r.table, r.chain)] = count.get((r.table, r.chain), 0) + 1
        ids[f"{prefix}{n}"] = r
    return ids


def rule_ids(role: str, rules: tuple[IptRule, ...]) -> dict[str, IptRule]:
    """id -> rendered rule for one netns, numbering each chain's rules in rendered order."""
    ids: dict[str, IptRule] = {}
    count: dict[tuple[str, str], int] = {}
    for r in rules:
        if r.family != 4 or r.is_hook:
            continue
        prefix = RULE_PREFIXES.get((role, r.table, r.chain))
        if prefix is None:
            continue
        n = count[(r.table, r.chain)] = count.get((r.table, r.chain), 0) + 1
        ids[f"{prefix}{n}"] = r
    return ids


# ---------------------------------------------------------------- snapshots


@dataclass(frozen=True)
class Snapshot:
    rules: dict[tuple[str, str], int]          # (netns key, rule id) -> packets
    tcp: dict[tuple[str, str, str], int]       # (netns key, device, "in"|"out") -> packets
    zt_events: dict[str, int]                  # ztunnel name -> events logged so far
    server_events: int


class Observer:
    """Reads every counter of one lab. Keep one for many requests: it holds a netns worker
    per namespace (libnftables must be created inside the netns)."""

    def __init__(self, rec: Record):
        self.rec = rec
        self.lab: Lab = rec.lab
        self.hosts: dict[str, Host] = {}
        for n in self.lab.node_list():
            self.hosts[n.name] = Host(self.lab.node_ns(n.index))
            self.hosts[f"ztunnel-{n.index}"] = Host(self.lab.ztunnel_ns(n.index))
            if self.lab.inpod:          # the capture happens inside the mesh pods
                for p in self.lab.pods(n.index):
                    if p.mesh:
                        self.hosts[p.name] = Host(self.lab.pod_ns(p))
        self._book: Optional[dict[tuple[str, str], IptRule]] = None

    def close(self) -> None:
        for h in self.hosts.values():
            h.close()

    def __enter__(self) -> "Observer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def role(key: str) -> str:
        return "ztunnel" if key.startswith("ztunnel-") else "node"

    def rulebook(self) -> dict[tuple[str, str], IptRule]:
        """(netns key, rule id) -> the rendered rule, from each node's engine (rendered once)."""
        if self._book is None:
            book: dict[tuple[str, str], IptRule] = {}
            for n in self.lab.node_list():
                with engine_for(self.lab, n.index, self.rec.values[n.name],
                                self.rec.tunnel or self.lab.tunnel) as eng:
                    rendered = eng.desired()
                for ns in rendered.netns:
                    if self.lab.inpod:
                        # roles "node" and "pod:default/<name>"; rules in iptables-save form
                        key = n.name if ns.role == "node" else ns.role.rpartition("/")[2]
                        for rid, r in inpod_rule_ids(ns.role, ns.iptables).items():
                            book[(key, rid)] = r
                        continue
                    key = n.name if ns.role == "node" else f"ztunnel-{n.index}"
                    for rid, r in rule_ids(ns.role, ns.iptables).items():
                        book[(key, rid)] = r
            self._book = book
        return self._book

    def _rule_counters(self, key: str) -> dict[str, int]:
        host = self.hosts[key]
        role = self.role(key)
        # the same text can be several rules (P7, P11 and P14 are all `-m mark --mark
        # 0x200/0x200 -j RETURN`): the n-th line of a text in a chain is the n-th rule of it
        book: dict[tuple[str, str, str], list[str]] = {}
        for (k, rid), r in self.rulebook().items():
            if k == key:
                book.setdefault((r.table, r.chain, r.args), []).append(rid)
        out: dict[str, int] = {}
        variant = IPT_VARIANT[self.lab.backend]
        # the nft backend may still leave driver rules (T*) to iptables-nft: read both
        for v in ([variant] if variant else ["nft"]):
            table = None
            seen: dict[tuple[str, str, str], int] = {}
            for line in host.iptables_save(v, counters=True).splitlines():
                if line.startswith("*"):
                    table = line[1:]
                    continue
                m = _SAVE_RULE.match(line)
                if not m:
                    continue
                text = (table, m.group(3), m.group(4))
                ids = book.get(text, [])
                n = seen[text] = seen.get(text, -1) + 1
                if n < len(ids):
                    out[ids[n]] = int(m.group(1))
        if variant is None:
            try:
                doc = host.nft_json(f"list table {names.NFT_FAMILY} {names.NFT_TABLES[role]}")
            except HostError:
                doc = {}
            for _chain, comment, packets in _nft_counters(doc):
                # "Z2 no listener" (Z2's companion drop) keeps its own name
                if comment != "hook":
                    out[comment] = packets
        return out

    def _tcp_counters(self, key: str) -> dict[tuple[str, str], int]:
        try:
            doc = self.hosts[key].nft_json(f"list table ip {OBS_TABLE}")
        except HostError:
            return {}
        out = {}
        for _chain, comment, packets in _nft_counters(doc):
            direction, _, dev = comment.partition(" ")
            out[(dev, direction)] = packets
        return out

    def snapshot(self) -> Snapshot:
        rules: dict[tuple[str, str], int] = {}
        tcp: dict[tuple[str, str, str], int] = {}
        for key in self.hosts:
            rules.update({(key, rid): v for rid, v in self._rule_counters(key).items()})
            tcp.update({(key, dev, d): v for (dev, d), v in self._tcp_counters(key).items()})
        zt = {name: len(ztunnel_mod.read_log(path)) for name, path in self.rec.logs.items()
              if name.startswith("ztunnel-")}
        srv = len(server_mod.read_log(self.rec.logs["servers"])) if "servers" in self.rec.logs else 0
        return Snapshot(rules, tcp, zt, srv)

    def conntrack_mark(self, key: str, addr: Optional[str]) -> Optional[int]:
        """The ct mark of the TCP connection whose original source is ``addr`` (ip:port)."""
        if not addr:
            return None
        ip, _, port = addr.rpartition(":")
        try:
            cp = self.hosts[key].run(["conntrack", "-L", "-p", "tcp", "--orig-src", ip,
                                      "--orig-port-src", port], check=False)
        except HostError:
            return None
        m = _CT_MARK.search(cp.stdout)
        return int(m.group(1)) if m else None

    def route_get(self, key: str, dst: str, src: Optional[str] = None, iif: Optional[str] = None,
                  mark: Optional[int] = None) -> Optional[dict]:
        """``ip -j route get`` in a node netns: the kernel's own routing decision."""
        argv = ["ip", "-j", "route", "get", dst]
        if src:
            argv += ["from", src]
        if iif:
            argv += ["iif", iif]
        if mark is not None:
            argv += ["mark", hex(mark)]
        try:
            cp = self.hosts[key].run(argv, check=False)
            data = json.loads(cp.stdout or "[]") if cp.returncode == 0 else []
        except (HostError, ValueError):
            return None
        return data[0] if data else None


# ---------------------------------------------------------------- one request


@dataclass
class Leg:
    """One connection a stand-in ztunnel accepted during the request."""

    ztunnel: str                 # "ztunnel-1"
    node: int
    accept: dict
    upstream: Optional[dict]

    @property
    def listener(self) -> int:
        return self.accept["listener"]

    @property
    def orig_dst(self) -> str:
        return self.accept["orig_dst"]

    @property
    def peer(self) -> str:
        return self.accept["peer"]

    @property
    def upstream_local(self) -> Optional[str]:
        return self.upstream.get("upstream_local") if self.upstream else None

    @property
    def upstream_error(self) -> Optional[str]:
        return self.upstream.get("error") if self.upstream else None

    @property
    def netns(self) -> Optional[str]:
        """In-pod mode: the path of the pod netns the listener lives in."""
        return self.accept.get("netns")


@dataclass
class Trace:
    lab: Lab
    tunnel: Optional[str]
    src: Endpoint
    dst_ip: str
    port: int
    dst: Optional[Endpoint]
    path: str
    bind: Optional[str]
    response: client.Response
    rules: dict[tuple[str, str], int]            # (netns key, rule id) -> packets during the request
    tcp: dict[tuple[str, str, str], int]         # (netns key, device, dir) -> TCP packets
    legs: list[Leg]
    server: list[dict]                           # server log lines written during the request
    rulebook: dict[tuple[str, str], IptRule]
    ct: dict[str, Optional[int]] = field(default_factory=dict)    # "<node> client|<leg>" -> mark
    routes: dict[str, Optional[dict]] = field(default_factory=dict)

    # ------------------------------------------------------------ what was observed

    def hits(self, key: str, rid: str) -> int:
        return self.rules.get((key, rid), 0)

    def tcp_on(self, key: str, dev: str, direction: Optional[str] = None) -> int:
        return sum(v for (k, d, dr), v in self.tcp.items()
                   if k == key and d == dev and (direction is None or dr == direction))

    def tunnel_tcp(self, node: int = 1) -> dict[str, int]:
        """TCP packets that entered each tunnel of node ``node`` (node side, outgoing)."""
        key = f"node-{node}"
        return {names.LINK_IN: self.tcp_on(key, names.LINK_IN, "out"),
                names.LINK_OUT: self.tcp_on(key, names.LINK_OUT, "out")}

    def accepts(self, listener: Optional[int] = None) -> list[Leg]:
        return [l for l in self.legs if listener is None or l.listener == listener]

    @property
    def server_client(self) -> Optional[str]:
        """The client address the server reported (``client=``), else the one it logged."""
        seen = self.response.client_seen
        if seen:
            return seen
        return self.server[-1].get("client") if self.server else None

    @property
    def entry_node(self) -> int:
        """The node where the request enters the lab's redirection first."""
        if self.src.node is not None:
            return self.src.node
        if self.dst is not None and self.dst.node is not None:
            return self.dst.node
        return 1

    # ------------------------------------------------------------ telling it

    def _rule(self, key: str, rid: str) -> str:
        r = self.rulebook.get((key, rid))
        if r is None:
            return f"{key} rule {rid}"
        return f"{key} {r.table} {r.chain} rule {rid} (`{r.args}`)"

    def _route(self, name: str) -> str:
        r = self.routes.get(name)
        if not r:
            return "(no route)"
        via = f"via {r['gateway']} " if r.get("gateway") else ""
        return f"table {r.get('table', 'main')} → {via}dev {r.get('dev')}"

    def pod_of(self, leg: Leg) -> str:
        """In-pod mode: the name of the pod whose netns holds the listener of ``leg``."""
        for ep in self.lab.endpoints().values():
            if leg.netns and procs.netns_path(ep.netns) == leg.netns:
                return ep.name
        return leg.netns or "?"

    def hops(self) -> list[str]:
        if self.lab.inpod:
            return [f"{i}. {h}" for i, h in enumerate(self._inpod_hops(), 1)]
        out: list[str] = []
        if not self.legs:
            out += self._uncaptured()
        for leg in self.legs:
            out += self._leg(leg)
        out.append(self._server_line())
        return [f"{i}. {h}" for i, h in enumerate(out, 1)]

    def _tun_name(self, vni: int) -> str:
        return f"{self.tunnel or 'tunnel'} VNI {vni}"

    def _leg(self, leg: Leg) -> list[str]:
        node, zt = f"node-{leg.node}", leg.ztunnel
        out: list[str] = []
        if leg.listener == names.PORT_OUTBOUND:
            p15 = self.hits(node, "P15")
            out.append(f"{self._rule(node, 'P15')} set mark {names.hexmark(names.MARK_OUTBOUND)} on "
                       f"{p15} packet{'s' if p15 != 1 else ''}" + (" (the SYN)" if p15 == 1 else ""))
            out.append(f"{node}: ip rule {names.PRIO_OUTBOUND} (fwmark "
                       f"{names.hexmark(names.MARK_OUTBOUND)}/{names.hexmark(names.MARK_OUTBOUND)}) → "
                       f"{self._route(f'{node} out')}")
            dev, pdev, vni, zid = names.LINK_OUT, names.PLINK_OUT, names.VNI_OUT, "Z2"
        else:
            where = "locally generated" if self.src.kind == "node" and self.src.node == leg.node \
                else "no mark of ours (P1–P15 did not match)"
            out.append(f"{node}: {where} → ip rule {names.PRIO_INBOUND} → {self._route(f'{node} in')}")
            dev, pdev, vni = names.LINK_IN, names.PLINK_IN, names.VNI_IN
            zid = "Z1" if leg.listener == names.PORT_HBONE else "Z3"
        sent, got = self.tcp_on(node, dev, "out"), self.tcp_on(zt, pdev, "in")
        out.append(f"tunnel: {sent} TCP packet{'s' if sent != 1 else ''} into {dev} "
                   f"({self._tun_name(vni)}) → {got} out of {pdev} in {zt}")
        z = self.hits(zt, zid)
        out.append(f"{self._rule(zt, zid)} matched {z} packet{'s' if z != 1 else ''} → TPROXY to "
                   f"listener {leg.listener}, original destination {leg.orig_dst} (client {leg.peer})")
        out += self._upstream(leg, node, zt)
        return out

    def _upstream(self, leg: Leg, node: str, zt: str) -> list[str]:
        if leg.upstream is None:
            return [f"{zt}: the stand-in logs and closes connections on {leg.listener} "
                    "(it does not speak HBONE)"]
        peer_ip = leg.peer.rpartition(":")[0]
        if leg.upstream_error:
            why = ""
            if any(peer_ip == n.internal_ip for n in self.lab.node_list()):
                why = (" — by design: the server's SYN-ACK goes to a node address, which the "
                       "node's `local` table (priority 0) claims before rule 102, so the node "
                       "answers it with a RST (kernel-notes.md §3, scenario 12)")
            return [f"{zt}: connecting to {leg.orig_dst} from {peer_ip} failed: "
                    f"{leg.upstream_error}; the client connection is reset{why}"]
        local = leg.upstream_local or "?"
        kept = local.rpartition(":")[0] == peer_ip
        p10 = self.hits(node, "P10")
        ct = self.ct.get(f"{leg.ztunnel} upstream")
        ct_text = f", ct mark {names.hexmark(ct)}" if ct else ""
        out = [f"{zt}: connects to {leg.orig_dst} from {local} "
               f"({'original source kept' if kept else 'its own address, not the client'}) → "
               f"{self._rule(node, 'P10')} marked {p10} packet{'s' if p10 != 1 else ''} "
               f"{names.hexmark(names.MARK_PROXY)}{ct_text} → ip rule {names.PRIO_SKIP} → main table"]
        p8, z4 = self.hits(node, "P8"), self.hits(zt, "Z4")
        veth = self.tcp_on(node, ZTUNNEL_VETH)
        client_ct = self.ct.get(f"{node} client")
        ct_client = (f"; client connection ct mark {names.hexmark(client_ct)}"
                     if client_ct and leg.node == self.entry_node else "")
        out.append(f"return traffic: {node} P8 set {names.hexmark(names.MARK_PROXYRET)} on {p8} "
                   f"packet{'s' if p8 != 1 else ''} → ip rule {names.PRIO_PROXYRET} → table "
                   f"{names.TABLE_PROXY} → {ZTUNNEL_VETH}; {zt} Z4 set "
                   f"{names.hexmark(names.ZT_MARK_ORGSRC)} on {z4} → local socket "
                   f"({veth} TCP packets on {ZTUNNEL_VETH} in all{ct_client})")
        return out

    def _uncaptured(self) -> list[str]:
        k = self.entry_node
        node = f"node-{k}"
        out = []
        o1 = self.hits(node, "O1")
        if o1:
            out.append(f"{self._rule(node, 'O1')} set the whole mark to "
                       f"{names.hexmark(names.MARK_CONNSKIP)} on {o1} packet{'s' if o1 != 1 else ''} "
                       f"(node-originated, source HostIP: the kubelet-probe bypass) → ip rule "
                       f"{names.PRIO_SKIP} → {self._route(f'{node} plain')}")
        else:
            out.append(f"{node}: no mark of ours (P8/P10/P15 matched "
                       f"{self.hits(node, 'P8')}/{self.hits(node, 'P10')}/{self.hits(node, 'P15')}) "
                       f"→ {self._route(f'{node} plain')}")
        tun = self.tunnel_tcp(k)
        out.append(f"not captured: no ztunnel accepted it; TCP packets on {names.LINK_IN}/"
                   f"{names.LINK_OUT}/{ZTUNNEL_VETH}: {tun[names.LINK_IN]}/{tun[names.LINK_OUT]}/"
                   f"{self.tcp_on(node, ZTUNNEL_VETH)}")
        return out

    # ------------------------------------------------------------ in-pod mode

    def _find(self, key: str, table: str, chain: str, needle: str) -> Optional[str]:
        """The id of the rule of ``key``'s ``table chain`` whose text contains ``needle``."""
        for (k, rid), r in self.rulebook.items():
            if k == key and r.table == table and r.chain == chain and needle in r.args:
                return rid
        return None

    def _counted(self, key: str, rid: Optional[str], what: str = "packet") -> str:
        n = self.hits(key, rid) if rid else 0
        return f"{n} {what}{'s' if n != 1 else ''}"

    def _inpod_hops(self) -> list[str]:
        out: list[str] = []
        if not self.legs:
            out += self._inpod_uncaptured()
        for leg in self.legs:
            out += self._inpod_leg(leg)
        zt = sum(self.tcp_on(f"node-{n.index}", ZTUNNEL_VETH) for n in self.lab.node_list())
        out.append(f"no tunnel, no capture rule on the node: {zt} TCP packet{'s' if zt != 1 else ''} "
                   f"on {ZTUNNEL_VETH} (the ztunnel pod's own interface)")
        out.append(self._server_line())
        return out

    def _inpod_leg(self, leg: Leg) -> list[str]:
        pod, zt = self.pod_of(leg), leg.ztunnel
        mark = names.hexmark(names.INPOD_MARK)
        out: list[str] = []
        if leg.listener == names.PORT_OUTBOUND:
            rid = self._find(pod, "nat", names.INPOD_CHAIN_OUTPUT, f"--to-ports {names.PORT_OUTBOUND}")
            out.append(f"{self._rule(pod, rid or '?')} matched {self._counted(pod, rid)} (nat sees the "
                       f"first packet of a connection) → REDIRECT to 127.0.0.1:{leg.listener} inside "
                       f"{pod}'s netns: nothing left the pod")
        elif leg.listener == names.PORT_INBOUND:
            rid = self._find(pod, "nat", names.INPOD_CHAIN_PRERT, f"--to-ports {names.PORT_INBOUND}")
            eth0 = self.tcp_on(pod, "eth0", "in")
            out.append(f"arrived on {pod}'s eth0 ({eth0} TCP packet{'s' if eth0 != 1 else ''} in); "
                       f"{self._rule(pod, rid or '?')} matched {self._counted(pod, rid)} → REDIRECT "
                       f"to port {leg.listener} inside {pod}'s netns")
        else:
            out.append(f"{pod}: destination port {leg.listener} is not redirected (`! --dport "
                       f"{names.PORT_HBONE}`): it reaches ztunnel's own listener inside {pod}'s netns")
        how = "SO_ORIGINAL_DST" if leg.listener != names.PORT_HBONE else "its own address"
        out.append(f"{zt}: listener {leg.listener} inside {pod}'s netns (SO_MARK {mark}) accepted "
                   f"client {leg.peer}, original destination {leg.orig_dst} ({how})")
        if leg.upstream is None:
            out.append(f"{zt}: the stand-in logs and closes connections on {leg.listener} "
                       "(it does not speak HBONE)")
            return out
        if leg.upstream_error:
            out.append(f"{zt}: connecting to {leg.orig_dst} from inside {pod}'s netns failed: "
                       f"{leg.upstream_error}; the client connection is reset")
            return out
        local = leg.upstream_local or "?"
        kept = local.rpartition(":")[0] == leg.peer.rpartition(":")[0]
        mpr = self._find(pod, "mangle", names.INPOD_CHAIN_PRERT, "CONNMARK --set-xmark")
        mout = self._find(pod, "mangle", names.INPOD_CHAIN_OUTPUT, "--restore-mark")
        src = ("the client's address (original source kept)" if kept and leg.listener == names.PORT_INBOUND
               else "the pod's own address")
        out.append(f"{zt}: connects to {leg.orig_dst} from {local}, {src}, inside {pod}'s netns "
                   f"with SO_MARK {mark}: the pod's REDIRECT rules skip marked packets (`! --mark "
                   f"{mark}/{names.hexmark(names.INPOD_MASK)}`)")
        ct = self.ct.get(f"{pod} upstream")
        ct_text = f", ct mark {names.hexmark(ct)}" if ct else ""
        out.append(f"{pod}: {mpr or 'MPR'} set connmark {names.hexmark(names.INPOD_TPROXY_MARK)} on "
                   f"{self._counted(pod, mpr)} (ztunnel's own packets looping through lo), "
                   f"{mout or 'MOUT'} restored it on {self._counted(pod, mout)}{ct_text} → ip rule "
                   f"{names.INPOD_PRIO} → table {names.INPOD_TABLE} (local): replies reach ztunnel's socket")
        return out

    def _inpod_uncaptured(self) -> list[str]:
        k = self.entry_node
        node = f"node-{k}"
        out: list[str] = []
        hpost = self._find(node, "nat", names.INPOD_CHAIN_POSTRT, "SNAT")
        n = self.hits(node, hpost) if hpost else 0
        dst = self.dst.name if self.dst else self.dst_ip
        if n:
            out.append(f"{self._rule(node, hpost)} matched {n} packet{'s' if n != 1 else ''} → source "
                       f"{names.INPOD_PROBE_SNAT_V4} (a node socket to an enrolled pod: the probe bypass)")
            npr = self._find(dst, "nat", names.INPOD_CHAIN_PRERT, f"-s {names.INPOD_PROBE_SNAT_V4}")
            if npr:
                out.append(f"{self._rule(dst, npr)} matched {self._counted(dst, npr)} → ACCEPT: not "
                           "redirected")
        else:
            out.append(f"{node}: no rule of ours matched (HPOST1 {n}); routed by the main table")
        out.append("not captured: no ztunnel listener accepted it")
        return out

    def _server_line(self) -> str:
        who = self.dst.name if self.dst else f"{self.dst_ip}:{self.port}"
        seen = self.server_client
        if seen is None:
            err = self.response.error or f"HTTP {self.response.status}"
            return f"{who}: the server logged no request ({err})"
        src_ip = self.response.local.rpartition(":")[0] if self.response.local else None
        note = ""
        if src_ip and seen.rpartition(":")[0] == src_ip:
            note = " (the client's own address)"
        return f"{who} saw client={seen}{note}"

    def summary(self) -> dict:
        """The observations as data (for ``-o json`` and tests)."""
        return {
            "from": self.src.name, "to": f"{self.dst_ip}:{self.port}", "path": self.path,
            "status": self.response.status, "error": self.response.error,
            "local": self.response.local, "server_client": self.server_client,
            "legs": [{"ztunnel": l.ztunnel, "listener": l.listener, "orig_dst": l.orig_dst,
                      "peer": l.peer, "upstream_local": l.upstream_local,
                      "upstream_error": l.upstream_error,
                      **({"pod": self.pod_of(l)} if self.lab.inpod else {})} for l in self.legs],
            "rule_hits": {f"{k} {rid}": v for (k, rid), v in sorted(self.rules.items()) if v},
            "tcp_packets": {f"{k} {dev} {d}": v for (k, dev, d), v in sorted(self.tcp.items()) if v},
            "ct_marks": {k: v for k, v in self.ct.items() if v is not None},
            "hops": self.hops(),
        }


def _delta(after: dict, before: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def _legs(rec: Record, before: Snapshot) -> list[Leg]:
    legs: list[Leg] = []
    for name, path in sorted(rec.logs.items()):
        if not name.startswith("ztunnel-"):
            continue
        new = ztunnel_mod.read_log(path)[before.zt_events.get(name, 0):]
        ups = {e["conn"]: e for e in new if e.get("event") == "upstream"}
        for e in new:
            if e.get("event") == "accept":
                legs.append(Leg(name, int(name.rpartition("-")[2]), e, ups.get(e["conn"])))
    legs.sort(key=lambda l: l.accept.get("ts", 0))
    return legs


def trace_request(rec: Record, src: str, dst: str, port: int, path: str = "/",
                  bind: Optional[str] = None, timeout: float = 5.0,
                  observer: Optional[Observer] = None) -> Trace:
    """Send ``GET path`` from ``src`` to ``dst:port`` and observe what it did."""
    lab = rec.lab
    src_ep = lab.endpoint(src)
    try:
        dst_ep: Optional[Endpoint] = lab.endpoint(dst)
        dst_ip = dst_ep.ip
    except LabError:
        try:
            dst_ip = str(ipaddress.IPv4Address(dst))
        except ValueError:
            raise LabError(f"{dst!r} is neither a lab name nor an IPv4 address") from None
        dst_ep = None
    own = observer is None
    obs = observer or Observer(rec)
    try:
        obs.rulebook()
        before = obs.snapshot()
        resp = client.request(procs.netns_path(src_ep.netns), dst_ip, port, path, bind=bind,
                              timeout=timeout)
        time.sleep(SETTLE)
        after = obs.snapshot()
        legs = _legs(rec, before)
        srv = server_mod.read_log(rec.logs["servers"])[before.server_events:] \
            if "servers" in rec.logs else []
        trace = Trace(lab=lab, tunnel=rec.tunnel, src=src_ep, dst_ip=dst_ip, port=port, dst=dst_ep,
                      path=path, bind=bind, response=resp, rules=_delta(after.rules, before.rules),
                      tcp=_delta(after.tcp, before.tcp), legs=legs, server=srv,
                      rulebook=obs.rulebook())
        _kernel_views(trace, obs)
        return trace
    finally:
        if own:
            obs.close()


def _kernel_views(t: Trace, obs: Observer) -> None:
    """conntrack marks and ``ip route get`` answers that back the hops."""
    if t.lab.inpod:
        _kernel_views_inpod(t, obs)
        return
    src_ip = t.bind or t.src.ip
    k = t.entry_node
    node = f"node-{k}"
    t.ct[f"{node} client"] = obs.conntrack_mark(node, t.response.local)
    iif = None
    if t.src.kind in ("pod", "ztunnel") and t.src.node == k:
        iif = t.src.veth
    elif t.src.kind in ("external",) or (t.src.kind == "node" and t.src.node != k):
        iif = "eth0"
    frm = src_ip if iif else t.bind
    for leg in t.legs:
        lnode = f"node-{leg.node}"
        peer_ip = leg.peer.rpartition(":")[0]
        dst_ip = leg.orig_dst.rpartition(":")[0]
        local = leg.node == k
        leg_iif = iif if local else "eth0"
        leg_from = (frm if local else peer_ip) if leg_iif else (t.bind if local else None)
        if leg.listener == names.PORT_OUTBOUND:
            t.routes[f"{lnode} out"] = obs.route_get(lnode, dst_ip, leg_from, leg_iif, names.MARK_OUTBOUND)
        else:
            t.routes[f"{lnode} in"] = obs.route_get(lnode, dst_ip, leg_from, leg_iif)
        if leg.upstream_local:
            t.ct[f"{leg.ztunnel} upstream"] = obs.conntrack_mark(lnode, leg.upstream_local)
    if not t.legs:
        mark = names.MARK_CONNSKIP if t.hits(node, "O1") else None
        t.routes[f"{node} plain"] = obs.route_get(node, t.dst_ip, frm, iif, mark)


def _kernel_views_inpod(t: Trace, obs: Observer) -> None:
    """In-pod mode: the ct mark of each ztunnel upstream connection, in the pod netns it was
    made in (0x111 once the pod's mangle rule saw ztunnel's marked packets)."""
    for leg in t.legs:
        pod = t.pod_of(leg)
        if leg.upstream_local and pod in obs.hosts:
            t.ct[f"{pod} upstream"] = obs.conntrack_mark(pod, leg.upstream_local)
