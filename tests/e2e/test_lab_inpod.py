"""The lab in in-pod mode (``lab up --mode inpod``): kernel-notes.md §11's twelve scenarios with
in-pod semantics, for both iptables backends; the life cycle (idempotent apply, drift repair,
status, down leaves nothing).

What in-pod mode is in the lab (inpod-mode.md §2-§4, docs/compare.md):

- each mesh pod's netns holds the in-pod rules (``ISTIO_PRERT``/``ISTIO_OUTPUT`` in mangle and
  nat), ``ip rule 32764 fwmark 0x111/0xfff lookup 100`` and ``local default dev lo table 100``;
  the node holds only the probe set ``istio-inpod-probes-v4`` and ``ISTIO_POSTRT``'s SNAT;
- the stand-in ztunnel runs from the ztunnel pod's netns but makes its listeners 15001 / 15006
  / 15008 inside each mesh pod's netns (setns, bind, setns back) with SO_MARK 0x539, and its
  upstream connections inside the accepting pod's netns, marked too.

How each scenario differs from legacy (the assertions below are the in-pod ones):

- capture happens inside the pods: outbound by nat OUTPUT REDIRECT (NOUT4) to 15001 in the
  *client's* netns, inbound by nat PREROUTING REDIRECT (NPR2) to 15006 in the *server's*
  netns. Nothing crosses a tunnel or ``veth-zt``; the node forwards by its main table.
- mesh to mesh (1, 9) is captured twice: 15001 in sleep, then 15006 in httpbin (legacy: once,
  15001 on the ztunnel). The stand-in speaks no HBONE; real ztunnel would send HBONE to
  httpbin:15008 instead of plaintext to :8000.
- the original destination is read with SO_ORIGINAL_DST (REDIRECT), not getsockname (TPROXY).
- node-originated traffic (6, 12) is SNATed to 169.254.7.127 by the node (HPOST1) and let
  through by the pod (NPR1): never captured, and the server sees 169.254.7.127 (legacy: 6 is a
  bypass with the HostIP kept; 12 is captured on 15006 and fails by design).
- 15008 (11) is not redirected: it reaches the listener inside httpbin's netns directly.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from labtools import drop, lab_netns
from noderedirect import names
from noderedirect.lab import paths, topology, ztunnel
from noderedirect.lab.server import pattern_bytes

pytestmark = pytest.mark.netns

BACKENDS = ("iptables", "iptables-legacy")
FOUR_MB = 4_000_000
SLEEP, HTTPBIN, PLAIN_A, PLAIN_B = "10.244.1.5", "10.244.1.6", "10.244.1.7", "10.244.1.8"
EXTERNAL, PROBE = "172.18.0.3", names.INPOD_PROBE_SNAT_V4
# the in-pod rule ids (the tracer's numbering) for the lab's era (1.29, DNS capture off)
REDIRECT_OUT, REDIRECT_IN, PROBE_IN, CONNMARK_SET, CONNMARK_RESTORE, SNAT = (
    "NOUT4", "NPR2", "NPR1", "MPR1", "MOUT1", "HPOST1")


class Lab:
    def __init__(self, rec, observer):
        self.rec, self.obs = rec, observer

    def run(self, src: str, dst: str, port: int = 8000, path: str = "/", bind=None,
            timeout: float = 10.0) -> paths.Trace:
        for key in ("node-1", "sleep", "httpbin"):
            self.obs.hosts[key].run(["conntrack", "-F"], check=False)
        return paths.trace_request(self.rec, src, dst, port, path, bind=bind, timeout=timeout,
                                   observer=self.obs)


@pytest.fixture(scope="class", params=BACKENDS)
def lab(request, make_lab):
    rec = make_lab(mode="inpod", backend=request.param)
    obs = paths.Observer(rec)
    try:
        yield Lab(rec, obs)
    finally:
        obs.close()
        drop(rec.prefix)


def ip_of(addr) -> str:
    return addr.rpartition(":")[0]


def legs(t: paths.Trace) -> list[tuple]:
    return [(t.pod_of(l), l.listener, l.orig_dst) for l in t.legs]


def assert_ok(t: paths.Trace) -> None:
    assert t.response.error is None and t.response.status == 200, (t.response, t.hops())


def assert_no_node_detour(t: paths.Trace) -> None:
    """In-pod mode: no tunnel exists and the ztunnel pod's veth carries nothing."""
    assert t.tcp_on("node-1", "veth-zt") == 0, t.hops()
    assert t.tcp_on("node-1", names.LINK_IN) == t.tcp_on("node-1", names.LINK_OUT) == 0


def assert_untouched(t: paths.Trace) -> None:
    """No listener accepted it and no in-pod rule of any pod moved."""
    assert t.legs == [], t.hops()
    moved = {k: n for k, n in t.rules.items() if n and k[0] in ("sleep", "httpbin")}
    assert moved == {}, t.hops()
    assert_no_node_detour(t)


@pytest.mark.usefixtures("lab")
class TestInpodScenarios:
    def test_01_mesh_to_mesh_captured_in_both_pods(self, lab):
        """Legacy: one capture, 15001 on the ztunnel, via mark 0x100 and istioout. In-pod: 15001
        inside sleep, the stand-in's upstream (marked 0x539, so NOUT4 lets it out) is captured
        again by NPR2 inside httpbin on 15006, whose upstream keeps sleep's address."""
        t = lab.run("sleep", "httpbin")
        assert_ok(t)
        assert legs(t) == [("sleep", 15001, f"{HTTPBIN}:8000"), ("httpbin", 15006, f"{HTTPBIN}:8000")]
        out, inb = t.legs
        assert ip_of(out.upstream_local) == SLEEP                  # the pod's own address
        assert inb.peer == out.upstream_local                      # httpbin caught sleep's upstream
        assert ip_of(inb.upstream_local) == SLEEP                  # original source kept
        assert t.server_client == inb.upstream_local
        # nat sees only the first packet; the marked upstream was not redirected in sleep
        assert t.hits("sleep", REDIRECT_OUT) == 1
        assert t.hits("httpbin", REDIRECT_IN) == 1
        assert t.hits("sleep", REDIRECT_IN) == t.hits("httpbin", REDIRECT_OUT) == 0
        # return routing by connmark inside both pods (ztunnel's own packets over lo)
        assert t.hits("sleep", CONNMARK_SET) > 0 and t.hits("sleep", CONNMARK_RESTORE) > 0
        assert t.hits("httpbin", CONNMARK_SET) > 0 and t.hits("httpbin", CONNMARK_RESTORE) > 0
        assert t.ct["httpbin upstream"] == names.INPOD_TPROXY_MARK == 0x111
        assert t.hits("node-1", SNAT) == 0
        assert t.tcp_on("sleep", "lo") > 0 and t.tcp_on("httpbin", "eth0", "in") > 0
        assert_no_node_detour(t)
        text = "\n".join(t.hops())
        for needle in ("sleep nat ISTIO_OUTPUT rule NOUT4", "listener 15001 inside sleep's netns",
                       "SO_ORIGINAL_DST", "httpbin nat ISTIO_PRERT rule NPR2",
                       "listener 15006 inside httpbin's netns", "original source kept",
                       "ip rule 32764", f"httpbin saw client={SLEEP}:", "0 TCP packets on veth-zt"):
            assert needle in text, text

    def test_02_mesh_to_plain(self, lab):
        """Captured inside sleep on 15001 only: plain-a has no in-pod rules."""
        t = lab.run("sleep", "plain-a")
        assert_ok(t)
        assert legs(t) == [("sleep", 15001, f"{PLAIN_A}:8000")]
        assert ip_of(t.server_client) == SLEEP
        assert t.hits("sleep", REDIRECT_OUT) == 1
        assert_no_node_detour(t)

    def test_03_mesh_to_external(self, lab):
        t = lab.run("sleep", "external")
        assert_ok(t)
        assert legs(t) == [("sleep", 15001, f"{EXTERNAL}:8000")]
        assert ip_of(t.server_client) == SLEEP
        assert_no_node_detour(t)

    def test_04_plain_to_mesh(self, lab):
        """Legacy: rule 103 -> table 100 -> istioin to the ztunnel's 15006. In-pod: NPR2 inside
        httpbin, the upstream made inside httpbin's netns from plain-a's address."""
        t = lab.run("plain-a", "httpbin")
        assert_ok(t)
        assert legs(t) == [("httpbin", 15006, f"{HTTPBIN}:8000")]
        assert ip_of(t.legs[0].peer) == PLAIN_A
        assert ip_of(t.server_client) == PLAIN_A
        assert t.hits("httpbin", REDIRECT_IN) == 1
        assert t.ct["httpbin upstream"] == 0x111
        assert_no_node_detour(t)

    def test_05_external_to_mesh(self, lab):
        t = lab.run("external", "httpbin")
        assert_ok(t)
        assert legs(t) == [("httpbin", 15006, f"{HTTPBIN}:8000")]
        assert ip_of(t.server_client) == EXTERNAL
        assert_no_node_detour(t)

    def test_06_node_to_mesh_is_snated_and_bypasses(self, lab):
        """Legacy: O1 sets 0x220, the HostIP reaches httpbin. In-pod: the node SNATs any host
        socket to an enrolled pod to 169.254.7.127 (HPOST1, first packet), the pod accepts that
        source (NPR1): not captured, and the server sees 169.254.7.127."""
        t = lab.run("node-1", "httpbin")
        assert_ok(t)
        assert t.legs == []
        assert ip_of(t.server_client) == PROBE
        assert t.hits("node-1", SNAT) == 1
        assert t.hits("httpbin", PROBE_IN) == 1 and t.hits("httpbin", REDIRECT_IN) == 0
        assert_no_node_detour(t)
        text = "\n".join(t.hops())
        assert "rule HPOST1" in text and "probe bypass" in text and "rule NPR1" in text, text

    def test_07_plain_to_plain_untouched(self, lab):
        t = lab.run("plain-a", "plain-b")
        assert_ok(t)
        assert ip_of(t.server_client) == PLAIN_A
        assert_untouched(t)
        assert t.hits("node-1", SNAT) == 0

    def test_08_external_to_plain_untouched(self, lab):
        t = lab.run("external", "plain-a")
        assert_ok(t)
        assert ip_of(t.server_client) == EXTERNAL
        assert_untouched(t)

    def test_09_four_megabytes_mesh_to_mesh(self, lab):
        """Both relays carry every byte; nat still sees one packet per connection."""
        t = lab.run("sleep", "httpbin", path=f"/bytes/{FOUR_MB}", timeout=30)
        assert_ok(t)
        assert t.response.body == pattern_bytes(FOUR_MB)
        assert [l.listener for l in t.legs] == [15001, 15006]
        assert t.hits("sleep", REDIRECT_OUT) == 1 and t.hits("httpbin", REDIRECT_IN) == 1
        log = lab.rec.logs["ztunnel-1"]
        for leg in t.legs:
            closed = ztunnel.wait_events(log, "close", match=lambda e, c=leg.accept["conn"]: e["conn"] == c)
            assert closed and closed[0]["bytes_down"] > FOUR_MB and closed[0]["error"] is None
        assert_no_node_detour(t)

    def test_10_four_megabytes_external_to_mesh(self, lab):
        t = lab.run("external", "httpbin", path=f"/bytes/{FOUR_MB}", timeout=30)
        assert_ok(t)
        assert len(t.response.body) == FOUR_MB
        assert legs(t) == [("httpbin", 15006, f"{HTTPBIN}:8000")]

    def test_11_hbone_port_reaches_the_listener_unredirected(self, lab):
        """NPR2 excludes --dport 15008: the connection reaches ztunnel's own 15008 listener
        inside httpbin's netns; the stand-in does not speak HBONE and resets it."""
        t = lab.run("external", "httpbin", port=15008)
        assert t.response.error == "ECONNRESET"
        assert legs(t) == [("httpbin", 15008, f"{HTTPBIN}:15008")]
        assert t.hits("httpbin", REDIRECT_IN) == 0

    def test_12_node_internal_ip_is_snated_too(self, lab):
        """Legacy: captured on 15006, and the spoofed upstream fails by design (curl 56).
        In-pod: ISTIO_POSTRT SNATs every node socket, whatever its source address: the request
        bypasses ztunnel and succeeds (inpod-mode.md §5, host-originated traffic)."""
        t = lab.run("node-1", "httpbin", bind="172.18.0.2")
        assert_ok(t)
        assert t.legs == []
        assert ip_of(t.server_client) == PROBE
        assert t.hits("node-1", SNAT) == 1


def test_listeners_live_inside_the_pods_with_mark_1337(lab):
    """ss inside each mesh pod shows 15001/15006/15008 with fwmark 0x539; the ztunnel pod's
    own netns, and the non-mesh pods, have none."""
    def listeners(netns: str) -> dict[int, str]:
        out = subprocess.run(["ip", "netns", "exec", netns, "ss", "-tlnOe"], capture_output=True,
                             text=True).stdout
        found = {}
        for line in out.splitlines():
            if line.startswith("LISTEN"):
                port = int(line.split()[3].rpartition(":")[2])
                mark = re.search(r"fwmark:0x[0-9a-f]+", line)
                found[port] = mark.group(0) if mark else ""
        return found
    rlab = lab.rec.lab
    for pod in ("sleep", "httpbin"):
        got = listeners(rlab.endpoint(pod).netns)
        assert {p: got.get(p) for p in (15001, 15006, 15008)} == \
            {15001: "fwmark:0x539", 15006: "fwmark:0x539", 15008: "fwmark:0x539"}, got
        assert got.get(8000) == ""          # the app's own server is not marked
    assert listeners(rlab.ztunnel_ns(1)) == {}
    assert set(listeners(rlab.endpoint("plain-a").netns)) == {8000}


def test_objects_are_where_the_design_puts_them(lab):
    rlab = lab.rec.lab

    def sh(netns: str, *argv: str) -> str:
        return subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, text=True,
                              check=True).stdout
    node = rlab.node_ns(1)
    assert sh(node, "ipset", "list", "-n").split() == [names.INPOD_IPSET_V4]
    assert "ztunnel-" not in sh(node, "iptables-save") and "ztunnel-" not in sh(node, "iptables-legacy-save")
    assert "-A ISTIO_POSTRT -p tcp -m owner --socket-exists -m set --match-set istio-inpod-probes-v4 " \
           "dst -j SNAT --to-source 169.254.7.127" in sh(node, "iptables-save" if lab.rec.lab.backend ==
                                                         "iptables" else "iptables-legacy-save")
    assert not any(l.split()[0].rstrip(":").startswith(("100", "101", "102", "103"))
                   for l in sh(node, "ip", "rule").splitlines())
    assert "istio" not in sh(node, "ip", "link")
    for pod in ("sleep", "httpbin"):
        ns = rlab.endpoint(pod).netns
        assert "32764:\tfrom all fwmark 0x111/0xfff lookup 100" in sh(ns, "ip", "rule")
        assert sh(ns, "ip", "route", "show", "table", "100").strip() == "local default dev lo scope host"
    for ns in (rlab.endpoint("plain-a").netns, rlab.ztunnel_ns(1)):
        assert "ISTIO" not in sh(ns, "iptables-save") + sh(ns, "iptables-legacy-save")
        assert "32764" not in sh(ns, "ip", "rule")


def test_prediction_agrees_with_the_lab(lab):
    """The packet tracer, with the stand-in's behaviour (no HBONE), predicts the rules the
    lab's counters show, and the listener and original destination of the first capture."""
    from noderedirect import values as values_mod
    from noderedirect.topology_model import build
    from noderedirect.trace import ZtunnelModel, compare, trace

    topo = build(values_mod.parse(lab.rec.lab.values_data(1)), "inpod")
    for src, dst, port in (("sleep", "httpbin", 8000), ("plain-a", "httpbin", 8000),
                           ("external", "httpbin", 8000), ("sleep", "plain-a", 8000),
                           ("node-1", "httpbin", 8000)):
        src_ip = "HostIP" if src == "node-1" else topo.get(src).ip
        pred = trace(topo, src_ip, topo.get(dst).ip, port, zt=ZtunnelModel(hbone=False))
        obs = lab.run(src, dst, port)
        seen: dict[str, set[str]] = {}
        for (key, rid), n in obs.rules.items():
            if n:
                seen.setdefault(key, set()).add(rid)
        first = obs.legs[0] if obs.legs else None
        diffs = compare(pred, seen, listener=first.listener if first else None,
                        orig_dst=first.orig_dst if first else None, netns_map={"node": "node-1"})
        assert diffs == [], "\n".join(map(str, diffs)) + "\n" + pred.to_text() + "\n".join(obs.hops())


# ---------------------------------------------------------------- life cycle


def test_up_again_changes_nothing_then_repairs_drift(make_lab):
    rec = make_lab(mode="inpod")
    try:
        again = topology.up(rec.lab)
        assert again.created is False and again.changes == {"node-1": 0}
        st = topology.status(rec.prefix)
        assert st["nodes"]["node-1"]["pending_changes"] == 0 and st["params"]["mode"] == "inpod"
        # someone flushes sleep's nat ISTIO_OUTPUT: sleep's traffic escapes capture ...
        sleep_ns = rec.lab.endpoint("sleep").netns
        subprocess.run(["ip", "netns", "exec", sleep_ns, "iptables", "-t", "nat", "-F", "ISTIO_OUTPUT"],
                       check=True)
        assert topology.status(rec.prefix)["nodes"]["node-1"]["pending_changes"] == 1
        t = paths.trace_request(rec, "sleep", "plain-a", 8000)
        assert t.response.ok and t.legs == []
        # ... until `lab up` re-applies: one chain rewritten, capture is back
        fixed = topology.up(rec.lab)
        assert fixed.changes == {"node-1": 1}
        t = paths.trace_request(rec, "sleep", "plain-a", 8000)
        assert [(t.pod_of(l), l.listener) for l in t.legs] == [("sleep", 15001)]
    finally:
        drop(rec.prefix)


def test_down_leaves_nothing(make_lab, lab_env):
    rec = make_lab(mode="inpod")
    pids = [topology.procs.read_pidfile(p)["pid"] for p in rec.processes.values()]
    res = topology.down(rec.prefix)
    assert res.found and sorted(res.stopped) == ["servers", "ztunnel-1"]
    assert lab_netns(rec.prefix) == []
    assert all(not Path(f"/proc/{pid}").exists() for pid in pids)
    assert not topology.record_path(rec.prefix).exists()
    assert not topology.run_dir(rec.prefix).exists()
    leftovers = [f.name for f in Path(lab_env).iterdir() if f.name.startswith("netns-")]
    assert leftovers == [], leftovers
    assert topology.down(rec.prefix).found is False


def test_inpod_mode_refuses_what_it_does_not_have():
    with pytest.raises(topology.LabError, match="native nft backend is not implemented"):
        topology.Lab(mode="inpod", backend="nft")
    with pytest.raises(topology.LabError, match="no tunnels"):
        topology.Lab(mode="inpod", tunnel="vxlan")
    # a legacy lab's record has no mode key: records written before in-pod mode still match
    assert "mode" not in topology.Lab().params()
    assert topology.Lab(mode="inpod").params()["mode"] == "inpod"
