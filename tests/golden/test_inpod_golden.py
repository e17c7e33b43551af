"""In-pod render vs upstream's goldens (inpod-mode.md §2.3, §2.5, §6), byte for byte.

The reference files under reference/inpod/ are hand-transcribed; they are the spec. Each upstream
golden is normalised the way §6.5 says (drop the two ``*-save`` lines, add the final newline)
and compared with ``render.restore_text`` of one netns, the v4 file followed by the v6 file.
"""

from __future__ import annotations

import pytest

from goldens import GOLDEN, assert_equal_text
from helpers import values_with

from noderedirect import desired, names, render, values
from noderedirect.model import IpRule, IpsetEntry, IpsetSet, IptRule, Route, Version

REF = GOLDEN / "reference" / "inpod"
FIXTURE_V6 = "e9ac:1e77:90ca:399f:4d6d:ece2:2f9b:3164"   # upstream's test value, not production
POD = {"namespace": "default", "name": "sleep", "uid": "6b1f2c3e-0a4d-4c55-9e1a-1b2c3d4e5f05",
       "ip": "10.244.1.5"}


def golden(name: str) -> str:
    """An upstream golden as restore input: no ``*-save`` probe lines, final newline added."""
    text = (REF / name).read_text(encoding="utf-8")
    lines = text.split("\n")
    assert lines[:2] == ["iptables-save", "ip6tables-save"], f"{name} lost its *-save lines"
    assert not text.endswith("\n"), f"{name} must keep upstream's missing final newline"
    return "\n".join(lines[2:]) + "\n"


def rendered(version: str = "1.29", *, dns: bool = True, ipv6: bool = False, probe6: str = FIXTURE_V6,
             **pod_knobs):
    """Upstream's test config: one pod, probe v4 169.254.7.127, the given v6 probe."""
    pod = dict(POD, **pod_knobs)
    vals = values_with(**{"dnsCapture": dns, "pods": [pod], "inpod.istioVersion": version,
                          "inpod.ipv6": ipv6, "inpod.probeSNATv6": probe6})
    return desired.render(vals, "inpod")     # with the consistency checks every render gets


def restore(ns, ipv6: bool) -> str:
    text = render.restore_text(ns.rules_for(4))
    return text + render.restore_text(ns.rules_for(6)) if ipv6 else text


def pod_text(version="1.29", *, ipv6=False, **kw) -> str:
    ns = rendered(version, ipv6=ipv6, **kw).get(f"pod:default/{POD['name']}")
    assert not ipv6 or ns.rules_for(6), "IPv6 asked for but no v6 rules rendered"
    return restore(ns, ipv6)


# ---------------------------------------------------------------- HEAD (1.29+) pod goldens

POD_CASES = {
    # golden: (dns on globally, pod knobs, ipv6)
    "default.golden": (True, {}, False),
    "default_ipv6.golden": (True, {}, True),
    "ingress.golden": (False, {"ingress": True}, False),
    "virtual_interfaces.golden": (False, {"virtualInterfaces": ["fake1s0f0", "fake1s0f1"]}, False),
    "ingress_and_virtual_interfaces.golden":
        (False, {"ingress": True, "virtualInterfaces": ["fake1s0f0", "fake1s0f1"]}, False),
    "dns_pod_disabled_and_on_globally.golden": (True, {"dnsCapture": False}, False),
    "dns_pod_enabled_and_off_globally.golden": (False, {"dnsCapture": True}, False),
}


@pytest.mark.parametrize("version", ["1.29", "1.30"])
@pytest.mark.parametrize("name", sorted(POD_CASES))
def test_pod_golden(name, version):
    dns, knobs, ipv6 = POD_CASES[name]
    assert_equal_text(golden(name), pod_text(version, dns=dns, ipv6=ipv6, **knobs), f"reference/inpod/{name}")


@pytest.mark.parametrize("version", ["1.29", "1.30"])
@pytest.mark.parametrize("name,ipv6", [("hostprobe.golden", False), ("hostprobe_ipv6.golden", True)])
def test_host_golden(name, ipv6, version):
    # the host test uses the production v6 SNAT address, not the pod fixture
    node = rendered(version, ipv6=ipv6, probe6=names.INPOD_PROBE_SNAT_V6).get("node")
    assert_equal_text(golden(name), restore(node, ipv6), f"reference/inpod/{name}")


# ---------------------------------------------------------------- earlier REDIRECT eras


@pytest.mark.parametrize("name,version", [
    (name, v) for name in ("default.golden", "default_ipv6.golden", "dns_pod_disabled_and_on_globally.golden")
    for v in ("1.24", "1.25", "1.26", "1.27", "1.28")
    if not (v == "1.24" and POD_CASES[name][1])    # the per-pod DNS annotation is 1.25+
])
def test_pod_rules_unchanged_since_124(name, version):
    """§0.1/§2.2: 1.24-1.28 differ from HEAD only in ingress mode (and lack knobs before 1.25)."""
    dns, knobs, ipv6 = POD_CASES[name]
    assert_equal_text(golden(name), pod_text(version, dns=dns, ipv6=ipv6, **knobs), name)


@pytest.mark.parametrize("version", ["1.24", "1.25", "1.26", "1.27", "1.28"])
def test_ingress_before_129_drops_the_connmark_set_rule(version):
    """§6.3: 1.24-1.28 omitted rule 8 in ingress mode, so mangle declares ISTIO_OUTPUT first."""
    assert_equal_text(golden("ingress-1.28.golden"), pod_text(version, dns=False, ingress=True),
                      "reference/inpod/ingress-1.28.golden")


@pytest.mark.parametrize("version", ["1.25", "1.28"])
def test_ingress_and_virtual_interfaces_before_129(version):
    text = pod_text(version, dns=False, ingress=True, virtualInterfaces=["fake1s0f0", "fake1s0f1"])
    assert_equal_text(golden("ingress_and_virtual_interfaces-1.28.golden"), text,
                      "reference/inpod/ingress_and_virtual_interfaces-1.28.golden")


def test_knobs_an_era_did_not_have_are_ignored():
    """Virtual interfaces and the per-pod DNS annotation are 1.25+; 1.24 behaves as without them."""
    plain = pod_text("1.24", dns=True)
    assert pod_text("1.24", dns=True, virtualInterfaces=["fake1s0f0"], dnsCapture=False) == plain
    assert "fake1s0f0" not in plain and "-j CT --zone 1" in plain
    # ingress mode is 1.24+: in 1.23 the annotation changes nothing
    assert pod_text("1.23", ingress=True) == pod_text("1.23")


@pytest.mark.parametrize("version,jump", [("1.23", "-A POSTROUTING -j ISTIO_POSTRT"),
                                          ("1.25", "-A POSTROUTING -j ISTIO_POSTRT"),
                                          ("1.26", "-A POSTROUTING -j ISTIO_POSTRT"),
                                          ("1.27", "-I POSTROUTING 1 -j ISTIO_POSTRT"),
                                          ("1.28", "-I POSTROUTING 1 -j ISTIO_POSTRT")])
def test_host_jump_by_era(version, jump):
    """§6.4: the jump was appended until 1.26 and inserted at position 1 from 1.27 (#56414)."""
    node = rendered(version, ipv6=True, probe6=names.INPOD_PROBE_SNAT_V6).get("node")
    expected = golden("hostprobe_ipv6.golden").replace("-I POSTROUTING 1 -j ISTIO_POSTRT", jump)
    assert_equal_text(expected, restore(node, True), f"hostprobe_ipv6 ({version})")


# ---------------------------------------------------------------- 1.21-1.23: TPROXY, CLI form


def cli_form(name: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """A CLI-form golden as (-N lines, -A lines), each (table, "CMD CHAIN ARGS")."""
    chains, rules = [], []
    for line in (REF / name).read_text().splitlines():
        toks = line.split()
        assert toks[0] == "iptables" and toks[1] == "-t", line
        item = (toks[2], " ".join(toks[3:]))
        (chains if toks[3] == "-N" else rules).append(item)
    return chains, rules


def as_cli(rules: list[IptRule]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Our restore data the way CLI form spells it: per table the -N lines, then every rule."""
    chains = [(t, f"-N {c}") for t in sorted({r.table for r in rules})
              for c in render.declared_chains(rules, t)]
    return chains, [(r.table, r.restore_line()) for r in rules]


@pytest.mark.parametrize("version", ["1.21", "1.22", "1.23"])
def test_tproxy_era_rule_sequence(version):
    """§2.5: the 1.21.0 default.golden (DNS on); 1.22.0 and 1.23.0 are byte-identical."""
    want_chains, want_rules = cli_form("tproxy-1.21.cli")
    ns = rendered(version, dns=True).get("pod:default/sleep")
    got_chains, got_rules = as_cli(list(ns.rules_for(4)))
    assert got_rules == want_rules
    # the CLI golden interleaves tables; per table the -N order is what restore declares
    for table in ("mangle", "nat"):
        assert [c for t, c in got_chains if t == table] == [c for t, c in want_chains if t == table]
    assert sorted(got_chains) == sorted(want_chains)
    assert {r.table for r in ns.rules_for(4)} == {"mangle", "nat"}   # no raw table before 1.24


def test_tproxy_era_without_dns_drops_only_the_udp_53_rule():
    _, want = cli_form("tproxy-1.21.cli")
    want = [r for r in want if "--dport 53" not in r[1]]
    assert len(want) == 14
    got = as_cli(list(rendered("1.21", dns=False).get("pod:default/sleep").rules_for(4)))[1]
    assert got == want


def test_tproxy_era_v6_copy_substitutes_loopback_and_probe():
    ns = rendered("1.23", ipv6=True).get("pod:default/sleep")
    v4 = [r.restore_line() for r in ns.rules_for(4)]
    v6 = [r.restore_line() for r in ns.rules_for(6)]
    assert v6 == [l.replace("127.0.0.1/32", "::1/128").replace("169.254.7.127", FIXTURE_V6) for l in v4]


@pytest.mark.parametrize("version", ["1.21", "1.22"])
def test_ipv6_never_on_before_123(version):
    """§0.1: through 1.22 the agent never passed the IPv6 flag on, pod and node alike."""
    r = rendered(version, ipv6=True, probe6=names.INPOD_PROBE_SNAT_V6)
    for ns in r.netns:
        assert {x.family for x in ns.iptables} == {4}
        assert {x.family for x in ns.routes + ns.ip_rules} <= {4}
    assert [s.name for s in r.get("node").ipsets] == [names.INPOD_IPSET_OLD]


@pytest.mark.parametrize("version", ["1.21", "1.22"])
def test_host_rules_121(version):
    want_chains, want_rules = cli_form("hostprobe-1.21.cli")
    got_chains, got_rules = as_cli(list(rendered(version).get("node").rules_for(4)))
    assert (got_chains, got_rules) == (want_chains, want_rules)


# ---------------------------------------------------------------- other pod and node objects


def test_pod_route_and_rule_v4_and_v6():
    """§2.1: local default via lo in table 100, fwmark 0x111/0xfff -> 100 at 32764, per family."""
    ns = rendered(ipv6=True).get("pod:default/sleep")
    assert ns.routes == (Route(table=100, dst="0.0.0.0/0", type="local", dev="lo", scope="host"),
                         Route(table=100, dst="::/0", type="local", dev="lo", scope="host", family=6))
    assert ns.ip_rules == (IpRule(priority=32764, action="lookup", table=100, fwmark=0x111, fwmask=0xfff),
                           IpRule(priority=32764, action="lookup", table=100, fwmark=0x111, fwmask=0xfff,
                                  family=6))
    assert [r.show() for r in ns.routes] == ["local default dev lo scope host"] * 2
    assert ns.ip_rules[0].show() == "32764:\tfrom all fwmark 0x111/0xfff lookup 100"
    assert not ns.ipsets and not ns.links and not ns.sysctls
    v4 = rendered().get("pod:default/sleep")
    assert (len(v4.routes), len(v4.ip_rules), {r.family for r in v4.iptables}) == (1, 1, {4})


def test_node_ipsets_per_family_with_uid_comments():
    pods = [dict(POD, ip6="fd00:10:244:1::5"),
            {"namespace": "default", "name": "httpbin", "uid": "7c2e3d4f-1b5e-4d66-8f2b-2c3d4e5f6a06",
             "ip": "10.244.1.6"}]
    node = desired.inpod(values_with(**{"pods": pods, "inpod.ipv6": True})).get("node")
    assert node.ipsets == (IpsetSet(name="istio-inpod-probes-v4"),
                           IpsetSet(name="istio-inpod-probes-v6", family="inet6"))
    assert node.ipset_entries == (
        IpsetEntry("istio-inpod-probes-v4", "10.244.1.5", "6b1f2c3e-0a4d-4c55-9e1a-1b2c3d4e5f05"),
        IpsetEntry("istio-inpod-probes-v4", "10.244.1.6", "7c2e3d4f-1b5e-4d66-8f2b-2c3d4e5f6a06"),
        IpsetEntry("istio-inpod-probes-v6", "fd00:10:244:1::5", "6b1f2c3e-0a4d-4c55-9e1a-1b2c3d4e5f05"),
    )
    assert not node.routes and not node.ip_rules and not node.links and not node.sysctls
    v4_only = desired.inpod(values_with(**{"pods": pods})).get("node")
    assert [s.name for s in v4_only.ipsets] == ["istio-inpod-probes-v4"]
    assert all(e.set == "istio-inpod-probes-v4" for e in v4_only.ipset_entries)


@pytest.mark.parametrize("version", values.INPOD_VERSIONS)
def test_every_era_and_knob_mix_renders_consistently(version):
    """No combination leaves a jump to an undeclared chain, an unused chain or a missing set."""
    vi = ["fake1s0f0", "fake1s0f1"]
    for dns in (True, False):
        for knobs in ({}, {"ingress": True}, {"virtualInterfaces": vi}, {"ingress": True, "virtualInterfaces": vi},
                      {"dnsCapture": True}, {"dnsCapture": False}):
            for ipv6 in (False, True):
                r = rendered(version, dns=dns, ipv6=ipv6, **dict(knobs, ip6="fd00:10:244:1::5"))
                v6_rules = r.get("pod:default/sleep").rules_for(6)
                assert bool(v6_rules) == (ipv6 and Version(version) >= "1.23")
