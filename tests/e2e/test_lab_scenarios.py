"""The twelve scenarios of kernel-notes.md §11, end to end, for every backend and tunnel driver.

One lab per (backend, tunnel) is shared by the scenarios (they only read). Before each
scenario the node's conntrack table is flushed; counters are not zeroed but read before and
after the request (:func:`noderedirect.lab.paths.trace_request`), so every number asserted is
what this one request did:

- the stand-in ztunnel's log: the listener (15001 / 15006 / 15008) and the original destination;
- the server's ``client=``: whether the original source was kept;
- TCP packets that went into ``istioout``/``istioin`` (node side) and came out of
  ``pistioout``/``pistioin`` (ztunnel side), and on ``veth-zt``: only the first packet of a
  captured connection crosses a tunnel; non-mesh traffic crosses neither tunnel nor veth-zt;
- our rules' counters (P8 / P10 / P15 / O1 / Z1-Z3) and conntrack marks.
"""

from __future__ import annotations

import subprocess

import pytest

from labtools import drop, kernel_tunnels
from noderedirect import names
from noderedirect.lab import paths
from noderedirect.lab.server import pattern_bytes

pytestmark = pytest.mark.netns

BACKENDS = ("iptables", "iptables-legacy", "nft")
TUNNELS = kernel_tunnels()
COMBOS = [(b, t) for b in BACKENDS for t in TUNNELS]
FOUR_MB = 4_000_000

SLEEP, HTTPBIN, PLAIN_A, PLAIN_B = "10.244.1.5", "10.244.1.6", "10.244.1.7", "10.244.1.8"
HOST_IP, NODE_IP, EXTERNAL, ZTUNNEL_IP = "10.244.1.1", "172.18.0.2", "172.18.0.3", "10.244.1.2"
IN, OUT, VETH_ZT = names.LINK_IN, names.LINK_OUT, "veth-zt"


class Lab:
    def __init__(self, rec, observer):
        self.rec, self.obs = rec, observer

    def run(self, src: str, dst: str, port: int = 8000, path: str = "/", bind=None,
            timeout: float = 10.0) -> paths.Trace:
        node = self.rec.lab.node_ns(1)
        subprocess.run(["ip", "netns", "exec", node, "conntrack", "-F"], capture_output=True, check=True)
        return paths.trace_request(self.rec, src, dst, port, path, bind=bind, timeout=timeout,
                                   observer=self.obs)


@pytest.fixture(scope="class", params=COMBOS, ids=[f"{b}-{t}" for b, t in COMBOS])
def lab(request, make_lab):
    backend, tunnel = request.param
    rec = make_lab(backend=backend, tunnel=tunnel)
    assert rec.tunnel == tunnel
    obs = paths.Observer(rec)
    try:
        yield Lab(rec, obs)
    finally:
        obs.close()
        drop(rec.prefix)


def ip_of(addr: str) -> str:
    return addr.rpartition(":")[0]


def legs(t: paths.Trace) -> list[tuple]:
    return [(l.ztunnel, l.listener, l.orig_dst) for l in t.legs]


def assert_ok(t: paths.Trace) -> None:
    assert t.response.error is None and t.response.status == 200, (t.response, t.hops())


def assert_tunnels(t: paths.Trace, *, inbound: int, outbound: int) -> None:
    """TCP packets into each tunnel on the node, and out of its peer in the ztunnel netns."""
    got = {"istioin": t.tcp_on("node-1", IN, "out"), "pistioin": t.tcp_on("ztunnel-1", names.PLINK_IN, "in"),
           "istioout": t.tcp_on("node-1", OUT, "out"), "pistioout": t.tcp_on("ztunnel-1", names.PLINK_OUT, "in")}
    assert got == {"istioin": inbound, "pistioin": inbound, "istioout": outbound,
                   "pistioout": outbound}, t.hops()


def assert_untouched(t: paths.Trace) -> None:
    """Scenarios 6-8: no ztunnel, no TCP on either tunnel or veth-zt."""
    assert t.legs == [], t.hops()
    assert_tunnels(t, inbound=0, outbound=0)
    assert t.tcp_on("node-1", VETH_ZT) == 0, t.hops()


@pytest.mark.usefixtures("lab")
class TestScenarios:
    def test_01_mesh_to_mesh_outbound(self, lab):
        t = lab.run("sleep", "httpbin")
        assert_ok(t)
        assert legs(t) == [("ztunnel-1", 15001, f"{HTTPBIN}:8000")]
        assert ip_of(t.legs[0].upstream_local) == SLEEP          # original source kept
        assert ip_of(t.server_client) == SLEEP
        assert t.server_client == t.legs[0].upstream_local       # httpbin talked to the ztunnel
        assert_tunnels(t, inbound=0, outbound=1)                 # only the SYN crossed
        assert t.hits("node-1", "P15") == 1 and t.hits("ztunnel-1", "Z2") == 1
        assert t.hits("node-1", "P10") > 0 and t.hits("node-1", "P8") > 0
        # P7, P11 and P14 have the same text; the RETURN after P10 is P11, and only P11
        assert t.hits("node-1", "P11") == t.hits("node-1", "P10")
        assert t.hits("node-1", "P7") == t.hits("node-1", "P14") == 0
        assert t.ct["node-1 client"] == names.MARK_PROXY == 528
        assert t.ct["ztunnel-1 upstream"] == names.MARK_PROXY
        text = "\n".join(t.hops())
        for needle in ("rule P15", "ip rule 101", "table 101", "dev istioout", "listener 15001",
                       f"original destination {HTTPBIN}:8000", "original source kept",
                       f"httpbin saw client={SLEEP}:"):
            assert needle in text, text

    def test_02_mesh_to_plain_outbound(self, lab):
        t = lab.run("sleep", "plain-a")
        assert_ok(t)
        assert legs(t) == [("ztunnel-1", 15001, f"{PLAIN_A}:8000")]
        assert ip_of(t.server_client) == SLEEP
        assert_tunnels(t, inbound=0, outbound=1)

    def test_03_mesh_to_external_outbound(self, lab):
        t = lab.run("sleep", "external")
        assert_ok(t)
        assert legs(t) == [("ztunnel-1", 15001, f"{EXTERNAL}:8000")]
        assert ip_of(t.server_client) == SLEEP
        assert_tunnels(t, inbound=0, outbound=1)

    def test_04_plain_to_mesh_inbound(self, lab):
        t = lab.run("plain-a", "httpbin")
        assert_ok(t)
        assert legs(t) == [("ztunnel-1", 15006, f"{HTTPBIN}:8000")]
        assert ip_of(t.legs[0].peer) == PLAIN_A
        assert ip_of(t.server_client) == PLAIN_A
        assert_tunnels(t, inbound=1, outbound=0)
        assert t.hits("ztunnel-1", "Z3") == 1 and t.hits("node-1", "P15") == 0

    def test_05_external_to_mesh_inbound(self, lab):
        t = lab.run("external", "httpbin")
        assert_ok(t)
        assert legs(t) == [("ztunnel-1", 15006, f"{HTTPBIN}:8000")]
        assert ip_of(t.server_client) == EXTERNAL
        assert_tunnels(t, inbound=1, outbound=0)
        assert t.routes["node-1 in"]["table"] == str(names.TABLE_INBOUND)
        assert t.routes["node-1 in"]["dev"] == IN

    def test_06_node_to_mesh_bypass(self, lab):
        t = lab.run("node-1", "httpbin")
        assert_ok(t)
        assert_untouched(t)
        assert ip_of(t.server_client) == HOST_IP
        assert t.hits("node-1", "O1") > 0                        # -s HostIP -> 0x220

    def test_07_plain_to_plain_untouched(self, lab):
        t = lab.run("plain-a", "plain-b")
        assert_ok(t)
        assert_untouched(t)
        assert ip_of(t.server_client) == PLAIN_A
        assert [t.hits("node-1", r) for r in ("P15", "P10", "P8")] == [0, 0, 0]

    def test_08_external_to_plain_untouched(self, lab):
        t = lab.run("external", "plain-a")
        assert_ok(t)
        assert_untouched(t)
        assert ip_of(t.server_client) == EXTERNAL
        assert [t.hits("node-1", r) for r in ("P15", "P10", "P8")] == [0, 0, 0]

    def test_09_four_mb_outbound(self, lab):
        t = lab.run("sleep", "httpbin", path=f"/bytes/{FOUR_MB}", timeout=30)
        assert_ok(t)
        assert t.response.body == pattern_bytes(FOUR_MB)
        assert legs(t) == [("ztunnel-1", 15001, f"{HTTPBIN}:8000")]
        assert_tunnels(t, inbound=0, outbound=1)
        assert t.tcp_on("node-1", VETH_ZT) > 100                 # the data went over veth-zt

    def test_10_four_mb_inbound(self, lab):
        t = lab.run("external", "httpbin", path=f"/bytes/{FOUR_MB}", timeout=30)
        assert_ok(t)
        assert t.response.body == pattern_bytes(FOUR_MB)
        assert legs(t) == [("ztunnel-1", 15006, f"{HTTPBIN}:8000")]
        assert_tunnels(t, inbound=1, outbound=0)

    def test_11_hbone_port(self, lab):
        t = lab.run("external", "httpbin", port=15008)
        # the more specific --dport 15008 rule wins; the stand-in only logs HBONE and closes
        assert legs(t) == [("ztunnel-1", 15008, f"{HTTPBIN}:15008")]
        assert t.hits("ztunnel-1", "Z1") == 1 and t.hits("ztunnel-1", "Z3") == 0
        assert t.legs[0].upstream is None
        assert t.response.error is not None and t.server == []
        assert_tunnels(t, inbound=1, outbound=0)

    def test_12_node_internal_ip_fails_by_design(self, lab):
        t = lab.run("node-1", "httpbin", bind=NODE_IP)
        assert legs(t) == [("ztunnel-1", 15006, f"{HTTPBIN}:8000")]
        assert ip_of(t.legs[0].peer) == NODE_IP
        # the spoofed upstream cannot complete: the SYN-ACK to 172.18.0.2 is local to the node
        assert t.legs[0].upstream_error is not None and t.legs[0].upstream_local is None
        assert t.response.status is None and t.response.error == "ECONNRESET"
        assert t.server == []
        # every client packet crosses istioin (no 0x210 connmark on the node for this flow)
        sent = t.tcp_on("node-1", IN, "out")
        assert sent >= 3 and t.tcp_on("ztunnel-1", names.PLINK_IN, "in") == sent
        assert "by design" in "\n".join(t.hops())


def test_12_succeeds_without_original_source(make_lab):
    """kernel-notes.md §11: with original-source spoofing off, scenario 12 works (the server
    sees the ztunnel's own address)."""
    rec = make_lab(tunnel="vxlan", spoof=False)
    try:
        t = paths.trace_request(rec, "node-1", "httpbin", 8000, bind=NODE_IP, timeout=10)
        assert_ok(t)
        assert legs(t) == [("ztunnel-1", 15006, f"{HTTPBIN}:8000")]
        assert ip_of(t.server_client) == ZTUNNEL_IP
    finally:
        drop(rec.prefix)


def test_kernel_geneve_combos():
    if "geneve" not in TUNNELS:
        pytest.skip("this kernel has no GENEVE: the geneve tunnel variants are not run "
                    "(usergeneve and vxlan are)")
    assert ("iptables", "geneve") in COMBOS
