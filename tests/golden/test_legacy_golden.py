"""Legacy render vs the hand-transcribed reference (legacy-mode.md §1–§2), per Istio era."""

from __future__ import annotations

import pytest

from goldens import GOLDEN, assert_equal_text, assert_golden
from helpers import strip_comments, values_with

from noderedirect import desired, render

REF = GOLDEN / "reference" / "legacy"


def ref(name: str) -> str:
    return strip_comments((REF / name).read_text())


def objects(ns) -> str:
    lines = [f"ipset: {s.show()}" for s in ns.ipsets] + [f"ipset: {e.show()}" for e in ns.ipset_entries]
    lines += [f"rule: {r.show()}" for r in ns.ip_rules]
    lines += [f"route: {r.show_with_table()}" for r in ns.routes]
    lines += [f"link: {l.show()}" for l in ns.links]
    lines += [f"sysctl: {s.show()}" for s in ns.sysctls]
    return "".join(l + "\n" for l in lines)


@pytest.fixture(scope="module")
def r120():
    return desired.legacy(values_with(istioVersion="1.20"))


def test_node_iptables_120_equals_reference(r120):
    assert_equal_text(ref("node-1.20.iptables"), render.save_text(r120.get("node").iptables),
                      "legacy-mode.md §1.2-§1.3 (node, 1.20)")


def test_ztunnel_iptables_120_equals_reference(r120):
    assert_equal_text(ref("ztunnel-1.20.iptables"), render.save_text(r120.get("ztunnel").iptables),
                      "legacy-mode.md §2.5 (ztunnel netns)")


@pytest.mark.parametrize("role", ["node", "ztunnel"])
def test_other_objects_120_equal_reference(r120, role):
    assert_equal_text(ref(f"{role}-1.20.objects"), objects(r120.get(role)),
                      f"legacy-mode.md ({role} netns objects)")


def test_issue_order_is_the_originals(r120):
    """§1.3: chains+jumps, batch 1 = P1-P4, F1, I1, F2, I2, O1, N1, NP1, FF1, [N2]; batch 2 = P5-P15."""
    rules = [r for r in r120.get("node").iptables if not r.is_hook]
    order = [(r.table, r.chain, r.args.split(" -j ")[0]) for r in rules]
    expected_heads = [
        ("mangle", "ztunnel-PREROUTING", "-i istioin"), ("mangle", "ztunnel-PREROUTING", "-i istioin"),
        ("mangle", "ztunnel-PREROUTING", "-i istioout"), ("mangle", "ztunnel-PREROUTING", "-i istioout"),
        ("mangle", "ztunnel-FORWARD", "-m mark --mark 0x220/0x220"),
        ("mangle", "ztunnel-INPUT", "-m mark --mark 0x220/0x220"),
        ("mangle", "ztunnel-FORWARD", "-m mark --mark 0x210/0x210"),
        ("mangle", "ztunnel-INPUT", "-m mark --mark 0x210/0x210"),
        ("mangle", "ztunnel-OUTPUT", "-s 10.244.1.1/32 -p tcp -m owner --socket-exists -m set --match-set ztunnel-pods-ips dst"),
        ("nat", "ztunnel-PREROUTING", "-m mark --mark 0x100/0x100"),
        ("nat", "ztunnel-POSTROUTING", "-m mark --mark 0x100/0x100"),
        ("filter", "ztunnel-FORWARD", "-m mark --mark 0x100/0x100"),
        ("mangle", "ztunnel-PREROUTING", "-p udp -m udp --dport 6081"),
    ]
    assert order[:len(expected_heads)] == expected_heads
    assert len(order) == 13 + 10  # batch 2 holds P6..P15 after P5
    hooks = [(r.table, r.chain) for r in r120.get("node").iptables if r.is_hook]
    assert hooks == [("nat", "PREROUTING"), ("nat", "POSTROUTING"), ("mangle", "PREROUTING"),
                     ("mangle", "POSTROUTING"), ("mangle", "OUTPUT"), ("mangle", "INPUT"),
                     ("mangle", "FORWARD"), ("filter", "FORWARD")]
    assert all(r.op == "-I" for r in r120.get("node").iptables if r.is_hook)


def test_era_118_differences():
    r = desired.legacy(values_with(istioVersion="1.18")).get("node")
    text = render.save_text(r.iptables)
    assert "*filter" not in text                                   # no FF1 before 1.19
    assert "-A ztunnel-OUTPUT -s 10.244.1.1/32 -j MARK --set-xmark 0x220/0xffffffff\n" in text
    assert "--socket-exists" not in text                             # O1 narrowed only in 1.20
    assert "--dport 6081 -j RETURN" in text                          # P5 literal 6081


def test_era_119_has_filter_but_broad_o1():
    text = render.save_text(desired.legacy(values_with(istioVersion="1.19")).get("node").iptables)
    assert "-A ztunnel-FORWARD -m mark --mark 0x100/0x100 -j ACCEPT" in text
    assert "-A ztunnel-OUTPUT -s 10.244.1.1/32 -j MARK --set-xmark 0x220/0xffffffff\n" in text


def test_geneve_port_reaches_p5_and_all_four_links():
    r = desired.legacy(values_with(**{"geneve.dstPort": 6082}))
    assert "-p udp -m udp --dport 6082 -j RETURN" in render.save_text(r.get("node").iptables)
    assert {l.dstport for ns in r.netns for l in ns.links} == {6082}


def test_118_ignores_a_custom_port_in_values():
    r = desired.legacy(values_with(**{"geneve.dstPort": 6082, "istioVersion": "1.18"}))
    assert {l.dstport for ns in r.netns for l in ns.links} == {6081}


def test_dns_capture_adds_only_n2():
    base = desired.legacy(values_with()).get("node").iptables
    dns = desired.legacy(values_with(dnsCapture=True)).get("node").iptables
    extra = [r for r in dns if r not in base]
    assert [r.save_line() for r in extra] == [
        "-A ztunnel-PREROUTING -p udp -m set --match-set ztunnel-pods-ips src -m udp --dport 53 "
        "-j DNAT --to-destination 10.244.1.2:15053"]
    assert extra[0].table == "nat"
    # N2 follows N1 in the nat chain
    nat = [r.args for r in dns if r.table == "nat" and r.chain == "ztunnel-PREROUTING"]
    assert nat[0].endswith("-j ACCEPT") and "DNAT" in nat[1]


def test_ipset_without_comments_as_real_nodes_had():
    ns = desired.legacy(values_with(**{"ipset.comments": False})).get("node")
    assert [s.show() for s in ns.ipsets] == [
        "create ztunnel-pods-ips hash:ip family inet hashsize 1024 maxelem 65536"]
    assert [e.show() for e in ns.ipset_entries] == ["add ztunnel-pods-ips 10.244.1.5",
                                                    "add ztunnel-pods-ips 10.244.1.6"]


def test_per_pod_objects_scale_with_the_pod_list():
    v = values_with(pods=[{"namespace": "a", "name": f"p{i}", "uid": f"u{i}", "ip": f"10.244.1.{10 + i}"}
                          for i in range(5)])
    node = desired.legacy(v).get("node")
    assert len(node.ipset_entries) == 5
    assert [r.show() for r in node.routes if r.table == 100][1:] == [
        f"10.244.1.{10 + i} via 192.168.126.2 dev istioin src 10.244.1.1" for i in range(5)]
    # nothing else is per pod
    assert len(node.iptables) == len(desired.legacy(values_with(pods=[])).get("node").iptables)


def test_pod_veth_gets_rp_filter_when_known():
    v = values_with(**{"pods[0].veth": "vethsleep"})
    keys = [s.key for s in desired.legacy(v).get("node").sysctls]
    assert "net/ipv4/conf/vethsleep/rp_filter" in keys


def test_render_snapshot_full_text():
    """Snapshot of the whole `render` text (all kinds, both netns), for review on change."""
    text = render.show(desired.legacy(values_with()))
    assert_golden("render/legacy-1.20.txt", text)
