"""The planner: empty when the kernel matches, exact changes for each drift, conflicts, ownership."""

from __future__ import annotations

import dataclasses

import pytest

from helpers import values_with

from noderedirect import desired, names, plan
from noderedirect.model import IpRule, IptRule, Route, Sysctl
from noderedirect.plan import Observation, ObservedRule
from noderedirect.render import declared_chains


def as_observed(ns, *, foreign_rules=(), extra_chains=()) -> Observation:
    """A fake kernel that holds exactly the rendered state (as iptables-save would list it)."""
    rules = []
    for table in names.TABLE_ORDER:
        t = [r for r in ns.iptables if r.table == table]
        chains = {}
        for r in t:
            body = chains.setdefault(r.chain, [])
            (body.insert(0, r) if r.op.startswith("-I") else body.append(r))
        for body in chains.values():
            rules += [dataclasses.replace(r, op="-A") for r in body]
    chains = frozenset((t, c) for t in names.TABLE_ORDER
                       for c in declared_chains([r for r in ns.iptables if r.table == t], t))
    return Observation(
        role=ns.role, ipsets=ns.ipsets, ipset_entries=ns.ipset_entries,
        iptables=tuple(rules) + tuple(foreign_rules), chains=chains | frozenset(extra_chains),
        ip_rules=tuple(ObservedRule(r) for r in ns.ip_rules), routes=ns.routes, links=ns.links,
        sysctls=ns.sysctls)


@pytest.fixture(scope="module")
def want():
    return desired.legacy(values_with())


def plan_for(want, role, obs):
    return plan.plan_netns(want.get(role), obs, plan.ownership(role))


@pytest.mark.parametrize("role", ["node", "ztunnel"])
def test_matching_kernel_means_empty_plan(want, role):
    p = plan_for(want, role, as_observed(want.get(role)))
    assert p.changes == () and p.conflicts == () and p.restore == () and p.ipset_script == ""


def test_empty_kernel_plans_everything(want):
    p = plan_for(want, "node", Observation("node"))
    kinds = {(c.kind, c.action) for c in p.changes}
    assert ("ipset", "create") in kinds and ("link", "create") in kinds
    assert sum(1 for c in p.changes if c.kind == "route") == 7
    assert sum(1 for c in p.changes if c.kind == "ip_rule") == 4
    assert sum(1 for c in p.changes if c.action == "hook") == 8
    tables = [r.table for r in p.restore]
    assert tables == ["mangle", "nat", "filter"]
    mangle = {r.table: r.text for r in p.restore}["mangle"]
    assert mangle.startswith("*mangle\n:ztunnel-PREROUTING - [0:0]\n:ztunnel-FORWARD - [0:0]\n")
    assert "-I PREROUTING 1 -j ztunnel-PREROUTING\n" in mangle and mangle.endswith("COMMIT\n")
    # the set is created with its members in the same ipset restore
    assert p.ipset_script.splitlines()[0].startswith("create ztunnel-pods-ips hash:ip")
    assert len(p.ipset_script.splitlines()) == 3


def test_one_deleted_rule_rewrites_only_its_chain(want):
    obs = as_observed(want.get("node"))
    victim = next(r for r in obs.iptables if r.chain == "ztunnel-PREROUTING" and "0x100/0x100" in r.args)
    obs = dataclasses.replace(obs, iptables=tuple(r for r in obs.iptables if r is not victim))
    p = plan_for(want, "node", obs)
    assert [(c.action, c.desc) for c in p.changes] == [("rewrite", "mangle chain ztunnel-PREROUTING")]
    assert "1 missing, first: -p tcp -m set --match-set ztunnel-pods-ips src" in p.changes[0].reason
    (family, table, text), = p.restore
    assert family == 4
    assert table == "mangle"
    lines = text.splitlines()
    assert lines[1] == ":ztunnel-PREROUTING - [0:0]" and len(lines) == 2 + 15 + 1


def test_duplicate_and_missing_hooks(want):
    obs = as_observed(want.get("node"))
    hook = IptRule("nat", "PREROUTING", "-j ztunnel-PREROUTING")
    rules = [r for r in obs.iptables if not (r.table == "mangle" and r.chain == "INPUT")] + [hook]
    p = plan_for(want, "node", dataclasses.replace(obs, iptables=tuple(rules)))
    descs = sorted((c.action, c.desc, c.reason) for c in p.changes)
    assert descs == [("hook", "mangle -I INPUT 1 -j ztunnel-INPUT", "missing"),
                     ("unhook", "nat -D PREROUTING -j ztunnel-PREROUTING", "duplicate")]


def test_stale_chain_is_unhooked_flushed_and_deleted(want):
    obs = as_observed(want.get("node"))
    extra = (IptRule("mangle", "ztunnel-OLD", "-j RETURN"), IptRule("mangle", "OUTPUT", "-j ztunnel-OLD"))
    obs = dataclasses.replace(obs, iptables=obs.iptables + extra, chains=obs.chains | {("mangle", "ztunnel-OLD")})
    p = plan_for(want, "node", obs)
    assert {(c.action, c.desc) for c in p.changes} == {("destroy", "mangle chain ztunnel-OLD"),
                                                      ("unhook", "mangle -D OUTPUT -j ztunnel-OLD")}
    text = {r.table: r.text for r in p.restore}["mangle"]
    assert text.index("-D OUTPUT -j ztunnel-OLD") < text.index("-X ztunnel-OLD")


def test_foreign_rules_and_chains_never_enter_the_plan(want):
    foreign = (IptRule("nat", "PREROUTING", "-j KUBE-SERVICES"), IptRule("nat", "KUBE-SERVICES", "-j RETURN"),
               IptRule("mangle", "PREROUTING", "-i eth9 -j MARK --set-xmark 0x4000/0x4000"))
    obs = as_observed(want.get("node"), foreign_rules=foreign, extra_chains={("nat", "KUBE-SERVICES")})
    p = plan_for(want, "node", obs)
    assert p.changes == ()
    assert p.warnings == ()   # foreign jumps appended below ours


def test_warns_when_a_foreign_jump_sits_above_ours(want):
    obs = as_observed(want.get("node"))
    rules = [IptRule("nat", "PREROUTING", "-j KUBE-SERVICES")] + list(obs.iptables)
    p = plan_for(want, "node", dataclasses.replace(obs, iptables=tuple(rules)))
    assert p.changes == ()
    assert p.warnings == ("node: nat PREROUTING: our jump to ztunnel-PREROUTING is not first "
                          "(below '-j KUBE-SERVICES'); traffic that rule accepts skips ours",)


def test_ztunnel_builtin_rules_reordered_or_missing(want):
    obs = as_observed(want.get("ztunnel"))
    z = [r for r in obs.iptables if r.chain == "PREROUTING"]
    foreign = IptRule("mangle", "PREROUTING", "-i eth1 -j RETURN")
    obs2 = dataclasses.replace(obs, iptables=(foreign, z[1], z[0], z[2], z[3]))
    p = plan_for(want, "ztunnel", obs2)
    assert [(c.action, c.desc) for c in p.changes] == [("rewrite", "mangle PREROUTING: our 4 rules")]
    text = {r.table: r.text for r in p.restore}["mangle"]
    assert text.count("-D PREROUTING") == 4 and text.count("-I PREROUTING") == 4
    assert "-i eth1" not in text                      # the foreign rule is left alone


def test_drift_in_routes_rules_sysctls_links_ipset(want):
    ns = want.get("node")
    obs = as_observed(ns)
    pod_route = next(r for r in ns.routes if r.dst == "10.244.1.5/32")
    obs = dataclasses.replace(
        obs,
        routes=tuple(r for r in obs.routes if r is not pod_route)
        + (Route(table=100, dst="10.244.1.9/32", via="192.168.126.2", dev="istioin", src="10.244.1.1"),),
        ip_rules=tuple(o for o in obs.ip_rules if o.rule.priority != 102),
        sysctls=tuple(Sysctl(s.key, "1") if s.key.endswith("all/rp_filter") else s for s in obs.sysctls),
        links=tuple(dataclasses.replace(l, remote="10.244.1.99") if l.name == "istioout" else l for l in obs.links),
        ipset_entries=obs.ipset_entries[1:],
    )
    p = plan_for(want, "node", obs)
    got = sorted((c.kind, c.action, c.reason.split(":")[0]) for c in p.changes)
    assert got == [("ip_rule", "add", "missing"), ("ipset", "add", "missing"),
                   ("link", "replace", "drifted"), ("route", "add", "missing"),
                   ("route", "delete", "stale"), ("sysctl", "set", "drifted")]
    assert p.ipset_script == 'add ztunnel-pods-ips 10.244.1.5 comment "6b1f2c3e-0a4d-4c55-9e1a-1b2c3d4e5f05"\n'


def test_conflicts_before_we_hold_the_node(want):
    foreign_rule = ObservedRule(IpRule(priority=101, action="lookup", table=200), text="101: from all lookup 200")
    foreign_route = Route(table=100, dst="10.0.0.0/8", via="172.18.0.1", dev="eth0")
    p = plan_for(want, "node", Observation("node", ip_rules=(foreign_rule,), routes=(foreign_route,)))
    assert p.conflicts == (
        "node: ip rule priority 101 is already used by '101: from all lookup 200' (not ours)",
        "node: route table 100 is already used ('10.0.0.0/8 via 172.18.0.1 dev eth0' and 0 more; not ours)")


def test_rule_with_foreign_selectors_is_a_conflict_even_when_we_hold_the_node(want):
    obs = as_observed(want.get("node"))
    odd = ObservedRule(IpRule(priority=103, action="lookup", table=100), plain=False,
                       text="103: from 10.1.0.0/16 lookup 100")
    p = plan_for(want, "node", dataclasses.replace(obs, ip_rules=obs.ip_rules + (odd,)))
    assert p.conflicts == ("node: ip rule '103: from 10.1.0.0/16 lookup 100' sits at priority 103, "
                           "which this design uses, and is not one of ours",)


def test_heavy_ipset_churn_rebuilds_and_swaps():
    many = [{"namespace": "a", "name": f"p{i}", "uid": f"u{i}", "ip": f"10.244.1.{10 + i}"} for i in range(20)]
    old = desired.legacy(values_with(pods=many)).get("node")
    new_pods = [{"namespace": "b", "name": f"q{i}", "uid": f"v{i}", "ip": f"10.244.1.{100 + i}"} for i in range(20)]
    new = desired.legacy(values_with(pods=new_pods)).get("node")
    p = plan.plan_netns(new, as_observed(old), plan.ownership("node"))
    ipset = [c for c in p.changes if c.kind == "ipset"]
    assert [c.action for c in ipset] == ["rebuild"]
    script = p.ipset_script.splitlines()
    assert script[0].startswith("create ztunnel-pods-ips-tmp ") and script[1] == "flush ztunnel-pods-ips-tmp"
    assert script[-2:] == ["swap ztunnel-pods-ips-tmp ztunnel-pods-ips", "destroy ztunnel-pods-ips-tmp"]
    assert len(script) == 2 + 20 + 2


def test_removal_plans_only_our_objects(want):
    foreign = (IptRule("nat", "PREROUTING", "-j KUBE-SERVICES"),)
    obs = as_observed(want.get("node"), foreign_rules=foreign, extra_chains={("nat", "KUBE-SERVICES")})
    p = plan.removal(obs, plan.ownership("node"))
    assert not any("KUBE" in c.desc for c in p.changes)
    assert sum(1 for c in p.changes if c.action == "destroy" and c.kind == "iptables") == 8
    assert sum(1 for c in p.changes if c.kind == "route") == 7


def test_ipv6_family_is_planned_only_when_asked_and_carried_with_each_restore():
    pod = {"namespace": "default", "name": "sleep", "uid": "u1", "ip": "10.244.1.5", "ip6": "fd00::5"}
    ns = desired.inpod(values_with(**{"pods": [pod], "inpod.ipv6": True})).get("pod:default/sleep")
    own = plan.ownership(ns.role, "inpod")
    v4 = plan.plan_netns(ns, Observation(ns.role), own)
    both = plan.plan_netns(ns, Observation(ns.role), own, families=(4, 6))
    # IPv4 only: the v6 rules are not planned, so nothing marked -6 among the iptables changes
    assert [(r.family, r.table) for r in v4.restore] == [(4, "mangle"), (4, "nat")]
    assert not any(c.desc.startswith("-6 ") for c in v4.of("iptables"))
    assert [(r.family, r.table) for r in both.restore] == [(4, "mangle"), (4, "nat"), (6, "mangle"), (6, "nat")]
    assert [r.text for r in both.restore[:2]] == [r.text for r in v4.restore]
    v6_nat = both.restore[3].text
    assert "-A ISTIO_OUTPUT ! -d ::1/128 -o lo -j ACCEPT\n" in v6_nat and "127.0.0.1" not in v6_nat
    assert [c.desc for c in both.of("ip_rule")] == ["32764: from all fwmark 0x111/0xfff lookup 100",
                                                    "-6 32764: from all fwmark 0x111/0xfff lookup 100"]
    assert [c.desc for c in both.of("route")] == ["local default dev lo scope host table 100",
                                                  "-6 local default dev lo scope host table 100"]
    assert "-6 nat chain ISTIO_OUTPUT (4 rules)" in [c.desc for c in both.of("iptables")]
    # chains declared only in ip6tables are IPv6 state: the v4 plan of the same netns ignores them
    held = Observation(ns.role, chains6=frozenset({("nat", "ISTIO_OUTPUT")}))
    assert plan.plan_netns(ns, held, own).restore == v4.restore
    stale = plan.removal(held, own, families=(4, 6))
    assert [(c.action, c.desc) for c in stale.changes] == [("destroy", "-6 nat chain ISTIO_OUTPUT")]
    assert [(r.family, r.table) for r in stale.restore] == [(6, "nat")]
