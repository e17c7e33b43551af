"""The packet tracer against the reference walks (legacy-mode.md §5, inpod-mode.md §2.1-§2.2) and
the lab scenarios (kernel-notes.md §11), in both modes.

Hops are compared as compact signatures, one string per hop:
  "<netns> <rule id> [<mark before>><mark after>] [ct=<ctmark>]"   a rule that matched
  "<netns> rule <prio>[><goto prio>] table <t> <dev|local> [(miss <prio>)]"   a routing decision
  "<netns> <dev>><netns>:<dev>"                                   a veth / segment / lo crossing
  "<netns> tunnel <link> vni <vni> <outer src>><outer dst>:<port>"   GENEVE encapsulation
  "<netns> decap <link>"                                          GENEVE decapsulation
  "<netns> ct <ctmark>"                                            a known connection with a ctmark
  "<netns> socket <port|name> [orig <ip:port>]"                    delivery
  "<netns> drop" / "<netns> nat"
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from helpers import values_with
from noderedirect import names, nft, desired
from noderedirect.model import IptRule
from noderedirect.topology_model import SCENARIOS, build, lab_values, scenario
from noderedirect.trace import Hop, TraceError, ZtunnelModel, compare, trace, trace_scenario
from noderedirect.trace_rules import compile_rules


def sig(h: Hop) -> str:
    ns = h.netns
    if h.rule:
        s = f"{ns} {h.rule}"
        if h.mark_before != h.mark_after:
            s += f" {h.mark_before:#x}>{h.mark_after:#x}"
        if h.verdict and h.verdict.startswith("CONNMARK"):
            s += f" ct={h.ctmark:#x}"
        return s
    if h.stage == "routing":
        r = h.route
        goto = [t.split(":")[0] for t in r.tried if "goto" in t]
        misses = [t.split(":")[0] for t in r.tried if "no route" in t]
        lead = f"rule {goto[0]}>{r.priority}" if goto else f"rule {r.priority}"
        end = "local" if r.type == "local" else r.dev
        return f"{ns} {lead} table {r.table} {end}" + (f" (miss {','.join(misses)})" if misses else "")
    if h.stage in ("veth", "segment", "lo"):
        return f"{ns} {h.device}>{h.to_netns}:{h.to_device}"
    if h.stage == "tunnel":
        t = h.tunnel
        return f"{ns} tunnel {t.link} vni {t.vni} {t.outer_src}>{t.outer_dst}:{t.port}"
    if h.stage == "decap":
        return f"{ns} decap {h.tunnel.peer_link}"
    if h.stage == "conntrack":
        return f"{ns} ct {h.ctmark:#x}"
    if h.stage == "socket":
        s = h.socket
        return f"{ns} socket {s.port or s.name}" + (f" orig {s.orig_dst}" if s.orig_dst and s.owner == "ztunnel" else "")
    return f"{ns} {h.stage.lower()}"


def sigs(t, leg: int, kind: str) -> list[str]:
    return [sig(h) for h in t.packet(leg, kind).hops]


@pytest.fixture(scope="module")
def legacy():
    v = lab_values()
    return {s.name: trace_scenario(v, "legacy", s.name) for s in SCENARIOS}


@pytest.fixture(scope="module")
def inpod():
    v = lab_values()
    return {s.name: trace_scenario(v, "inpod", s.name) for s in SCENARIOS}


# ---------------------------------------------------------------- legacy: the walks hop by hop

S1_FIRST = [  # legacy-mode.md §5.1 steps 1-6 (same node: §5.4 "steps 1-6 as above")
    "sleep rule 32766 table main eth0",
    "sleep eth0>node:veth-sleep",
    "node P15 0x0>0x100",                      # tcp, src in ztunnel-pods-ips
    "node N1",                                 # nat: skip kube-proxy DNAT
    "node rule 101 table 101 istioout",
    "node FF1",                                # filter FORWARD ACCEPT (1.19+)
    "node NP1",                                # nat POSTROUTING ACCEPT
    "node tunnel istioout vni 1001 10.244.1.1>10.244.1.2:6081",
    "node rule 101 table 101 veth-zt",         # the outer packet keeps 0x100: the ZT_IP route
    "node NP1",                                # NP1 again for the outer packet
    "node veth-zt>ztunnel:eth0",
    "ztunnel rule 0 table local local",
    "ztunnel decap pistioout",
    "ztunnel Z2 0x0>0x400",
    "ztunnel rule 20000 table 100 local",
    "ztunnel socket 15001 orig 10.244.1.6:8000",
]
S1_REPLY = [  # ztunnel's SYN-ACK with the spoofed source 10.244.1.6 (§5.2 R6, kernel-notes §3)
    "ztunnel rule 32766 table main eth0",
    "ztunnel eth0>node:veth-zt",
    "node P10 0x0>0x210",
    "node P11",
    "node rule 100>32766 table main veth-sleep",
    "node F2 ct=0x210",
    "node veth-sleep>sleep:eth0",
    "sleep rule 0 table local local",
    "sleep socket client",
]
S1_NEXT = [  # §5.3: the connmark path, no tunnel
    "sleep rule 32766 table main eth0",
    "sleep eth0>node:veth-sleep",
    "node ct 0x210",
    "node P8 0x0>0x40",
    "node P9",
    "node rule 102 table 102 veth-zt",
    "node veth-zt>ztunnel:eth0",
    "ztunnel Z4 0x0>0x4d3",
    "ztunnel rule 20003 table 100 local",
    "ztunnel socket 15001 orig 10.244.1.6:8000",
]
S1_UPSTREAM_FIRST = [  # §5.4: ztunnel connects to H from source S
    "ztunnel rule 32766 table main eth0",
    "ztunnel eth0>node:veth-zt",
    "node P10 0x0>0x210",
    "node P11",
    "node rule 100>32766 table main veth-httpbin",
    "node F2 ct=0x210",
    "node veth-httpbin>httpbin:eth0",
    "httpbin rule 0 table local local",
    "httpbin socket 8000",
]
S1_UPSTREAM_REPLY = [  # §5.4: httpbin's reply -> P8 -> 0x040 -> table 102 -> Z4 -> local
    "httpbin rule 32766 table main eth0",
    "httpbin eth0>node:veth-httpbin",
    "node ct 0x210",
    "node P8 0x0>0x40",
    "node P9",
    "node rule 102 table 102 veth-zt",
    "node veth-zt>ztunnel:eth0",
    "ztunnel Z4 0x0>0x4d3",
    "ztunnel rule 20003 table 100 local",
    "ztunnel socket ztunnel upstream",
]


@pytest.mark.parametrize("leg,kind,expected", [
    (1, "first", S1_FIRST), (1, "reply", S1_REPLY), (1, "next", S1_NEXT),
    (2, "first", S1_UPSTREAM_FIRST), (2, "reply", S1_UPSTREAM_REPLY),
])
def test_sleep_to_httpbin_legacy_hop_by_hop(legacy, leg, kind, expected):
    assert sigs(legacy["sleep-httpbin"], leg, kind) == expected


def test_node_probe_from_hostip_is_exempted_by_o1(legacy):
    t = legacy["node-httpbin"]
    assert sigs(t, 1, "first") == [
        "node rule 103 table 100 istioin",         # before mangle OUTPUT: table 100 would capture
        "node O1 0x0>0x220",                       # -s HostIP, tcp, local socket, dst in the set
        "node rule 100>32766 table main veth-httpbin",   # re-route on the mark change
        "node veth-httpbin>httpbin:eth0",
        "httpbin rule 0 table local local",
        "httpbin socket 8000",
    ]
    # kernel-notes §3: the reply hits the ipset rule (0x100), but the local table wins
    assert sigs(t, 1, "reply") == [
        "httpbin rule 32766 table main eth0",
        "httpbin eth0>node:veth-httpbin",
        "node P15 0x0>0x100",
        "node rule 0 table local local",
        "node socket client",
    ]
    # the whole mark is replaced (0x220/0xffffffff), and no CONNMARK save happens in OUTPUT
    o1 = next(h for h in t.packet(1, "first").hops if h.rule == "O1")
    assert (o1.verdict, o1.ctmark) == ("MARK 0x220", 0)


def test_plain_to_plain_misses_table_100_and_is_untouched(legacy):
    t = legacy["plain-plain"]
    assert sigs(t, 1, "first") == [
        "plain-a rule 32766 table main eth0",
        "plain-a eth0>node:veth-plain-a",
        "node rule 32766 table main veth-plain-b (miss 103)",
        "node veth-plain-b>plain-b:eth0",
        "plain-b rule 0 table local local",
        "plain-b socket 8000",
    ]
    assert t.rule_hits() == {}
    assert len(t.legs) == 1 and t.capture is None and t.ok


def test_cross_node_walk_matches_section_5_1(legacy):
    t = legacy["sleep-httpbin-cross-node"]
    assert t.capture.port == names.PORT_OUTBOUND and t.capture.netns == "ztunnel-1"
    assert t.capture.orig_dst == "10.244.2.6:8000"
    # steps 8-14: the HBONE leg, spoofed source S, through node-1's main table into node-2's istioin
    assert sigs(t, 2, "first") == [
        "ztunnel-1 rule 32766 table main eth0",
        "ztunnel-1 eth0>node-1:veth-zt",
        "node-1 P10 0x0>0x210",
        "node-1 P11",
        "node-1 rule 100>32766 table main eth0",
        "node-1 F2 ct=0x210",
        "node-1 eth0>node-2:eth0",
        "node-2 rule 103 table 100 istioin",
        "node-2 tunnel istioin vni 1000 10.244.2.1>10.244.2.2:6081",
        "node-2 rule 103 table 100 veth-zt",
        "node-2 veth-zt>ztunnel-2:eth0",
        "ztunnel-2 rule 0 table local local",
        "ztunnel-2 decap pistioin",
        "ztunnel-2 Z1 0x0>0x400",
        "ztunnel-2 rule 20000 table 100 local",
        "ztunnel-2 socket 15008 orig 10.244.2.6:15008",
    ]
    # steps 15-17: ztunnel-2 connects to H:8000 from S; httpbin sees the client's address
    assert t.legs[2].tuple == "10.244.1.5:41001 → 10.244.2.6:8000 tcp"
    assert "node-2 P10 0x0>0x210" in sigs(t, 3, "first")
    assert t.server.netns == "httpbin-2" and t.server.remote.startswith("10.244.1.5:")
    # R1/R2: httpbin's SYN-ACK goes back to ztunnel-2 through node-2's table 102
    assert sigs(t, 3, "reply")[3:7] == ["node-2 P8 0x0>0x40", "node-2 P9",
                                        "node-2 rule 102 table 102 veth-zt", "node-2 veth-zt>ztunnel-2:eth0"]
    assert t.ok


def test_cross_node_reply_path_r3_r5_exactly(legacy):
    hops = sigs(legacy["sleep-httpbin-cross-node"], 2, "reply")
    assert hops == [
        "ztunnel-2 rule 32766 table main eth0",
        "ztunnel-2 eth0>node-2:veth-zt",
        "node-2 P10 0x0>0x210",
        "node-2 P11",
        "node-2 rule 100>32766 table main eth0",
        "node-2 F2 ct=0x210",
        "node-2 eth0>node-1:eth0",
        "node-1 ct 0x210",
        "node-1 P8 0x0>0x40",
        "node-1 P9",
        "node-1 rule 102 table 102 veth-zt",
        "node-1 veth-zt>ztunnel-1:eth0",
        "ztunnel-1 Z4 0x0>0x4d3",
        "ztunnel-1 rule 20003 table 100 local",
        "ztunnel-1 socket ztunnel upstream",
    ]


# ---------------------------------------------------------------- legacy: every lab scenario (kernel-notes §11)

# scenario -> (ztunnel listener of the client's connection | None, original destination,
#              what the server sees as client | None (no server reached), tunnel of the first packet,
#              rules that must be hit on the first packet of leg 1, ok)
LEGACY_EXPECT = {
    "sleep-httpbin": (15001, "10.244.1.6:8000", "10.244.1.5", "istioout", {"P15", "N1", "FF1", "NP1", "Z2"}, True),
    "sleep-plain": (15001, "10.244.1.7:8000", "10.244.1.5", "istioout", {"P15", "N1", "FF1", "NP1", "Z2"}, True),
    "sleep-external": (15001, "172.18.0.3:8000", "10.244.1.5", "istioout", {"P15", "N1", "FF1", "NP1", "Z2"}, True),
    "plain-httpbin": (15006, "10.244.1.6:8000", "10.244.1.7", "istioin", {"Z3"}, True),
    "external-httpbin": (15006, "10.244.1.6:8000", "172.18.0.3", "istioin", {"Z3"}, True),
    "node-httpbin": (None, None, "10.244.1.1", None, {"O1"}, True),
    "plain-plain": (None, None, "10.244.1.7", None, set(), True),
    "external-plain": (None, None, "172.18.0.3", None, set(), True),
    "sleep-httpbin-4mb": (15001, "10.244.1.6:8000", "10.244.1.5", "istioout", {"P15", "N1", "FF1", "NP1", "Z2"}, True),
    "external-httpbin-4mb": (15006, "10.244.1.6:8000", "172.18.0.3", "istioin", {"Z3"}, True),
    "external-httpbin-hbone": (15008, "10.244.1.6:15008", None, "istioin", {"Z1"}, True),
    # the upstream leg's SYN-ACK to 172.18.0.2 is claimed by the node's local table: RST
    "node-internal-httpbin": (15006, "10.244.1.6:8000", "172.18.0.2", "istioin", {"Z3"}, False),
    "sleep-httpbin-cross-node": (15001, "10.244.2.6:8000", "10.244.1.5", "istioout", {"P15", "N1", "FF1", "NP1", "Z2"}, True),
}


# TCP packets of the traced first/reply/next packets that cross istioin/istioout, where not 1 or 0
TUNNEL_TCP = {"node-internal-httpbin": 2, "sleep-httpbin-cross-node": 2}


@pytest.mark.parametrize("name", [s.name for s in SCENARIOS])
def test_every_scenario_legacy(legacy, name):
    listener, orig, seen, tunnel, rules, ok = LEGACY_EXPECT[name]
    t = legacy[name]
    cap = t.capture
    assert (cap.port if cap else None, cap.orig_dst if cap else None) == (listener, orig)
    srv = t.server
    assert (srv.remote.rsplit(":", 1)[0] if srv else None) == seen
    first = t.packet(1, "first")
    assert [h.device for h in first.hops if h.stage == "tunnel"] == ([tunnel] if tunnel else [])
    assert {h.rule for h in first.hops if h.rule} == rules
    assert t.ok is ok
    # only the connection-opening packet crosses a tunnel (kernel-notes §3): one per captured
    # connection; cross-node: one per node; scenario 12: every client packet (OUTPUT never
    # restores the ctmark)
    tunnel_tcp = {k: v for k, v in t.devices(proto="tcp").items() if k[1] in (names.LINK_IN, names.LINK_OUT)}
    assert sum(tunnel_tcp.values()) == TUNNEL_TCP.get(name, 1 if tunnel else 0)


@pytest.mark.parametrize("name", ["node-httpbin", "plain-plain", "external-plain"])
def test_untouched_scenarios_never_see_veth_zt_or_capture_marks(legacy, name):
    t = legacy[name]
    devices = {dev for (_ns, dev) in t.devices()}
    assert not devices & {"veth-zt", names.LINK_IN, names.LINK_OUT}
    assert not {r for (_ns, r) in t.rule_hits()} & {"P15", "P10", "P8"} or name == "node-httpbin"
    if name == "node-httpbin":   # only the reply hits P15 (and the local table ignores it)
        assert {r for (_ns, r) in t.rule_hits(["first", "next"])} == {"O1"}


def test_scenario_12_fails_where_the_kernel_fails(legacy):
    t = legacy["node-internal-httpbin"]
    # every client packet crosses istioin (OUTPUT never restores the ctmark)
    assert [h.device for h in t.packet(1, "next").hops if h.stage == "tunnel"] == ["istioin"]
    bad = t.packet(2, "reply")
    assert (bad.outcome, bad.netns) == ("reset", "node")
    assert sigs(t, 2, "reply")[-3:] == ["node P9", "node rule 0 table local local", "node drop"]
    assert "fails: leg 2 reply packet reset in node" in t.verdict()
    # without original-source spoofing the upstream comes from ztunnel's own address and works
    fixed = trace_scenario(lab_values(), "legacy", "node-internal-httpbin",
                           zt=ZtunnelModel(original_source=False))
    assert fixed.ok and fixed.server.remote.startswith("10.244.1.2:")


def test_scenario_11_hbone_ends_at_15008_without_an_upstream(legacy):
    t = legacy["external-httpbin-hbone"]
    assert len(t.legs) == 1 and "CONNECT target" in t.notes[0]
    assert "ztunnel Z1 0x0>0x400" in sigs(t, 1, "first")


def test_ctmark_of_the_captured_connection_is_0x210_mark_528(legacy):
    """kernel-notes §11 scenario 1: conntrack shows mark=528 on the client's connection."""
    t = legacy["sleep-httpbin"]
    f2 = [h for h in t.packet(1, "reply").hops if h.rule == "F2"]
    assert [h.ctmark for h in f2] == [528]


# ---------------------------------------------------------------- legacy eras and failure modes


def test_1_19_o1_rewrites_the_outer_packet_mark():
    """§5.1 step 5: up to 1.19, O1 (-s HostIP) matches the GENEVE outer packet: 0x220, rule 100,
    main table, still veth-zt."""
    t = trace_scenario(values_with(istioVersion="1.19"), "legacy", "sleep-httpbin")
    hops = sigs(t, 1, "first")
    i = hops.index("node tunnel istioout vni 1001 10.244.1.1>10.244.1.2:6081")
    assert hops[i + 1:i + 5] == ["node rule 101 table 101 veth-zt", "node O1 0x100>0x220",
                                 "node rule 100>32766 table main veth-zt", "node veth-zt>ztunnel:eth0"]
    assert t.ok


def test_1_18_has_no_filter_forward_rule():
    t = trace_scenario(values_with(istioVersion="1.18"), "legacy", "sleep-httpbin")
    assert "FF1" not in {h.rule for h in t.hops()}
    assert t.capture.port == 15001


def test_wrong_tunnel_remote_is_dropped_at_decap():
    """W13 / kernel-notes §3: the ztunnel side's remote must equal the node's outer source."""
    t = trace_scenario(values_with(**{"ztunnel.tunnelHostIP": "172.18.0.2"}), "legacy", "sleep-httpbin")
    first = t.packet(1, "first")
    assert (first.outcome, first.netns) == ("dropped", "ztunnel")
    drop = first.hops[-1]
    assert drop.stage == "drop" and "outer source 10.244.1.1 ≠ remote 172.18.0.2" in drop.note
    assert t.capture is None and not t.ok


def test_table_101_without_the_ztunnel_route_loops_into_istioout():
    """kernel-notes §3: the 10.244.1.2 route in table 101 is required."""
    topo = build(lab_values(), "legacy")
    node = topo.get("node")
    routes = tuple(r for r in node.routes if not (r.table == 101 and r.dst == "10.244.1.2/32"))
    topo = dataclasses.replace(topo, netns=tuple(
        dataclasses.replace(n, routes=routes) if n.name == "node" else n for n in topo.netns))
    t = trace(topo, "10.244.1.5", "10.244.1.6", 8000)
    first = t.packet(1, "first")
    assert first.outcome == "dropped" and "routed into itself" in first.reason
    assert first.hops[-1].route.dev == "istioout"


def test_without_a_transparent_listener_tproxy_drops():
    topo = build(lab_values(), "legacy")
    zt = topo.get("ztunnel")
    no_listeners = dataclasses.replace(zt, listeners=())
    topo = dataclasses.replace(topo, netns=tuple(no_listeners if n.name == "ztunnel" else n for n in topo.netns))
    t = trace(topo, "10.244.1.5", "10.244.1.6", 8000)
    first = t.packet(1, "first")
    assert first.outcome == "dropped" and first.hops[-1].rule == "Z2"
    assert "no transparent socket" in first.hops[-1].note


def test_udp_is_conn_skipped_and_never_captured():
    t = trace(build(lab_values(), "legacy"), "10.244.1.5", "10.244.1.6", 8000, proto="udp")
    assert sigs(t, 1, "first")[2:5] == ["node P13 0x0>0x220", "node P14",
                                        "node rule 100>32766 table main veth-httpbin"]
    assert "node F1 ct=0x220" in sigs(t, 1, "first")
    # nothing listens on udp/8000 in the lab: ICMP port unreachable, no reply
    assert t.packet(1, "first").outcome == "unreachable"


# ---------------------------------------------------------------- in-pod mode


def test_inpod_sleep_to_httpbin_hop_by_hop(inpod):
    t = inpod["sleep-httpbin"]
    assert sigs(t, 1, "first") == [
        "sleep rule 32766 table main eth0",
        "sleep NOUT4",                              # nat OUTPUT REDIRECT --to-ports 15001
        "sleep rule 0 table local local",           # re-route to 127.0.0.1
        "sleep lo>sleep:lo",
        "sleep rule 0 table local local",
        "sleep socket 15001 orig 10.244.1.6:8000",  # SO_ORIGINAL_DST from conntrack
    ]
    # the listener's SYN-ACK carries SO_MARK 0x539 across lo: the connection gets connmark 0x111
    assert "sleep MPR1 ct=0x111" in sigs(t, 1, "reply")
    # later app packets: mark restored to 0x111, rule 32764 -> table 100 -> local
    assert sigs(t, 1, "next")[1:5] == ["sleep ct 0x111", "sleep MOUT1 0x0>0x111 ct=0x111",
                                       "sleep rule 32764 table 100 local", "sleep nat"]
    # HBONE leg: ztunnel's own socket (0x539) is not redirected; 15008 is not redirected either
    assert sigs(t, 2, "first") == [
        "sleep rule 32766 table main eth0",
        "sleep eth0>node:veth-sleep",
        "node rule 32766 table main veth-httpbin",
        "node veth-httpbin>httpbin:eth0",
        "httpbin rule 0 table local local",
        "httpbin socket 15008 orig 10.244.1.6:15008",
    ]
    # ztunnel in httpbin's netns connects with the original source over lo; connmark 0x111
    assert sigs(t, 3, "first") == [
        "httpbin rule 0 table local local",
        "httpbin NOUT3",
        "httpbin lo>httpbin:lo",
        "httpbin MPR1 ct=0x111",
        "httpbin rule 0 table local local",
        "httpbin socket 8000",
    ]
    # the app's reply: restore 0x111 -> rule 32764 -> table 100 local -> ztunnel's socket
    assert sigs(t, 3, "reply") == [
        "httpbin rule 32766 table main eth0",
        "httpbin ct 0x111",
        "httpbin MOUT1 0x0>0x111 ct=0x111",
        "httpbin rule 32764 table 100 local",
        "httpbin lo>httpbin:lo",
        "httpbin rule 32764 table 100 local",
        "httpbin socket ztunnel upstream",
    ]
    assert t.server.remote.startswith("10.244.1.5:")


# scenario -> (netns of the capturing listener, port, orig dst, server sees)
INPOD_EXPECT = {
    "sleep-httpbin": ("sleep", 15001, "10.244.1.6:8000", "10.244.1.5"),
    "sleep-plain": ("sleep", 15001, "10.244.1.7:8000", "10.244.1.5"),
    "sleep-external": ("sleep", 15001, "172.18.0.3:8000", "10.244.1.5"),
    "plain-httpbin": ("httpbin", 15006, "10.244.1.6:8000", "10.244.1.7"),
    "external-httpbin": ("httpbin", 15006, "10.244.1.6:8000", "172.18.0.3"),
    "node-httpbin": (None, None, None, names.INPOD_PROBE_SNAT_V4),
    "plain-plain": (None, None, None, "10.244.1.7"),
    "external-plain": (None, None, None, "172.18.0.3"),
    "sleep-httpbin-4mb": ("sleep", 15001, "10.244.1.6:8000", "10.244.1.5"),
    "external-httpbin-4mb": ("httpbin", 15006, "10.244.1.6:8000", "172.18.0.3"),
    "external-httpbin-hbone": ("httpbin", 15008, "10.244.1.6:15008", None),
    # in-pod mode SNATs every host socket to an enrolled pod, whatever its source: it works
    "node-internal-httpbin": (None, None, None, names.INPOD_PROBE_SNAT_V4),
    "sleep-httpbin-cross-node": ("sleep", 15001, "10.244.2.6:8000", "10.244.1.5"),
}


@pytest.mark.parametrize("name", [s.name for s in SCENARIOS])
def test_every_scenario_inpod(inpod, name):
    where, port, orig, seen = INPOD_EXPECT[name]
    t = inpod[name]
    cap = t.capture
    assert (cap.netns if cap else None, cap.port if cap else None, cap.orig_dst if cap else None) == (where, port, orig)
    assert (t.server.remote.rsplit(":", 1)[0] if t.server else None) == seen
    assert t.ok
    # no tunnel, no ztunnel netns: in-pod never leaves the pods' own netns for redirection
    assert not any(h.stage in ("tunnel", "decap") for h in t.hops())
    assert "ztunnel" not in {h.netns for h in t.hops()}


def test_inpod_probe_snat_and_accept(inpod):
    t = inpod["node-httpbin"]
    assert sigs(t, 1, "first") == [
        "node rule 32766 table main veth-httpbin",
        "node HPOST1",                      # SNAT to 169.254.7.127 (socket-exists, dst in set)
        "node veth-httpbin>httpbin:eth0",
        "httpbin NPR1",                     # -s PROBE -p tcp -j ACCEPT: no redirect
        "httpbin rule 0 table local local",
        "httpbin socket 8000",
    ]
    assert "node nat" in sigs(t, 1, "reply")   # reverse SNAT back to the node's address


@pytest.mark.parametrize("version,first_rule", [("1.21", "MPR6"), ("1.23", "MPR6"), ("1.24", "NPR2"), ("1.29", "NPR2")])
def test_inpod_inbound_capture_by_era(version, first_rule):
    """1.21-1.23 TPROXY in mangle (mark 0x111 -> table 100); 1.24+ REDIRECT in nat."""
    t = trace_scenario(lab_values(inpod_version=version), "inpod", "plain-httpbin")
    rules = [h.rule for h in t.packet(1, "first").hops if h.rule]
    assert rules == [first_rule]
    assert t.capture.port == 15006 and t.capture.orig_dst == "10.244.1.6:8000" and t.ok


# ---------------------------------------------------------------- the interpreter


def test_rule_ids_follow_the_nft_backend():
    """The tracer and the nft rendering number the rules the same way."""
    import re
    r = desired.render(lab_values(), "legacy")
    for ns in r.netns:
        compiled = compile_rules(ns.role, ns.role, ns.rules_for(4), frozenset(s.name for s in ns.ipsets))
        ids = {c.rid for c in compiled.all_rules()} - {"hook"}
        script = nft.legacy_nft(ns)
        nft_ids = set(re.findall(r'comment "([A-Z]+[0-9]+)"', script))
        assert ids == nft_ids
    assert len(ids) == 4   # the ztunnel netns: Z1-Z4


def test_unknown_vocabulary_raises_naming_the_rule():
    bad = IptRule(table="mangle", chain="PREROUTING", args="-m statistic --mode random -j ACCEPT")
    with pytest.raises(TraceError, match=r"-t mangle -A PREROUTING -m statistic.*'statistic' is not interpreted"):
        compile_rules("node", "node", (bad,), frozenset())
    bad = IptRule(table="mangle", chain="PREROUTING", args="-p tcp -j LOG --log-prefix x")
    with pytest.raises(TraceError, match="target 'LOG' is not interpreted"):
        compile_rules("node", "node", (bad,), frozenset())
    bad = IptRule(table="mangle", chain="PREROUTING", args="-m set --match-set nope src -j ACCEPT")
    with pytest.raises(TraceError, match="set nope is not rendered"):
        compile_rules("node", "node", (bad,), frozenset())


def test_connmark_arithmetic_is_the_kernels():
    """save: ct = (ct & ~ctmask) ^ (mark & nfmask); a connection saved as 0x220 and then 0x210
    ends at 0x230, which satisfies both restores (legacy-mode.md §3.1); P6 wins, being first."""
    topo = build(lab_values(), "legacy")
    from noderedirect.trace import Walker, Packet, CtEntry
    w = Walker(topo)
    node = topo.get("node")
    entry = CtEntry(orig=("tcp", "1.1.1.1", 1, "2.2.2.2", 2), reply=("tcp", "2.2.2.2", 2, "1.1.1.1", 1))
    for mark in (0x220, 0x210):
        pkt = Packet(proto="tcp", src="1.1.1.1", sport=1, dst="2.2.2.2", dport=2, mark=mark, ct=(entry, "orig"))
        w.run_hook(node, "mangle", "FORWARD", pkt, "eth0")
    assert entry.mark == 0x230
    pkt = Packet(proto="tcp", src="1.1.1.1", sport=1, dst="2.2.2.2", dport=2, ct=(entry, "orig"), iif="eth0")
    w.run_hook(node, "mangle", "PREROUTING", pkt)
    assert [h.rule for h in w.hops[-2:]] == ["P6", "P7"] and pkt.mark == 0x200


def test_ip_rule_goto_to_a_missing_priority_is_skipped():
    topo = build(lab_values(), "legacy")
    from noderedirect.trace import Walker
    node = topo.get("node")
    rules = tuple(dataclasses.replace(r, goto=30000) if r.action == "goto" else r for r in node.ip_rules)
    node = dataclasses.replace(node, ip_rules=rules)
    w = Walker(dataclasses.replace(topo, netns=tuple(node if n.name == "node" else n for n in topo.netns)))
    rd = w.route(node, "10.244.1.6", 0x200)      # rule 100 unresolved: falls to 103 -> table 100
    assert (rd.priority, rd.table, rd.dev) == (103, "100", "istioin")


# ---------------------------------------------------------------- output and comparison


def test_select_renumbers_and_json_round_trips(legacy):
    t = legacy["sleep-httpbin"].select(["next"])
    assert [h.n for h in t.hops()] == list(range(1, len(t.hops()) + 1))
    assert {p.kind for p in t.packets()} == {"next"}
    data = json.loads(json.dumps(t.to_json()))
    hop = next(h for h in data["legs"][0]["packets"][0]["hops"] if h.get("rule") == "P8")
    assert (hop["mark_before"], hop["mark_after"], hop["ctmark"], hop["chain"]) == ("0x0", "0x40", "0x210", "ztunnel-PREROUTING")
    route = next(h for h in data["legs"][0]["packets"][0]["hops"] if h["stage"] == "routing" and h["netns"] == "node")
    assert route["route"]["priority"] == 102 and route["route"]["dev"] == "veth-zt"
    assert data["capture"]["port"] == 15001 and data["capture"]["orig_dst"] == "10.244.1.6:8000"
    with pytest.raises(TraceError, match="unknown packet kind"):
        t.select(["syn"])


def test_full_trace_json_has_tunnel_and_socket(legacy):
    data = legacy["sleep-httpbin"].to_json()
    hops = data["legs"][0]["packets"][0]["hops"]
    tun = next(h for h in hops if h["stage"] == "tunnel")
    assert tun["tunnel"] == {"link": "istioout", "vni": 1001, "outer_src": "10.244.1.1",
                             "outer_dst": "10.244.1.2", "port": 6081, "peer_netns": "ztunnel",
                             "peer_link": "pistioout"}
    sock = hops[-1]["socket"]
    assert (sock["port"], sock["orig_dst"], sock["netns"]) == (15001, "10.244.1.6:8000", "ztunnel")


def test_compare_agrees_with_a_matching_observation(legacy):
    t = legacy["sleep-httpbin"]
    observed: dict[str, set] = {}
    for (ns, rid) in t.rule_hits():
        observed.setdefault(ns, set()).add(rid)
    assert compare(t, observed, listener=15001, orig_dst="10.244.1.6:8000",
                   tunnel_tcp={("node", "istioout"): 1, ("node", "istioin"): 0}) == []


def test_compare_names_the_first_hop_that_differs(legacy):
    t = legacy["sleep-httpbin"]
    observed: dict[str, set] = {}
    for (ns, rid) in t.rule_hits():
        observed.setdefault(ns, set()).add(rid)
    observed["node"] -= {"N1"}
    observed["node"] |= {"P13"}
    diffs = compare(t, observed, listener=15006)
    n1 = next(h.n for h in t.hops() if h.rule == "N1")
    assert diffs[0].hop == n1 and "N1 in node predicted" in str(diffs[0])
    assert any("P13 in node was hit" in str(d) for d in diffs)
    assert any("predicted ztunnel listener :15001, observed 15006" in str(d) for d in diffs)


def test_scenario_lookup_by_name_and_number():
    assert scenario("6").name == "node-httpbin" and scenario("node-httpbin").number == 6
    with pytest.raises(KeyError):
        scenario("nope")
    assert [s.number for s in SCENARIOS] == list(range(1, 14))


def test_mark_targets_use_xor_under_the_mask():
    """MARK --set-xmark V/M: (mark & ~M) ^ V; CONNMARK --restore-mark: (mark & ~nfmask) ^
    (ct & ctmask); --save-mark: ct = (ct & ~ctmask) ^ (mark & nfmask) — with masks where OR and
    XOR, or a missing mask, would give different numbers."""
    from noderedirect.topology_model import Iface, NetnsModel, Topology
    from noderedirect.trace import CtEntry, Packet, Walker
    rules = (IptRule("mangle", "PREROUTING", "-j MARK --set-xmark 0x11/0xf"),
             IptRule("mangle", "PREROUTING", "-j CONNMARK --restore-mark --nfmask 0xf00 --ctmask 0xff00"),
             IptRule("mangle", "PREROUTING", "-j CONNMARK --save-mark --nfmask 0xf --ctmask 0xff")),
    ns = NetnsModel(name="x", kind="pod", rule_role="", node="", iptables=rules[0],
                    ifaces=(Iface("lo", ("127.0.0.1/8",), "lo"),))
    w = Walker(Topology(mode="legacy", version="1.20", netns=(ns,), nodes=()))
    entry = CtEntry(orig=("tcp", "1.1.1.1", 1, "2.2.2.2", 2), reply=("tcp", "2.2.2.2", 2, "1.1.1.1", 1),
                    mark=0xab0f)
    pkt = Packet(proto="tcp", src="1.1.1.1", sport=1, dst="2.2.2.2", dport=2, mark=0xf0f0, ct=(entry, "orig"))
    w.run_hook(ns, "mangle", "PREROUTING", pkt)
    assert [(h.mark_before, h.mark_after) for h in w.hops] == [(0xf0f0, 0xf0e1), (0xf0e1, 0x5be1), (0x5be1, 0x5be1)]
    assert entry.mark == (0xab0f & ~0xff) ^ (0x5be1 & 0xf)   # 0xab01


# ---------------------------------------------------------------- the command


def cli(*args: str) -> tuple[int, str, str]:
    import contextlib
    import io

    from noderedirect.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()


def test_trace_command_text():
    rc, out, _ = cli("trace", "--scenario", "1", "--packet", "first")
    assert rc == 0
    assert "node     mangle PREROUTING  P15  [tcp, src ∈ ztunnel-pods-ips] → MARK 0x100/0x100   mark 0x0 → 0x100" in out
    assert "ztunnel  decap              pistioout ← VNI 1001 from 10.244.1.1 (= remote of pistioout)" in out
    assert ("\nverdict: captured by ztunnel outbound :15001, original destination 10.244.1.6:8000; "
            "server sees client 10.244.1.5\n") in out
    assert out.rstrip().splitlines()[-1] == (
        "may also match: P5 in node (ARP for 192.168.126.2 over istioin, whenever the kernel resolves "
        "or re-checks it: GENEVE UDP :6081 between 10.244.1.1 and 10.244.1.2)")
    assert "reply packet" not in out and "next packet" not in out


def test_trace_command_json_and_src_dst():
    rc, out, _ = cli("trace", "--src", "10.244.1.7:5555", "--dst", "10.244.1.8:8000", "-o", "json")
    data = json.loads(out)
    assert rc == 0 and data["request"] == "10.244.1.7:5555 → 10.244.1.8:8000 tcp from plain-a"
    assert data["capture"] is None and data["server"]["remote"] == "10.244.1.7:5555"
    rc, out, _ = cli("trace", "--two-node", "--src", "10.244.1.5", "--dst", "10.244.2.6:8000", "-o", "json")
    assert rc == 0 and json.loads(out)["server"]["netns"] == "httpbin-2"


def test_trace_command_values_file_and_era():
    from helpers import EXAMPLE
    rc, out, _ = cli("trace", "--values", str(EXAMPLE), "--istio-version", "1.19", "--scenario", "1",
                     "--packet", "first")
    assert rc == 0 and "Istio 1.19" in out and "O1  [src 10.244.1.1] → MARK 0x220" in out


def test_trace_command_errors():
    rc, _, err = cli("trace", "--from", "netns", "nr-x", "--scenario", "1")
    assert rc == 2 and err == ("noderedirect: --from netns in legacy mode needs --ztunnel-netns NS "
                               "(the ztunnel pod's netns holds the receiving half of the design)\n")
    rc, _, err = cli("trace", "--mode", "inpod", "--from", "netns", "nr-x", "--backend", "nft",
                     "--scenario", "1")
    assert rc == 2 and err == ("noderedirect: --backend nft programs the legacy design only; --mode inpod "
                               "has no nft table to read\n")
    rc, _, err = cli("trace", "--from", "netns", "--scenario", "1")
    assert rc == 2 and "--from netns needs the netns name" in err
    rc, _, err = cli("trace", "--lenient", "--ztunnel-netns", "nr-y", "--scenario", "1")
    assert rc == 2 and err == "noderedirect: --ztunnel-netns, --lenient: only with --from netns NS\n"
    rc, _, err = cli("trace", "--from", "disk", "--scenario", "1")
    assert rc == 2 and "expected 'rendered' or 'netns NS'" in err
    rc, _, err = cli("trace", "--scenario", "1", "--src", "10.244.1.5")
    assert rc == 2 and "cannot be combined" in err
    rc, _, err = cli("trace", "--src", "10.9.9.9", "--dst", "10.244.1.6:8000")
    assert rc == 2 and "no netns of the topology has the address 10.9.9.9" in err
    rc, _, err = cli("trace", "--src", "10.244.1.5", "--dst", "10.244.1.6")
    assert rc == 2 and "needs a port" in err
    rc, _, err = cli("trace", "--scenario", "nope")
    assert rc == 2 and "unknown scenario 'nope'" in err


def test_trace_command_lists_the_scenarios():
    rc, out, _ = cli("trace", "--list-scenarios")
    lines = out.splitlines()
    assert rc == 0 and len(lines) == 13
    assert lines[5].split()[:4] == ["6", "node-httpbin", "node", "→"]


def test_tunnel_neighbour_traffic_is_incidental_and_allowed_by_compare(legacy):
    """GENEVE carries ARP: its outer packets meet P5 on the node at any time (kernel-notes §11
    #7); up to 1.19 the outgoing one also meets O1 (-s HostIP). Allowed, never required."""
    t = legacy["plain-plain"]
    assert set(t.incidental) == {("node", "P5")}
    assert compare(t, {"node": {"P5"}}) == [] and compare(t, {}) == []
    assert [str(d) for d in compare(t, {"node": {"P6"}})] == ["P6 in node was hit, the trace does not predict it"]
    old = trace_scenario(values_with(istioVersion="1.19"), "legacy", "plain-plain")
    assert set(old.incidental) == {("node", "P5"), ("node", "O1")}
    inpod = trace_scenario(lab_values(), "inpod", "plain-plain")
    assert inpod.incidental == {}


def test_compare_ignores_what_the_observer_cannot_attribute(legacy):
    t = legacy["sleep-httpbin"]
    observed: dict[str, set] = {}
    for (ns, rid) in t.rule_hits():
        observed.setdefault(ns, set()).add(rid)
    observed["node"] -= {"P11"}
    assert compare(t, observed, listener=15001,
                   ignore={("node", "P7"), ("node", "P11"), ("node", "P14")}) == []
    assert compare(t, observed, listener=15001)[0].what.startswith("P11 in node predicted")
