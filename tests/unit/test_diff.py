"""noderedirect.diff and ``noderedirect diff``: per-netns, per-kind comparison and the mapping."""

from __future__ import annotations

import copy
import dataclasses
import json
import re

import pytest
import yaml

from goldens import assert_golden
from helpers import EXAMPLE, example_data, values_with

from noderedirect import cli, desired, diff, diff_format, values
from noderedirect.inventory import KINDS
from noderedirect.model import IptRule

SRC = "examples/values.yaml"
O1_118 = "mangle -A ztunnel-OUTPUT -s 10.244.1.1/32 -j MARK --set-xmark 0x220/0xffffffff"
O1_120 = ("mangle -A ztunnel-OUTPUT -s 10.244.1.1/32 -p tcp -m owner --socket-exists -m set "
          "--match-set ztunnel-pods-ips dst -j MARK --set-xmark 0x220/0xffffffff")
FF1 = "filter -A ztunnel-FORWARD -m mark --mark 0x100/0x100 -j ACCEPT"


def legacy(version="1.20", **changes):
    return desired.legacy(values_with(istioVersion=version, **changes))


def inpod(version="1.29", **changes):
    return desired.inpod(values_with(**{"inpod.istioVersion": version}, **changes))


def era_diff(a, b):
    return diff.diff_same(a, b, diff.side(a, SRC), diff.side(b, SRC))


def modes_diff(a, b):
    return diff.diff_modes(a, b, diff.side(a, SRC), diff.side(b, SRC))


def kinds_of(nd):
    return {k.kind: k for k in nd.kinds}


def texts(items):
    return [it.text for it in items]


# ---------------------------------------------------------------- one design, two eras


def test_era_118_vs_120_is_exactly_the_filter_chain_hook_ff1_and_o1():
    d = era_diff(legacy("1.18"), legacy("1.20"))
    node, zt = d.netns
    assert (node.left_role, node.right_role) == ("node", "node")
    k = kinds_of(node)
    assert texts(k["chains"].only_left) == []
    assert texts(k["chains"].only_right) == ["filter ztunnel-FORWARD"]
    assert texts(k["hooks"].only_left) == []
    assert texts(k["hooks"].only_right) == ["filter -I FORWARD -j ztunnel-FORWARD"]
    assert texts(k["rules"].only_left) == [O1_118]
    assert texts(k["rules"].only_right) == [O1_120, FF1]
    assert [h.chain for h in k["rules"].hunks] == ["mangle ztunnel-OUTPUT", "filter ztunnel-FORWARD"]
    assert k["rules"].hunks[0].lines == (
        "@@ -1 +1 @@", "-" + O1_118.removeprefix("mangle "), "+" + O1_120.removeprefix("mangle "))
    assert k["rules"].hunks[1].lines == ("@@ -0,0 +1 @@", "+" + FF1.removeprefix("filter "))
    others = [kk for kk in KINDS if kk not in ("chains", "hooks", "rules")]
    assert all(k[kk].same for kk in others)
    assert zt.same and (zt.left_role, zt.right_role) == ("ztunnel", "ztunnel")
    assert not d.same and d.mapping is None


def test_era_119_vs_120_is_only_o1():
    d = era_diff(legacy("1.19"), legacy("1.20"))
    k = kinds_of(d.netns[0])
    assert [kk for kk in KINDS if not k[kk].same] == ["rules"]
    assert texts(k["rules"].only_left) == [O1_118]
    assert texts(k["rules"].only_right) == [O1_120]


def test_same_input_twice_is_identical():
    d = era_diff(legacy(), legacy())
    assert d.same
    assert "no differences" in diff_format.to_text(d)


def test_rule_order_change_shows_as_a_hunk_even_with_the_same_rules():
    a = legacy()
    node = a.get("node")
    rules = list(node.iptables)
    i, j = 0, 1
    # swap P1 and P2 (both mangle ztunnel-PREROUTING): same set of rules, different order
    idx = [n for n, r in enumerate(rules) if r.chain == "ztunnel-PREROUTING" and r.table == "mangle"]
    rules[idx[i]], rules[idx[j]] = rules[idx[j]], rules[idx[i]]
    b = dataclasses.replace(a, netns=(dataclasses.replace(node, iptables=tuple(rules)), a.get("ztunnel")))
    k = kinds_of(era_diff(a, b).netns[0])["rules"]
    assert k.only_left == () and k.only_right == ()
    assert [h.chain for h in k.hunks] == ["mangle ztunnel-PREROUTING"]
    assert not k.same


def test_values_diff_pods_and_dns():
    data = example_data()
    other = copy.deepcopy(data)
    other["dnsCapture"] = True
    other["pods"].append({"namespace": "default", "name": "extra", "uid": "u-3", "ip": "10.244.1.9"})
    a, b = desired.legacy(values.parse(data)), desired.legacy(values.parse(other))
    k = kinds_of(era_diff(a, b).netns[0])
    assert texts(k["ipset_entries"].only_right) == ['add ztunnel-pods-ips 10.244.1.9 comment "u-3"']
    assert texts(k["routes"].only_right) == ["table 100: 10.244.1.9 via 192.168.126.2 dev istioin src 10.244.1.1"]
    assert texts(k["rules"].only_right) == [
        "nat -A ztunnel-PREROUTING -p udp -m set --match-set ztunnel-pods-ips src -m udp --dport 53 "
        "-j DNAT --to-destination 10.244.1.2:15053"]
    assert k["rules"].only_left == () and k["ipset_entries"].only_left == ()


def test_inpod_eras_pod_diffs_printed_once_for_identical_pods():
    d = era_diff(inpod("1.23"), inpod("1.29"))
    roles = [(n.left_role, n.same_as) for n in d.netns]
    assert roles == [("node", None), ("pod:default/sleep", None), ("pod:default/httpbin", "pod:default/sleep")]
    node = kinds_of(d.netns[0])
    assert texts(node["hooks"].only_left) == ["nat -A POSTROUTING -j ISTIO_POSTRT"]
    assert texts(node["hooks"].only_right) == ["nat -I POSTROUTING 1 -j ISTIO_POSTRT"]
    text = diff_format.to_text(d)
    assert "== pod:default/httpbin netns: the same differences as pod:default/sleep ==" in text


# ---------------------------------------------------------------- legacy vs in-pod


def test_cross_mode_pairs_node_with_node_and_ztunnel_with_one_pod():
    d = modes_diff(legacy(), inpod())
    assert d.cross_mode
    assert [(n.left_role, n.right_role) for n in d.netns] == [("node", "node"), ("ztunnel", "pod:default/sleep")]
    assert "in-pod: one netns per ambient pod; shown: default/sleep, one of 2 pod netns (× 2 pods, all identical)" \
        in d.netns[1].notes
    node = kinds_of(d.netns[0])
    assert len(node["rules"].left) == 23 and texts(node["rules"].right) == [
        "nat -A ISTIO_POSTRT -m owner --socket-exists -p tcp -m set --match-set istio-inpod-probes-v4 dst "
        "-j SNAT --to-source 169.254.7.127"]
    assert node["links"].right == () and len(node["links"].left) == 2
    zt = kinds_of(d.netns[1])
    # the only object with the same text on both sides: a local default route in table 100
    assert [texts(zt[k].common_items) for k in KINDS if zt[k].common] == [["table 100: local default dev lo scope host"]]


def test_cross_mode_reversed_order_keeps_the_pairing():
    d = modes_diff(inpod(), legacy())
    assert [(n.left_role, n.right_role) for n in d.netns] == [("node", "node"), ("pod:default/sleep", "ztunnel")]
    assert d.mapping is not None and not d.mapping.unmapped_legacy


def test_cross_mode_without_pods_says_so():
    d = modes_diff(legacy(pods=[]), inpod(pods=[]))
    zt = d.netns[1]
    assert zt.left_role == "ztunnel" and zt.right_role is None
    assert zt.right_note == "no pod netns: the values list no ambient pods"
    text = diff_format.to_text(d)
    assert "== ztunnel netns  ↔  (none: no pod netns: the values list no ambient pods) ==" in text
    assert all(not k.right for k in zt.kinds)


def test_cross_mode_names_pods_that_differ_from_the_representative():
    data = example_data()
    data["pods"][1]["ingress"] = True
    d = modes_diff(desired.legacy(values.parse(data)), desired.inpod(values.parse(data)))
    assert "in-pod: one netns per ambient pod; shown: default/sleep, one of 2 pod netns " \
           "(× 2 pods; 1 differ from it: default/httpbin)" in d.netns[1].notes


# ---------------------------------------------------------------- the mapping is checkable

LEGACY_CONFIGS = [
    {"istioVersion": v, "dnsCapture": dns, "ipset.comments": c}
    for v in ("1.18", "1.19", "1.20") for dns in (False, True) for c in (False, True)
]
INPOD_CONFIGS = [
    {"inpod.istioVersion": v, "dnsCapture": dns, "inpod.ipv6": v6}
    for v in ("1.21", "1.22", "1.23", "1.24", "1.25", "1.27", "1.28", "1.29", "1.30")
    for dns in (False, True) for v6 in (False, True)
]


def _with_knobs(data):
    """Pods exercising every per-pod knob: veth, ingress, virtual interfaces, DNS override, IPv6."""
    data["pods"][0].update({"veth": "vethsleep", "ip6": "fd00::5", "virtualInterfaces": ["fake1s0f0"]})
    data["pods"][1].update({"ingress": True, "dnsCapture": True, "ip6": "fd00::6"})
    data["pods"].append({"namespace": "default", "name": "plain", "uid": "u-7", "ip": "10.244.1.7",
                         "dnsCapture": False})
    return data


def _configs():
    # the mapping is checked per object and per side, so each side's configurations are
    # walked in full and paired with any one of the other side's
    for lc in LEGACY_CONFIGS:
        yield lc, INPOD_CONFIGS[-1]
    for ic in INPOD_CONFIGS:
        yield LEGACY_CONFIGS[-1], ic


def _render_pair(lc, ic):
    data = _with_knobs(example_data())
    from helpers import apply_change
    for k, v in {**lc, **ic}.items():
        apply_change(data, k, v)
    vals = values.parse(data)
    return desired.legacy(vals), desired.inpod(vals)


def test_every_object_of_both_designs_is_mapped_in_every_era_and_knob():
    seen_rows_legacy, seen_rows_inpod = set(), set()
    for lc, ic in _configs():
        leg, inp = _render_pair(lc, ic)
        m = diff.map_objects(leg, inp)
        assert m.unmapped_legacy == (), (lc, [lo.item.text for lo in m.unmapped_legacy])
        assert m.unmapped_inpod == (), (ic, [lo.item.text for lo in m.unmapped_inpod])
        seen_rows_legacy |= {r.row.topic for r in m.rows if r.legacy}
        seen_rows_inpod |= {r.row.topic for r in m.rows + m.new_in_inpod if r.inpod}
    # and no row's matchers are dead: each one selects something in some configuration
    assert seen_rows_legacy == {r.topic for r in diff.MAPPING if r.legacy}
    assert seen_rows_inpod == {r.topic for r in diff.MAPPING + diff.NEW_IN_INPOD if r.inpod}


def test_every_legacy_kind_in_both_netns_is_covered_by_a_row():
    leg, inp = _render_pair({"dnsCapture": True}, {})
    covered = {(m.netns, m.kind) for r in diff.MAPPING for m in r.legacy}
    from noderedirect.inventory import items
    present = {(ns.role, k) for ns in leg.netns for k, its in items(ns).items() if its}
    assert present <= covered
    assert {r for r, _ in present} == {"node", "ztunnel"}


def test_an_unexplained_object_is_reported_not_hidden():
    leg, inp = legacy(), inpod()
    node = leg.get("node")
    stray = IptRule("mangle", "ztunnel-PREROUTING", "-p sctp -j LOG")
    leg = dataclasses.replace(leg, netns=(dataclasses.replace(node, iptables=node.iptables + (stray,)),
                                          leg.get("ztunnel")))
    d = modes_diff(leg, inp)
    assert [(lo.netns, lo.item.text) for lo in d.mapping.unmapped_legacy] == [
        ("node", "mangle -A ztunnel-PREROUTING -p sctp -j LOG")]
    assert "not in the mapping (legacy, node): mangle -A ztunnel-PREROUTING -p sctp -j LOG" \
        in diff_format.to_text(d)
    assert "every rendered object" not in diff_format.to_text(d)
    assert len(kinds_of(d.netns[0])["chains"].left) == 8     # a -j LOG target is no chain


def test_mapping_rows_select_the_documented_objects():
    d = modes_diff(legacy(dnsCapture=True), inpod(dnsCapture=True))
    rows = {r.row.topic: r for r in d.mapping.rows}
    out = rows["outbound capture"]
    assert texts(lo.item for lo in out.legacy) == [
        "mangle -A ztunnel-PREROUTING -p tcp -m set --match-set ztunnel-pods-ips src -j MARK --set-xmark 0x100/0x100",
        "101: from all fwmark 0x100/0x100 lookup 101",
        "table 101: default via 192.168.127.2 dev istioout",
        "table 101: 10.244.1.2 dev veth-zt scope link"]
    assert [(lo.netns, lo.item.text) for lo in out.inpod] == [
        ("pod:default/sleep", "nat -A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff "
                              "-j REDIRECT --to-ports 15001")]
    dns = rows["DNS capture"]
    assert len(dns.legacy) == 1 and "DNAT --to-destination 10.244.1.2:15053" in dns.legacy[0].item.text
    assert sorted({lo.item.kind for lo in dns.inpod}) == ["chains", "hooks", "rules"]
    assert {lo.netns for lo in dns.inpod} == {"pod:default/sleep"}   # the representative only
    assert len(rows["kube-proxy bypass"].legacy) == 3 and rows["kube-proxy bypass"].inpod == ()
    assert len(rows["skip marks"].legacy) == 14   # P1-P7, P11-P14, F1, I1 + ip rule 100


# ---------------------------------------------------------------- output formats


def test_text_fits_160_columns_and_truncates_with_an_ellipsis():
    for d in (modes_diff(legacy(dnsCapture=True), inpod(**{"inpod.ipv6": True})),
              era_diff(legacy("1.18"), legacy("1.20"))):
        lines = diff_format.to_text(d).splitlines()
        assert max(len(line) for line in lines) <= 160
        assert any(line.endswith("…") for line in lines)
    assert diff_format.clip("abcdef", 4) == "abc…" and diff_format.clip("abcd", 4) == "abcd"


def test_text_golden_legacy_vs_inpod():
    assert_golden("render/diff-legacy-inpod.txt", diff_format.to_text(modes_diff(legacy(), inpod())))


def test_text_golden_era_118_vs_120():
    assert_golden("render/diff-legacy-1.18-1.20.txt",
                  diff_format.to_text(era_diff(legacy("1.18"), legacy("1.20"))))


def test_markdown_has_the_mapping_table():
    md = diff_format.to_markdown(modes_diff(legacy(), inpod()))
    assert "## Where each legacy piece went in in-pod mode" in md
    assert "| Legacy piece | Legacy objects | In in-pod mode | In-pod objects |" in md
    for row in diff.MAPPING:
        assert f"| **{row.topic}**: " in md
    assert "| **outbound capture**: " in md and "| node: 1 iptables rule, 1 ip rule, 2 routes |" in md
    assert "| ip rules (4\\|0) |" in md          # pipes inside cells are escaped
    assert "Every rendered object of both designs is covered by a row above." in md


def test_markdown_era_diff_has_diff_blocks():
    md = diff_format.to_markdown(era_diff(legacy("1.18"), legacy("1.20")))
    assert "Rules of `filter ztunnel-FORWARD`:\n\n```diff\n@@ -0,0 +1 @@\n+-A ztunnel-FORWARD -m mark " \
           "--mark 0x100/0x100 -j ACCEPT\n```" in md
    assert "## Where each legacy piece" not in md


def _cli(capsys, *argv):
    try:
        rc = cli.main(["diff", *argv])
    except SystemExit as e:       # argparse's own errors and --help
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_json_output_has_the_documented_keys(capsys):
    rc, out, err = _cli(capsys, "legacy", "inpod", "--values", str(EXAMPLE), "--format", "json")
    assert rc == 0 and err == ""
    doc = json.loads(out)
    assert list(doc) == ["left", "right", "cross_mode", "identical", "netns", "mapping", "unmapped"]
    assert doc["left"] == {"name": "legacy 1.20", "mode": "legacy", "version": "1.20", "values": str(EXAMPLE)}
    assert doc["cross_mode"] is True and doc["identical"] is False
    ns = doc["netns"][1]
    assert list(ns) == ["left", "right", "left_note", "right_note", "notes", "identical", "same_as", "kinds"]
    assert (ns["left"], ns["right"]) == ("ztunnel", "pod:default/sleep")
    assert list(ns["kinds"]) == list(KINDS)
    assert list(ns["kinds"]["rules"]) == ["left", "right", "common", "only_left", "only_right", "hunks"]
    assert (ns["kinds"]["rules"]["left"], ns["kinds"]["rules"]["right"]) == (4, 8)
    assert list(doc["mapping"][0]) == ["topic", "legacy", "inpod", "new_in_inpod", "legacy_objects", "inpod_objects"]
    assert [r["topic"] for r in doc["mapping"]] == [r.topic for r in diff.MAPPING + diff.NEW_IN_INPOD]
    assert doc["mapping"][0]["legacy_objects"][0] == {
        "netns": "node", "kind": "ipsets",
        "text": "create ztunnel-pods-ips hash:ip family inet hashsize 1024 maxelem 65536 comment"}
    assert doc["unmapped"] == {"legacy": [], "inpod": []}


def test_json_era_diff_hunks(capsys):
    rc, out, _ = _cli(capsys, "legacy", "--values", str(EXAMPLE), "--istio-version", "1.18",
                      "--istio-version", "1.20", "--format", "json")
    doc = json.loads(out)
    assert rc == 0 and doc["mapping"] == [] and doc["cross_mode"] is False
    assert [h["chain"] for h in doc["netns"][0]["kinds"]["rules"]["hunks"]] == \
        ["mangle ztunnel-OUTPUT", "filter ztunnel-FORWARD"]
    assert doc["netns"][1]["identical"] is True


def test_cli_values_diff_names_the_files(tmp_path, capsys):
    data = example_data()
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(yaml.safe_dump(data))
    data["pods"] = data["pods"][:1]
    b.write_text(yaml.safe_dump(data))
    rc, out, _ = _cli(capsys, "legacy", "--values", str(a), "--values", str(b))
    assert rc == 0
    assert out.splitlines()[0] == "noderedirect diff: a.yaml (legacy 1.20)  ↔  b.yaml (legacy 1.20)"
    assert re.search(r"^ipset entries \(2\|1\) +add ztunnel-pods-ips 10\.244\.1\.6 ", out, re.M)


@pytest.mark.parametrize("argv, message", [
    (["legacy", "legacy"], "'diff legacy legacy' compares nothing"),
    (["legacy"], "nothing to compare: give a second --values FILE or a second --istio-version"),
    (["inpod"], "nothing to compare: give a second --values FILE or a second --inpod-version"),
    (["legacy", "--inpod-version", "1.23", "--inpod-version", "1.29"], "--inpod-version has no effect"),
    (["legacy", "inpod", "--values", "X"], "comparing legacy with in-pod takes one --values"),
    (["legacy", "inpod", "--istio-version", "1.18", "--istio-version", "1.20"], "--istio-version given 2 times"),
    (["legacy", "--values", "X", "--istio-version", "1.18", "--istio-version", "1.20"], "compare one thing at a time"),
    (["legacy", "--istio-version", "1.18", "--istio-version", "1.19", "--istio-version", "1.20"], "at most two"),
    (["legacy", "inpod", "legacy"], "diff takes one MODE"),
    (["legacy", "--istio-version", "1.17"], "invalid choice: '1.17'"),
    (["ebpf"], "invalid choice: 'ebpf'"),
])
def test_bad_combinations_exit_2_with_one_line(capsys, argv, message):
    rc, out, err = _cli(capsys, *argv, "--values", str(EXAMPLE))
    assert rc == 2
    assert out == ""
    assert len(err.splitlines()) == 1, err
    assert message in err


def test_help_has_examples(capsys):
    rc, out, _ = _cli(capsys, "--help")
    assert rc == 0
    assert "noderedirect diff legacy --values examples/values.yaml --istio-version 1.18 --istio-version 1.20" in out
    assert "noderedirect diff inpod --values examples/values.yaml --inpod-version 1.23 --inpod-version 1.29" in out
