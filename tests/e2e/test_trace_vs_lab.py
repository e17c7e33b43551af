"""The tracer's prediction against what the lab observes, for every scenario of kernel-notes.md §11.

The tracer walks the rules rendered from the lab's own values files (pure); the lab sends the
same request through the real kernel and reports what moved (:mod:`noderedirect.lab.paths`).
They must agree on:

- which of our rules matched (rule counters; RETURN rules included, also P7, P11 and P14, which
  share their text and are told apart by their position in the chain), per netns;
- the stand-in ztunnel's listener and the original destination it logged;
- whether TCP went into istioin/istioout at all;
- the client address the server saw, and the ctmark of the client's connection on the node.

A disagreement names the first predicted hop that differs (:func:`noderedirect.trace.compare`).

What the tracer is told about the lab: the stand-in ztunnel relays 15001/15006 directly to the
original destination (no HBONE, ``ZtunnelModel(hbone=False)``) and closes 15008 connections.
The lab's VXLAN stand-in adds an outer-source check chain (``ztunnel-TUNNEL``, rule ids T…)
that is not part of the design and not rendered; its counters are left out.
"""

from __future__ import annotations

import subprocess

import pytest

from labtools import drop
from noderedirect import values as values_mod
from noderedirect.topology_model import SCENARIOS, build
from noderedirect.trace import ZtunnelModel, compare, trace

pytestmark = pytest.mark.netns

SINGLE = [s for s in SCENARIOS if not s.two_node]
LAB_NAME = {"node": "node-1"}                 # the tracer's netns name -> the lab's endpoint name
NETNS_MAP = {"node": "node-1", "ztunnel": "ztunnel-1"}
BIND = {"HostIP": "10.244.1.1", "InternalIP": "172.18.0.2"}
FOUR_MB = 4_000_000


def lab_values(rec, k: int):
    return values_mod.parse(rec.lab.values_data(k), source=f"lab node-{k}")


def observed_rules(t) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for (key, rid), n in t.rules.items():
        if n > 0 and not rid.startswith("T"):
            out.setdefault(key, set()).add(rid)
    return out


def predicted_client_ctmark(pred, node_ns: str):
    marks = [h.ctmark for p in pred.legs[0].packets for h in p.hops
             if h.netns == node_ns and h.ctmark is not None]
    return marks[-1] if marks else 0


# (backend, tunnel): iptables-nft with the default tunnel stand-in, and native nft over VXLAN
COMBOS = [("iptables", "auto"), ("nft", "vxlan")]


@pytest.fixture(scope="module", params=COMBOS, ids=[f"{b}-{t}" for b, t in COMBOS])
def lab(request, make_lab):
    backend, tunnel = request.param
    rec = make_lab(backend=backend, tunnel=tunnel)
    try:
        yield rec
    finally:
        drop(rec.prefix)


def run_lab(rec, sc):
    from noderedirect.lab import paths
    subprocess.run(["ip", "netns", "exec", rec.lab.node_ns(1), "conntrack", "-F"], capture_output=True,
                   check=True)
    path = f"/bytes/{FOUR_MB}" if sc.name.endswith("-4mb") else "/"
    return paths.trace_request(rec, LAB_NAME.get(sc.client, sc.client), sc.server, sc.port, path,
                               bind=BIND.get(sc.src or ""), timeout=30 if path != "/" else 10)


@pytest.mark.parametrize("sc", SINGLE, ids=[s.name for s in SINGLE])
def test_prediction_agrees_with_the_lab(lab, sc):
    topo = build(lab_values(lab, 1), "legacy")
    src = BIND.get(sc.src or "", None) or topo.get(sc.client).ip
    pred = trace(topo, src, topo.get(sc.server).ip, sc.port,
                 zt=ZtunnelModel(original_source=lab.lab.spoof, hbone=False))
    obs = run_lab(lab, sc)
    first = obs.legs[0] if obs.legs else None
    diffs = compare(pred, observed_rules(obs), listener=first.listener if first else None,
                    orig_dst=first.orig_dst if first else None,
                    tunnel_tcp={("node-1", d): n for d, n in obs.tunnel_tcp(1).items()},
                    netns_map=NETNS_MAP)
    report = "\n".join(map(str, diffs)) + "\n--- predicted\n" + pred.to_text() + "--- observed\n" + \
        "\n".join(obs.hops())
    assert diffs == [], report
    seen = obs.server_client.rpartition(":")[0] if obs.server_client else None
    expect = pred.server.remote.rpartition(":")[0] if pred.server else None
    if sc.number == 12:   # the tracer's server is reached, but the lab's request fails right after
        assert pred.verdict().startswith("fails: leg 2 reply packet reset in node") and not pred.ok
        assert obs.response.error is not None and obs.server == [], report
    elif sc.number != 11:
        assert (pred.ok, seen) == (True, expect), report
    ct = obs.ct.get("node-1 client")
    if ct is not None:
        assert ct == predicted_client_ctmark(pred, "node"), report


def test_cross_node_prediction_agrees_with_a_two_node_lab(make_lab):
    rec = make_lab(nodes=2)
    try:
        topo = build(lab_values(rec, 1), "legacy", peers=(lab_values(rec, 2),))
        pred = trace(topo, "10.244.1.5", "10.244.2.6", 8000, zt=ZtunnelModel(hbone=False))
        from noderedirect.lab import paths
        obs = paths.trace_request(rec, "sleep", "httpbin-2", 8000, timeout=10)
        diffs = compare(pred, observed_rules(obs), listener=obs.legs[0].listener,
                        orig_dst=obs.legs[0].orig_dst,
                        tunnel_tcp={(f"node-{k}", d): n for k in (1, 2) for d, n in obs.tunnel_tcp(k).items()})
        report = "\n".join(map(str, diffs)) + "\n" + pred.to_text() + "\n".join(obs.hops())
        assert diffs == [], report
        # the stand-in chains through both ztunnels: 15001 on node 1, 15006 on node 2
        assert [(l.ztunnel, l.listener) for l in obs.legs] == \
            [(leg.accepted.netns, leg.accepted.port) for leg in pred.legs if leg.accepted.owner == "ztunnel"]
    finally:
        drop(rec.prefix)
