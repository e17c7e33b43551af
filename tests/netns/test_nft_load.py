"""The nft scripts of the legacy design in a real kernel: load, list, reload, and real packets.

Every test works in network namespaces it creates (``nr-nft-<hex>``) and removes, even on
failure. libnftables is driven through the ``nftables`` bindings, created INSIDE the netns
(kernel-notes.md §7: the netlink socket is bound at creation and does not follow a setns).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
from collections import Counter

import pytest

from helpers import values_with

from noderedirect import desired, names, nft

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
]

nftables = pytest.importorskip("nftables", reason="the nftables bindings (libnftables1) are missing")
pyroute2_netns = pytest.importorskip("pyroute2.netns")

IP_TRANSPARENT = 19    # linux/in.h; not exported by the socket module
NODE_CHAINS = {"mangle-PREROUTING", "mangle-INPUT", "mangle-FORWARD", "mangle-OUTPUT",
               "mangle-POSTROUTING", "nat-PREROUTING", "nat-POSTROUTING", "filter-FORWARD",
               "mangle-ztunnel-PREROUTING", "mangle-ztunnel-INPUT", "mangle-ztunnel-FORWARD",
               "mangle-ztunnel-OUTPUT", "mangle-ztunnel-POSTROUTING", "nat-ztunnel-PREROUTING",
               "nat-ztunnel-POSTROUTING", "filter-ztunnel-FORWARD"}
SLEEP_UID = "6b1f2c3e-0a4d-4c55-9e1a-1b2c3d4e5f05"
HTTPBIN_UID = "7c2e3d4f-1b5e-4d66-8f2b-2c3d4e5f6a06"


# ---------------------------------------------------------------- helpers


def ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True, text=True)


class Nft:
    """libnftables bound to one netns."""

    def __init__(self, ns: str):
        pyroute2_netns.pushns(ns)
        try:
            self.lib = nftables.Nftables()
        finally:
            pyroute2_netns.popns()

    def run(self, text: str, *, json_out: bool = False, stateless: bool = False) -> str:
        self.lib.set_json_output(json_out)
        self.lib.set_stateless_output(stateless)
        rc, out, err = self.lib.cmd(text)
        if rc != 0:
            raise AssertionError(f"nft failed (rc={rc}): {err}")
        return out

    def try_run(self, text: str) -> tuple[int, str]:
        rc, _, err = self.lib.cmd(text)
        return rc, err

    def listing(self, table: str) -> str:
        return self.run(f"list table ip {table}", stateless=True)

    def objects(self, table: str) -> list[dict]:
        return json.loads(self.run(f"list table ip {table}", json_out=True))["nftables"]

    def counters(self, table: str) -> dict[str, int]:
        """Packets per rule comment."""
        out: dict[str, int] = {}
        for obj in self.objects(table):
            r = obj.get("rule")
            if r and "comment" in r:
                out[r["comment"]] = sum(e["counter"]["packets"] for e in r["expr"] if "counter" in e)
        return out


def split_elements(text: str) -> tuple[str, frozenset[str]]:
    """Set elements as a set (nft lists them in hash order, wrapped to width)."""
    found: set[str] = set()

    def cut(m: re.Match) -> str:
        found.update(e.strip() for e in m.group(1).split(","))
        return "elements = { … }"

    return re.sub(r"elements = \{ (.*?) \}", cut, text, flags=re.S), frozenset(found)


def definition(script: str) -> str:
    """The ``table … { … }`` block of a script: what `nft list table` should print back."""
    start = script.index(" {\n") - len(script[:script.index(" {\n")].split("\n")[-1])
    return script[start:]


@pytest.fixture
def make_netns():
    created: list[str] = []

    def make(purpose: str) -> str:
        name = f"nr-nft-{purpose}-{secrets.token_hex(3)}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        created.append(name)
        ip(name, "link", "set", "lo", "up")
        return name

    yield make
    for name in reversed(created):
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture(scope="module")
def scripts() -> dict[str, str]:
    return dict(nft.rendered_nft(desired.legacy(values_with())).nft)


# ---------------------------------------------------------------- loading


def test_node_script_loads_with_set_chains_and_rules(make_netns, scripts):
    ns = make_netns("load")
    lib = Nft(ns)
    lib.run("add table ip nr-sentinel; add chain ip nr-sentinel keep")
    lib.run(scripts["node"])

    objs = lib.objects(names.NFT_TABLE_NODE)
    sets = [o["set"] for o in objs if "set" in o]
    assert [(s["name"], s["type"], s["size"]) for s in sets] == [(names.IPSET, "ipv4_addr", 65536)]
    assert {(e["elem"]["val"], e["elem"]["comment"]) for e in sets[0]["elem"]} == {
        ("10.244.1.5", SLEEP_UID), ("10.244.1.6", HTTPBIN_UID)}
    assert {o["chain"]["name"] for o in objs if "chain" in o} == NODE_CHAINS
    rules = [o["rule"] for o in objs if "rule" in o]
    assert len(rules) == 31   # 8 hooks + P1-P15, F1-F2, I1-I2, O1, N1, NP1, FF1
    assert Counter(r["comment"] for r in rules) == Counter(
        ["hook"] * 8 + [f"P{i}" for i in range(1, 16)]
        + ["F1", "F2", "I1", "I2", "O1", "N1", "NP1", "FF1"])

    # what the kernel lists back is the script's own definition, element order aside
    listed, listed_elems = split_elements(lib.listing(names.NFT_TABLE_NODE))
    wanted, wanted_elems = split_elements(definition(scripts["node"]))
    assert listed == wanted
    assert listed_elems == wanted_elems
    # and nothing else in the netns was touched
    assert "table ip nr-sentinel" in lib.run("list tables")


def test_ztunnel_script_loads(make_netns, scripts):
    ns = make_netns("loadzt")
    lib = Nft(ns)
    lib.run(scripts["ztunnel"])
    rules = [o["rule"] for o in lib.objects(names.NFT_TABLE_ZTUNNEL) if "rule" in o]
    assert [r["comment"] for r in rules] == ["Z1", "Z1 no listener", "Z2", "Z2 no listener",
                                             "Z3", "Z3 no listener", "Z4"]
    assert lib.listing(names.NFT_TABLE_ZTUNNEL) == definition(scripts["ztunnel"])


@pytest.mark.parametrize("role", ["node", "ztunnel"])
def test_loading_twice_gives_the_same_ruleset(make_netns, scripts, role):
    ns = make_netns("twice")
    lib = Nft(ns)
    lib.run(scripts[role])
    first = lib.run("list ruleset", stateless=True)
    lib.run(scripts[role])
    assert lib.run("list ruleset", stateless=True) == first
    assert lib.run("list tables") == f"table ip {names.NFT_TABLES[role]}\n"


def test_a_failing_script_leaves_the_loaded_table_alone(make_netns, scripts):
    ns = make_netns("atomic")
    lib = Nft(ns)
    lib.run(scripts["node"])
    before = lib.run("list ruleset", stateless=True)
    broken = scripts["node"].replace('@ztunnel-pods-ips counter meta mark set meta mark | 0x00000100',
                                     '@nr-missing counter meta mark set meta mark | 0x00000100')
    assert broken != scripts["node"]
    rc, err = lib.try_run(broken)
    assert rc != 0 and "No such file or directory" in err   # the set is unknown
    # the delete of the old table was in the same transaction: it did not happen either
    assert lib.run("list ruleset", stateless=True) == before


# ---------------------------------------------------------------- real packets


def veth(a_ns: str, a: str, b_ns: str, b: str) -> None:
    """A veth pair with end ``a`` in ``a_ns`` and end ``b`` in ``b_ns`` (created in ``a_ns``)."""
    ip(a_ns, "link", "add", a, "type", "veth", "peer", "name", b, "netns", b_ns)
    ip(a_ns, "link", "set", a, "up")
    ip(b_ns, "link", "set", b, "up")


def socket_in(ns: str, kind: int = socket.SOCK_STREAM) -> socket.socket:
    pyroute2_netns.pushns(ns)
    try:
        return socket.socket(socket.AF_INET, kind)
    finally:
        pyroute2_netns.popns()


OBSERVE = """table ip nr-observe {
	chain pre {
		type filter hook prerouting priority -140; policy accept;
		ip saddr 10.244.1.5 tcp dport 9 meta mark 0x00000100 counter comment "member syn 0x100"
		ip saddr 10.244.1.7 tcp dport 9 meta mark 0x00000000 counter comment "non-member syn 0x0"
		ip saddr 10.244.1.7 udp dport 9 meta mark 0x00000220 counter comment "udp first 0x220"
		ip saddr 10.244.1.7 udp dport 9 meta mark 0x00000200 counter comment "udp later 0x200"
	}
	chain in {
		type filter hook input priority -140; policy accept;
		ip saddr 10.244.1.7 udp dport 9 ct mark 0x00000220 counter comment "udp ct 0x220"
	}
}
"""


def test_node_marks_real_packets(make_netns, scripts):
    """Pods on one veth: TCP from a set member gets 0x100 (P15), from a non-member nothing;
    UDP gets 0x220 (P13), saved to the connmark on input (I1) and restored as 0x200 (P6)."""
    node, pods = make_netns("node"), make_netns("pods")
    veth(node, "nr-pods", pods, "eth0")
    ip(node, "addr", "add", "10.244.1.1/24", "dev", "nr-pods")
    ip(pods, "addr", "add", "10.244.1.5/24", "dev", "eth0")
    ip(pods, "addr", "add", "10.244.1.7/24", "dev", "eth0")
    lib = Nft(node)
    lib.run(scripts["node"])
    lib.run(OBSERVE)

    for src in ("10.244.1.5", "10.244.1.7"):
        with socket_in(pods) as s:
            s.bind((src, 0))
            s.settimeout(3)
            assert s.connect_ex(("10.244.1.1", 9)) == 111   # ECONNREFUSED: one SYN, one RST
    with socket_in(pods, socket.SOCK_DGRAM) as u:
        u.bind(("10.244.1.7", 0))
        u.sendto(b"first", ("10.244.1.1", 9))
        u.sendto(b"later", ("10.244.1.1", 9))

    assert lib.counters("nr-observe") == {"member syn 0x100": 1, "non-member syn 0x0": 1,
                                          "udp first 0x220": 1, "udp later 0x200": 1,
                                          "udp ct 0x220": 2}
    ours = lib.counters(names.NFT_TABLE_NODE)
    assert (ours["P15"], ours["N1"], ours["P13"], ours["P6"], ours["I1"]) == (1, 1, 1, 1, 1)


def test_ztunnel_tproxy_picks_its_own_listener_or_drops(make_netns, scripts):
    """Z1: a SYN for :15008 from pistioin reaches the 15008 listener with its original
    destination; with no 15008 listener it is dropped, never handed to the 15006 one (Z3)."""
    zt, peer = make_netns("zt"), make_netns("peer")
    veth(zt, names.PLINK_IN, peer, "nr-in")
    ip(zt, "addr", "add", f"{names.TUN_IN_ZTUNNEL}/30", "dev", names.PLINK_IN)
    ip(peer, "addr", "add", f"{names.TUN_IN_NODE}/30", "dev", "nr-in")
    ip(peer, "route", "add", "10.244.1.6/32", "via", str(names.TUN_IN_ZTUNNEL))
    ip(zt, "rule", "add", "fwmark", f"{names.ZT_MARK_TPROXY:#x}/{names.ZT_MARK_MASK:#x}",
       "lookup", str(names.ZT_TABLE_LOCAL), "priority", str(names.ZT_PRIO_TPROXY))
    ip(zt, "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", str(names.ZT_TABLE_LOCAL))
    lib = Nft(zt)
    lib.run(scripts["ztunnel"])

    def listener(port: int) -> socket.socket:
        s = socket_in(zt)
        s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        s.bind(("0.0.0.0", port))
        s.listen(4)
        s.settimeout(3)
        return s

    with listener(names.PORT_INBOUND) as inbound:
        with socket_in(peer) as c:
            c.settimeout(1.5)
            with pytest.raises(socket.timeout):
                c.connect(("10.244.1.6", names.PORT_HBONE))
        counts = lib.counters(names.NFT_TABLE_ZTUNNEL)
        assert counts["Z1 no listener"] >= 1 and counts["Z1"] == counts["Z1 no listener"]
        assert counts["Z3"] == 0
        inbound.settimeout(0.2)
        with pytest.raises(socket.timeout):
            inbound.accept()

        with listener(names.PORT_HBONE) as hbone, socket_in(peer) as c:
            c.settimeout(3)
            c.connect(("10.244.1.6", names.PORT_HBONE))
            conn, client = hbone.accept()
            with conn:
                assert conn.getsockname() == ("10.244.1.6", names.PORT_HBONE)   # original dst
                assert client == c.getsockname()
        assert lib.counters(names.NFT_TABLE_ZTUNNEL)["Z3"] == 0


KUBE_DNAT = """table ip nr-kube {
	chain pre {
		type nat hook prerouting priority -99; policy accept;
		ip daddr 10.96.0.10 tcp dport 9 counter dnat to 10.244.1.1:9 comment "service dnat"
	}
}
"""


def test_n1_accept_does_not_skip_another_tables_dnat(make_netns, scripts):
    """docs/nft.md: N1 runs first (priority -100 < -99) and accepts, yet a nat chain of another
    table still DNATs the captured SYN, because the nat core only stops at a NAT binding."""
    node, pods = make_netns("n1"), make_netns("n1pods")
    veth(node, "nr-pods", pods, "eth0")
    ip(node, "addr", "add", "10.244.1.1/24", "dev", "nr-pods")
    ip(pods, "addr", "add", "10.244.1.5/24", "dev", "eth0")
    ip(pods, "route", "add", "10.96.0.0/16", "via", "10.244.1.1")
    lib = Nft(node)
    lib.run(scripts["node"])
    lib.run(KUBE_DNAT)
    with socket_in(pods) as s:
        s.bind(("10.244.1.5", 0))
        s.settimeout(3)
        assert s.connect_ex(("10.96.0.10", 9)) == 111   # DNATed to the node, refused there
    assert lib.counters(names.NFT_TABLE_NODE)["N1"] == 1
    assert lib.counters("nr-kube") == {"service dnat": 1}
