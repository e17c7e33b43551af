"""``trace --from netns``: the tracer on the live state of a node programmed by the engine.

A node + ztunnel pair is wired as tests/netns/test_engine.py does (kind/ptp), plus what the
topology's main table needs: a veth per pod (``veth-<name>`` with HostIP/32 and a
``<podIP>/32 dev veth-<name> scope host`` route; the pod end stays in the node netns, the pods
themselves are the model's) and ``eth0`` with the InternalIP. After ``Engine.apply()``, a walk on
the live state must equal the walk on the rendered state, hop for hop; after drift, it must not.
"""

from __future__ import annotations

import pytest

from helpers import EXAMPLE
from test_engine import engine, pair, sh  # noqa: F401 - pair is a fixture
from noderedirect import trace_live
from noderedirect.model import IptRule
from noderedirect.topology_model import TABLE_MAIN, Live, Route
from noderedirect.trace import TraceError, trace_scenario
from noderedirect.trace_rules import compile_rules

PODS = (("sleep", "10.244.1.5"), ("httpbin", "10.244.1.6"), ("plain-a", "10.244.1.7"), ("plain-b", "10.244.1.8"))
SCENARIOS = ("sleep-httpbin", "plain-plain", "node-httpbin")
P15 = ["-p", "tcp", "-m", "set", "--match-set", "ztunnel-pods-ips", "src", "-j", "MARK",
       "--set-xmark", "0x100/0x100"]
FOREIGN_IPTABLES = """*nat
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m comment --comment "default/kubernetes:https cluster IP" -m tcp --dport 443 -j RETURN
-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
COMMIT
*mangle
-A PREROUTING -s 10.244.1.7/32 -j MARK --set-xmark 0x4000/0x4000
COMMIT
"""
ADDRTYPE = "-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"


def cli(*args: str) -> tuple[int, str, str]:
    import contextlib
    import io

    from noderedirect.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()


def wire_pods(node: str) -> None:
    """What the model's node netns has beyond test_engine's wiring: pod veths and eth0."""
    for name, ip in PODS:
        dev, peer = f"veth-{name}"[:15], f"p-{name}"[:15]
        sh("ip", "link", "add", dev, "type", "veth", "peer", "name", peer, ns=node)
        sh("ip", "addr", "add", "10.244.1.1/32", "dev", dev, ns=node)
        sh("ip", "link", "set", dev, "up", ns=node)
        sh("ip", "link", "set", peer, "up", ns=node)
        sh("ip", "route", "add", f"{ip}/32", "dev", dev, "scope", "host", ns=node)
    sh("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "u-node", ns=node)
    sh("ip", "addr", "add", "172.18.0.2/24", "dev", "eth0", ns=node)
    sh("ip", "link", "set", "u-node", "up", ns=node)
    sh("ip", "link", "set", "eth0", "up", ns=node)


@pytest.fixture
def applied(pair):  # noqa: F811 - the fixture imported above
    node, zt = pair
    wire_pods(node)
    with engine(pair, tunnel="vxlan") as eng:
        eng.apply()
        vals = eng.values
    return node, zt, vals


def live(node: str, zt: str, backend: str = "iptables", lenient: bool = False) -> Live:
    return Live(node=trace_live.read(node, "node", backend), ztunnel=trace_live.read(zt, "ztunnel", backend),
                lenient=lenient)


def hops(t) -> list[tuple[str, str, str]]:
    return [(h.netns, h.stage, h.describe()) for h in t.hops()]


def without_notes(text: str) -> str:
    return "".join(l + "\n" for l in text.splitlines() if not l.startswith("note: "))


# ---------------------------------------------------------------- live equals rendered


@pytest.mark.netns
def test_live_walk_equals_the_rendered_walk(applied):
    node, zt, vals = applied
    state = live(node, zt)
    for name in SCENARIOS:
        rendered = trace_scenario(vals, "legacy", name)
        t = trace_scenario(vals, "legacy", name, live=state)
        assert hops(t) == hops(rendered), name
        assert without_notes(t.to_text()) == without_notes(rendered.to_text()), name
        assert t.notes[:2] == [f"node: live state of netns {node}", f"ztunnel: live state of netns {zt}"]
    # the walk really ran on the kernel's objects: its local table, its complete rule list
    topo = trace_scenario(vals, "legacy", "sleep-httpbin", live=state).topology
    n = topo.get("node")
    assert n.live == node and topo.get("ztunnel").live == zt
    assert Route(table=255, dst="10.244.1.1/32", type="local", dev="veth-zt", src="10.244.1.1") in n.routes
    assert [r.priority for r in n.ip_rules] == [0, 100, 101, 102, 103, 32766, 32767]
    assert topo.get("sleep").iface("eth0").peer == ("node", "veth-sleep")
    first = trace_scenario(vals, "legacy", "sleep-httpbin", live=state)
    assert ("node", "P15") in first.rule_hits(("first",))
    assert (first.capture.port, first.capture.orig_dst) == (15001, "10.244.1.6:8000")


TRACE_SLEEP_HTTPBIN = ("trace", "--scenario", "sleep-httpbin", "--values", str(EXAMPLE))


def assert_cli_live_walk_is_the_rendered_one(node: str, zt: str, *extra: str) -> None:
    """`trace --from netns` on a converged pair prints the rendered walk, plus where it read."""
    rc, rendered, err = cli(*TRACE_SLEEP_HTTPBIN)
    assert rc == 0, err
    rc, out, err = cli(*TRACE_SLEEP_HTTPBIN, "--from", "netns", node, "--ztunnel-netns", zt, *extra)
    assert rc == 0, err
    assert without_notes(out) == without_notes(rendered)
    assert f"note: node: live state of netns {node}\n" in out
    assert "verdict: captured by ztunnel outbound :15001, original destination 10.244.1.6:8000" in out


@pytest.mark.netns
def test_trace_command_from_netns(applied):
    node, zt, _ = applied
    assert_cli_live_walk_is_the_rendered_one(node, zt)


# ---------------------------------------------------------------- drift: what --from netns is for


@pytest.mark.netns
def test_a_deleted_rule_shows_in_the_live_walk_only(applied):
    node, zt, vals = applied
    sh("iptables", "-t", "mangle", "-D", "ztunnel-PREROUTING", *P15, ns=node)
    assert_walk_without_p15(vals, live(node, zt))


def assert_walk_without_p15(vals, state: Live):
    """The live walks of a node whose P15 was deleted, against the rendered ones. Returns the
    rendered sleep-plain trace."""
    rendered = trace_scenario(vals, "legacy", "sleep-plain")
    t = trace_scenario(vals, "legacy", "sleep-plain", live=state)
    # rendered: P15 marks the SYN for table 101 and ztunnel's :15001 takes it
    assert rendered.capture is not None and rendered.capture.port == 15001
    assert ("node", "P15") in rendered.rule_hits(("first",))
    # live: the SYN is not captured, it goes straight to plain-a
    syn = t.packet(1, "first")
    assert t.capture is None and ("node", "P15") not in t.rule_hits()
    assert (syn.outcome, syn.netns, syn.socket.name) == ("delivered", "plain-a", "test server")
    assert [h.describe() for h in syn.hops if h.netns == "node" and h.stage == "routing"] == [
        "103: lookup 100: no route; 32766: lookup main → 10.244.1.7 dev veth-plain-a scope host"]
    # same node, mesh destination: no outbound capture any more, the inbound path takes it
    assert trace_scenario(vals, "legacy", "sleep-httpbin").capture.port == 15001
    assert trace_scenario(vals, "legacy", "sleep-httpbin", live=state).capture.port == 15006
    return rendered
    # the remaining rules keep their ids
    ids = {r.rid for r in compile_rules("node", "node", state.node.state.iptables, frozenset({"ztunnel-pods-ips"}),
                                        declared=state.node.chains,
                                        reference=trace_scenario(vals, "legacy", "sleep-plain")
                                        .topology.get("node").iptables).chain("mangle", "ztunnel-PREROUTING")}
    assert ids == {f"P{i}" for i in range(1, 15)}


@pytest.mark.netns
def test_the_other_iptables_variant_is_read_with_backend(pair):  # noqa: F811
    node, zt = pair
    wire_pods(node)
    with engine(pair, backend="iptables-legacy", tunnel="vxlan") as eng:
        eng.apply()
        vals = eng.values
    rendered = trace_scenario(vals, "legacy", "sleep-httpbin")
    t = trace_scenario(vals, "legacy", "sleep-httpbin", live=live(node, zt, "iptables-legacy"))
    assert hops(t) == hops(rendered)
    wrong = live(node, zt, "iptables")
    assert wrong.node.state.iptables == ()
    for ns, state in ((node, wrong.node), (zt, wrong.ztunnel)):
        assert state.notes == (f"netns {ns}: none of the design's rules in the iptables rules; if the node "
                               "was programmed with another backend, pass it with --backend",)
    # without Z1-Z4 nothing in the ztunnel netns takes the tunnelled SYN
    assert trace_scenario(vals, "legacy", "sleep-httpbin", live=wrong).verdict() == \
        "fails: leg 1 first packet dropped in ztunnel: ip_forward=0"


# ---------------------------------------------------------------- foreign objects


@pytest.mark.netns
def test_foreign_rules_are_walked_and_unknown_ones_stop_or_warn(applied):
    node, zt, vals = applied
    sh("iptables-nft-restore", "--noflush", ns=node, input=FOREIGN_IPTABLES)
    sh("ip", "route", "add", "10.60.0.0/16", "dev", "eth0", "table", "200", ns=node)
    sh("ip", "rule", "add", "priority", "500", "fwmark", "0x8000/0x8000", "lookup", "200", ns=node)
    base = ("trace", "--scenario", "plain-plain", "--values", str(EXAMPLE), "--from", "netns", node,
            "--ztunnel-netns", zt, "--packet", "first")
    rc, out, err = cli(*base)
    assert rc == 2 and out == ""
    assert err == (f"noderedirect: netns node ({node}): cannot interpret -t nat {ADDRTYPE}: match module "
                   "'addrtype' is not interpreted (--lenient treats it as non-matching)\n")

    rc, out, err = cli(*base, "--lenient")
    assert rc == 0, err
    lines = out.splitlines()
    warn = [l for l in lines if "warning:" in l]
    assert len(warn) == 1 and warn[0].split()[1:3] == ["node", "nat"] and warn[0].endswith(
        f"warning: nat/KUBE-SERVICES#2 not interpreted (match module 'addrtype' is not interpreted), "
        f"treated as non-matching: {ADDRTYPE}")
    # a foreign rule that matches is a hop like any other, named by its line number
    assert any(l.split()[1:] == ["node", "mangle", "PREROUTING", "mangle/PREROUTING#2", "[src", "10.244.1.7]",
                                 "→", "MARK", "0x4000/0x4000", "mark", "0x0", "→", "0x4000"] for l in lines), out
    assert "verdict: not captured: delivered straight to plain-b; server sees client 10.244.1.7" in lines

    state = live(node, zt, lenient=True)
    t = trace_scenario(vals, "legacy", "plain-plain", live=state)
    assert Route(table=200, dst="10.60.0.0/16", dev="eth0", scope="link") in t.topology.get("node").routes
    foreign = [h for h in t.hops() if h.verdict == "skipped" or (h.rule or "").startswith("mangle/")]
    # the SYN and the ACK meet the MARK; only the SYN passes nat PREROUTING (a new connection)
    assert [(h.packet.split(" → ")[0], h.verdict) for h in foreign] == [
        ("10.244.1.7:40000", "MARK 0x4000/0x4000"), ("10.244.1.7:40000", "skipped"), ("10.244.1.7:40000", "MARK 0x4000/0x4000")]
    rendered = trace_scenario(vals, "legacy", "plain-plain")
    # otherwise the same walk: mark 0x4000 selects no ip rule (only the veth hops show it cleared)
    same = [(h.netns, h.stage, h.rule, h.route, h.socket, h.to_device) for h in t.hops() if h not in foreign]
    assert same == [(h.netns, h.stage, h.rule, h.route, h.socket, h.to_device) for h in rendered.hops()]

    # an ip rule the model cannot express: refused by name, or left out with a note
    sh("ip", "rule", "add", "priority", "600", "from", "10.9.0.0/16", "lookup", "200", ns=node)
    with pytest.raises(TraceError, match=rf"^netns {node}: ip rule '600:\tfrom 10.9.0.0/16 lookup 200': "
                                         "the tracer cannot interpret it"):
        trace_scenario(vals, "legacy", "plain-plain", live=live(node, zt))
    t = trace_scenario(vals, "legacy", "plain-plain", live=live(node, zt, lenient=True))
    assert f"netns {node}: ip rule '600:\tfrom 10.9.0.0/16 lookup 200': not interpreted, left out (--lenient)" in t.notes
    assert t.verdict() == rendered.verdict()


# ---------------------------------------------------------------- rule ids and vocabulary (pure)


def _rule(chain: str, args: str, table: str = "mangle") -> IptRule:
    return IptRule(table=table, chain=chain, args=args)


def test_live_rule_ids_line_up_with_the_rendered_rules():
    """P7, P11 and P14 share their text; a deletion or a foreign insertion must not renumber."""
    c = "ztunnel-PREROUTING"
    texts = ["-i istioin -j RETURN", "-m mark --mark 0x200/0x200 -j RETURN", "-i veth-zt -j RETURN",
             "-m mark --mark 0x200/0x200 -j RETURN", "-p udp -j RETURN", "-m mark --mark 0x200/0x200 -j RETURN"]
    rendered = tuple(_rule(c, t) for t in texts)
    live_rules = (rendered[0], _rule(c, "-s 10.1.1.1/32 -j RETURN"), rendered[1], rendered[3], rendered[4],
                  rendered[5])   # rule 3 deleted, a foreign rule inserted at line 2
    rs = compile_rules("node", "node", live_rules, frozenset(), reference=rendered)
    assert [r.rid for r in rs.chain("mangle", c)] == ["P1", "mangle/ztunnel-PREROUTING#2", "P2", "P4", "P5", "P6"]
    plain = compile_rules("node", "node", rendered, frozenset())
    assert [r.rid for r in plain.chain("mangle", c)] == [f"P{i}" for i in range(1, 7)]


def test_comments_are_read_and_empty_foreign_chains_are_jump_targets():
    rules = (_rule("PREROUTING", '-m comment --comment "kube: a b" -j KUBE-X', table="nat"),)
    with pytest.raises(TraceError, match="target 'KUBE-X' is not interpreted"):
        compile_rules("node", "node", rules, frozenset())
    rs = compile_rules("node", "node", rules, frozenset(), declared=(("nat", "KUBE-X"),))
    (r,) = rs.chain("nat", "PREROUTING")
    assert (r.target.kind, r.target.chain, r.match_short) == ("chain", "KUBE-X", "every packet")


def test_lenient_keeps_an_unreadable_rule_as_never_matching():
    bad = _rule("PREROUTING", "-m statistic --mode random --probability 0.5 -j ACCEPT")
    (r,) = compile_rules("node", "node", (bad,), frozenset(), lenient=True).chain("mangle", "PREROUTING")
    assert r.skipped == "match module 'statistic' is not interpreted" and r.rid == "mangle/PREROUTING#1"
    assert not r.matches_view(object())


@pytest.mark.netns
def test_the_kernels_ip_rule_list_is_walked_as_it_is(applied):
    """Rule 100 is ``goto 32766``; with 32766 gone (main looked up at 32000 instead) the kernel
    skips it as unresolved, so ztunnel's SYN-ACK (P10: mark 0x210, which rule 100 selects) meets
    rule 103 and goes back into istioin. The rendered walk, which always has 32766, cannot show it."""
    node, zt, vals = applied
    sh("ip", "rule", "del", "priority", "32766", ns=node)
    sh("ip", "rule", "add", "priority", "32000", "lookup", "main", ns=node)
    t = trace_scenario(vals, "legacy", "sleep-httpbin", live=live(node, zt))
    reply = t.packet(1, "reply")
    first_route = next(h for h in reply.hops if h.netns == "node" and h.stage == "routing")
    assert first_route.describe() == ("100: goto 32766 (no such rule: skipped); 103: lookup 100 → 10.244.1.5 "
                                      "via 192.168.126.2 dev istioin src 10.244.1.1")
    assert t.verdict() == ("fails: leg 1 reply packet misdelivered in ztunnel: the reply reached ztunnel "
                           "inbound in ztunnel, not the client")
    assert trace_scenario(vals, "legacy", "sleep-httpbin").ok
