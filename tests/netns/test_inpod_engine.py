"""The in-pod engine against the real kernel: a node netns and one netns per ambient pod.

- the canonical form (:func:`noderedirect.inpod_apply.canonical`) is exactly what
  ``iptables-save`` prints, for every in-pod era and both backends: after apply, a re-plan is
  empty (the planner compares the two), and the saved text equals the canonical rules;
- apply is idempotent (a second apply changes nothing), verified, and puts the objects where
  inpod-mode.md §2-§3 says: ISTIO_* chains, rule 32764 and table 100 in each pod, the probe
  set and ISTIO_POSTRT in the node; nothing of the legacy design anywhere;
- drift inside a pod netns is repaired; foreign rules are left alone; cleanup removes exactly ours;
- ``pod_add`` (the agent's per-pod path) leaves the pod exactly as a full apply would.
"""

from __future__ import annotations

import subprocess

import pytest

from helpers import values_with

from noderedirect import names
from noderedirect.inpod_apply import InpodEngine, InpodError, canonical
from noderedirect.model import IptRule, Pod

pytestmark = pytest.mark.netns

SLEEP = {"namespace": "default", "name": "sleep", "uid": "6b1f2c3e-0a4d-4c55-9e1a-1b2c3d4e5f05",
         "ip": "10.244.1.5"}
HTTPBIN = {"namespace": "default", "name": "httpbin", "uid": "7c2e3d4f-1b5e-4d66-8f2b-2c3d4e5f6a06",
           "ip": "10.244.1.6"}
VARIANT = {"iptables": "nft", "iptables-legacy": "legacy"}


def sh(ns: str, *argv: str) -> str:
    cp = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True)
    assert cp.returncode == 0, f"{argv}: {cp.stderr}"
    return cp.stdout


def saved_rules(ns: str, variant: str) -> list[str]:
    """Our ``-A`` lines (owned chains and jumps into them) as iptables-save prints them."""
    out, table = [], None
    for line in sh(ns, f"iptables-{variant}-save").splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith("-A ") and "ISTIO_" in line:
            out.append(f"{table} {line}")
    return sorted(out)


def want_rules(ns_state) -> list[str]:
    return sorted(f"{r.table} -A {r.chain} {r.args}" for r in ns_state.iptables)


@pytest.fixture
def node_and_pods(netns_factory):
    return netns_factory("ipnode"), netns_factory("ipsleep"), netns_factory("iphttpbin")


def engine(node, sleep, httpbin, backend="iptables", version="1.29", **extra):
    vals = values_with(**{"pods": [SLEEP, HTTPBIN], "inpod.istioVersion": version, **extra})
    return InpodEngine(vals, node, {SLEEP["uid"]: sleep, HTTPBIN["uid"]: httpbin}, backend=backend)


@pytest.mark.parametrize("backend", ["iptables", "iptables-legacy"])
@pytest.mark.parametrize("version,dns", [("1.29", True), ("1.29", False), ("1.27", False),
                                         ("1.24", True), ("1.23", True), ("1.21", False)])
def test_apply_is_canonical_idempotent_and_verified(node_and_pods, backend, version, dns):
    node, sleep, httpbin = node_and_pods
    with engine(node, sleep, httpbin, backend, version, dnsCapture=dns) as eng:
        first = eng.apply()
        assert first.changed
        want = eng.desired()
        # the kernel prints exactly the canonical rules (else the verify step would have failed)
        for role, ns in (("pod:default/sleep", sleep), ("pod:default/httpbin", httpbin), ("node", node)):
            assert saved_rules(ns.spec, VARIANT[backend]) == want_rules(want.get(role)), role
        second = eng.apply()
        assert second.applied == [] and second.plan.empty
    for ns in (sleep, httpbin):
        assert sh(ns.spec, "ip", "rule", "show").count("32764:\tfrom all fwmark 0x111/0xfff lookup 100") == 1
        assert sh(ns.spec, "ip", "route", "show", "table", "100").strip() == "local default dev lo scope host"
    ipset = sh(node.spec, "ipset", "save")
    set_name = names.INPOD_IPSET_OLD if version < "1.23" else names.INPOD_IPSET_V4
    assert f'add {set_name} 10.244.1.5 comment "{SLEEP["uid"]}"' in ipset
    assert f'add {set_name} 10.244.1.6 comment "{HTTPBIN["uid"]}"' in ipset
    # nothing of the legacy design, in any netns
    for ns in (node, sleep, httpbin):
        text = sh(ns.spec, f"iptables-{VARIANT[backend]}-save")
        assert "ztunnel-" not in text
    assert "istioin" not in sh(node.spec, "ip", "link")


def test_canonical_matches_the_restore_spelling_rules():
    def canon(chain: str, args: str) -> str:
        return canonical(IptRule("nat", chain, args)).args

    assert canon("ISTIO_PRERT", "-s 169.254.7.127 -p tcp -m tcp -j ACCEPT") == \
        "-s 169.254.7.127/32 -p tcp -m tcp -j ACCEPT"
    assert canon("ISTIO_OUTPUT", "! -d 127.0.0.1/32 -p tcp --dport 53 -m mark ! --mark 0x539/0xfff "
                 "-j REDIRECT --to-ports 15053") == \
        "! -d 127.0.0.1/32 -p tcp -m tcp --dport 53 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15053"
    assert canon("ISTIO_OUTPUT", "! -o lo -p udp -m udp --dport 53 -j REDIRECT --to-port 15053") == \
        "! -o lo -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053"
    assert canon("ISTIO_POSTRT", "-m owner --socket-exists -p tcp -m set --match-set x dst -j SNAT "
                 "--to-source 169.254.7.127") == \
        "-p tcp -m owner --socket-exists -m set --match-set x dst -j SNAT --to-source 169.254.7.127"
    # already canonical text is left as it is
    done = "! -d 127.0.0.1/32 -p tcp -m tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006"
    assert canon("ISTIO_PRERT", done) == done


def test_drift_in_a_pod_is_repaired_and_foreign_rules_stay(node_and_pods):
    node, sleep, httpbin = node_and_pods
    with engine(node, sleep, httpbin) as eng:
        eng.apply()
        # someone flushes our nat chain in sleep, deletes httpbin's ip rule, adds a foreign rule
        sh(sleep.spec, "iptables", "-t", "nat", "-F", "ISTIO_OUTPUT")
        sh(httpbin.spec, "ip", "rule", "del", "priority", "32764")
        sh(sleep.spec, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "udp", "-j", "ACCEPT")
        p = eng.plan()
        assert [c.desc for c in p.get("pod:default/sleep").changes] == ["nat chain ISTIO_OUTPUT"]
        assert [c.action for c in p.get("pod:default/httpbin").changes] == ["add"]
        assert p.get("node").changes == ()
        res = eng.apply()
        assert len(res.applied) == 2
        assert eng.plan().empty
        assert "-A OUTPUT -p udp -j ACCEPT" in sh(sleep.spec, "iptables-save", "-t", "nat")
        # cleanup: ours gone everywhere, the foreign rule stays
        eng.cleanup()
        for ns in (node, sleep, httpbin):
            assert saved_rules(ns.spec, "nft") == []
            assert "32764" not in sh(ns.spec, "ip", "rule", "show")
        assert "-A OUTPUT -p udp -j ACCEPT" in sh(sleep.spec, "iptables-save", "-t", "nat")
        assert names.INPOD_IPSET_V4 not in sh(node.spec, "ipset", "list", "-n")


def test_a_rule_at_32764_that_is_not_ours_is_a_conflict(node_and_pods):
    node, sleep, httpbin = node_and_pods
    sh(sleep.spec, "ip", "rule", "add", "priority", "32764", "fwmark", "0x7", "lookup", "7")
    with engine(node, sleep, httpbin) as eng:
        with pytest.raises(Exception, match="32764"):
            eng.apply()
    # refused before anything changed, in every netns
    assert saved_rules(httpbin.spec, "nft") == [] and saved_rules(node.spec, "nft") == []


def test_pod_add_equals_a_full_apply(node_and_pods, netns_factory):
    node, sleep, httpbin = node_and_pods
    with engine(node, sleep, httpbin) as eng:
        eng.apply()
        extra_ns = netns_factory("ipextra")
        pod = Pod("default", "extra", "0b0b0b0b-0000-4000-8000-000000000010", "10.244.1.10")
        done = eng.pod_add(pod, extra_ns)
        assert done[0].startswith("iptables-restore --noflush: ")
        assert done[-1] == f'add {names.INPOD_IPSET_V4} 10.244.1.10 comment "{pod.uid}"'
        # a full plan with the pod in the values finds nothing to do, and the kernel holds
        # the canonical rules: the per-pod path and apply agree
        assert eng.plan().empty, eng.plan().text()
        assert saved_rules(extra_ns.spec, "nft") == want_rules(eng.desired().get("pod:default/extra"))
        # again: the netns now holds our chains, so the planner takes it (no duplicate jumps);
        # the set entry is re-added as `ipset -exist add` would
        assert eng.pod_add(pod) == [done[-1]]
        assert eng.plan().empty
        # unenroll: the set entry and every rule of ours in its netns
        eng.pod_remove(pod)
        assert "10.244.1.10" not in sh(node.spec, "ipset", "save")
        assert saved_rules(extra_ns.spec, "nft") == []
        assert eng.plan().empty


def test_refuses_pods_without_netns_and_the_nft_backend(node_and_pods):
    node, sleep, httpbin = node_and_pods
    vals = values_with(**{"pods": [SLEEP, HTTPBIN]})
    with pytest.raises(InpodError, match="httpbin"):
        InpodEngine(vals, node, {SLEEP["uid"]: sleep})
    with pytest.raises(InpodError, match="nft"):
        InpodEngine(vals, node, {SLEEP["uid"]: sleep, HTTPBIN["uid"]: httpbin}, backend="nft")
