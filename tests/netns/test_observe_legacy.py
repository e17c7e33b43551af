"""observe() reads back exactly what was rendered.

The rendered legacy objects for examples/values.yaml are applied to a fresh node netns and a
fresh ztunnel netns with plain commands only (ipset restore, iptables-restore, ip rule/route,
sysctl), with VXLAN links standing in for GENEVE. Then every rendered ipset, entry, iptables
rule, ip rule, route and sysctl must be found by observe() with an equal value, and nothing
owned may be observed that was not rendered.
"""

from __future__ import annotations

import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

from noderedirect import desired, names, values
from noderedirect.host import Host
from noderedirect.model import IpRule, NetnsState
from noderedirect.observe import observe
from noderedirect.render import declared_chains, restore_text

pytestmark = pytest.mark.netns

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "values.yaml"


def sh(*argv: str, input: str | None = None) -> str:
    cp = subprocess.run(list(argv), input=input, capture_output=True, text=True)
    assert cp.returncode == 0, f"{' '.join(argv)}: {cp.stderr}"
    return cp.stdout


def ip(ns, *args: str) -> str:
    return sh("ip", "-n", ns.spec, *args)


def rule_cmd(r: IpRule) -> list[str]:
    args = ["priority", str(r.priority)]
    if r.fwmark is not None:
        args += ["fwmark", f"{r.fwmark:#x}/{r.fwmask:#x}"]
    args += ["lookup", str(r.table)] if r.action == "lookup" else ["goto", str(r.goto)]
    return args


def wire(node, zt, v) -> None:
    """The kind/ptp wiring of kernel-notes §2, with VXLAN for the four GENEVE links."""
    n = v.node
    ip(node, "link", "add", n.ztunnel_veth, "type", "veth", "peer", "name", n.ztunnel_if,
       "netns", zt.spec)
    ip(node, "addr", "add", f"{n.host_ip}/32", "dev", n.ztunnel_veth)
    ip(zt, "addr", "add", f"{n.ztunnel_ip}/24", "dev", n.ztunnel_if)
    ip(node, "link", "set", n.ztunnel_veth, "up")
    ip(zt, "link", "set", n.ztunnel_if, "up")


def apply_plain(ns, state: NetnsState, variant: str) -> None:
    for link in state.links:
        ip(ns, "link", "add", link.name, "type", "vxlan", "id", str(link.vni), "remote", link.remote,
           "dstport", str(link.dstport))
        ip(ns, "addr", "add", link.address, "dev", link.name)
        ip(ns, "link", "set", link.name, "up")
    if state.ipsets:
        text = "".join(x.show() + "\n" for x in (*state.ipsets, *state.ipset_entries))
        sh("ip", "netns", "exec", ns.spec, "ipset", "restore", input=text)
    sh("ip", "netns", "exec", ns.spec, f"iptables-{variant}-restore", "--noflush",
       input=restore_text(state.rules_for(4)))
    for r in state.ip_rules:
        ip(ns, "rule", "add", *rule_cmd(r))
    for r in state.routes:
        ip(ns, "route", "add", *r.show_with_table().split())
    for s in state.sysctls:
        sh("ip", "netns", "exec", ns.spec, "sysctl", "-q", "-w", f"{s.key}={s.value}")


def owned_view(rules, role: str):
    """Rules per (table, chain) that belong to the design: owned chains, hooks into them, and in
    the ztunnel netns the built-in mangle PREROUTING it writes to directly."""
    out = defaultdict(list)
    for r in rules:
        if (names.is_owned_chain(r.chain) or r.is_hook
                or (role == "ztunnel" and (r.table, r.chain) == ("mangle", "PREROUTING"))):
            out[(r.table, r.chain)].append(r.args)
    return dict(out)


def rendered_view(rules, role: str):
    """The same, in the order the kernel holds them: -I lands on top, -A at the end."""
    out = defaultdict(list)
    for r in rules:
        body = out[(r.table, r.chain)]
        if r.op.startswith("-I"):
            body.insert(int(r.op.split()[1]) - 1 if " " in r.op else 0, r.args)
        else:
            body.append(r.args)
    return dict(out)


@pytest.mark.parametrize("variant", ["nft", "legacy"])
def test_observe_equals_rendered_legacy(netns_factory, variant, capsys):
    v = values.load(str(EXAMPLE))
    rendered = desired.legacy(v)
    node, zt = netns_factory("node"), netns_factory("zt")
    wire(node, zt, v)
    netns_of = {"node": node, "ztunnel": zt}
    for state in rendered.netns:
        apply_plain(netns_of[state.role], state, variant)

    for state in rendered.netns:
        with Host(netns_of[state.role]) as h:
            obs = observe(h, state.role, variant=variant, tables=(100, 101, 102),
                          sysctl_keys=[s.key for s in state.sysctls])
        # ipsets and members
        assert obs.ipsets == state.ipsets
        assert sorted(obs.ipset_entries) == sorted(state.ipset_entries)
        # iptables: same rules, same order in every chain, every declared chain present
        assert owned_view(obs.iptables, state.role) == rendered_view(state.iptables, state.role)
        for r in state.iptables:
            assert r.save_line() in {x.save_line() for x in obs.rules_in(r.table, r.chain)}
        for table in {r.table for r in state.iptables}:
            for chain in declared_chains(list(state.iptables), table):
                assert (table, chain) in obs.chains, (table, chain)
        if state.role == "node":
            assert obs.chains[("mangle", "ztunnel-POSTROUTING")].policy is None   # empty, still seen
            assert obs.rules_in("mangle", "ztunnel-POSTROUTING") == []
        # ip rules: each rendered one found, plain, equal
        plain = [o.rule for o in obs.ip_rules if o.plain]
        for r in state.ip_rules:
            assert r in plain, r
        # routes of tables 100-102: exactly the rendered ones, none made by the kernel
        assert sorted(obs.routes) == sorted(state.routes)
        assert obs.kernel_routes == ()
        # sysctls
        assert sorted(obs.sysctls) == sorted(state.sysctls)
        # links: the VXLAN stand-ins carry the rendered VNI, remote, port and address
        for link in state.links:
            seen = obs.link(link.name)
            assert (seen.vni, seen.remote, seen.dstport, seen.addresses, seen.up) == \
                (link.vni, link.remote, link.dstport, (link.address,), link.up)
        with capsys.disabled():
            print(f"\n[{variant}] {state.role}: {len(state.iptables)} iptables rules, "
                  f"{len(state.ip_rules)} ip rules, {len(state.routes)} routes, "
                  f"{len(state.ipset_entries)} set members, {len(state.sysctls)} sysctls: all observed equal")


def test_observe_reports_foreign_objects_too(netns):
    """Foreign rules in built-in chains, foreign ip rules and other sets are reported (or, for
    ipsets, filtered by name): the planner, not observe, decides what is ours."""
    sh("ip", "netns", "exec", netns.spec, "iptables-nft-restore", "--noflush", input=(
        "*filter\n:KUBE-FORWARD - [0:0]\n-A FORWARD -j KUBE-FORWARD\n"
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\nCOMMIT\n"))
    sh("ip", "netns", "exec", netns.spec, "ipset", "restore",
       input="create other hash:ip\ncreate ztunnel-pods-ips-tmp hash:ip comment\n")
    ip(netns, "rule", "add", "priority", "101", "from", "10.9.0.0/16", "lookup", "101")
    with Host(netns) as h:
        obs = observe(h, "node", tables=(101, 254))
    assert [(r.table, r.chain, r.args) for r in obs.iptables] == [
        ("filter", "FORWARD", "-j KUBE-FORWARD"),
        ("filter", "KUBE-FORWARD", "-m conntrack --ctstate INVALID -j DROP"),
    ]
    assert obs.chains[("filter", "FORWARD")].policy == "ACCEPT"
    assert [s.name for s in obs.ipsets] == ["ztunnel-pods-ips-tmp"]
    foreign = [o for o in obs.ip_rules if o.rule.priority == 101]
    assert [(o.plain, o.text) for o in foreign] == [(False, "101:\tfrom 10.9.0.0/16 lookup 101")]
    assert obs.routes == () and obs.kernel_routes == ()
