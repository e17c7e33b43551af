"""The pure half of the nft backend's apply: desired table, JSON -> shape, drift, changes."""

from __future__ import annotations

import dataclasses

import pytest

from helpers import values_with

from noderedirect import desired, names, nftapply
from noderedirect.model import IptRule
from noderedirect.nftapply import Element, LiveTable, NftOp, Shape
from noderedirect.tunnels.vxlan import VxlanDriver

T = names.NFT_TABLE_NODE


def node_state(tunnel_rules: bool = True):
    ns = desired.legacy(values_with()).get("node")
    extra = VxlanDriver().extra_rules("node", ns.links) if tunnel_rules else []
    return dataclasses.replace(ns, iptables=ns.iptables + tuple(extra))


# ---------------------------------------------------------------- desired table


def test_vxlan_check_becomes_two_chains_of_our_table():
    t = nftapply.desired_table(node_state())
    assert t.table == T and t.name == "table ip ztunnel-node"
    assert t.script.endswith(
        "\tchain filter-INPUT {\n"
        "\t\ttype filter hook input priority filter; policy accept;\n"
        '\t\tcounter jump filter-ztunnel-TUNNEL comment "hook"\n'
        "\t}\n\n"
        "\tchain filter-ztunnel-TUNNEL {\n"
        '\t\tip saddr != 10.244.1.2 udp dport 6081 counter drop comment "T1"\n'
        "\t}\n}\n")
    assert "ztunnel-TUNNEL -j" not in t.script and "DROP" not in t.script
    # the skeleton is the same table with an empty set; elements are compared by value
    assert "elements = {" in t.script and "elements = {" not in t.skeleton
    assert t.skeleton == nftapply.desired_table(dataclasses.replace(node_state(), ipset_entries=())).script
    assert t.elements == (Element(names.IPSET, "10.244.1.5", "6b1f2c3e-0a4d-4c55-9e1a-1b2c3d4e5f05"),
                          Element(names.IPSET, "10.244.1.6", "7c2e3d4f-1b5e-4d66-8f2b-2c3d4e5f6a06"))


def test_without_tunnel_rules_the_script_is_the_rendered_one():
    from noderedirect import nft

    ns = node_state(tunnel_rules=False)
    assert nftapply.desired_table(ns).script == nft.legacy_nft(ns)


@pytest.mark.parametrize("args", ["-s 10.244.1.2/32 -p udp -m udp --dport 6081 -j DROP",
                                  "! -s 10.244.1.2/32 -p udp -m udp --dport 6081 -j ACCEPT",
                                  "! -s 10.244.1.0/24 -p udp -m udp --dport 6081 -j DROP"])
def test_any_other_tunnel_rule_is_refused_by_name(args):
    ns = node_state(tunnel_rules=False)
    bad = (IptRule("filter", "INPUT", f"-j {names.CHAIN_TUNNEL}", op="-I"),
           IptRule("filter", names.CHAIN_TUNNEL, args))
    with pytest.raises(nftapply.NftPlanError, match=f"-A ztunnel-TUNNEL {args}: not the outer-source check"):
        nftapply.desired_table(dataclasses.replace(ns, iptables=ns.iptables + bad))


def test_without_firewall_keeps_routes_rules_links_sysctls_only():
    ns = node_state()
    rest = nftapply.without_firewall(ns)
    assert (rest.ipsets, rest.ipset_entries, rest.iptables) == ((), (), ())
    assert (rest.routes, rest.ip_rules, rest.links, rest.sysctls) == (ns.routes, ns.ip_rules, ns.links, ns.sysctls)


# ---------------------------------------------------------------- JSON -> shape -> drift


def rule(chain: str, comment, *expr, packets: int = 0) -> dict:
    body = {"family": "ip", "table": T, "chain": chain, "handle": 7,
            "expr": [*expr, {"counter": {"packets": packets, "bytes": packets * 60}}]}
    if comment is not None:
        body["comment"] = comment
    return {"rule": body}


IIF_IN = {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "istioin"}}
IIF_OUT = {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "istioout"}}


def doc(*rules: dict, elems=None) -> dict:
    s = {"family": "ip", "name": names.IPSET, "table": T, "type": "ipv4_addr", "handle": 3, "size": 65536}
    if elems is not None:
        s["elem"] = elems
    return {"nftables": [
        {"metainfo": {"version": "1.0.6"}},
        {"table": {"family": "ip", "name": T, "handle": 9}},
        {"set": s},
        {"chain": {"family": "ip", "table": T, "name": "c", "handle": 1}},
        *rules]}


WANT = nftapply.shape(doc(rule("c", "P1", IIF_IN), rule("c", "P2", IIF_OUT)), T)


@pytest.mark.parametrize("rules, problems", [
    ((rule("c", "P1", IIF_IN, packets=5), rule("c", "P2", IIF_OUT, packets=9)), []),   # counters differ only
    ((rule("c", "P1", IIF_IN),), ["c P2 missing"]),
    ((rule("c", "P1", IIF_IN), rule("c", "P2", IIF_IN)), ["c P2 differs"]),
    ((rule("c", "P1", IIF_IN), rule("c", None, IIF_OUT), rule("c", "P2", IIF_OUT)), ["c a rule without id unexpected"]),
    ((rule("c", "P2", IIF_OUT), rule("c", "P1", IIF_IN)), ["c rules out of order"]),
    ((rule("c", "P1", IIF_IN), rule("c", "P1", IIF_IN), rule("c", "P2", IIF_OUT)), ["c P1 duplicated"]),
])
def test_shape_drift_names_each_rule(rules, problems):
    have = nftapply.shape(doc(*rules), T)
    assert nftapply.shape_drift(WANT, have) == (problems, len(problems))


def test_chain_header_set_declaration_and_other_objects_are_compared():
    d = doc(rule("c", "P1", IIF_IN), rule("c", "P2", IIF_OUT))
    d["nftables"][2]["set"]["size"] = 1024
    d["nftables"][3]["chain"].update(type="filter", hook="input", prio=0, policy="accept")
    d["nftables"].append({"counter": {"family": "ip", "table": T, "name": "x", "handle": 4}})
    problems, rules = nftapply.shape_drift(WANT, nftapply.shape(d, T))
    assert problems == ["chain c type/hook/priority/policy differs", f"set {names.IPSET} declaration differs",
                        "counter x unexpected"]
    assert rules == 0


def test_elements_are_read_with_and_without_comments():
    d = doc(elems=[{"elem": {"val": "10.244.1.6", "comment": "uid-6"}}, "10.244.1.5"])
    assert nftapply.elements(d, T) == (Element(names.IPSET, "10.244.1.5"), Element(names.IPSET, "10.244.1.6", "uid-6"))
    assert nftapply.elements(d, "another-table") == ()


# ---------------------------------------------------------------- changes and the transaction


def test_plan_table_changes_and_the_one_transaction():
    t = nftapply.desired_table(node_state())
    want = Shape({"c": "{}"}, {"c": (("P1", "[]"),)}, {names.IPSET: "{}"})
    [create] = nftapply.plan_table("node", t, want, None)
    assert create.line() == ("node     nft      create   table ip ztunnel-node (1 chain, 1 rule, "
                             "set ztunnel-pods-ips: 2 elements)  (missing)")
    assert nftapply.transaction([create]) == t.script

    uid5 = t.elements[0].comment
    live = LiveTable(want, (Element(names.IPSET, "10.244.1.5", "old"), Element(names.IPSET, "10.244.1.9")))
    changes = nftapply.plan_table("node", t, want, live)
    assert [c.line() for c in changes] == [
        f'node     nft      replace  table ip ztunnel-node: set element ztunnel-pods-ips 10.244.1.5 comment "{uid5}"'
        "  (drifted: comment was 'old')",
        f'node     nft      add      table ip ztunnel-node: set element ztunnel-pods-ips 10.244.1.6 comment '
        f'"{t.elements[1].comment}"  (missing)',
        "node     nft      delete   table ip ztunnel-node: set element ztunnel-pods-ips 10.244.1.9  (stale)"]
    assert nftapply.transaction(changes) == (
        "delete element ip ztunnel-node ztunnel-pods-ips { 10.244.1.5 }\n"
        f'add element ip ztunnel-node ztunnel-pods-ips {{ 10.244.1.5 comment "{uid5}" }}\n'
        f'add element ip ztunnel-node ztunnel-pods-ips {{ 10.244.1.6 comment "{t.elements[1].comment}" }}\n'
        "delete element ip ztunnel-node ztunnel-pods-ips { 10.244.1.9 }\n")

    drifted = LiveTable(Shape({"c": "{}"}, {"c": ()}, {names.IPSET: "{}"}), live.elements)
    changes = nftapply.plan_table("node", t, want, drifted)
    assert changes[0].line() == "node     nft      replace  table ip ztunnel-node: 1 rule differs  (drifted: c P1 missing)"
    # a whole-table replacement carries every element: it is the transaction on its own
    assert nftapply.transaction(changes) == t.script


def test_removal_is_our_table_only():
    assert nftapply.removal("node", None) == []
    live = LiveTable(Shape({"a": "{}", "b": "{}"}, {"a": (("x", "[]"),), "b": ()}, {}), ())
    [c] = nftapply.removal("ztunnel", live)
    assert c.line() == "ztunnel  nft      delete   table ip ztunnel-tproxy (2 chains, 1 rule)  (ours)"
    assert c.obj == NftOp("delete table ip ztunnel-tproxy\n", whole_table=True)
