"""``trace --from netns --backend nft``: the tracer on a node programmed by the native nft backend.

The same wiring as test_trace_live.py (its fixtures and helpers are reused), applied with
``backend="nft"``: our rules live in ``table ip ztunnel-node`` / ``ztunnel-tproxy``. A live nft
rule is interpreted as the rendered rule it translates only when its id and its expression
both match; after ``apply`` the live walk equals the rendered walk hop for hop, and every
change made here with the ``nft`` tool shows up exactly where the iptables twin of the test
shows it.
"""

from __future__ import annotations

import json

import pytest

from helpers import EXAMPLE
from test_engine import engine, pair, sh  # noqa: F401 - pair is a fixture
from test_trace_live import (P15, SCENARIOS, TRACE_SLEEP_HTTPBIN, assert_cli_live_walk_is_the_rendered_one,
                             assert_walk_without_p15, cli, hops, wire_pods, without_notes)
from noderedirect import desired, names, trace_live, trace_live_nft
from noderedirect.model import IptRule
from noderedirect.topology_model import Live
from noderedirect.trace import TraceError, trace_scenario
from noderedirect.trace_rules import compile_rules

pytest.importorskip("nftables", reason="the nftables bindings (libnftables1) are missing")

NODE_T = names.NFT_TABLE_NODE
PRE = "mangle-ztunnel-PREROUTING"
P3_CHANGED = 'iifname "istioout" counter meta mark set meta mark | 0x00000300 comment "P3"'
P3_RENDERED = "-t mangle -A ztunnel-PREROUTING -i istioout -j MARK --set-xmark 0x200/0x200"


@pytest.fixture
def applied_nft(pair):  # noqa: F811 - the fixture imported above
    node, zt = pair
    wire_pods(node)
    with engine(pair, backend="nft", tunnel="vxlan") as eng:
        eng.apply()
        vals = eng.values
    return node, zt, vals


def live_nft(node: str, zt: str, vals, lenient: bool = False) -> Live:
    rendered = desired.render(vals, "legacy")
    return Live(node=trace_live.read(node, "node", "nft", rendered.get("node")),
                ztunnel=trace_live.read(zt, "ztunnel", "nft", rendered.get("ztunnel")), lenient=lenient)


def handle(ns: str, chain: str, comment: str) -> int:
    doc = json.loads(sh("nft", "-j", "list", "chain", "ip", NODE_T, chain, ns=ns))
    return next(o["rule"]["handle"] for o in doc["nftables"]
                if "rule" in o and o["rule"].get("comment") == comment)


# ---------------------------------------------------------------- live equals rendered


@pytest.mark.netns
def test_live_nft_walk_equals_the_rendered_walk(applied_nft):
    node, zt, vals = applied_nft
    state = live_nft(node, zt, vals)
    assert state.node.unsupported == () and state.ztunnel.unsupported == ()
    assert state.node.notes == () and state.ztunnel.notes == ()
    # every live nft rule became the rendered rule it translates (plus the VXLAN outer-source
    # check, chains of our table with this backend), and the set members the ipset members
    rendered = desired.render(vals, "legacy")
    for live, role in ((state.node, "node"), (state.ztunnel, "ztunnel")):
        want = trace_live_nft.with_tunnel_check(rendered.get(role)).iptables
        assert sorted((r.table, r.chain, r.args) for r in live.state.iptables) == \
            sorted((r.table, r.chain, r.args) for r in want), role
    assert [(e.set, e.ip) for e in state.node.state.ipset_entries] == [
        ("ztunnel-pods-ips", "10.244.1.5"), ("ztunnel-pods-ips", "10.244.1.6")]
    assert [s.name for s in state.node.state.ipsets] == ["ztunnel-pods-ips"]
    for name in SCENARIOS + ("sleep-plain",):
        want_walk = trace_scenario(vals, "legacy", name)
        t = trace_scenario(vals, "legacy", name, live=state)
        assert hops(t) == hops(want_walk), name
        assert without_notes(t.to_text()) == without_notes(want_walk.to_text()), name
        assert t.notes[:2] == [f"node: live state of netns {node}", f"ztunnel: live state of netns {zt}"]
    first = trace_scenario(vals, "legacy", "sleep-httpbin", live=state)
    assert ("node", "P15") in first.rule_hits(("first",)) and ("ztunnel", "Z2") in first.rule_hits(("first",))
    assert (first.capture.port, first.capture.orig_dst) == (15001, "10.244.1.6:8000")


@pytest.mark.netns
def test_trace_command_from_netns_with_backend_nft(applied_nft):
    node, zt, _ = applied_nft
    assert_cli_live_walk_is_the_rendered_one(node, zt, "--backend", "nft")
    # the iptables reader finds none of our rules, and says where they are
    rc, out, err = cli(*TRACE_SLEEP_HTTPBIN, "--from", "netns", node, "--ztunnel-netns", zt, "--packet", "first")
    assert rc == 0, err
    assert (f"note: netns {node} holds nft table ip ztunnel-node (the native nft backend): pass "
            "--backend nft to trace it\n") in out
    assert "verdict: fails: leg 1 first packet" in out


# ---------------------------------------------------------------- drift


@pytest.mark.netns
def test_a_deleted_nft_rule_shows_in_the_live_walk_only(applied_nft):
    node, zt, vals = applied_nft
    sh("nft", "delete", "rule", "ip", NODE_T, PRE, "handle", str(handle(node, PRE, "P15")), ns=node)
    state = live_nft(node, zt, vals)
    assert state.node.unsupported == ()
    rendered = assert_walk_without_p15(vals, state)
    ids = {r.rid for r in compile_rules("node", "node", state.node.state.iptables,
                                        frozenset({"ztunnel-pods-ips"}), declared=state.node.chains,
                                        reference=rendered.topology.get("node").iptables
                                        ).chain("mangle", "ztunnel-PREROUTING")}
    assert ids == {f"P{i}" for i in range(1, 15)}
    # exactly what the iptables backend's twin shows for `iptables -D … P15`
    assert " ".join(P15) not in {r.args for r in state.node.state.iptables}


@pytest.mark.netns
def test_a_hand_changed_nft_rule_is_refused_or_a_warning_hop(applied_nft):
    node, zt, vals = applied_nft
    sh("nft", "replace", "rule", "ip", NODE_T, PRE, "handle", str(handle(node, PRE, "P3")),
       "iifname", "istioout", "counter", "meta", "mark", "set", "meta", "mark", "|", "0x300",
       "comment", '"P3"', ns=node)
    problem = (f"netns {node}: table ip {NODE_T} chain {PRE}: rule '{P3_CHANGED}': not the translation "
               f"of P3 ({P3_RENDERED})")
    state = live_nft(node, zt, vals)
    assert state.node.unsupported == (problem,)
    with pytest.raises(TraceError) as e:
        trace_scenario(vals, "legacy", "sleep-httpbin", live=state)
    assert str(e.value) == f"{problem}: the tracer cannot interpret it (--lenient leaves it out with a note)"
    base = ("trace", "--scenario", "sleep-httpbin", "--values", str(EXAMPLE), "--from", "netns", node,
            "--ztunnel-netns", zt, "--backend", "nft", "--packet", "first")
    rc, out, err = cli(*base)
    assert rc == 2 and out == "" and err.startswith(f"noderedirect: {problem}: the tracer cannot interpret")

    rc, out, err = cli(*base, "--lenient")
    assert rc == 0, err
    warn = [l.split(maxsplit=1)[1] for l in out.splitlines() if "warning:" in l]
    # the SYN of leg 1 (sleep -> ztunnel) and of leg 2 (ztunnel -> httpbin) pass the rule's place
    assert warn == ["node     mangle PREROUTING  warning: mangle/ztunnel-PREROUTING#3 not interpreted (an nft "
                    "rule that is not the translation of a rendered rule), treated as non-matching: nft "
                    f"chain {PRE}: {P3_CHANGED}"] * 2
    assert f"note: {problem}: not interpreted, left out (--lenient)\n" in out
    # the rest of the walk is the rendered one (P3 only ever matches on istioout)
    t = trace_scenario(vals, "legacy", "sleep-httpbin", live=live_nft(node, zt, vals, lenient=True))
    rendered = trace_scenario(vals, "legacy", "sleep-httpbin")
    assert [h for h in hops(t) if "warning:" not in h[2]] == hops(rendered)
    assert t.verdict() == rendered.verdict()


@pytest.mark.netns
def test_a_tproxy_rule_without_its_no_listener_drop_is_not_interpreted(applied_nft):
    node, zt, vals = applied_nft
    doc = json.loads(sh("nft", "-j", "list", "chain", "ip", names.NFT_TABLE_ZTUNNEL, "mangle-PREROUTING", ns=zt))
    h = next(o["rule"]["handle"] for o in doc["nftables"] if o.get("rule", {}).get("comment") == "Z2 no listener")
    sh("nft", "delete", "rule", "ip", names.NFT_TABLE_ZTUNNEL, "mangle-PREROUTING", "handle", str(h), ns=zt)
    state = live_nft(node, zt, vals)
    assert state.ztunnel.unsupported == (
        f"netns {zt}: table ip {names.NFT_TABLE_ZTUNNEL} chain mangle-PREROUTING: rule 'iifname \"pistioout\" "
        'meta l4proto tcp counter tproxy to 127.0.0.1:15001 meta mark set meta mark & 0xfffff400 | '
        "0x00000400 accept comment \"Z2\"': Z2 without its 'Z2 no listener' drop right after it "
        "(xt_TPROXY drops when no listener is found)",)


# ---------------------------------------------------------------- other tables


@pytest.mark.netns
def test_foreign_nft_tables_and_iptables_nft_rules(applied_nft):
    node, zt, vals = applied_nft
    # a foreign table with a base chain: reported, not read
    sh("nft", "add", "table", "inet", "fw", ns=node)
    sh("nft", "add", "chain", "inet", "fw", "in", "{ type filter hook input priority 0; }", ns=node)
    sh("nft", "add", "rule", "inet", "fw", "in", "tcp", "dport", "22", "accept", ns=node)
    # a foreign table without base chains sees no packet: nothing to say
    sh("nft", "add", "table", "ip", "quiet", ns=node)
    sh("nft", "add", "chain", "ip", "quiet", "c", ns=node)
    # iptables-nft: a chain we do not hold (raw PREROUTING) is walked; nat PREROUTING shares our
    # nat-PREROUTING's hook and priority, so its order against ours is unknown
    sh("iptables-nft", "-t", "raw", "-A", "PREROUTING", "-s", "10.244.1.7/32", "-j", "ACCEPT", ns=node)
    sh("iptables-nft", "-t", "nat", "-N", "KUBE-SERVICES", ns=node)
    sh("iptables-nft", "-t", "nat", "-A", "PREROUTING", "-j", "KUBE-SERVICES", ns=node)
    state = live_nft(node, zt, vals)
    assert state.node.unsupported == (
        f"netns {node}: nft table inet fw base chain in (type filter hook input priority 0): its rules are "
        "not read, and the tracer cannot order another table's base chains against ours",
        f"netns {node}: iptables-nft nat PREROUTING (1 rule): a base chain at the hook and priority of our "
        "nat-PREROUTING; which of the two runs first is not known")
    with pytest.raises(TraceError, match=r"nft table inet fw base chain in .*the tracer cannot interpret it"):
        trace_scenario(vals, "legacy", "plain-plain", live=state)

    lenient = live_nft(node, zt, vals, lenient=True)
    assert IptRule("raw", "PREROUTING", "-s 10.244.1.7/32 -j ACCEPT") in lenient.node.state.iptables
    assert not any(r.table == "nat" and r.chain == "PREROUTING" and r.target == "KUBE-SERVICES"
                   for r in lenient.node.state.iptables)
    t = trace_scenario(vals, "legacy", "plain-plain", live=lenient)
    assert [p for p in t.notes if p.endswith("(--lenient)")] == [
        f"{p}: not interpreted, left out (--lenient)" for p in lenient.node.unsupported]
    foreign = [h for h in t.hops() if (h.rule or "").startswith("raw/")]
    assert [(h.netns, h.stage, h.rule, h.verdict) for h in foreign] == [
        ("node", "raw PREROUTING", "raw/PREROUTING#1", "ACCEPT")] * 2     # the SYN and the ACK
    rendered = trace_scenario(vals, "legacy", "plain-plain")
    assert [h for h in hops(t) if not h[2].startswith("raw/")] == hops(rendered)

    # the iptables backend's chains beside our table: both would act, the trace says so
    sh("iptables-nft", "-t", "mangle", "-N", "ztunnel-PREROUTING", ns=node)
    sh("iptables-nft", "-t", "mangle", "-A", "PREROUTING", "-j", "ztunnel-PREROUTING", ns=node)
    both = live_nft(node, zt, vals)
    assert (f"netns {node}: iptables-nft mangle chain ztunnel-PREROUTING: the iptables backend's, beside "
            "our nft table (both would act on every packet; trace the one you mean with --backend)"
            ) in both.node.unsupported


@pytest.mark.netns
def test_no_nft_table_says_which_backend(pair):  # noqa: F811
    node, zt = pair
    wire_pods(node)
    with engine(pair, backend="iptables", tunnel="vxlan") as eng:
        eng.apply()
        vals = eng.values
    state = live_nft(node, zt, vals)
    assert state.node.notes == (
        f"netns {node}: no table ip ztunnel-node (the nft backend's); if the node was programmed with "
        "another backend, pass it with --backend",
        f"netns {node}: ipset ztunnel-pods-ips (the iptables backend's) is present; the nft set of our "
        "table is what the rules match")
    assert state.node.state.iptables == () and state.node.state.ipsets == ()
    assert state.node.unsupported[0].startswith(f"netns {node}: iptables-nft mangle chain ztunnel-")


# ---------------------------------------------------------------- pure parts


def _r(args: str, chain: str = "PREROUTING") -> IptRule:
    return IptRule("mangle", chain, args)


def test_map_chain_needs_id_and_expression_and_both_halves_of_tproxy():
    tp = _r("-i pistioin -p tcp -j TPROXY --on-port 15006 --on-ip 127.0.0.1 --tproxy-mark 0x400/0xfff")
    mark = _r("-i eth0 -j MARK --set-xmark 0x4d3/0xfff")
    origins = {("Z3", "e-tp"): trace_live_nft.Origin(tp, 0, 2),
               ("Z3 no listener", "e-drop"): trace_live_nft.Origin(tp, 1, 2),
               ("Z4", "e-mark"): trace_live_nft.Origin(mark)}
    labels = [f"L{i}" for i in range(6)]
    found = (("Z3", "e-tp"), ("Z3 no listener", "e-drop"), ("Z4", "e-other"), ("Z4", "e-mark"),
             ("Z9", "e-mark"), ("Z3 no listener", "e-drop"))
    got = trace_live_nft.map_chain(found, origins, labels)
    assert got == [
        (tp, "L0", ""),
        (None, "L2", "not the translation of Z4 (-t mangle -A PREROUTING -i eth0 -j MARK --set-xmark 0x4d3/0xfff)"),
        (mark, "L3", ""),
        (None, "L4", "no rule of ours in this chain has the id 'Z9'"),
        (None, "L5", "a no-listener drop without its tproxy rule right before it")]
    assert trace_live_nft.map_chain((("Z3", "e-tp"), ("Z4", "e-mark")), origins, labels[:2]) == [
        (None, "L0", "Z3 without its 'Z3 no listener' drop right after it (xt_TPROXY drops when no "
                     "listener is found)"),
        (mark, "L1", "")]
    assert trace_live_nft.map_chain(((None, "e-mark"),), origins, ["L"]) == [(None, "L", "no rule id (comment)")]


def test_listed_rules_reads_chains_in_order_without_counter_values():
    text = ("table ip ztunnel-node {\n\tset s {\n\t\ttype ipv4_addr\n\t\telements = { 10.0.0.1 }\n\t}\n\n"
            "\tchain mangle-PREROUTING {\n\t\ttype filter hook prerouting priority mangle; policy accept;\n"
            '\t\tcounter packets 3 bytes 180 jump mangle-ztunnel-PREROUTING comment "hook"\n\t}\n\n'
            "\tchain mangle-ztunnel-POSTROUTING {\n\t}\n\n"
            '\tchain mangle-ztunnel-PREROUTING {\n\t\tiifname "istioin" counter packets 0 bytes 0 return '
            'comment "P2"\n\t}\n}\n')
    assert trace_live_nft.listed_rules(text) == {
        "mangle-PREROUTING": ['counter jump mangle-ztunnel-PREROUTING comment "hook"'],
        "mangle-ztunnel-POSTROUTING": [],
        "mangle-ztunnel-PREROUTING": ['iifname "istioin" counter return comment "P2"']}


def test_nft_placeholder_rules_are_refused_or_skipped():
    r = IptRule("mangle", "ztunnel-PREROUTING", 'nft chain mangle-ztunnel-PREROUTING: meta mark 0x1 counter '
                                                 'accept comment "P9"')
    with pytest.raises(TraceError, match="an nft rule that is not the translation of a rendered rule"):
        compile_rules("node", "node", (r,), frozenset())
    (c,) = compile_rules("node", "node", (r,), frozenset(), lenient=True).chain("mangle", "ztunnel-PREROUTING")
    assert c.skipped == "an nft rule that is not the translation of a rendered rule"
    assert c.text == r.args and not c.matches_view(object())


@pytest.mark.netns
def test_other_changes_to_our_table_are_named(applied_nft):
    node, zt, vals = applied_nft
    sh("nft", "chain", "ip", NODE_T, "filter-FORWARD", "{ policy drop; }", ns=node)
    sh("nft", "insert", "rule", "ip", NODE_T, PRE, "ip", "saddr", "10.9.9.9", "counter", "return", ns=node)
    sh("nft", "add", "chain", "ip", NODE_T, "extra", ns=node)
    sh("nft", "add", "rule", "ip", NODE_T, "extra", "counter", "accept", "comment", '"P1"', ns=node)
    state = live_nft(node, zt, vals)
    where = f"netns {node}: table ip {NODE_T}"
    assert state.node.unsupported == (
        f"{where} chain filter-FORWARD: declared 'type filter hook forward priority 0; policy drop', not as "
        "translated ('type filter hook forward priority 0; policy accept')",
        f"{where} chain {PRE}: rule 'ip saddr 10.9.9.9 counter return': no rule id (comment)",
        f"{where} chain extra: rule 'counter accept comment \"P1\"': not a chain of ours")
    # the rule without id keeps its place: the rendered rules after it keep theirs
    lenient = live_nft(node, zt, vals, lenient=True)
    body = [r.args for r in lenient.node.state.iptables if r.chain == "ztunnel-PREROUTING" and r.table == "mangle"]
    assert body[0] == f"nft chain {PRE}: ip saddr 10.9.9.9 counter return" and len(body) == 16


@pytest.mark.netns
def test_trace_derives_host_ip_from_the_netns_like_apply(pair, tmp_path):  # noqa: F811
    """A values file that leaves hostIP to the kernel: apply derives it from the node (the
    first podCIDR address found there, 10.244.1.1, not the file's assumed 10.244.0.1), and so
    must the trace, or our own rules (P9/P11 match on HostIP) would read as changed."""
    import yaml

    from helpers import DELETE, apply_change, example_data

    node, zt = pair
    wire_pods(node)
    data = example_data()
    apply_change(data, "node.hostIP", DELETE)
    apply_change(data, "node.podCIDR", "10.244.0.0/16")
    path = tmp_path / "derived.yaml"
    path.write_text(yaml.safe_dump(data))
    with engine(pair, backend="nft", tunnel="vxlan", **{"node.hostIP": DELETE,
                                                       "node.podCIDR": "10.244.0.0/16"}) as eng:
        eng.apply()
        assert eng.node_params().node.host_ip == "10.244.1.1" != eng.values.node.host_ip
    rc, out, err = cli("trace", "--scenario", "sleep-httpbin", "--values", str(path), "--from", "netns",
                       node, "--ztunnel-netns", zt, "--backend", "nft")
    assert rc == 0, err
    assert "not the translation" not in out + err
    assert "verdict: captured by ztunnel outbound :15001, original destination 10.244.1.6:8000" in out
