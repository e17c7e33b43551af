"""The lab's shape, the rule ids and the hop text, without a kernel (no root needed).

What the kernel tests rely on but cannot show directly: every name stays inside the lab's
prefix and the interface-name limit, the addresses are the plan's, each node's values file is
one the ``apply`` command accepts, the wiring never names a namespace outside the lab, and the
hop report is derived from the observed numbers (not from fixed text).
"""

from __future__ import annotations

import re

import pytest

from noderedirect import desired, names, values
from noderedirect.commands.lab_cmd import _exec_args, _split_target
from noderedirect.lab import client, paths
from noderedirect.lab.topology import Lab, LabError


def test_names_stay_inside_the_prefix_and_the_ifname_limit():
    lab = Lab(prefix="nrx-", nodes=2, extra_pods=3)
    nss = lab.all_netns()
    assert len(nss) == len(set(nss)) == 2 + 2 * 2 + 4 + 3 + 3
    assert all(n.startswith("nrx-") for n in nss)
    for k in (1, 2):
        veths = [p.veth for p in (lab.ztunnel(k),) + lab.pods(k)]
        assert len(veths) == len(set(veths))
        assert all(re.fullmatch(r"veth[0-9a-f]{8}|veth-zt", v) for v in veths)
    assert lab.ztunnel(1).veth == "veth-zt" and lab.key == "nrx"


def test_addresses_follow_the_plan():
    lab = Lab(nodes=2, extra_pods=2)
    got = {p.name: (p.node, p.ip, p.mesh) for p in lab.pods()}
    assert got == {
        "sleep": (1, "10.244.1.5", True), "httpbin": (1, "10.244.1.6", True),
        "plain-a": (1, "10.244.1.7", False), "plain-b": (1, "10.244.1.8", False),
        "extra-1": (1, "10.244.1.10", True), "extra-2": (1, "10.244.1.11", True),
        "sleep-2": (2, "10.244.2.5", True), "httpbin-2": (2, "10.244.2.6", True),
        "plain-2": (2, "10.244.2.7", False)}
    n1, n2 = lab.node_list()
    assert (n1.internal_ip, n1.pod_cidr, n1.host_ip, n1.ztunnel_ip) == \
        ("172.18.0.2", "10.244.1.0/24", "10.244.1.1", "10.244.1.2")
    assert (n2.internal_ip, n2.pod_cidr, n2.host_ip, n2.ztunnel_ip) == \
        ("172.18.0.4", "10.244.2.0/24", "10.244.2.1", "10.244.2.2")


def test_values_files_are_what_apply_accepts():
    lab = Lab(nodes=2, extra_pods=1)
    v1 = values.parse(lab.values_data(1))
    assert [p.name for p in v1.pods] == ["sleep", "httpbin", "extra-1"]     # mesh pods only
    assert v1.node.host_ip == "10.244.1.1" and v1.node.ztunnel_veth == "veth-zt"
    assert all(p.veth == next(q.veth for q in lab.pods() if q.name == p.name) for p in v1.pods)
    v2 = values.parse(lab.values_data(2))
    assert [p.ip for p in v2.pods] == ["10.244.2.5", "10.244.2.6"]
    assert v2.node.internal_ip == "172.18.0.4"


def test_wiring_names_only_lab_namespaces():
    lab = Lab(prefix="nry-", nodes=2)
    own = set(lab.all_netns())
    batches = lab.batches()
    assert {ns for ns, _ in batches} == own
    for ns, lines in batches:
        for line in lines:
            for peer in re.findall(r"\bnetns (\S+)", line):
                assert peer in own and peer != ns, line
    node1 = dict(batches)[lab.node_ns(1)]
    for p in lab.pods(1):
        assert f"route add {p.ip}/32 dev {p.veth} scope host" in node1
    assert "route add 10.244.2.0/24 via 172.18.0.4 dev eth0" in node1
    assert dict(batches)[lab.ns("sleep")][-1] == "route add default via 10.244.1.1 dev eth0"
    ext = dict(batches)[lab.external_ns]
    assert "route add 10.244.0.0/16 via 172.18.0.2 dev eth0" in ext
    assert "route add 10.244.2.0/24 via 172.18.0.4 dev eth0" in ext


@pytest.mark.parametrize("params", [{"prefix": "Bad-"}, {"prefix": "a b-"}, {"prefix": "x" * 40 + "-"},
                                    {"prefix": "nodash"},
                                    {"nodes": 3}, {"extra_pods": 201}, {"backend": "pf"},
                                    {"tunnel": "gre"}])
def test_bad_parameters(params):
    with pytest.raises(LabError):
        Lab(**params)


def test_endpoints():
    lab = Lab()
    assert lab.endpoint("node").name == "node-1" and lab.endpoint("ztunnel").ip == "10.244.1.2"
    assert lab.endpoint("10.244.1.6").name == "httpbin"
    assert lab.endpoint("external").netns == "nrlab-external"
    with pytest.raises(LabError, match="no pod, node or host 'nope'"):
        lab.endpoint("nope")


def test_rule_ids_follow_the_reference_numbering():
    lab = Lab()
    rendered = desired.render(values.parse(lab.values_data(1)), "legacy")
    node = paths.rule_ids("node", rendered.get("node").iptables)
    zt = paths.rule_ids("ztunnel", rendered.get("ztunnel").iptables)
    assert sorted(node, key=lambda r: (re.sub(r"\d", "", r), int(re.sub(r"\D", "", r)))) == \
        ["F1", "F2", "FF1", "I1", "I2", "N1", "NP1", "O1"] + [f"P{i}" for i in range(1, 16)]
    assert node["P15"].args == ("-p tcp -m set --match-set ztunnel-pods-ips src "
                                "-j MARK --set-xmark 0x100/0x100")
    assert node["P10"].args.startswith("! -s 10.244.1.2/32 -i veth-zt")
    assert node["O1"].args.startswith("-s 10.244.1.1/32")
    assert list(zt) == ["Z1", "Z2", "Z3", "Z4"]
    assert "--on-port 15001" in zt["Z2"].args and "--dport 15008" in zt["Z1"].args


def _trace(legs, rules, tcp, body=b"client=10.244.1.5:4000\n", error=None, status=200):
    lab = Lab()
    book = {("node-1", rid): r for rid, r in paths.rule_ids(
        "node", desired.render(values.parse(lab.values_data(1)), "legacy").get("node").iptables).items()}
    resp = client.Response(status, body, "10.244.1.5:3000", error, 0.01)
    return paths.Trace(lab=lab, tunnel="vxlan", src=lab.endpoint("sleep"), dst_ip="10.244.1.6",
                       port=8000, dst=lab.endpoint("httpbin"), path="/", bind=None, response=resp,
                       rules=rules, tcp=tcp, legs=legs, server=[], rulebook=book,
                       routes={"node-1 out": {"gateway": "192.168.127.2", "dev": "istioout",
                                              "table": "101"}})


def test_hops_are_told_from_the_observed_numbers():
    leg = paths.Leg("ztunnel-1", 1, {"listener": 15001, "orig_dst": "10.244.1.6:8000",
                                     "peer": "10.244.1.5:3000", "conn": 1},
                    {"upstream_local": "10.244.1.5:4000", "error": None})
    t = _trace([leg], {("node-1", "P15"): 1, ("ztunnel-1", "Z2"): 1, ("node-1", "P10"): 7},
               {("node-1", "istioout", "out"): 1, ("ztunnel-1", "pistioout", "in"): 1})
    hops = t.hops()
    assert [h.split(".")[0] for h in hops] == [str(i) for i in range(1, len(hops) + 1)]
    assert "rule P15 (`-p tcp -m set --match-set ztunnel-pods-ips src" in hops[0]
    assert "on 1 packet (the SYN)" in hops[0]
    assert hops[1].endswith("→ table 101 → via 192.168.127.2 dev istioout")
    assert "1 TCP packet into istioout (vxlan VNI 1001) → 1 out of pistioout" in hops[2]
    assert "listener 15001, original destination 10.244.1.6:8000" in hops[3]
    assert "from 10.244.1.5:4000 (original source kept)" in hops[4] and "marked 7 packets" in hops[4]
    assert hops[-1] == f"{len(hops)}. httpbin saw client=10.244.1.5:4000 (the client's own address)"
    # other numbers, other text: nothing is hard-wired
    t2 = _trace([leg], {("node-1", "P15"): 2}, {("node-1", "istioout", "out"): 3})
    assert "on 2 packets" in t2.hops()[0] and "3 TCP packets into istioout" in t2.hops()[2]


def test_uncaptured_hops_say_so():
    t = _trace([], {}, {})
    text = "\n".join(t.hops())
    assert "not captured: no ztunnel accepted it; TCP packets on istioin/istioout/veth-zt: 0/0/0" in text
    assert "P8/P10/P15 matched 0/0/0" in text


def test_cli_argument_helpers():
    assert _split_target("httpbin") == ("httpbin", 8000)
    assert _split_target("10.244.1.6:15008") == ("10.244.1.6", 15008)
    with pytest.raises(ValueError):
        _split_target("httpbin:http")
    assert _exec_args(["sleep", "--", "ip", "-br", "a"], "nrlab-") == ("sleep", "nrlab-", ["ip", "-br", "a"])
    assert _exec_args(["sleep", "--prefix", "x-", "--", "ip", "r"], "nrlab-") == ("sleep", "x-", ["ip", "r"])
    assert _exec_args(["sleep", "ip", "r"], "p-") == ("sleep", "p-", ["ip", "r"])
    for bad in ([], ["--", "ip"], ["sleep"], ["sleep", "--"], ["sleep", "--foo", "--", "ip"]):
        with pytest.raises(ValueError):
            _exec_args(bad, "p-")
