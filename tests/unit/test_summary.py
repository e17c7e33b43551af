"""noderedirect.summary and ``render --summary``: objects per netns and kind, and per extra pod."""

from __future__ import annotations

import json

import pytest

from goldens import assert_golden
from helpers import EXAMPLE, values_with

from noderedirect import cli, summary
from noderedirect.summary import ROWS, SummaryError


def cols(design):
    return {c.key: dict(c.counts) for c in design.columns}


def row(**nonzero):
    """A full column: every row of the summary, zero unless given."""
    return {r: nonzero.get(r, 0) for r in ROWS}


def designs(vals, pods=None):
    s = summary.summarize(vals, pods=pods)
    assert [d.mode for d in s.designs] == ["legacy", "inpod"]
    return s.designs


# legacy node netns, Istio 1.20, DNS off, two pods without a known host-side device
# (legacy-mode.md §1): 5 mangle + 2 nat + 1 filter chains, 8 hooks, P1-P15 + F1 F2 I1 I2 O1
# + N1 NP1 FF1 = 23 rules, 4 ip rules, 3 + 2 + 2 routes (one per pod in table 100), 2 links,
# 8 sysctls
LEGACY_NODE_120 = row(netns=1, ipsets=1, ipset_entries=2, chains=8, hooks=8, rules=23, iptables=31,
                      ip_rules=4, routes=7, links=2, sysctls=8)
# §2: Z1-Z4 in the built-in mangle PREROUTING, rules 20000/20003, 1 + 2 + 2 routes, 2 links,
# rp_filter on pistioin, pistioout, all, default, eth0
LEGACY_ZTUNNEL = row(netns=1, rules=4, iptables=4, ip_rules=2, routes=5, links=2, sysctls=5)
# inpod-mode.md §3.1: the probe set with one entry per pod, nat ISTIO_POSTRT + its hook + SNAT
INPOD_NODE = row(netns=1, ipsets=1, ipset_entries=2, chains=1, hooks=1, rules=1, iptables=2)
# §2.2 without DNS: jumps 1-3 and 6, rules 8-12 and 17-19; ip rule 32764; table 100 local route
INPOD_POD = row(netns=1, chains=4, hooks=4, rules=8, iptables=12, ip_rules=1, routes=1)


def test_legacy_example_two_pods_exact():
    leg, _ = designs(values_with())
    c = cols(leg)
    assert c["node"] == LEGACY_NODE_120
    assert c["ztunnel"] == LEGACY_ZTUNNEL
    assert c["total"] == {r: LEGACY_NODE_120[r] + LEGACY_ZTUNNEL[r] for r in ROWS}
    assert c["total"]["iptables"] == 35 and c["total"]["netns"] == 2


def test_legacy_per_extra_pod_is_one_ipset_entry_and_one_route():
    for version in ("1.18", "1.19", "1.20"):
        leg, _ = designs(values_with(istioVersion=version, dnsCapture=True))
        assert cols(leg)["per_pod"] == row(ipset_entries=1, routes=1), version


def test_legacy_118_has_no_filter_chain():
    leg, _ = designs(values_with(istioVersion="1.18"))
    node = cols(leg)["node"]
    assert (node["chains"], node["hooks"], node["rules"], node["iptables"]) == (7, 7, 22, 29)


def test_inpod_example_two_pods_exact():
    _, inp = designs(values_with())
    c = cols(inp)
    assert [col.label for col in inp.columns] == ["node", "1 pod netns", "total (2 pods)", "+1 pod"]
    assert c["node"] == INPOD_NODE
    assert c["pod"] == INPOD_POD
    assert c["total"] == {r: INPOD_NODE[r] + 2 * INPOD_POD[r] for r in ROWS}


def test_inpod_per_extra_pod_is_one_ipset_entry_and_a_whole_pod_netns():
    _, inp = designs(values_with())
    assert cols(inp)["per_pod"] == {**INPOD_POD, "ipset_entries": 1}


def test_inpod_with_dns_is_18_rules_per_pod():
    # inpod-mode.md §5: "18 rules per family with DNS on: 6 jumps + 12 chain rules"
    _, inp = designs(values_with(dnsCapture=True))
    pod = cols(inp)["pod"]
    assert (pod["chains"], pod["hooks"], pod["rules"], pod["iptables"]) == (6, 6, 12, 18)


def test_inpod_ipv6_doubles_the_pod_and_node_rules():
    _, inp = designs(values_with(**{"inpod.ipv6": True}))
    c = cols(inp)
    assert c["pod"] == row(netns=1, chains=8, hooks=8, rules=16, iptables=24, ip_rules=2, routes=2)
    # two sets; the example pods have no IPv6 address, so the v6 set is empty
    assert c["node"] == row(netns=1, ipsets=2, ipset_entries=2, chains=2, hooks=2, rules=2, iptables=4)


def test_totals_grow_linearly_by_the_per_pod_cost():
    vals = values_with()
    zero = designs(vals, pods=0)
    seven = designs(vals, pods=7)
    for d0, d7 in zip(zero, seven):
        c0, c7 = cols(d0), cols(d7)
        assert c0["per_pod"] == c7["per_pod"]
        assert c7["total"] == {r: c0["total"][r] + 7 * c0["per_pod"][r] for r in ROWS}, d0.mode
    assert cols(zero[0])["total"]["routes"] == 5 + 5   # legacy: no per-pod route at N=0
    assert cols(seven[1])["total"]["netns"] == 8


def test_synthetic_pods_skip_host_and_ztunnel_addresses():
    pods = summary.synthetic_pods(values_with(), 4)
    assert [p.ip for p in pods] == ["10.244.1.3", "10.244.1.4", "10.244.1.5", "10.244.1.6"]
    assert [p.key for p in pods] == ["default/pod-1", "default/pod-2", "default/pod-3", "default/pod-4"]
    assert len({p.uid for p in pods}) == 4


def test_pods_must_fit_the_cidr_with_room_for_one_more():
    # /29: hosts .1-.6; HostIP .1 and ztunnel .2 leave four addresses
    vals = values_with(**{"node.podCIDR": "10.244.1.0/29"})
    s = summary.summarize(vals, pods=3)
    assert s.pods == 3 and s.synthetic
    with pytest.raises(SummaryError) as e:
        summary.summarize(vals, pods=4)
    assert str(e.value) == (
        "--pods 4 does not fit node.podCIDR 10.244.1.0/29: 4 addresses are free (without HostIP "
        "and the ztunnel IP), and one more than N is needed to measure the per-pod cost; use at most 3")
    with pytest.raises(SummaryError):
        summary.summarize(vals, pods=-1)


def test_extra_pod_avoids_the_values_pods():
    vals = values_with(**{"pods[0].ip": "10.244.1.3"})
    extra = summary.extra_pod(vals)
    assert extra.ip == "10.244.1.4"
    assert extra.key not in {p.key for p in vals.pods}


def _render(capsys, *argv):
    try:
        rc = cli.main(["render", "--values", str(EXAMPLE), *argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_summary_text_golden(capsys):
    rc, out, err = _render(capsys, "--summary")
    assert rc == 0 and err == ""
    assert max(len(line) for line in out.splitlines()) <= 160
    assert_golden("render/summary-example.txt", out.replace(str(EXAMPLE), "examples/values.yaml"))


def test_cli_summary_pods_text(capsys):
    rc, out, _ = _render(capsys, "--summary", "--pods", "10")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].startswith("kernel objects on node node-1 for 10 synthetic pods")
    entries = next(line for line in lines if line.startswith("ipset entries"))
    # legacy node, ztunnel, total, +1 | in-pod node, 1 pod netns, total, +1
    assert entries.replace("│", " ").split()[2:] == ["10", "0", "10", "1", "10", "0", "10", "1"]


def test_cli_summary_json(capsys):
    rc, out, _ = _render(capsys, "--summary", "--pods", "3", "--output", "json")
    doc = json.loads(out)
    assert rc == 0
    assert list(doc) == ["source", "node", "pods", "synthetic", "notes", "designs"]
    assert doc["pods"] == 3 and doc["synthetic"] is True
    leg, inp = doc["designs"]
    assert list(leg) == ["mode", "version", "pods", "notes", "columns"]
    assert list(leg["columns"]) == ["node", "ztunnel", "total", "per_pod"]
    assert list(inp["columns"]) == ["node", "pod", "total", "per_pod"]
    assert list(leg["columns"]["node"]["counts"]) == list(ROWS)
    assert leg["columns"]["node"]["counts"]["routes"] == 3 + 2 + 2 + 1
    assert inp["columns"]["total"]["counts"]["netns"] == 4


@pytest.mark.parametrize("argv, message", [
    (["--pods", "3"], "--pods only applies to --summary"),
    (["--summary", "--kind", "routes"], "--kind cannot be combined with --summary"),
    (["--summary", "--netns", "node"], "--netns cannot be combined with --summary"),
    (["--summary", "--vars"], "--vars cannot be combined with --summary"),
    (["--summary", "--backend", "nft"], "--backend nft cannot be combined with --summary"),
    (["--summary", "--pods", "252"], "--pods 252 does not fit node.podCIDR 10.244.1.0/24"),
])
def test_cli_summary_bad_arguments_exit_2(capsys, argv, message):
    rc, out, err = _render(capsys, *argv)
    assert rc == 2 and out == ""
    assert len(err.splitlines()) == 1 and message in err
