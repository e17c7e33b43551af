"""Two nodes on one underlay, one ztunnel per node: sleep (node 1) → httpbin-2 (node 2).

The walk with the lab's stand-in ztunnel, compared with legacy-mode.md §5.1 (real ztunnel):

| step | real ztunnel (HBONE)                                  | this lab's stand-in                     |
|------|-------------------------------------------------------|-----------------------------------------|
| 1-6  | node-1 P15 → 0x100 → rule 101 → istioout → ztunnel-1 :15001, original destination H:8000 | the same |
| 7-8  | ztunnel-1 opens mTLS + HTTP/2 CONNECT to **H:15008**, from S | connects in plaintext to **H:8000** (the original destination), from S |
| 9-10 | node-1 P10 → 0x210 → rule 100 → main → node-2 via the underlay | the same |
| 11-13| node-2: no mark (S is not in its ipset) → rule 103 → table 100 → istioin | the same |
| 14   | ztunnel-2 Z1 (dport 15008) → **:15008** (HBONE inbound) | Z3 → **:15006** (plaintext inbound), original destination H:8000 |
| 15-17| ztunnel-2 connects to H:80 from S                    | connects to H:8000 from S               |

So the stand-in shows the same capture points (outbound on node 1, inbound on node 2) and the
same marks and tunnels; only the inbound port differs (15006 instead of 15008), because it does
not speak HBONE. Return packets on both nodes follow §5.2 (P8 → 0x040 → table 102 → veth-zt →
Z4 → the proxy's socket).
"""

from __future__ import annotations

import pytest

from labtools import drop
from noderedirect import names
from noderedirect.lab import paths

pytestmark = pytest.mark.netns

SLEEP, HTTPBIN_2, SLEEP_2, HTTPBIN = "10.244.1.5", "10.244.2.6", "10.244.2.5", "10.244.1.6"


@pytest.fixture(scope="module", params=["usergeneve", "vxlan"])
def two(request, make_lab):
    rec = make_lab(nodes=2, tunnel=request.param)
    obs = paths.Observer(rec)
    try:
        yield rec, obs
    finally:
        obs.close()
        drop(rec.prefix)


def tunnels(t: paths.Trace) -> dict[str, int]:
    return {f"node-{k} {dev}": t.tcp_on(f"node-{k}", dev, "out")
            for k in (1, 2) for dev in (names.LINK_OUT, names.LINK_IN)}


def test_sleep_node1_to_httpbin_node2(two):
    rec, obs = two
    t = paths.trace_request(rec, "sleep", "httpbin-2", 8000, observer=obs, timeout=10)
    assert t.response.ok, (t.response, t.hops())
    assert [(l.ztunnel, l.listener, l.orig_dst) for l in t.legs] == [
        ("ztunnel-1", names.PORT_OUTBOUND, f"{HTTPBIN_2}:8000"),    # outbound on node 1
        ("ztunnel-2", names.PORT_INBOUND, f"{HTTPBIN_2}:8000"),     # inbound on node 2
    ]
    out_leg, in_leg = t.legs
    # ztunnel-1 kept sleep's address; that is the client ztunnel-2 sees and passes on
    assert out_leg.upstream_local.rpartition(":")[0] == SLEEP
    assert in_leg.peer == out_leg.upstream_local
    assert t.server_client.rpartition(":")[0] == SLEEP
    assert t.server_client == in_leg.upstream_local
    # one TCP packet (the SYN of each leg) into one tunnel per node
    assert tunnels(t) == {"node-1 istioout": 1, "node-1 istioin": 0,
                          "node-2 istioout": 0, "node-2 istioin": 1}, t.hops()
    assert t.hits("node-1", "P15") == 1 and t.hits("node-2", "P15") == 0
    assert t.hits("ztunnel-1", "Z2") == 1 and t.hits("ztunnel-2", "Z3") == 1
    # both ztunnels' spoofed packets were marked 0x210 on their own node
    assert t.hits("node-1", "P10") > 0 and t.hits("node-2", "P10") > 0
    assert t.ct["ztunnel-1 upstream"] == t.ct["ztunnel-2 upstream"] == names.MARK_PROXY
    # the underlay carried the flow: node 1's eth0 sent, node 2's eth0 received
    assert t.tcp_on("node-1", "eth0", "out") > 0 and t.tcp_on("node-2", "eth0", "in") > 0
    assert t.routes["node-2 in"]["dev"] == names.LINK_IN


def test_sleep2_node2_to_httpbin_node1(two):
    rec, obs = two
    t = paths.trace_request(rec, "sleep-2", "httpbin", 8000, observer=obs, timeout=10)
    assert t.response.ok, (t.response, t.hops())
    assert [(l.ztunnel, l.listener, l.orig_dst) for l in t.legs] == [
        ("ztunnel-2", names.PORT_OUTBOUND, f"{HTTPBIN}:8000"),
        ("ztunnel-1", names.PORT_INBOUND, f"{HTTPBIN}:8000"),
    ]
    assert t.server_client.rpartition(":")[0] == SLEEP_2
    assert tunnels(t) == {"node-1 istioout": 0, "node-1 istioin": 1,
                          "node-2 istioout": 1, "node-2 istioin": 0}, t.hops()


def test_external_enters_node2_directly(two):
    """The external host routes 10.244.2.0/24 via node 2: only node 2 captures (inbound)."""
    rec, obs = two
    t = paths.trace_request(rec, "external", "httpbin-2", 8000, observer=obs, timeout=10)
    assert t.response.ok, (t.response, t.hops())
    assert [(l.ztunnel, l.listener) for l in t.legs] == [("ztunnel-2", names.PORT_INBOUND)]
    assert t.server_client.rpartition(":")[0] == "172.18.0.3"
    assert tunnels(t) == {"node-1 istioout": 0, "node-1 istioin": 0,
                          "node-2 istioout": 0, "node-2 istioin": 1}, t.hops()
    assert t.tcp_on("node-1", "eth0") == 0


def test_plain_across_nodes_untouched(two):
    """plain-2 (node 2, not in the mesh) → plain-a (node 1): no ztunnel on either node."""
    rec, obs = two
    t = paths.trace_request(rec, "plain-2", "plain-a", 8000, observer=obs, timeout=10)
    assert t.response.ok, (t.response, t.hops())
    assert t.legs == []
    assert set(tunnels(t).values()) == {0}
    assert t.tcp_on("node-1", "veth-zt") == t.tcp_on("node-2", "veth-zt") == 0
    assert t.server_client.rpartition(":")[0] == "10.244.2.7"
