"""The engine in real network namespaces: apply, idempotence, drift repair, foreign objects,
conflicts, cleanup, crash recovery, backends and tunnel drivers.

Topology (kind/ptp wiring, kernel-notes.md §2): a node netns and a ztunnel netns joined by a veth
(`veth-zt` on the node with 10.244.1.1/32, `eth0` in ztunnel with 10.244.1.2/32).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from helpers import ROOT, values_with

pytestmark = pytest.mark.netns

from noderedirect import names  # noqa: E402


def sh(*args, ns=None, check=True, input=None) -> str:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    res = subprocess.run(cmd, capture_output=True, text=True, input=input, timeout=60)
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} -> {res.returncode}: {res.stderr}")
    return res.stdout


def wire(node: str, zt: str) -> None:
    # no IPv6: link-local addresses appear asynchronously (DAD) and would race the snapshots
    for ns in (node, zt):
        sh("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1", ns=ns)
    sh("ip", "link", "add", "veth-zt", "netns", node, "type", "veth", "peer", "name", "eth0", "netns", zt)
    sh("ip", "-n", node, "addr", "add", "10.244.1.1/32", "dev", "veth-zt")
    sh("ip", "-n", node, "link", "set", "veth-zt", "up")
    sh("ip", "-n", node, "route", "add", "10.244.1.2/32", "dev", "veth-zt", "scope", "link")
    sh("ip", "-n", zt, "addr", "add", "10.244.1.2/32", "dev", "eth0")
    sh("ip", "-n", zt, "link", "set", "eth0", "up")
    sh("ip", "-n", zt, "route", "add", "10.244.1.1/32", "dev", "eth0", "scope", "link")
    sh("ip", "-n", zt, "route", "add", "default", "via", "10.244.1.1", "dev", "eth0")
    sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=node)


@pytest.fixture
def pair(netns_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("NODEREDIRECT_STATE_DIR", str(tmp_path / "state"))
    node, zt = netns_factory("node").spec, netns_factory("zt").spec
    wire(node, zt)
    return node, zt


def engine(pair, backend="iptables", tunnel="vxlan", **changes):
    from noderedirect.apply import Engine
    from noderedirect.host import NetnsRef

    node, zt = pair
    vals = values_with(**changes)
    return Engine(vals, NetnsRef.resolve(node), NetnsRef.resolve(zt), backend=backend, tunnel=tunnel)


def save(ns, variant="nft") -> str:
    cmd = "iptables-nft-save" if variant == "nft" else "iptables-legacy-save"
    return "".join(l + "\n" for l in sh(cmd, ns=ns).splitlines() if not l.startswith("#"))


def table_blocks(text: str) -> dict[str, list[str]]:
    out, table = {}, None
    for l in text.splitlines():
        if l.startswith("*"):
            table = l[1:]
        elif l != "COMMIT":
            out.setdefault(table, []).append(l)
    return out


def owned_lines(text: str) -> list[str]:
    return [l for l in text.splitlines() if "ztunnel-" in l or "pistio" in l or "0x4d3" in l]


def foreign_snapshot(ns: str, variant="nft") -> dict:
    """Everything in a netns that is NOT ours, as text (ours filtered by name/number)."""
    ours = re.compile(r"ztunnel-|istioin|istioout|pistio|0x4d3/0xfff|192\.168\.12[67]\.")
    iptables = {}
    table = None
    for l in save(ns, variant).splitlines():
        if l.startswith("*"):
            table = l[1:]
        elif l != "COMMIT" and not ours.search(l) and not re.match(r":(PREROUTING|INPUT|FORWARD|OUTPUT|POSTROUTING) ", l):
            iptables.setdefault(table, []).append(l)   # tables with nothing foreign are left out
    rules = [l for l in sh("ip", "rule", "show", ns=ns).splitlines()
             if l.split(":")[0] not in {str(p) for p in names.LEGACY_NODE_RULE_PRIOS + names.LEGACY_ZTUNNEL_RULE_PRIOS}]
    routes = [l for l in sh("ip", "route", "show", "table", "all", ns=ns).splitlines()
              if not ours.search(l) and not re.search(r"table (100|101|102)\b", l)]
    links = [re.sub(r"^\d+: ", "", l) for l in sh("ip", "-o", "link", "show", ns=ns).splitlines() if not ours.search(l)]
    sets = [l for l in sh("ipset", "save", ns=ns).splitlines() if "ztunnel-pods-ips" not in l]
    return {"iptables": iptables, "rules": rules, "routes": routes, "links": links, "ipsets": sets}


def add_foreign(node: str, variant="nft") -> None:
    restore = "iptables-nft-restore" if variant == "nft" else "iptables-legacy-restore"
    sh(restore, "--noflush", ns=node, input=(
        "*nat\n:KUBE-SERVICES - [0:0]\n-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m tcp --dport 443 -j RETURN\n"
        "-A PREROUTING -j KUBE-SERVICES\nCOMMIT\n"
        "*mangle\n:KUBE-KUBELET-CANARY - [0:0]\n-A PREROUTING -i eth9 -j MARK --set-xmark 0x4000/0x4000\nCOMMIT\n"))
    sh("ipset", "create", "kube-foreign", "hash:ip", ns=node)
    sh("ipset", "add", "kube-foreign", "10.9.9.9", ns=node)
    sh("ip", "link", "add", "fz-a", "type", "veth", "peer", "name", "fz-b", ns=node)
    sh("ip", "addr", "add", "172.18.0.2/24", "dev", "fz-a", ns=node)
    sh("ip", "link", "set", "fz-a", "up", ns=node)
    sh("ip", "route", "add", "10.50.0.0/16", "via", "172.18.0.1", "dev", "fz-a", ns=node)
    sh("ip", "route", "add", "10.60.0.0/16", "via", "172.18.0.1", "dev", "fz-a", "table", "200", ns=node)
    sh("ip", "rule", "add", "priority", "500", "fwmark", "0x8000/0x8000", "lookup", "200", ns=node)


# ---------------------------------------------------------------- apply: state and idempotence


@pytest.mark.parametrize("backend", ["iptables", "iptables-legacy"])
def test_apply_then_observed_equals_desired_and_second_apply_is_empty(pair, backend):
    node, zt = pair
    variant = "nft" if backend == "iptables" else "legacy"
    with engine(pair, backend=backend) as eng:
        res = eng.apply()
        assert res.changed and res.plan.conflicts == []
        again = eng.apply()
        assert again.plan.empty and again.applied == []
        want = eng.desired()
    # value for value, through the kernel's own tools
    from noderedirect import render
    node_rules = [r for r in want.get("node").iptables if "ztunnel-TUNNEL" not in r.args and r.chain != "ztunnel-TUNNEL"]
    saved = save(node, variant)
    for line in render.save_text(node_rules).splitlines():
        if line.startswith("-A") or line.startswith(":ztunnel"):
            assert line in saved.splitlines(), line
    assert sh("ip", "rule", "show", ns=node).count("goto 32766") == 1
    for r in want.get("node").ip_rules:
        assert r.show() in sh("ip", "rule", "show", ns=node)
    for t in (100, 101, 102):
        shown = sh("ip", "route", "show", "table", str(t), ns=node)
        for r in want.get("node").routes:
            if r.table == t:
                assert r.show() in shown, (t, r.show(), shown)
    members = sh("ipset", "save", "ztunnel-pods-ips", ns=node)
    assert 'add ztunnel-pods-ips 10.244.1.5 comment "6b1f2c3e-0a4d-4c55-9e1a-1b2c3d4e5f05"' in members
    zsaved = save(zt, variant)
    assert "-A PREROUTING -i pistioout -p tcp -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x400/0xfff" in zsaved
    assert "20003:\tfrom all fwmark 0x4d3/0xfff lookup 100" in sh("ip", "rule", "show", ns=zt)
    assert "local default dev lo scope host" in sh("ip", "route", "show", "table", "100", ns=zt)
    assert sh("cat", "/proc/sys/net/ipv4/conf/veth-zt/accept_local", ns=node).strip() == "1"


def test_jumps_never_duplicate_over_many_applies(pair):
    node, _ = pair
    with engine(pair) as eng:
        for _ in range(3):
            eng.apply()
    saved = save(node)
    for table_hook in ("-A PREROUTING -j ztunnel-PREROUTING", "-A FORWARD -j ztunnel-FORWARD"):
        assert saved.count(table_hook + "\n") == 2   # nat+mangle / mangle+filter, once each


# ---------------------------------------------------------------- drift repair


DRIFTS = {
    "flush chain": lambda n, z: sh("iptables", "-t", "mangle", "-F", "ztunnel-PREROUTING", ns=n),
    "delete rule": lambda n, z: sh("iptables", "-t", "nat", "-D", "ztunnel-PREROUTING", "-m", "mark", "--mark",
                                   "0x100/0x100", "-j", "ACCEPT", ns=n),
    "delete hook": lambda n, z: sh("iptables", "-t", "mangle", "-D", "FORWARD", "-j", "ztunnel-FORWARD", ns=n),
    "ztunnel rule": lambda n, z: sh("iptables", "-t", "mangle", "-D", "PREROUTING", "-i", "pistioout", "-p", "tcp",
                                    "-j", "TPROXY", "--on-port", "15001", "--on-ip", "127.0.0.1",
                                    "--tproxy-mark", "0x400/0xfff", ns=z),
    "ip rule": lambda n, z: sh("ip", "rule", "del", "priority", "102", ns=n),
    "route": lambda n, z: sh("ip", "route", "del", "default", "table", "101", ns=n),
    "pod route": lambda n, z: sh("ip", "route", "del", "10.244.1.6/32", "table", "100", ns=n),
    "route attribute": lambda n, z: sh("ip", "route", "replace", "10.244.1.5/32", "via", "192.168.126.2", "dev",
                                       "istioin", "table", "100", ns=n),    # src HostIP lost
    "link": lambda n, z: sh("ip", "link", "del", "istioout", ns=n),
    "address": lambda n, z: sh("ip", "addr", "flush", "dev", "pistioin", ns=z),
    "ipset member": lambda n, z: sh("ipset", "del", "ztunnel-pods-ips", "10.244.1.5", ns=n),
    "sysctl": lambda n, z: sh("sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1", ns=n),
}


@pytest.mark.parametrize("drift", sorted(DRIFTS))
def test_drift_is_named_by_plan_and_repaired_by_apply(pair, drift):
    node, zt = pair
    with engine(pair) as eng:
        eng.apply()
        before_node, before_zt = save(node), save(zt)
        DRIFTS[drift](node, zt)
        p = eng.plan()
        assert not p.empty, f"{drift} went unnoticed"
        assert all(c.reason for c in p.changes)
        res = eng.apply()
        assert res.changed
        assert eng.plan().empty
    assert owned_lines(save(node)) == owned_lines(before_node)
    assert owned_lines(save(zt)) == owned_lines(before_zt)


def test_plan_names_exactly_what_drifted(pair):
    node, zt = pair
    with engine(pair) as eng:
        eng.apply()
        DRIFTS["ip rule"](node, zt)
        DRIFTS["pod route"](node, zt)
        p = eng.plan()
    assert sorted(c.line() for c in p.changes) == [
        "node     ip_rule  add      102: from all fwmark 0x40/0x40 lookup 102  (missing)",
        "node     route    add      10.244.1.6 via 192.168.126.2 dev istioin src 10.244.1.1 table 100  (missing)",
    ]


# ---------------------------------------------------------------- foreign objects and conflicts


@pytest.mark.parametrize("backend", ["iptables", "iptables-legacy"])
def test_foreign_objects_are_byte_identical_after_apply_reapply_cleanup(pair, backend):
    node, zt = pair
    variant = "nft" if backend == "iptables" else "legacy"
    add_foreign(node, variant)
    before = foreign_snapshot(node, variant)
    with engine(pair, backend=backend) as eng:
        eng.apply()
        assert foreign_snapshot(node, variant) == before
        # someone inserts a jump above ours after apply: re-apply keeps it where it is
        restore = "iptables-nft-restore" if variant == "nft" else "iptables-legacy-restore"
        sh(restore, "--noflush", ns=node, input="*nat\n:KUBE-TOP - [0:0]\n-I PREROUTING 1 -j KUBE-TOP\nCOMMIT\n")
        before2 = foreign_snapshot(node, variant)
        res = eng.apply()
        assert res.plan.empty
        assert any("not first" in w for w in res.plan.warnings)
        assert foreign_snapshot(node, variant) == before2
        eng.cleanup()
    assert foreign_snapshot(node, variant) == before2
    assert owned_lines(save(node, variant)) == []


def test_conflicting_table_refuses_before_changing_anything(pair):
    from noderedirect.apply import ConflictError

    node, zt = pair
    sh("ip", "route", "add", "10.70.0.0/16", "dev", "veth-zt", "table", "101", ns=node)
    sh("ip", "rule", "add", "priority", "103", "lookup", "main", ns=node)
    before = (save(node), sh("ip", "rule", "show", ns=node), sh("ip", "route", "show", "table", "all", ns=node),
              sh("ip", "link", "show", ns=zt))
    with engine(pair) as eng, pytest.raises(ConflictError) as ei:
        eng.apply()
    msg = str(ei.value)
    assert "route table 101 is already used ('10.70.0.0/16 dev veth-zt" in msg
    assert "ip rule priority 103 is already used" in msg
    after = (save(node), sh("ip", "rule", "show", ns=node), sh("ip", "route", "show", "table", "all", ns=node),
             sh("ip", "link", "show", ns=zt))
    assert after == before


# ---------------------------------------------------------------- cleanup


def full_snapshot(ns: str) -> dict:
    keys = ["net/ipv4/conf/all/rp_filter", "net/ipv4/conf/default/rp_filter"]
    return {"save": save(ns), "legacy": save(ns, "legacy"), "rules": sh("ip", "rule", "show", ns=ns),
            "routes": sh("ip", "route", "show", "table", "all", ns=ns),
            "links": re.sub(r"^\d+: ", "", sh("ip", "-o", "link", "show", ns=ns), flags=re.M),
            "addrs": sh("ip", "-o", "addr", "show", ns=ns), "sets": sh("ipset", "save", ns=ns),
            "sysctl": [sh("cat", f"/proc/sys/{k}", ns=ns) for k in keys]}


@pytest.mark.parametrize("tunnel", ["vxlan", "usergeneve"])
def test_cleanup_leaves_both_netns_identical_to_before(pair, tunnel):
    node, zt = pair
    sh("sysctl", "-qw", "net.ipv4.conf.all.rp_filter=2", ns=node)
    sh("sysctl", "-qw", "net.ipv4.conf.default.rp_filter=1", ns=zt)
    before = full_snapshot(node), full_snapshot(zt)
    with engine(pair, tunnel=tunnel) as eng:
        eng.apply()
        assert sh("cat", "/proc/sys/net/ipv4/conf/all/rp_filter", ns=node).strip() == "0"
        res = eng.cleanup()
        assert res.changed
        assert eng.cleanup().plan.empty        # nothing left to remove
    after = full_snapshot(node), full_snapshot(zt)
    for i, (a, b) in enumerate(zip(after, before)):
        for k in b:
            assert a[k] == b[k], (["node", "ztunnel"][i], k)


# ---------------------------------------------------------------- crash in the middle


def test_interrupted_apply_converges_without_duplicates(pair, monkeypatch):
    from noderedirect import host as host_mod

    node, zt = pair
    calls = {"n": 0}
    real = host_mod.Host.iptables_restore

    def dying_restore(self, text, *a, **kw):
        calls["n"] += 1
        real(self, text, *a, **kw)
        if calls["n"] == 2:        # ztunnel done, node mangle committed, nat/filter not
            raise KeyboardInterrupt("killed")

    with engine(pair) as eng:
        monkeypatch.setattr(host_mod.Host, "iptables_restore", dying_restore)
        with pytest.raises(KeyboardInterrupt):
            eng.apply()
        monkeypatch.setattr(host_mod.Host, "iptables_restore", real)
        assert not eng.plan().empty
        eng.apply()
        assert eng.plan().empty
        want = eng.desired()
    saved = save(node)
    assert saved.count("-A PREROUTING -j ztunnel-PREROUTING\n") == 2     # nat and mangle, once each
    from collections import Counter
    from noderedirect import render
    got = Counter((t, l) for t, body in table_blocks(saved).items() for l in body if l in owned_lines(saved))
    want_text = render.save_text(want.get("node").iptables)
    expected = Counter((t, l) for t, body in table_blocks(want_text).items() for l in body)
    assert got == expected                                   # nothing twice, nothing missing


def test_sigkilled_apply_converges(pair, tmp_path):
    """A real SIGKILL at several points of a CLI apply with 500 pods; the next apply converges."""
    node, zt = pair
    pods = [{"namespace": "bulk", "name": f"p{i}", "uid": f"uid-{i}", "ip": f"10.244.{2 + i // 250}.{i % 250 + 1}"}
            for i in range(500)]
    import yaml
    from helpers import example_data
    data = example_data()
    data["pods"] = pods
    f = tmp_path / "bulk.yaml"
    f.write_text(yaml.safe_dump(data))
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "noderedirect", "apply", "--values", str(f), "--node-netns", node,
           "--ztunnel-netns", zt, "--tunnel", "vxlan"]
    for delay in (0.3, 0.6, 0.9):
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert "no changes" in res.stdout
    assert sh("ipset", "list", "-n", ns=node).split() == ["ztunnel-pods-ips"]     # no twin left
    assert len(sh("ip", "route", "show", "table", "100", ns=node).splitlines()) == 501


# ---------------------------------------------------------------- pod add/remove, CLI


def test_pod_add_remove_touches_only_that_pod(pair):
    from noderedirect.model import Pod

    node, zt = pair
    with engine(pair) as eng:
        eng.apply()
        before = save(node), sh("ip", "rule", "show", ns=node)
        done = eng.pod_add(Pod("default", "new", "uid-new", "10.244.1.9"))
        assert done[0] == 'add ztunnel-pods-ips 10.244.1.9 comment "uid-new"'
        assert "10.244.1.9 via 192.168.126.2 dev istioin src 10.244.1.1" in sh("ip", "route", "show", "table", "100", ns=node)
        from noderedirect.host import HostError
        with pytest.raises(HostError, match="belongs to pod UID uid-new"):
            eng.pod_remove("10.244.1.9", uid="uid-old")     # IP reused: the old pod's delete is refused
        assert eng.pod_remove("10.244.1.9", uid="uid-new") == [
            "del ztunnel-pods-ips 10.244.1.9",
            "route del 10.244.1.9 via 192.168.126.2 dev istioin src 10.244.1.1 table 100"]
        assert (save(node), sh("ip", "rule", "show", ns=node)) == before
        assert eng.plan().empty


def test_cli_plan_exit_codes_and_json(pair):
    node, zt = pair
    base = [sys.executable, "-m", "noderedirect"]
    args = ["--values", "examples/values.yaml", "--node-netns", node, "--ztunnel-netns", zt, "--tunnel", "vxlan"]
    run = lambda *a: subprocess.run(base + list(a) + args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    r = run("plan")
    assert r.returncode == 3 and "ipset    create" in r.stdout
    r = run("apply", "--dry-run")
    assert r.returncode == 0 and "would change" in r.stdout
    assert run("plan").returncode == 3                         # dry run changed nothing
    r = run("apply")
    assert r.returncode == 0 and "changed" in r.stdout
    r = run("plan")
    assert r.returncode == 0 and r.stdout.strip() == "no changes"
    r = run("apply", "--output", "json")
    assert json.loads(r.stdout)["changed"] is False
    r = run("status")
    assert r.returncode == 0 and "HostIP 10.244.1.1" in r.stdout and " missing " not in r.stdout
    r = subprocess.run(base + ["cleanup", "--node-netns", node, "--ztunnel-netns", zt], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "removed" in r.stdout, r.stderr


def test_missing_netns_and_geneve_fail_in_one_line_before_changes(pair):
    node, zt = pair
    base = [sys.executable, "-m", "noderedirect", "apply", "--values", "examples/values.yaml"]
    r = subprocess.run(base + ["--node-netns", "nr-does-not-exist", "--ztunnel-netns", zt], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    before = save(node), sh("ip", "link", "show", ns=node)
    r = subprocess.run(base + ["--node-netns", node, "--ztunnel-netns", zt, "--tunnel", "geneve"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "usergeneve" in r.stderr
    assert (save(node), sh("ip", "link", "show", ns=node)) == before


def _record_writes(monkeypatch) -> list[tuple[str, str, str]]:
    """(netns, what, thread name) of every write the engine makes, in the order they start."""
    import threading

    from noderedirect import host as host_mod

    events: list[tuple[str, str, str]] = []
    for name in ("link_add", "sysctl_set", "routes_batch", "run", "iptables_restore", "rule_add",
                 "rule_del"):
        real = getattr(host_mod.Host, name)

        def recorded(self, *a, _real=real, _name=name, **kw):
            events.append((self.ns.spec, _name, threading.current_thread().name))
            return _real(self, *a, **kw)
        monkeypatch.setattr(host_mod.Host, name, recorded)
    return events


def test_capture_starts_only_after_the_ztunnel_netns_is_ready(pair, monkeypatch):
    """First apply: the node's inert part goes side by side with the ztunnel netns (another
    thread), but no node iptables rule or ip rule before the last ztunnel write. Later applies
    with capture on: every node write after every ztunnel write."""
    node, zt = pair
    events = _record_writes(monkeypatch)
    with engine(pair) as eng:
        eng.apply()
        zt_last = max(i for i, (ns, _, _) in enumerate(events) if ns == zt)
        steering = [i for i, (ns, what, _) in enumerate(events)
                    if ns == node and what in ("iptables_restore", "rule_add")]
        assert steering and min(steering) > zt_last, events
        inert_threads = {t for ns, what, t in events if ns == node and what in ("link_add", "routes_batch")}
        assert inert_threads and all(t.startswith("write") for t in inert_threads), events
        assert eng.plan().empty

        # capture on: a drifted node route and a drifted ztunnel route are rewritten in order
        sh("ip", "route", "del", "10.244.1.5", "table", "100", ns=node)
        sh("ip", "route", "flush", "table", "101", ns=zt)
        events.clear()
        eng.apply()
        assert [ns for ns, _, _ in events] == sorted((ns for ns, _, _ in events), key=lambda n: n != zt)
        assert {ns for ns, _, _ in events} == {node, zt}
        assert all(not t.startswith("write") for _, _, t in events), events
        assert eng.plan().empty


@pytest.mark.parametrize("backend,missing,says", [
    ("iptables", "iptables_nft", "iptables-nft is not available in netns"),
    ("iptables-legacy", "iptables_legacy", "iptables-legacy is not available in netns"),
    ("iptables", "ipset", "ipset (the kernel ip_set module or the ipset tool) is not available"),
])
def test_missing_tool_is_one_line_before_any_change(pair, monkeypatch, backend, missing, says):
    import dataclasses

    from noderedirect import host as host_mod
    from noderedirect.host import MissingFeature

    node, zt = pair
    real = host_mod.Host.features
    monkeypatch.setattr(host_mod.Host, "features",
                        lambda self: dataclasses.replace(real(self), **{missing: False}))
    before = full_snapshot(node), full_snapshot(zt)
    with engine(pair, backend=backend) as eng:
        with pytest.raises(MissingFeature) as ei:
            eng.apply()
    text = str(ei.value)
    assert says in text and node in text and "\n" not in text
    assert (full_snapshot(node), full_snapshot(zt)) == before
