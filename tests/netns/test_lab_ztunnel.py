"""The lab's stand-in ztunnel, test server and client, with real traffic through TPROXY.

Topology (three namespaces, the ztunnel netns in the middle as a router that forwards nothing):

    client 10.0.1.2 (eth0) --- (zc) 10.0.1.1  ZTUNNEL  10.0.2.1 (zs) --- (eth0) 10.0.2.2 server

ztunnel netns, as in the legacy ztunnel netns (legacy-mode.md §2.4, §2.5):
mangle PREROUTING ``-i zc`` TPROXY to 15008 (dport 15008), to 15006 (dport 8006), else to
15001, mark 0x400/0xfff; ``-i zs ! -d 10.0.2.1`` MARK 0x4d3/0xfff; rules fwmark 0x400 and
0x4d3 → table 100 = ``local 0.0.0.0/0 dev lo``. ``ip_forward`` stays 0: every byte that
reaches the server went through the proxy.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from noderedirect.lab import client, procs, server, ztunnel

pytestmark = pytest.mark.netns

CLIENT_IP, ZC_IP, ZS_IP, SERVER_IP = "10.0.1.2", "10.0.1.1", "10.0.2.1", "10.0.2.2"


def sh(*args: str, ns: str | None = None) -> str:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        raise AssertionError(f"{cmd} -> {res.returncode}: {res.stderr}")
    return res.stdout


def veth(a: str, a_if: str, a_ip: str, b: str, b_if: str, b_ip: str) -> None:
    sh("ip", "link", "add", a_if, "netns", a, "type", "veth", "peer", "name", b_if, "netns", b)
    for ns, ifname, ip in ((a, a_if, a_ip), (b, b_if, b_ip)):
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", ifname)
        sh("ip", "-n", ns, "link", "set", ifname, "up")


ZTUNNEL_RULES = f"""*mangle
-A PREROUTING -i zc -p tcp -m tcp --dport 15008 -j TPROXY --on-port 15008 --on-ip 127.0.0.1 --tproxy-mark 0x400/0xfff
-A PREROUTING -i zc -p tcp -m tcp --dport 8006 -j TPROXY --on-port 15006 --on-ip 127.0.0.1 --tproxy-mark 0x400/0xfff
-A PREROUTING -i zc -p tcp -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x400/0xfff
-A PREROUTING -i zs -p tcp ! -d {ZS_IP}/32 -j MARK --set-xmark 0x4d3/0xfff
COMMIT
"""


@pytest.fixture
def topo(netns_factory):
    c, z, s = netns_factory("labc"), netns_factory("labz"), netns_factory("labs")
    veth(z.spec, "zc", ZC_IP, c.spec, "eth0", CLIENT_IP)
    veth(z.spec, "zs", ZS_IP, s.spec, "eth0", SERVER_IP)
    sh("ip", "-n", c.spec, "route", "add", "default", "via", ZC_IP)
    sh("ip", "-n", s.spec, "route", "add", "default", "via", ZS_IP)
    subprocess.run(["ip", "netns", "exec", z.spec, "iptables-restore", "--noflush"],
                   input=ZTUNNEL_RULES, text=True, check=True, capture_output=True)
    for mark in ("0x400/0xfff", "0x4d3/0xfff"):
        sh("ip", "-n", z.spec, "rule", "add", "fwmark", mark, "lookup", "100")
    sh("ip", "-n", z.spec, "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100")
    assert sh("cat", "/proc/sys/net/ipv4/ip_forward", ns=z.spec).strip() == "0"
    assert sh("cat", "/proc/sys/net/ipv4/tcp_fwmark_accept", ns=z.spec).strip() == "0"
    return c, z, s


class Lab:
    """Starts the daemons under a state dir and stops them at the end."""

    def __init__(self, state: Path):
        self.state = state
        self.pidfiles: list[Path] = []

    def start(self, name: str, module: str, *args: str) -> tuple[procs.Started, Path]:
        ready = self.state / f"{name}.ready"
        p = procs.start(procs.module_argv(module, *args, "--ready-file", str(ready)),
                        self.state, name)
        self.pidfiles.append(p.pidfile)
        procs.wait_ready(ready, 10.0, pidfile=p.pidfile)
        return p, ready

    def ztunnel(self, z, *extra: str, name: str = "ztunnel") -> tuple[procs.Started, Path]:
        logf = self.state / f"{name}.log"
        p, _ = self.start(name, ztunnel.PROGRAM, "--netns", z.path, "--log", str(logf), *extra)
        return p, logf

    def server(self, *serves: str, name: str = "server") -> tuple[procs.Started, Path, Path]:
        logf = self.state / f"{name}.log"
        args = [a for s in serves for a in ("--serve", s)]
        p, ready = self.start(name, server.PROGRAM, *args, "--log", str(logf))
        return p, logf, ready

    def stop_all(self) -> None:
        for pf in self.pidfiles:
            procs.stop(pf)


@pytest.fixture
def lab(tmp_path):
    lab = Lab(tmp_path / "state")
    try:
        yield lab
    finally:
        lab.stop_all()


def gone(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}")


# ---------------------------------------------------------------- through the proxy


def test_relay_keeps_original_source_and_destination(topo, lab):
    c, z, s = topo
    _, zlog = lab.ztunnel(z)
    _, slog, _ = lab.server(f"{s.path}={SERVER_IP}:8000", f"{s.path}={SERVER_IP}:8006")

    out = client.request(c.path, SERVER_IP, 8000, "/")
    assert (out.error, out.status) == (None, 200)
    assert out.local.startswith(f"{CLIENT_IP}:")

    [acc] = ztunnel.accepts(zlog)
    assert acc["listener"] == 15001
    assert acc["peer"] == out.local
    assert acc["orig_dst"] == f"{SERVER_IP}:8000"
    [up] = ztunnel.events(zlog, "upstream", conn=acc["conn"])
    assert up["error"] is None and up["orig_dst"] == f"{SERVER_IP}:8000"
    # the server saw the client's own address, from the upstream socket ztunnel opened
    assert up["upstream_local"].startswith(f"{CLIENT_IP}:")
    assert up["upstream_local"] != out.local
    assert out.body == f"client={up['upstream_local']}\n".encode()
    assert out.client_seen == up["upstream_local"]
    [req] = server.read_log(slog)
    assert (req["listen"], req["client"], req["path"], req["status"]) == \
        (f"{SERVER_IP}:8000", up["upstream_local"], "/", 200)

    # inbound plaintext listener (selected by port here), same relay
    out2 = client.request(c.path, SERVER_IP, 8006, "/")
    assert out2.ok and out2.client_seen.startswith(f"{CLIENT_IP}:")
    [acc2] = ztunnel.accepts(zlog, listener=15006)
    assert (acc2["peer"], acc2["orig_dst"]) == (out2.local, f"{SERVER_IP}:8006")

    closes = sorted(ztunnel.wait_events(zlog, "close", count=2), key=lambda e: e["conn"])
    assert [(e["conn"], e["error"]) for e in closes] == [(acc["conn"], None), (acc2["conn"], None)]
    assert closes[0]["bytes_up"] == len(client.request_bytes(SERVER_IP, 8000, "/"))
    assert closes[0]["bytes_down"] == len(server.response_head(200, len(out.body))) + len(out.body)


def test_no_spoof_connects_from_ztunnel_address(topo, lab):
    c, z, s = topo
    _, zlog = lab.ztunnel(z, "--no-spoof")
    lab.server(f"{s.path}={SERVER_IP}:8000")
    out = client.request(c.path, SERVER_IP, 8000)
    assert out.ok, out
    [up] = ztunnel.events(zlog, "upstream")
    assert up["upstream_local"].startswith(f"{ZS_IP}:")
    assert out.client_seen == up["upstream_local"]


def test_four_megabytes_relay_intact(topo, lab):
    c, z, s = topo
    _, zlog = lab.ztunnel(z)
    lab.server(f"{s.path}={SERVER_IP}:8000")
    out = client.request(c.path, SERVER_IP, 8000, "/bytes/4000000", timeout=10)
    assert (out.error, out.status, len(out.body)) == (None, 200, 4_000_000)
    assert out.body == server.pattern_bytes(4_000_000)
    [close] = ztunnel.wait_events(zlog, "close")
    assert close["bytes_up"] == len(client.request_bytes(SERVER_IP, 8000, "/bytes/4000000"))
    assert close["bytes_down"] == len(server.response_head(200, 4_000_000)) + 4_000_000
    assert close["error"] is None


def test_failed_upstream_resets_the_client(topo, lab):
    """Like scenario 12: the client's connection is accepted, the upstream one fails."""
    c, z, s = topo
    _, zlog = lab.ztunnel(z)
    out = client.request(c.path, SERVER_IP, 8000)      # nothing listens on the server
    assert (out.status, out.error) == (None, "ECONNRESET")
    [up] = ztunnel.events(zlog, "upstream")
    assert up["upstream_local"] is None
    assert up["error"].startswith("ECONNREFUSED")


def test_upstream_reset_reaches_the_client(topo, lab):
    c, z, s = topo
    _, zlog = lab.ztunnel(z)
    lsock = procs.socket_in_netns(s.path)
    lsock.bind((SERVER_IP, 8000))
    lsock.listen(1)

    def reset_after_request() -> None:
        conn, _ = lsock.accept()
        conn.recv(4096)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    t = threading.Thread(target=reset_after_request)
    t.start()
    with lsock:
        out = client.request(c.path, SERVER_IP, 8000, timeout=3)
        t.join()
    assert (out.status, out.error) == (None, "ECONNRESET")
    [close] = ztunnel.wait_events(zlog, "close")
    assert close["error"].startswith("ECONNRESET")
    assert close["bytes_up"] == len(client.request_bytes(SERVER_IP, 8000, "/"))


def test_upstream_without_answer_times_out_and_resets(topo, lab):
    """Scenario 12's shape: the server's SYN-ACK never comes back to the spoofed socket."""
    c, z, s = topo
    sh("iptables", "-A", "OUTPUT", "-p", "tcp", "--sport", "8000", "--tcp-flags", "SYN,ACK",
       "SYN,ACK", "-j", "DROP", ns=s.spec)
    _, zlog = lab.ztunnel(z, "--connect-timeout", "0.3")
    lab.server(f"{s.path}={SERVER_IP}:8000")
    out = client.request(c.path, SERVER_IP, 8000, timeout=3)
    assert (out.status, out.error) == (None, "ECONNRESET")
    assert 0.3 <= out.seconds < 2
    [up] = ztunnel.events(zlog, "upstream")
    assert (up["upstream_local"], up["error"]) == (None, "timeout")


def test_idle_connection_is_closed(topo, lab):
    c, z, s = topo
    _, zlog = lab.ztunnel(z, "--idle-timeout", "0.3")
    lab.server(f"{s.path}={SERVER_IP}:8000")
    sock = procs.socket_in_netns(c.path)
    with sock:
        sock.settimeout(3)
        sock.connect((SERVER_IP, 8000))
        assert sock.recv(10) == b""             # ztunnel hung up on the silent client
    [close] = ztunnel.wait_events(zlog, "close")
    assert (close["error"], close["bytes_up"], close["bytes_down"]) == ("idle for 0.3s", 0, 0)


def test_hbone_and_self_connections_are_logged_and_reset(topo, lab):
    c, z, s = topo
    _, zlog = lab.ztunnel(z)
    lab.server(f"{s.path}={SERVER_IP}:15008")
    out = client.request(c.path, SERVER_IP, 15008)
    assert out.status is None and out.error == "ECONNRESET"
    [acc] = ztunnel.accepts(zlog)
    assert (acc["listener"], acc["orig_dst"], acc["peer"]) == (15008, f"{SERVER_IP}:15008", out.local), out
    assert ztunnel.events(zlog, "upstream") == []
    [close] = ztunnel.events(zlog, "close", conn=acc["conn"])
    assert (close["bytes_up"], close["bytes_down"]) == (0, 0)

    # a connection to a listener itself is refused, not relayed to itself over and over
    direct = client.request(c.path, ZC_IP, 15001)
    assert (direct.status, direct.error) == (None, "ECONNRESET")
    [acc2] = ztunnel.accepts(zlog, listener=15001)
    assert acc2["orig_dst"] == f"{ZC_IP}:15001"
    [close2] = ztunnel.events(zlog, "close", conn=acc2["conn"])
    assert close2["error"] == "addressed to the proxy itself"
    assert ztunnel.events(zlog, "upstream") == []


def test_without_ztunnel_nothing_gets_through(topo, lab):
    """The rules send everything to the proxy; with no proxy running the client fails."""
    c, z, s = topo
    lab.server(f"{s.path}={SERVER_IP}:8000")
    out = client.request(c.path, SERVER_IP, 8000, timeout=0.5)
    # TPROXY drops what no transparent socket takes: the SYN goes unanswered
    assert (out.status, out.error) == (None, "timeout")
    assert out.local.startswith(f"{CLIENT_IP}:")


# ---------------------------------------------------------------- server, client, processes


def test_one_server_serves_three_netns(netns_factory, lab):
    pods = [netns_factory("labp") for _ in range(3)]
    # the same address in each: binding it three times only works in three namespaces
    p, slog, ready = lab.server(*(f"{ns.path}=127.0.0.1:8000" for ns in pods))
    for ns in pods:
        assert procs.netns_pids(ns.spec) == []          # the process itself stays outside
    outs = [client.request(ns.path, "127.0.0.1", 8000) for ns in pods]
    assert all(o.ok for o in outs), outs
    reqs = server.read_log(slog)
    assert [(r["netns"], r["client"]) for r in reqs] == [(ns.path, o.local) for ns, o in zip(pods, outs)]
    missing = client.request(pods[0].path, "127.0.0.1", 8000, "/nothing")
    assert (missing.status, missing.error) == (404, None)
    big = client.request(pods[1].path, "127.0.0.1", 8000, f"/bytes/{server.MAX_BODY + 1}")
    assert big.status == 400


def test_client_reports_refused_and_bind(netns_factory):
    ns = netns_factory("labcl")
    out = client.request(ns.path, "127.0.0.1", 9)
    assert (out.status, out.error) == (None, "ECONNREFUSED")
    assert out.local.startswith("127.0.0.1:") and out.local != "127.0.0.1:0"
    bad = client.request(ns.path, "127.0.0.1", 9, bind="10.9.9.9")
    assert (bad.error, bad.local) == ("EADDRNOTAVAIL", None)
    unreachable = client.request(ns.path, "10.9.9.9", 80)
    assert (unreachable.error, unreachable.local) == ("ENETUNREACH", None)


def test_stop_leaves_no_process(topo, lab):
    c, z, s = topo
    zt, zlog = lab.ztunnel(z)
    sv, _, _ = lab.server(f"{s.path}={SERVER_IP}:8000")
    assert procs.alive(zt.pidfile) and procs.netns_pids(z.spec) == [zt.pid]
    assert procs.stop(zt.pidfile) and procs.stop(sv.pidfile)
    assert ztunnel.events(zlog, "exit")[0]["reason"] == "signal"
    assert gone(zt.pid) and gone(sv.pid)
    assert not procs.alive(zt.pidfile) and not zt.pidfile.exists()
    assert procs.netns_pids(z.spec) == []
    assert procs.stop(zt.pidfile) is False


def test_kill_netns_pids(netns_factory, lab):
    ns = netns_factory("labk")
    sleeper = procs.start(["ip", "netns", "exec", ns.spec, "sleep", "30"], lab.state, "sleeper")
    deadline = time.monotonic() + 5
    while procs.netns_pids(ns.spec) != [sleeper.pid] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert procs.kill_netns_pids(ns.spec) == [sleeper.pid]
    assert not procs.alive(sleeper.pidfile) and gone(sleeper.pid)
    assert procs.kill_netns_pids(ns.spec) == []


def wait_dead(pidfile: Path, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while procs.alive(pidfile) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not procs.alive(pidfile)


def test_daemons_do_not_outlive_their_netns(netns_factory, lab):
    """Deleting a netns does not end it while a socket or process is inside, so the daemons
    let go by themselves: ztunnel exits, the server drops that listener (and exits with the
    last one)."""
    zns, a, b = netns_factory("labz"), netns_factory("labp"), netns_factory("labp")
    zt, zlog = lab.ztunnel(zns)
    sv, _, _ = lab.server(f"{a.path}=127.0.0.1:8000", f"{b.path}=127.0.0.1:8000")
    sh("ip", "netns", "del", zns.spec)
    sh("ip", "netns", "del", a.spec)
    assert wait_dead(zt.pidfile)
    assert ztunnel.events(zlog, "exit")[0]["reason"] == f"netns {zns.path} is gone"
    assert procs.alive(sv.pidfile) and client.request(b.path, "127.0.0.1", 8000).ok
    sh("ip", "netns", "del", b.spec)
    assert wait_dead(sv.pidfile)
