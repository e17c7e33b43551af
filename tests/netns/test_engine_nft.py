"""The engine with ``--backend nft`` in real network namespaces: apply, idempotence, drift named
and repaired, foreign nft tables and iptables rules untouched, cleanup, and one real connection
through the whole path (mark 0x100 -> table 101 -> istioout -> pistioout -> TPROXY).

Same topology as test_engine.py (its helpers are reused): a node netns and a ztunnel netns
joined by a veth, VXLAN tunnels unless a test says otherwise. Everything is checked through
the kernel's own tools (`nft`, `ip`, `ipset`, `iptables-save`), not through the code under test.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from helpers import ROOT
from test_engine import DRIFTS, add_foreign, engine, foreign_snapshot, full_snapshot, pair, sh  # noqa: F401
from test_nft_load import IP_TRANSPARENT, definition, socket_in, split_elements
from test_tunnels import inert_frame

from noderedirect import names

pytestmark = pytest.mark.netns
pytest.importorskip("nftables", reason="the nftables bindings (libnftables1) are missing")

NODE_T, ZT_T = names.NFT_TABLE_NODE, names.NFT_TABLE_ZTUNNEL
SLEEP_UID = "6b1f2c3e-0a4d-4c55-9e1a-1b2c3d4e5f05"
HTTPBIN_UID = "7c2e3d4f-1b5e-4d66-8f2b-2c3d4e5f6a06"


def listing(ns: str, table: str) -> str:
    """``nft -s list table``: the table as the kernel holds it, without counter values."""
    return sh("nft", "-s", "list", "table", "ip", table, ns=ns)


def comparable(text: str) -> tuple[str, frozenset[str]]:
    return split_elements(text)


def objects(ns: str, table: str) -> list[dict]:
    return json.loads(sh("nft", "-j", "list", "table", "ip", table, ns=ns))["nftables"]


def rule_handles(ns: str, table: str) -> dict[tuple[str, str], int]:
    return {(o["rule"]["chain"], o["rule"]["comment"]): o["rule"]["handle"] for o in objects(ns, table)
            if "rule" in o and "comment" in o["rule"]}


def table_handle(ns: str, table: str) -> int:
    """Per netns, every new table gets a new handle: a replaced table has another one."""
    return next(o["table"]["handle"] for o in objects(ns, table) if "table" in o)


def counters(ns: str, table: str) -> dict[str, int]:
    return {o["rule"]["comment"]: sum(e["counter"]["packets"] for e in o["rule"]["expr"] if "counter" in e)
            for o in objects(ns, table) if "rule" in o and "comment" in o["rule"]}


def delete_rule(ns: str, table: str, chain: str, comment: str) -> None:
    sh("nft", "delete", "rule", "ip", table, chain, "handle", str(rule_handles(ns, table)[(chain, comment)]),
       ns=ns)


def tables(ns: str) -> list[str]:
    return sh("nft", "list", "tables", ns=ns).splitlines()


# ---------------------------------------------------------------- apply: state and idempotence


def test_apply_then_observed_equals_desired_and_second_apply_is_empty(pair):
    node, zt = pair
    with engine(pair, backend="nft") as eng:
        res = eng.apply()
        assert res.changed and res.plan.conflicts == []
        assert sorted(c.line() for c in res.plan.changes if c.kind == "nft") == [
            "node     nft      create   table ip ztunnel-node (18 chains, 33 rules, set ztunnel-pods-ips: "
            "2 elements)  (missing)",
            "ztunnel  nft      create   table ip ztunnel-tproxy (3 chains, 9 rules)  (missing)"]
        again = eng.apply()
        assert again.plan.empty and again.applied == []
        want = eng.desired()
    scripts = dict(want.nft)
    # what the kernel lists is the loaded script's own definition, set element order aside
    assert comparable(listing(node, NODE_T)) == comparable(definition(scripts["node"]))
    assert comparable(listing(zt, ZT_T)) == comparable(definition(scripts["ztunnel"]))
    # the VXLAN outer-source check is part of our table, not an iptables rule
    assert 'ip saddr != 10.244.1.2 udp dport 6081 counter drop comment "T1"' in listing(node, NODE_T)
    assert 'ip saddr != 10.244.1.1 udp dport 6081 counter drop comment "T1"' in listing(zt, ZT_T)
    sets = [o["set"] for o in objects(node, NODE_T) if "set" in o]
    assert {(e["elem"]["val"], e["elem"]["comment"]) for e in sets[0]["elem"]} == {
        ("10.244.1.5", SLEEP_UID), ("10.244.1.6", HTTPBIN_UID)}
    # our table is the only thing nft holds: no ipset, no iptables-nft table, no iptables rule
    assert tables(node) == [f"table ip {NODE_T}"] and tables(zt) == [f"table ip {ZT_T}"]
    assert sh("ipset", "list", "-n", ns=node) == "" and sh("ipset", "list", "-n", ns=zt) == ""
    assert sh("iptables-legacy-save", ns=node) == ""
    # routes, ip rules, links and sysctls exactly as with iptables
    rules = sh("ip", "rule", "show", ns=node)
    for r in want.get("node").ip_rules:
        assert r.show() in rules
    for t in (100, 101, 102):
        shown = sh("ip", "route", "show", "table", str(t), ns=node)
        assert sorted(l.strip() for l in shown.splitlines()) == sorted(r.show() for r in want.get("node").routes
                                                            if r.table == t), t
    assert "20003:\tfrom all fwmark 0x4d3/0xfff lookup 100" in sh("ip", "rule", "show", ns=zt)
    assert "local default dev lo scope host" in sh("ip", "route", "show", "table", "100", ns=zt)
    assert sh("cat", "/proc/sys/net/ipv4/conf/veth-zt/accept_local", ns=node).strip() == "1"


def test_usergeneve_has_no_tunnel_check_chains(pair):
    """Only the VXLAN stand-in needs the outer-source check; usergeneve checks in user space."""
    node, zt = pair
    with engine(pair, backend="nft", tunnel="usergeneve") as eng:
        eng.apply()
        assert eng.plan().empty
        eng.cleanup()
    assert "T1" not in sh("nft", "-s", "list", "ruleset", ns=node)


# ---------------------------------------------------------------- drift: named by plan, repaired by apply


def _replace_p15(n: str, z: str) -> None:
    h = rule_handles(n, NODE_T)[("mangle-ztunnel-PREROUTING", "P15")]
    sh("nft", "replace", "rule", "ip", NODE_T, "mangle-ztunnel-PREROUTING", "handle", str(h), "meta", "l4proto",
       "tcp", "ip", "saddr", "@ztunnel-pods-ips", "counter", "meta", "mark", "set", "meta", "mark", "|",
       "0x400", "comment", '"P15"', ns=n)


def _recomment(n: str, z: str) -> None:
    sh("nft", "delete", "element", "ip", NODE_T, names.IPSET, "{ 10.244.1.5 }", ns=n)
    sh("nft", "add", "element", "ip", NODE_T, names.IPSET, '{ 10.244.1.5 comment "uid-old" }', ns=n)


ELEMENT = f'ztunnel-pods-ips 10.244.1.5 comment "{SLEEP_UID}"'
NFT_DRIFTS = {
    "delete rule": (lambda n, z: delete_rule(n, NODE_T, "mangle-ztunnel-PREROUTING", "P3"),
                    "node     nft      replace  table ip ztunnel-node: 1 rule differs  "
                    "(drifted: mangle-ztunnel-PREROUTING P3 missing)"),
    "change rule": (_replace_p15, "node     nft      replace  table ip ztunnel-node: 1 rule differs  "
                                  "(drifted: mangle-ztunnel-PREROUTING P15 differs)"),
    "foreign rule in our chain": (
        lambda n, z: sh("nft", "add", "rule", "ip", NODE_T, "nat-ztunnel-PREROUTING", "counter", "accept", ns=n),
        "node     nft      replace  table ip ztunnel-node: 1 rule differs  "
        "(drifted: nat-ztunnel-PREROUTING a rule without id unexpected)"),
    "delete chain": (lambda n, z: (delete_rule(n, NODE_T, "filter-FORWARD", "hook"),
                                   sh("nft", "delete", "chain", "ip", NODE_T, "filter-ztunnel-FORWARD", ns=n)),
                     "node     nft      replace  table ip ztunnel-node: 2 rules differ  "
                     "(drifted: filter-FORWARD hook missing; chain filter-ztunnel-FORWARD missing (1 rule))"),
    "delete element": (lambda n, z: sh("nft", "delete", "element", "ip", NODE_T, names.IPSET, "{ 10.244.1.5 }", ns=n),
                       f"node     nft      add      table ip ztunnel-node: set element {ELEMENT}  (missing)"),
    "stray element": (lambda n, z: sh("nft", "add", "element", "ip", NODE_T, names.IPSET, "{ 10.244.1.99 }", ns=n),
                      "node     nft      delete   table ip ztunnel-node: set element ztunnel-pods-ips "
                      "10.244.1.99  (stale)"),
    "element comment": (_recomment, f"node     nft      replace  table ip ztunnel-node: set element {ELEMENT}  "
                                    "(drifted: comment was 'uid-old')"),
    "delete table": (lambda n, z: sh("nft", "delete", "table", "ip", NODE_T, ns=n),
                     "node     nft      create   table ip ztunnel-node (18 chains, 33 rules, set "
                     "ztunnel-pods-ips: 2 elements)  (missing)"),
    "ztunnel rule": (lambda n, z: delete_rule(z, ZT_T, "mangle-PREROUTING", "Z2"),
                     "ztunnel  nft      replace  table ip ztunnel-tproxy: 1 rule differs  "
                     "(drifted: mangle-PREROUTING Z2 missing)"),
    "tunnel check": (lambda n, z: delete_rule(n, NODE_T, "filter-ztunnel-TUNNEL", "T1"),
                     "node     nft      replace  table ip ztunnel-node: 1 rule differs  "
                     "(drifted: filter-ztunnel-TUNNEL T1 missing)"),
    "delete ztunnel table": (lambda n, z: sh("nft", "delete", "table", "ip", ZT_T, ns=z),
                             "ztunnel  nft      create   table ip ztunnel-tproxy (3 chains, 9 rules)  (missing)"),
}
ELEMENT_ONLY = {"delete element", "stray element", "element comment"}


@pytest.mark.parametrize("drift", sorted(NFT_DRIFTS))
def test_nft_drift_is_named_by_plan_and_repaired_by_apply(pair, drift):
    node, zt = pair
    make, line = NFT_DRIFTS[drift]
    with engine(pair, backend="nft") as eng:
        eng.apply()
        before = comparable(listing(node, NODE_T)), comparable(listing(zt, ZT_T))
        handle = table_handle(node, NODE_T)
        make(node, zt)
        p = eng.plan()
        assert [c.line() for c in p.changes] == [line]
        res = eng.apply()
        assert [c.line() for c in res.applied] == [line]
        assert eng.plan().empty
    assert (comparable(listing(node, NODE_T)), comparable(listing(zt, ZT_T))) == before
    if drift in ELEMENT_ONLY:
        # repaired element by element: the table was not replaced (its counters are kept)
        assert table_handle(node, NODE_T) == handle


@pytest.mark.parametrize("drift", ["ip rule", "route", "pod route", "route attribute", "link", "address", "sysctl"])
def test_other_drift_is_repaired_without_touching_the_table(pair, drift):
    node, zt = pair
    with engine(pair, backend="nft") as eng:
        eng.apply()
        handles = table_handle(node, NODE_T), table_handle(zt, ZT_T)
        DRIFTS[drift](node, zt)
        p = eng.plan()
        assert not p.empty and all(c.reason for c in p.changes)
        assert [c for c in p.changes if c.kind == "nft"] == []
        eng.apply()
        assert eng.plan().empty
    assert (table_handle(node, NODE_T), table_handle(zt, ZT_T)) == handles


def test_interrupted_between_table_and_routes_converges(pair, monkeypatch):
    """A crash after the node's table is loaded but before its ip rules, then the tunnel links
    are lost too: only our table still says the netns is ours. Routes in our tables are then
    ours (a stale one is removed), not a conflict, and the next apply finishes the job."""
    from noderedirect import host as host_mod

    node, zt = pair
    real = host_mod.Host.routes_batch
    calls = {"n": 0}

    def dying(self, *a, **kw):
        calls["n"] += 1
        real(self, *a, **kw)
        if calls["n"] == 2:          # ztunnel routes done, node routes done, node rules not
            raise KeyboardInterrupt("killed")

    with engine(pair, backend="nft") as eng:
        monkeypatch.setattr(host_mod.Host, "routes_batch", dying)
        with pytest.raises(KeyboardInterrupt):
            eng.apply()
        monkeypatch.setattr(host_mod.Host, "routes_batch", real)
        for link in ("istioin", "istioout"):
            sh("ip", "link", "del", link, ns=node)
        sh("ip", "route", "add", "10.244.1.77", "dev", "veth-zt", "table", "100", ns=node)
        p = eng.plan()
        assert p.conflicts == []
        assert "node     route    delete   10.244.1.77 dev veth-zt scope link table 100  (stale)" in \
            [c.line() for c in p.changes]
        assert {c.kind for c in p.changes} == {"link", "sysctl", "route", "ip_rule"}
        eng.apply()
        assert eng.plan().empty


# ---------------------------------------------------------------- foreign objects and conflicts


FOREIGN_NFT = """table inet kube-foreign {
	set seen {
		type ipv4_addr
		elements = { 10.1.1.1 }
	}

	chain pre {
		type filter hook prerouting priority mangle; policy accept;
		ip saddr @seen counter accept comment "foreign"
	}
}
table ip ztunnel-other {
	chain c {
		counter
	}
}
table inet ztunnel-node {
	chain c {
		type filter hook input priority filter; policy accept;
		counter
	}
}
"""


def foreign_nft(ns: str) -> dict[str, str]:
    out = {}
    for t in tables(ns):
        _, fam, name = t.split()
        if not (fam == "ip" and name in (NODE_T, ZT_T)):
            out[t] = sh("nft", "-s", "list", "table", fam, name, ns=ns)
    return out


def test_foreign_nft_tables_and_iptables_rules_are_byte_identical(pair):
    node, zt = pair
    add_foreign(node, "nft")
    sh("nft", "-f", "-", ns=node, input=FOREIGN_NFT)
    sh("nft", "-f", "-", ns=zt, input=FOREIGN_NFT)
    sh("iptables-nft", "-t", "mangle", "-A", "PREROUTING", "-i", "eth0", "-p", "tcp", "-j", "MARK",
       "--set-xmark", "0x8/0x8", ns=zt)
    before = (foreign_snapshot(node), foreign_nft(node), foreign_snapshot(zt), foreign_nft(zt))
    assert len(before[1]) == 5      # 3 tables above + iptables-nft's ip nat and ip mangle
    with engine(pair, backend="nft") as eng:
        eng.apply()
        assert (foreign_snapshot(node), foreign_nft(node), foreign_snapshot(zt), foreign_nft(zt)) == before
        res = eng.apply()
        assert res.plan.empty and res.plan.conflicts == []
        assert (foreign_snapshot(node), foreign_nft(node), foreign_snapshot(zt), foreign_nft(zt)) == before
        eng.cleanup()
    assert (foreign_snapshot(node), foreign_nft(node), foreign_snapshot(zt), foreign_nft(zt)) == before
    assert f"table ip {NODE_T}" not in tables(node) and f"table ip {ZT_T}" not in tables(zt)


def test_iptables_backend_leftovers_refuse_before_changing_anything(pair):
    from noderedirect.apply import ConflictError

    node, zt = pair
    with engine(pair, backend="iptables") as eng:
        eng.apply()
    before = sh("nft", "-s", "list", "ruleset", ns=node), sh("ip", "rule", ns=node), sh("nft", "-s", "list", "ruleset", ns=zt)
    with engine(pair, backend="nft") as eng, pytest.raises(ConflictError) as ei:
        eng.apply()
    assert "node: the iptables backend's chains are present (ip mangle ztunnel-" in str(ei.value)
    assert "run cleanup with --backend iptables first" in str(ei.value)
    assert (sh("nft", "-s", "list", "ruleset", ns=node), sh("ip", "rule", ns=node),
            sh("nft", "-s", "list", "ruleset", ns=zt)) == before
    with engine(pair, backend="iptables") as eng:
        eng.cleanup()
    with engine(pair, backend="nft") as eng:
        eng.apply()
        assert eng.plan().empty


# ---------------------------------------------------------------- cleanup


def test_cleanup_leaves_both_netns_identical_to_before(pair):
    node, zt = pair
    sh("sysctl", "-qw", "net.ipv4.conf.all.rp_filter=2", ns=node)
    sh("sysctl", "-qw", "net.ipv4.conf.default.rp_filter=1", ns=zt)
    before = [(full_snapshot(ns), sh("nft", "-s", "list", "ruleset", ns=ns)) for ns in (node, zt)]
    with engine(pair, backend="nft") as eng:
        eng.apply()
        assert sh("cat", "/proc/sys/net/ipv4/conf/all/rp_filter", ns=node).strip() == "0"
        res = eng.cleanup()
        assert [c.line() for c in res.applied if c.kind == "nft"] == [
            "node     nft      delete   table ip ztunnel-node (18 chains, 33 rules, 2 set elements)  (ours)",
            "ztunnel  nft      delete   table ip ztunnel-tproxy (3 chains, 9 rules)  (ours)"]
        assert eng.cleanup().plan.empty
    assert [(full_snapshot(ns), sh("nft", "-s", "list", "ruleset", ns=ns)) for ns in (node, zt)] == before


# ---------------------------------------------------------------- real packets


def test_a_pod_syn_is_marked_tunnelled_and_tproxied_to_ztunnel(pair, netns_factory):
    """A TCP connection from an enrolled pod (10.244.1.5) to a service IP: P15 marks the SYN
    0x100, rule 101 sends it by table 101 out of istioout, VXLAN carries it to pistioout, Z2
    hands it to the transparent 15001 listener, which accepts it with the original destination
    (the replies find their way back through the node: the handshake completes)."""
    node, zt = pair
    pod = netns_factory("pod").spec
    sh("ip", "link", "add", "veth-pod", "netns", node, "type", "veth", "peer", "name", "eth0", "netns", pod)
    sh("ip", "-n", node, "addr", "add", "10.244.1.1/32", "dev", "veth-pod")
    sh("ip", "-n", node, "link", "set", "veth-pod", "up")
    sh("ip", "-n", node, "route", "add", "10.244.1.5/32", "dev", "veth-pod", "scope", "link")
    sh("ip", "-n", pod, "addr", "add", "10.244.1.5/32", "dev", "eth0")
    sh("ip", "-n", pod, "link", "set", "eth0", "up")
    sh("ip", "-n", pod, "route", "add", "10.244.1.1/32", "dev", "eth0", "scope", "link")
    sh("ip", "-n", pod, "route", "add", "default", "via", "10.244.1.1", "dev", "eth0")
    with engine(pair, backend="nft") as eng:
        eng.apply()
    # the kernel's own routing decision for a 0x100-marked packet from the pod
    assert "dev istioout table 101" in sh("ip", "route", "get", "10.96.0.10", "from", "10.244.1.5", "iif",
                                          "veth-pod", "mark", "0x100", ns=node)
    tx_before = int(sh("cat", "/sys/class/net/istioout/statistics/tx_packets", ns=node))

    listener = socket_in(zt)
    client = socket_in(pod)
    try:
        listener.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        listener.bind((names.LOOPBACK_V4, names.PORT_OUTBOUND))
        listener.listen(4)
        listener.settimeout(5)
        client.settimeout(5)
        client.connect(("10.96.0.10", 80))
        conn, peer = listener.accept()
        with conn:
            # ztunnel's outbound listener got the pod's connection with its original destination
            assert conn.getsockname() == ("10.96.0.10", 80)
            assert peer == client.getsockname() and peer[0] == "10.244.1.5"
    finally:
        client.close()
        listener.close()
    node_counts, zt_counts = counters(node, NODE_T), counters(zt, ZT_T)
    assert node_counts["P15"] >= 1 and node_counts["T1"] == 0
    assert zt_counts["Z2"] >= 1 and zt_counts["Z2 no listener"] == 0 and zt_counts["T1"] == 0
    assert int(sh("cat", "/sys/class/net/istioout/statistics/tx_packets", ns=node)) > tx_before


def test_tunnel_check_drops_a_wrong_outer_source(pair):
    """T1 in our table does what the iptables ztunnel-TUNNEL chain did: VXLAN to port 6081 from
    anyone but the tunnel remote is dropped before the device sees it."""
    node, zt = pair
    with engine(pair, backend="nft") as eng:
        eng.apply()
    sh("ip", "addr", "add", "10.244.1.99/32", "dev", "eth0", ns=zt)
    vxlan = bytes([0x08, 0, 0, 0]) + names.VNI_IN.to_bytes(3, "big") + b"\x00" + inert_frame()
    rx = lambda: int(sh("cat", "/sys/class/net/istioin/statistics/rx_packets", ns=node))
    before = rx()
    for src in ("10.244.1.99", "10.244.1.2"):
        with socket_in(zt, socket.SOCK_DGRAM) as u:
            u.bind((src, 0))
            u.sendto(vxlan, ("10.244.1.1", names.GENEVE_DEFAULT_PORT))
    deadline = time.monotonic() + 3
    while rx() == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert counters(node, NODE_T)["T1"] == 1
    assert rx() == before + 1          # only the packet from the remote reached istioin


# ---------------------------------------------------------------- CLI


def test_cli_plan_apply_status_cleanup_with_backend_nft(pair):
    node, zt = pair
    base = [sys.executable, "-m", "noderedirect"]
    args = ["--node-netns", node, "--ztunnel-netns", zt, "--tunnel", "vxlan", "--backend", "nft"]
    vals = ["--values", "examples/values.yaml"]
    run = lambda cmd, *a: subprocess.run(base + [cmd] + vals + list(a) + args, cwd=ROOT, capture_output=True,
                                         text=True, timeout=120)
    r = run("plan")
    assert r.returncode == 3 and "nft      create   table ip ztunnel-node" in r.stdout, r.stderr
    assert "ipset" not in r.stdout and "iptables" not in r.stdout
    assert run("apply").returncode == 0
    r = run("plan")
    assert r.returncode == 0 and r.stdout.strip() == "no changes"
    sh("nft", "delete", "element", "ip", NODE_T, names.IPSET, "{ 10.244.1.6 }", ns=node)
    r = run("status")
    assert r.returncode == 0, r.stderr
    assert "  ok       nft      table ip ztunnel-node\n" in r.stdout
    assert f"  missing  nft      table ip ztunnel-node: set element ztunnel-pods-ips 10.244.1.6 comment " \
           f'"{HTTPBIN_UID}"  (missing)' in r.stdout
    assert "  ok       nft      table ip ztunnel-tproxy\n" in r.stdout
    r = subprocess.run(base + ["cleanup"] + args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "nft      delete   table ip ztunnel-node" in r.stdout, r.stderr
    assert tables(node) == [] and tables(zt) == []


# ---------------------------------------------------------------- the scratch namespace


def test_canonical_form_comes_from_a_scratch_netns_that_leaves_nothing():
    import os

    from noderedirect.host import nft_scratch_json

    me = os.stat("/proc/thread-self/ns/net").st_ino
    doc = nft_scratch_json("table ip nr-scratch-probe { chain c { meta l4proto tcp tcp dport 1 counter; }; }",
                           "list ruleset")
    objs = [o for o in doc["nftables"] if "metainfo" not in o]
    # only what the script made: the scratch netns started empty
    assert [next(iter(o)) for o in objs] == ["table", "chain", "rule"]
    # the kernel's form, not the script's: the l4proto dependency is implied by the port match
    assert [e for e in objs[2]["rule"]["expr"] if "match" in e] == [
        {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 1}}]
    assert os.stat("/proc/thread-self/ns/net").st_ino == me
    assert "nr-scratch-probe" not in subprocess.run(["nft", "list", "tables"], capture_output=True,
                                                    text=True).stdout


# ---------------------------------------------------------------- one pod


def test_pod_add_remove_with_nft_touch_one_element_and_its_route(pair):
    """pod add|remove with --backend nft: the set element (with its UID comment) and the table-100
    route, nothing else; the rule counters and every other element stay; a late remove for an
    old pod that reused the IP is refused; a full plan afterwards is empty."""
    from noderedirect.host import HostError
    from noderedirect.model import Pod

    node, zt = pair
    with engine(pair, backend="nft") as eng:
        with pytest.raises(HostError, match=f"nft table ip {NODE_T} does not exist .*run apply first"):
            eng.pod_add(Pod("default", "early", "uid-early", "10.244.1.8"))
        eng.apply()
        handles, rules = table_handle(node, NODE_T), rule_handles(node, NODE_T)
        done = eng.pod_add(Pod("default", "new", "uid-new", "10.244.1.9"))
        assert done == [f'add element ip {NODE_T} {names.IPSET} {{ 10.244.1.9 comment "uid-new" }}',
                        "route replace 10.244.1.9 via 192.168.126.2 dev istioin src 10.244.1.1 table 100"]
        assert "10.244.1.9 via 192.168.126.2 dev istioin src 10.244.1.1" in \
            sh("ip", "route", "show", "table", "100", ns=node)
        _, live = split_elements(listing(node, NODE_T))
        assert '10.244.1.9 comment "uid-new"' in live and len(live) == 3
        # the same pod again: nothing to do; the IP reused by a new UID: re-commented atomically
        assert eng.pod_add(Pod("default", "new", "uid-new", "10.244.1.9"))[0] == \
            f"element {names.IPSET} 10.244.1.9 already there"
        done = eng.pod_add(Pod("default", "newer", "uid-newer", "10.244.1.9"))
        assert done[0] == (f"delete element ip {NODE_T} {names.IPSET} {{ 10.244.1.9 }}\n"
                           f'add element ip {NODE_T} {names.IPSET} {{ 10.244.1.9 comment "uid-newer" }}')
        with pytest.raises(HostError, match="belongs to pod UID uid-newer"):
            eng.pod_remove("10.244.1.9", uid="uid-new")
        assert eng.pod_remove("10.244.1.9", uid="uid-newer") == [
            f"delete element ip {NODE_T} {names.IPSET} {{ 10.244.1.9 }}",
            "route del 10.244.1.9 via 192.168.126.2 dev istioin src 10.244.1.1 table 100"]
        assert eng.pod_remove("10.244.1.9") == []                   # not enrolled
        assert (table_handle(node, NODE_T), rule_handles(node, NODE_T)) == (handles, rules)
        assert eng.plan().empty
