"""The in-pod engine with ``inpod.ipv6: true``, against the real kernel (both iptables variants).

What upstream's node agent does per family (inpod-mode.md §2.1, §2.6, §3.1-§3.2), checked on the
IPv6 half next to the IPv4 one:

- apply: ``ip6tables-save`` of each pod netns holds exactly the canonical v6 rules, chain by
  chain in order; ``ip -6 rule`` 32764 and ``local ::/0 dev lo table 100``; the node holds the
  v6 ``ISTIO_POSTRT`` SNAT and the ``istio-inpod-probes-v6`` set (family inet6, one entry per
  pod IPv6 address); a second apply changes nothing;
- drift in the IPv6 half (a flushed ip6tables chain, a deleted v6 rule, route and set entry) is
  named by the plan as IPv6 (``-6``) and repaired, the IPv4 half untouched;
- ``pod_add``/``pod_remove`` do both families;
- cleanup leaves every netns as it was before the first apply, for both families;
- a pod whose ``lo`` has IPv6 disabled gets no v6 route (1.23+), the rest as usual;
- no ip6tables: one-line MissingFeature naming it, before anything changes.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from helpers import values_with

from noderedirect import names
from noderedirect.host import MissingFeature
from noderedirect.inpod_apply import InpodEngine
from noderedirect.model import Pod
from noderedirect.plan import Restore

pytestmark = pytest.mark.netns

SLEEP = {"namespace": "default", "name": "sleep", "uid": "6b1f2c3e-0a4d-4c55-9e1a-1b2c3d4e5f05",
         "ip": "10.244.1.5", "ip6": "fd00:10:244:1::5"}
HTTPBIN = {"namespace": "default", "name": "httpbin", "uid": "7c2e3d4f-1b5e-4d66-8f2b-2c3d4e5f6a06",
           "ip": "10.244.1.6", "ip6": "fd00:10:244:1::6"}
VARIANT = {"iptables": "nft", "iptables-legacy": "legacy"}
RULE6 = "32764:\tfrom all fwmark 0x111/0xfff lookup 100"
SLEEP_ROLE, HTTPBIN_ROLE = "pod:default/sleep", "pod:default/httpbin"


def sh(ns: str, *argv: str) -> str:
    cp = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True)
    assert cp.returncode == 0, f"{argv}: {cp.stderr}"
    return cp.stdout


def save_tool(variant: str, family: int) -> str:
    return f"{'ip6tables' if family == 6 else 'iptables'}-{variant}-save"


def saved_chains(ns: str, variant: str, family: int) -> dict[tuple[str, str], list[str]]:
    """Our rules as iptables-save prints them: (table, chain) -> args, in chain order (owned
    chains and the jumps into them in built-in chains)."""
    out: dict[tuple[str, str], list[str]] = {}
    table = None
    for line in sh(ns, save_tool(variant, family)).splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith("-A ") and "ISTIO_" in line:
            _, chain, args = line.split(" ", 2)
            out.setdefault((table, chain), []).append(args)
    return out


def want_chains(ns_state, family: int) -> dict[tuple[str, str], list[str]]:
    out: dict[tuple[str, str], list[str]] = {}
    for r in ns_state.rules_for(family):
        out.setdefault((r.table, r.chain), []).append(r.args)
    return out


def firewall(ns: str, variant: str, family: int) -> str:
    """iptables-save without comments and counters; with the legacy variant, tables that only
    hold empty built-in chains are left out (the kernel instantiates those on first use and
    never removes them, with or without us)."""
    blocks: list[list[str]] = []
    for line in sh(ns, save_tool(variant, family)).splitlines():
        if line.startswith("#"):
            continue
        if line.startswith("*"):
            blocks.append([])
        blocks[-1].append(re.sub(r" \[\d+:\d+\]$", "", line))
    if variant == "legacy":
        blocks = [b for b in blocks if not all(re.fullmatch(r"\*\w+|:[A-Z]+ ACCEPT|COMMIT", l) for l in b)]
    return "\n".join(l for b in blocks for l in b)


def snapshot(ns: str, variant: str) -> dict[str, str]:
    """Everything in-pod mode could touch in one netns, both families."""
    return {
        "iptables": firewall(ns, variant, 4), "ip6tables": firewall(ns, variant, 6),
        "rule4": sh(ns, "ip", "-4", "rule", "show"), "rule6": sh(ns, "ip", "-6", "rule", "show"),
        "route4": sh(ns, "ip", "-4", "route", "show", "table", "all"),
        "route6": sh(ns, "ip", "-6", "route", "show", "table", "all"),
        "ipset": sh(ns, "ipset", "save"),
    }


@pytest.fixture
def node_and_pods(netns_factory):
    return netns_factory("i6node"), netns_factory("i6sleep"), netns_factory("i6httpbin")


def engine(node, sleep, httpbin, backend="iptables", **extra):
    vals = values_with(**{"pods": [SLEEP, HTTPBIN], "inpod.istioVersion": "1.29", "inpod.ipv6": True,
                          "dnsCapture": True, **extra})
    return InpodEngine(vals, node, {SLEEP["uid"]: sleep, HTTPBIN["uid"]: httpbin}, backend=backend)


@pytest.mark.parametrize("backend", ["iptables", "iptables-legacy"])
def test_apply_both_families_idempotent_and_cleanup_restores_both(node_and_pods, backend):
    node, sleep, httpbin = node_and_pods
    variant = VARIANT[backend]
    before = {ns.spec: snapshot(ns.spec, variant) for ns in node_and_pods}
    with engine(node, sleep, httpbin, backend) as eng:
        assert eng.families == (4, 6)
        first = eng.apply()
        assert first.changed
        want = eng.desired()
        for role, ns in ((SLEEP_ROLE, sleep), (HTTPBIN_ROLE, httpbin), ("node", node)):
            for fam in (4, 6):
                assert saved_chains(ns.spec, variant, fam) == want_chains(want.get(role), fam), (role, fam)
        # the v6 file is upstream's (::1/128, the v6 probe address), in the kernel's spelling
        assert saved_chains(sleep.spec, variant, 6)[("nat", "ISTIO_OUTPUT")][-1] == \
            "! -d ::1/128 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001"
        assert saved_chains(node.spec, variant, 6) == {
            ("nat", "POSTROUTING"): ["-j ISTIO_POSTRT"],
            ("nat", "ISTIO_POSTRT"): ["-p tcp -m owner --socket-exists -m set --match-set "
                                      "istio-inpod-probes-v6 dst -j SNAT --to-source "
                                      "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"]}
        for ns in (sleep, httpbin):
            assert sh(ns.spec, "ip", "-6", "rule", "show").count(RULE6) == 1
            assert sh(ns.spec, "ip", "-4", "rule", "show").count(RULE6) == 1
            assert sh(ns.spec, "ip", "-6", "route", "show", "table", "100") == \
                "local default dev lo metric 1024 pref medium\n"
            assert sh(ns.spec, "ip", "-4", "route", "show", "table", "100").strip() == \
                "local default dev lo scope host"
        # member order in `ipset save` is the hash's: compared as sets; the create lines up
        # to the kernel's own extras (bucketsize, initval)
        ipset = sh(node.spec, "ipset", "save").splitlines()
        assert [l.split(" bucketsize")[0] for l in ipset if l.startswith("create ")] == [
            f"create {names.INPOD_IPSET_V4} hash:ip family inet hashsize 1024 maxelem 65536 comment",
            f"create {names.INPOD_IPSET_V6} hash:ip family inet6 hashsize 1024 maxelem 65536 comment"]
        assert sorted(l for l in ipset if l.startswith("add ")) == [
            f'add {names.INPOD_IPSET_V4} 10.244.1.5 comment "{SLEEP["uid"]}"',
            f'add {names.INPOD_IPSET_V4} 10.244.1.6 comment "{HTTPBIN["uid"]}"',
            f'add {names.INPOD_IPSET_V6} fd00:10:244:1::5 comment "{SLEEP["uid"]}"',
            f'add {names.INPOD_IPSET_V6} fd00:10:244:1::6 comment "{HTTPBIN["uid"]}"',
        ]
        second = eng.apply()
        assert second.applied == [] and second.plan.empty
        eng.cleanup()
        assert eng.plan().changes, "after cleanup everything is missing again"
    for ns in node_and_pods:
        assert snapshot(ns.spec, variant) == before[ns.spec], ns.spec


@pytest.mark.parametrize("backend", ["iptables", "iptables-legacy"])
def test_ipv6_drift_is_named_and_repaired(node_and_pods, backend):
    node, sleep, httpbin = node_and_pods
    variant = VARIANT[backend]
    with engine(node, sleep, httpbin, backend) as eng:
        eng.apply()
        v4_before = {ns.spec: saved_chains(ns.spec, variant, 4) for ns in node_and_pods}
        sh(sleep.spec, f"ip6tables-{variant}", "-t", "nat", "-F", "ISTIO_OUTPUT")
        sh(sleep.spec, "ip", "-6", "route", "del", "local", "::/0", "dev", "lo", "table", "100")
        sh(httpbin.spec, "ip", "-6", "rule", "del", "priority", "32764")
        sh(node.spec, "ipset", "del", names.INPOD_IPSET_V6, "fd00:10:244:1::6")
        p = eng.plan()
        assert [(c.kind, c.action, c.desc) for c in p.get(SLEEP_ROLE).changes] == [
            ("iptables", "rewrite", "-6 nat chain ISTIO_OUTPUT"),
            ("route", "add", "-6 local default dev lo table 100")]
        assert p.get(SLEEP_ROLE).changes[0].reason.startswith("drifted: 6 missing, first: -d fd16:")
        [restore] = p.get(SLEEP_ROLE).restore
        assert isinstance(restore, Restore) and (restore.family, restore.table) == (6, "nat")
        assert restore.text.startswith("*nat\n:ISTIO_OUTPUT - [0:0]\n-A ISTIO_OUTPUT -d fd16:")
        assert [(c.kind, c.action, c.desc) for c in p.get(HTTPBIN_ROLE).changes] == [
            ("ip_rule", "add", "-6 32764: from all fwmark 0x111/0xfff lookup 100")]
        assert [(c.kind, c.action, c.desc) for c in p.get("node").changes] == [
            ("ipset", "add", f'add {names.INPOD_IPSET_V6} fd00:10:244:1::6 comment "{HTTPBIN["uid"]}"')]
        res = eng.apply()
        assert len(res.applied) == 4
        assert eng.plan().empty
        assert sh(sleep.spec, "ip", "-6", "route", "show", "table", "100") == \
            "local default dev lo metric 1024 pref medium\n"
        assert sh(httpbin.spec, "ip", "-6", "rule", "show").count(RULE6) == 1
        assert {ns.spec: saved_chains(ns.spec, variant, 4) for ns in node_and_pods} == v4_before
        assert saved_chains(sleep.spec, variant, 6) == want_chains(eng.desired().get(SLEEP_ROLE), 6)


def test_pod_add_and_remove_do_both_families(node_and_pods, netns_factory):
    node, sleep, httpbin = node_and_pods
    with engine(node, sleep, httpbin) as eng:
        eng.apply()
        extra_ns = netns_factory("i6extra")
        before = snapshot(extra_ns.spec, "nft")
        pod = Pod("default", "extra", "0b0b0b0b-0000-4000-8000-000000000010", "10.244.1.10",
                  ip6="fd00:10:244:1::a")
        done = eng.pod_add(pod, extra_ns)
        assert done == [
            "iptables-restore --noflush: 18 rules",
            "ip6tables-restore --noflush: 18 rules",
            "route replace local default dev lo scope host table 100",
            "ip -6 route replace local default dev lo scope host table 100",
            "ip rule add 32764: from all fwmark 0x111/0xfff lookup 100",
            "ip -6 rule add 32764: from all fwmark 0x111/0xfff lookup 100",
            f'add {names.INPOD_IPSET_V4} 10.244.1.10 comment "{pod.uid}"',
            f'add {names.INPOD_IPSET_V6} fd00:10:244:1::a comment "{pod.uid}"',
        ]
        # the per-pod path and a full apply agree, in both families
        assert eng.plan().empty, eng.plan().text()
        want = eng.desired().get("pod:default/extra")
        assert saved_chains(extra_ns.spec, "nft", 6) == want_chains(want, 6)
        assert sh(extra_ns.spec, "ip", "-6", "rule", "show").count(RULE6) == 1
        # again: the netns holds our chains, the planner takes it; the set entries are re-added
        assert eng.pod_add(pod) == done[-2:]
        eng.pod_remove(pod)
        saved = sh(node.spec, "ipset", "save")
        assert "10.244.1.10" not in saved and "fd00:10:244:1::a" not in saved
        assert "fd00:10:244:1::5" in saved
        # the pod netns is as before (pod_add made no record of iptables-nft's tables, so the
        # empty tables it created stay, as with IPv4): none of our rules, rules or routes
        after = snapshot(extra_ns.spec, "nft")
        for key in ("rule4", "rule6", "route4", "route6"):
            assert after[key] == before[key], key
        assert "ISTIO_" not in after["iptables"] and "ISTIO_" not in after["ip6tables"]
        assert eng.plan().empty


def test_a_pod_whose_lo_has_ipv6_disabled_gets_no_v6_route(node_and_pods):
    node, sleep, httpbin = node_and_pods
    sh(httpbin.spec, "sysctl", "-qw", "net.ipv6.conf.lo.disable_ipv6=1")
    with engine(node, sleep, httpbin) as eng:
        eng.apply()
        assert eng.plan().empty
        assert [r.family for r in eng.desired().get(HTTPBIN_ROLE).routes] == [4]
        assert sh(httpbin.spec, "ip", "-6", "route", "show", "table", "100") == ""
        assert sh(httpbin.spec, "ip", "-6", "rule", "show").count(RULE6) == 1
        assert saved_chains(httpbin.spec, "nft", 6) == want_chains(eng.desired().get(HTTPBIN_ROLE), 6)
        assert sh(sleep.spec, "ip", "-6", "route", "show", "table", "100") != ""


def test_without_ip6tables_one_line_names_it_and_nothing_changes(node_and_pods, tmp_path, monkeypatch):
    node, sleep, httpbin = node_and_pods
    # a PATH with every tool the engine runs except ip6tables
    for tool in ("ip", "ipset", "iptables-nft", "iptables-nft-save", "iptables-nft-restore",
                 "iptables-legacy", "iptables-legacy-save", "iptables-legacy-restore"):
        path = shutil.which(tool)
        if path is None:
            pytest.skip(f"{tool} is not installed")
        os.symlink(path, tmp_path / tool)
    monkeypatch.setenv("PATH", str(tmp_path))
    with engine(node, sleep, httpbin) as eng:
        with pytest.raises(MissingFeature) as err:
            eng.apply()
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith("ip6tables (IPv6 netfilter, for inpod.ipv6: true) is not available in netns "
                           f"{node.spec} (ip6tables-nft -w 10 -t filter -S: ")
    assert text.endswith("or set inpod.ipv6: false")
    monkeypatch.undo()
    for ns in node_and_pods:
        assert "ISTIO_" not in sh(ns.spec, "iptables-nft-save")
    assert sh(node.spec, "ipset", "list", "-n") == ""
