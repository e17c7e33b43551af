"""The stand-in ztunnel in in-pod mode (``--inpod``), with the real in-pod rules of one pod.

Topology: the pod netns holds the rendered in-pod rules (applied by the in-pod engine); the
stand-in lives in its own netns and makes its listeners inside the pod's::

    pod 10.0.0.1 (eth0) --- (eth0) 10.0.0.2 peer           ztunnel home netns (no interfaces)

- outbound: the pod connects to the peer; nat OUTPUT REDIRECTs it to 15001 inside the pod; the
  stand-in reads the original destination with SO_ORIGINAL_DST and connects from inside the
  pod with SO_MARK 0x539, so the pod's rules let it out (no loop);
- inbound: the peer connects to the pod; nat PREROUTING REDIRECTs it to 15006; the upstream to
  the pod's own server keeps the peer's address (or the pod's own with ``--no-spoof``) and its
  replies come back through connmark 0x111, ip rule 32764 and table 100;
- the listener set (:func:`ztunnel.listener_set`) is made inside the given netns, marked;
- a pod netns that is deleted loses its listeners (``pod_gone``) while the process runs on.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest

from helpers import values_with

from noderedirect.inpod_apply import InpodEngine
from noderedirect.lab import client, procs, server, ztunnel

pytestmark = pytest.mark.netns

POD_IP, PEER_IP = "10.0.0.1", "10.0.0.2"
POD = {"namespace": "default", "name": "pod", "uid": "0c0c0c0c-0000-4000-8000-000000000001", "ip": POD_IP}


def sh(*argv: str) -> str:
    cp = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    assert cp.returncode == 0, f"{argv}: {cp.stderr}"
    return cp.stdout


@pytest.fixture
def topo(netns_factory):
    pod, peer, node, home = (netns_factory(n) for n in ("zipod", "zipeer", "zinode", "zihome"))
    sh("ip", "link", "add", "eth0", "netns", pod.spec, "type", "veth", "peer", "name", "eth0",
       "netns", peer.spec)
    for ns, ip in ((pod, POD_IP), (peer, PEER_IP)):
        sh("ip", "-n", ns.spec, "addr", "add", f"{ip}/24", "dev", "eth0")
        sh("ip", "-n", ns.spec, "link", "set", "eth0", "up")
    vals = values_with(**{"pods": [POD]})
    with InpodEngine(vals, node, {POD["uid"]: pod}) as eng:
        eng.apply()
    return pod, peer, home


@pytest.fixture
def daemons(tmp_path):
    started: list[procs.Started] = []

    def start(name: str, module: str, *args: str) -> procs.Started:
        ready = tmp_path / f"{name}.ready"
        p = procs.start(procs.module_argv(module, *args, "--ready-file", str(ready)), tmp_path, name)
        started.append(p)
        procs.wait_ready(ready, 10.0, pidfile=p.pidfile)
        return p
    start.dir = tmp_path
    try:
        yield start
    finally:
        for p in started:
            procs.stop(p.pidfile)


def start_both(daemons, pod, peer, home, *extra: str):
    zlog, slog = daemons.dir / "zt.log", daemons.dir / "srv.log"
    zt = daemons("zt", ztunnel.PROGRAM, "--netns", home.path, "--log", str(zlog), "--inpod", pod.path, *extra)
    daemons("srv", server.PROGRAM, "--serve", f"{pod.path}={POD_IP}:8000",
            "--serve", f"{peer.path}={PEER_IP}:8000", "--log", str(slog))
    return zt, zlog


def test_outbound_is_redirected_inside_the_pod_and_the_marked_upstream_leaves(topo, daemons):
    pod, peer, home = topo
    _, zlog = start_both(daemons, pod, peer, home)
    r = client.request(pod.path, PEER_IP, 8000, timeout=5)
    assert r.ok and r.client_seen.rpartition(":")[0] == POD_IP
    (acc,) = ztunnel.accepts(zlog)
    assert (acc["listener"], acc["orig_dst"], acc["netns"]) == (15001, f"{PEER_IP}:8000", pod.path)
    assert acc["peer"] == r.local
    (up,) = ztunnel.events(zlog, "upstream")
    assert up["error"] is None and up["upstream_local"] == r.client_seen and up["netns"] == pod.path
    # the stand-in's upstream was not redirected again: exactly one accept
    assert len(ztunnel.accepts(zlog)) == 1


@pytest.mark.parametrize("spoof", [True, False])
def test_inbound_keeps_the_client_address_unless_no_spoof(topo, daemons, spoof):
    pod, peer, home = topo
    _, zlog = start_both(daemons, pod, peer, home, *([] if spoof else ["--no-spoof"]))
    for _ in range(3):          # several: the upstream never reuses the client's own port
        r = client.request(peer.path, POD_IP, 8000, timeout=5)
        assert r.ok, r
        seen = r.client_seen.rpartition(":")[0]
        assert seen == (PEER_IP if spoof else POD_IP)
        assert r.client_seen != r.local
    accs = ztunnel.accepts(zlog)
    assert [(a["listener"], a["orig_dst"]) for a in accs] == [(15006, f"{POD_IP}:8000")] * 3


def test_hbone_port_is_not_redirected_and_is_reset(topo, daemons):
    pod, peer, home = topo
    _, zlog = start_both(daemons, pod, peer, home)
    r = client.request(peer.path, POD_IP, 15008, timeout=5)
    assert r.error == "ECONNRESET"
    (acc,) = ztunnel.accepts(zlog)
    assert (acc["listener"], acc["orig_dst"]) == (15008, f"{POD_IP}:15008")


def test_listener_set_is_made_inside_the_netns_with_mark(topo):
    pod, _, _ = topo
    socks = ztunnel.listener_set(pod.path)
    try:
        assert [s.getsockname()[1] for s in socks] == [15001, 15006, 15008]
        assert all(s.getsockopt(socket.SOL_SOCKET, ztunnel.SO_MARK) == 0x539 for s in socks)
        ss = sh("ip", "netns", "exec", pod.spec, "ss", "-tlnH")
        assert sorted(int(l.split()[3].rpartition(":")[2]) for l in ss.splitlines()) == [15001, 15006, 15008]
    finally:
        for s in socks:
            s.close()


def test_a_deleted_pod_netns_loses_its_listeners(topo, daemons):
    pod, peer, home = topo
    zt, zlog = start_both(daemons, pod, peer, home)
    procs.stop(daemons.dir / "srv.pid")          # the server holds a socket in the pod too

    def fds() -> list[tuple[str, int]]:
        base = f"/proc/{zt.pid}/fd"
        out = []
        for f in os.listdir(base):
            try:
                out.append((os.readlink(f"{base}/{f}"), os.stat(f"{base}/{f}").st_ino))
            except OSError:
                continue
        return out
    ino = procs.netns_identity(pod.path)[1]
    before = fds()
    assert ino in {i for _, i in before}          # the pod's netns, held open by fd
    sh("ip", "netns", "del", pod.spec)
    deadline = time.monotonic() + 5
    while not ztunnel.events(zlog, "pod_gone") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [e["netns"] for e in ztunnel.events(zlog, "pod_gone")] == [pod.path]
    assert procs.alive(zt.pidfile)                # its own netns is still there
    after = fds()
    assert ino not in {i for _, i in after}       # nothing of ours keeps the netns alive
    sockets = lambda links: sum(l.startswith("socket:") for l, _ in links)   # noqa: E731
    assert sockets(before) - sockets(after) == 3  # the three listeners are closed
