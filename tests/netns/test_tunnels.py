"""Tunnel drivers against the real kernel: two netns ("node" and "zt") joined by a veth pair.

Wiring as kernel-notes.md §2: node ``veth-zt`` 10.244.1.1/32, zt ``eth0`` 10.244.1.2/32, a host route
each way. Tunnels as legacy-mode.md §1.6/§2.2. Traffic is real: ICMP echo across the tunnel,
frames captured on the veth with an AF_PACKET socket, forged GENEVE/VXLAN packets from a wrong
outer source. The user-space GENEVE processes are checked by pid, pidfile and /proc.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import struct
import subprocess
import time

import pytest

from noderedirect import model, names, tunnels
from noderedirect.host import Host, MissingFeature, NetnsRef, parse_iptables_save
from noderedirect.tunnels import usergeneve
from noderedirect.tunnels.geneve import GeneveDriver, kernel_has_geneve
from noderedirect.tunnels.usergeneve import UserGeneveDriver
from noderedirect.tunnels.usergeneve_main import PROGRAM
from noderedirect.tunnels.vxlan import VxlanDriver

pytestmark = pytest.mark.netns

NODE_IP, ZT_IP, STRANGER_IP = "10.244.1.1", "10.244.1.2", "10.244.1.99"
PORT = names.GENEVE_DEFAULT_PORT
NODE_LINKS = [
    model.Link(names.LINK_IN, "geneve", names.VNI_IN, ZT_IP, PORT, "192.168.126.1/30"),
    model.Link(names.LINK_OUT, "geneve", names.VNI_OUT, ZT_IP, PORT, "192.168.127.1/30"),
]
ZT_LINKS = [
    model.Link(names.PLINK_IN, "geneve", names.VNI_IN, NODE_IP, PORT, "192.168.126.2/30"),
    model.Link(names.PLINK_OUT, "geneve", names.VNI_OUT, NODE_IP, PORT, "192.168.127.2/30"),
]
NODE_NAMES = [l.name for l in NODE_LINKS]
ZT_NAMES = [l.name for l in ZT_LINKS]
ETH_P_ALL = 0x0003


def ip(ns: NetnsRef, *args: str, check: bool = True) -> str:
    """Plain iproute2 inside the netns, independent of the code under test."""
    return subprocess.run(["ip", "-n", ns.spec, *args], check=check, capture_output=True,
                          text=True).stdout


class Pair:
    def __init__(self, node: NetnsRef, zt: NetnsRef):
        self.node, self.zt = node, zt
        self.hosts = {"node": Host(node), "zt": Host(zt)}

    def close(self):
        for h in self.hosts.values():
            h.close()

    def ensure(self, driver, node_links=NODE_LINKS, zt_links=ZT_LINKS):
        return (driver.ensure(self.node.path, node_links), driver.ensure(self.zt.path, zt_links))

    def remove(self, driver):
        return driver.remove(self.node.path, NODE_NAMES) + driver.remove(self.zt.path, ZT_NAMES)


@pytest.fixture
def pair(netns_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("NODEREDIRECT_STATE_DIR", str(tmp_path / "state"))
    node, zt = netns_factory("tunnode"), netns_factory("tunzt")
    for ns in (node, zt):
        # no IPv6 chatter (router solicitations, MLD) on the tunnels: counters stay exact
        subprocess.run(["ip", "netns", "exec", ns.spec, "sysctl", "-qw",
                        "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"],
                       check=True)
    ip(node, "link", "add", "veth-zt", "type", "veth", "peer", "name", "eth0", "netns", zt.spec)
    ip(node, "addr", "add", f"{NODE_IP}/32", "dev", "veth-zt")
    ip(node, "link", "set", "veth-zt", "up")
    ip(node, "route", "add", ZT_IP, "dev", "veth-zt", "scope", "link")
    ip(zt, "addr", "add", f"{ZT_IP}/32", "dev", "eth0")
    ip(zt, "link", "set", "eth0", "up")
    ip(zt, "route", "add", NODE_IP, "dev", "eth0", "scope", "link")
    p = Pair(node, zt)
    try:
        yield p
    finally:
        p.close()


# ---------------------------------------------------------------- traffic helpers


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def ping(host: Host, dst: str, tries: int = 4, wait: float = 1.0) -> bool:
    """ICMP echo from inside ``host``'s netns (a raw socket made on its netns thread)."""
    sock = host.in_netns(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
    ident = random.randrange(1, 0xFFFF)
    try:
        for seq in range(tries):
            body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"noderedirect"
            pkt = body[:2] + struct.pack("!H", _checksum(body)) + body[4:]
            sock.sendto(pkt, (dst, 0))
            deadline = time.monotonic() + wait
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                try:
                    data, (src, _) = sock.recvfrom(2048)
                except socket.timeout:
                    break
                ihl = (data[0] & 0xF) * 4
                typ, _, _, rid, _ = struct.unpack_from("!BBHHH", data, ihl)
                if src == dst and typ == 0 and rid == ident:
                    return True
        return False
    finally:
        sock.close()


class Capture:
    """Every IPv4 UDP frame seen on ``dev`` (both directions) while the capture is open."""

    def __init__(self, host: Host, dev: str):
        def make():
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            s.bind((dev, 0))
            return s
        self.sock = host.in_netns(make)
        self.sock.settimeout(0.2)

    def udp(self, until=lambda pkts: False, timeout: float = 3.0) -> list[tuple[str, str, int, bytes]]:
        """(src, dst, dport, payload) of UDP packets, until ``until(list)`` or the timeout."""
        out = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not until(out):
            try:
                frame = self.sock.recv(65536)
            except socket.timeout:
                continue
            if frame[12:14] != b"\x08\x00" or frame[23] != 17:
                continue
            ihl = (frame[14] & 0xF) * 4
            udp = 14 + ihl
            src, dst = socket.inet_ntoa(frame[26:30]), socket.inet_ntoa(frame[30:34])
            dport = struct.unpack_from("!H", frame, udp + 2)[0]
            out.append((src, dst, dport, frame[udp + 8:]))
        return out

    def close(self):
        self.sock.close()


def send_udp(host: Host, src: str, dst: str, port: int, payload: bytes) -> None:
    """One UDP datagram from ``src`` (a local address of that netns) to ``dst:port``."""
    def send():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((src, 0))
            s.sendto(payload, (dst, port))
    host.in_netns(send)


def inert_frame() -> bytes:
    """A broadcast Ethernet frame of the local-experimental EtherType 0x88b5: a TAP/VXLAN
    device counts it as received, and nothing in the netns answers it, so counts stay exact."""
    return b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5" + b"noderedirect".ljust(46, b"\0")


def rx_packets(ns: NetnsRef, dev: str) -> int:
    data = json.loads(ip(ns, "-s", "-j", "link", "show", "dev", dev))
    return data[0]["stats64"]["rx"]["packets"]


def link_names(ns: NetnsRef) -> list[str]:
    return sorted(l["ifname"] for l in json.loads(ip(ns, "-j", "link", "show")))


def bridge_pids(ns: NetnsRef) -> list[int]:
    """Bridge processes inside ``ns``, found independently of the pidfile."""
    out = subprocess.run(["ip", "netns", "pids", ns.spec], capture_output=True, text=True).stdout
    pids = []
    for p in out.split():
        try:
            if PROGRAM.encode() in open(f"/proc/{p}/cmdline", "rb").read():
                pids.append(int(p))
        except OSError:
            pass
    return sorted(pids)


def proc_alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def wait_for(cond, timeout: float = 5.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()


def pidfile(ns: NetnsRef):
    return usergeneve.paths_for(ns.path).pidfile


# ---------------------------------------------------------------- kernel GENEVE (absent here)


def test_geneve_missing_is_reported_before_anything_changes(pair, caplog):
    if kernel_has_geneve(pair.node.path):
        pytest.skip("this kernel has GENEVE; the test is about kernels without it")
    before = (link_names(pair.node), link_names(pair.zt))
    drv = GeneveDriver()
    with pytest.raises(MissingFeature) as err:
        drv.check(pair.node.path, pair.zt.path)
    msg = str(err.value)
    assert "\n" not in msg
    assert "GENEVE" in msg and "--tunnel usergeneve" in msg and "--tunnel vxlan" in msg
    # ensure() hits EOPNOTSUPP too: the same error, once, and still nothing is created
    with pytest.raises(MissingFeature, match="--tunnel usergeneve"):
        drv.ensure(pair.node.path, NODE_LINKS)
    assert (link_names(pair.node), link_names(pair.zt)) == before == (["lo", "veth-zt"], ["eth0", "lo"])
    # auto falls back to user-space GENEVE and says so in one info line
    caplog.set_level(logging.INFO, logger="noderedirect.tunnels")
    chosen = tunnels.select("auto", pair.node.path)
    assert chosen.name == "usergeneve"
    lines = [r.getMessage() for r in caplog.records if r.name == "noderedirect.tunnels"]
    assert lines == ["tunnel driver: usergeneve (kernel has no GENEVE; user-space GENEVE over TAP)"]
    assert link_names(pair.node) == ["lo", "veth-zt"]


# ---------------------------------------------------------------- VXLAN stand-in


def test_vxlan_carries_traffic_on_6081_and_reapply_is_empty(pair):
    drv = VxlanDriver()
    drv.check(pair.node.path, pair.zt.path)
    node_changes, zt_changes = pair.ensure(drv)
    assert "created vxlan istioin id 1000 remote 10.244.1.2 dstport 6081" in node_changes
    assert "created vxlan pistioout id 1001 remote 10.244.1.1 dstport 6081" in zt_changes
    assert drv.observe(pair.node.path, NODE_NAMES) == [drv.desired(l) for l in NODE_LINKS]
    assert drv.observe(pair.zt.path, ZT_NAMES) == [drv.desired(l) for l in ZT_LINKS]
    assert [l.show() for l in drv.observe(pair.node.path, NODE_NAMES)] == [
        "istioin: vxlan id 1000 remote 10.244.1.2 dstport 6081 address 192.168.126.1/30 up",
        "istioout: vxlan id 1001 remote 10.244.1.2 dstport 6081 address 192.168.127.1/30 up"]
    # the MTU follows the underlay like a kernel GENEVE device (1500 - 50), with brd as §8
    details = ip(pair.node, "-d", "addr", "show", "dev", "istioin")
    assert "mtu 1450" in details and "192.168.126.1/30 brd 192.168.126.3" in details

    cap = Capture(pair.hosts["node"], "veth-zt")
    try:
        assert ping(pair.hosts["node"], "192.168.126.2")
        assert ping(pair.hosts["node"], "192.168.127.2")
        pkts = cap.udp(until=lambda ps: {p[3][4:7] for p in ps} >= {b"\x00\x03\xe8", b"\x00\x03\xe9"})
    finally:
        cap.close()
    out = [p for p in pkts if p[0] == NODE_IP]
    assert out and all(p[1] == ZT_IP and p[2] == PORT for p in out)
    # VXLAN header: I flag, VNI in bytes 4-6
    assert {(p[3][0], int.from_bytes(p[3][4:7], "big")) for p in out} == {(0x08, 1000), (0x08, 1001)}

    assert pair.ensure(drv) == ([], [])


def test_vxlan_outer_source_check_rules_drop_a_wrong_source(pair):
    drv = VxlanDriver()
    pair.ensure(drv)
    rules = drv.extra_rules("node", [drv.desired(l) for l in NODE_LINKS])
    assert [(r.table, r.op, r.chain, r.args) for r in rules] == [
        ("filter", "-I", "INPUT", "-j ztunnel-TUNNEL"),
        ("filter", "-A", "ztunnel-TUNNEL", "! -s 10.244.1.2/32 -p udp -m udp --dport 6081 -j DROP"),
    ]
    node = pair.hosts["node"]
    node.iptables_restore("*filter\n:ztunnel-TUNNEL - [0:0]\n"
                          + "".join(r.restore_line() + "\n" for r in rules) + "COMMIT\n", "nft")
    saved = [r for r in parse_iptables_save(node.iptables_save("nft", table="filter"))]
    # what the kernel shows is exactly what the driver rendered (canonical spelling)
    assert [(r.chain, r.args) for r in saved] == [(r.chain, r.args) for r in rules]

    ip(pair.zt, "addr", "add", f"{STRANGER_IP}/32", "dev", "eth0")
    vxlan = struct.pack("!BBHI", 0x08, 0, 0, names.VNI_IN << 8) + inert_frame()
    before = rx_packets(pair.node, "istioin")
    send_udp(pair.hosts["zt"], STRANGER_IP, NODE_IP, PORT, vxlan)
    time.sleep(0.3)
    counters = node.iptables_save("nft", table="filter", counters=True)
    assert "[1:" in next(l for l in counters.splitlines() if "-A ztunnel-TUNNEL" in l)
    assert rx_packets(pair.node, "istioin") == before
    # control: the same packet from the tunnel's remote gets through
    send_udp(pair.hosts["zt"], ZT_IP, NODE_IP, PORT, vxlan)
    assert wait_for(lambda: rx_packets(pair.node, "istioin") == before + 1, timeout=2)


def test_vxlan_recreates_a_link_whose_vni_or_port_changed(pair):
    drv = VxlanDriver()
    pair.ensure(drv)
    old_index = json.loads(ip(pair.node, "-j", "link", "show", "istioin"))[0]["ifindex"]
    changed = [model.Link("istioin", "geneve", 1234, ZT_IP, 6082, "192.168.126.1/30"), NODE_LINKS[1]]
    changes = drv.ensure(pair.node.path, changed)
    assert changes[0] == ("deleted vxlan istioin (was istioin: vxlan id 1000 remote 10.244.1.2 "
                          "dstport 6081 address 192.168.126.1/30 up)")
    assert changes[1] == "created vxlan istioin id 1234 remote 10.244.1.2 dstport 6082"
    assert not any("istioout" in c for c in changes)
    assert drv.observe(pair.node.path, ["istioin"]) == [drv.desired(changed[0])]
    assert json.loads(ip(pair.node, "-j", "link", "show", "istioin"))[0]["ifindex"] != old_index
    # a stray address and admin-down are repaired in place, without recreating
    ip(pair.node, "addr", "add", "192.168.99.1/24", "dev", "istioout")
    ip(pair.node, "link", "set", "istioout", "down")
    assert drv.ensure(pair.node.path, changed) == [
        "istioout: removed stray address 192.168.99.1/24", "istioout: up"]
    assert drv.remove(pair.node.path, NODE_NAMES) == ["deleted vxlan istioin", "deleted vxlan istioout"]
    assert drv.remove(pair.node.path, NODE_NAMES) == []
    assert link_names(pair.node) == ["lo", "veth-zt"]


def test_vxlan_moves_to_a_new_remote_in_place_keeping_its_routes(pair):
    """A new ztunnel IP: the device stays (same ifindex, address, up) and so does every route
    through it; only the remote changes. The kernel refuses a port change in place, so a port
    or VNI change still re-creates it (test above)."""
    drv = VxlanDriver()
    pair.ensure(drv)
    ip(pair.node, "route", "add", "10.244.1.5", "via", "192.168.126.2", "dev", "istioin", "table", "100")
    ip(pair.node, "route", "add", "10.244.9.0/24", "dev", "veth-zt", "scope", "link")
    old_index = json.loads(ip(pair.node, "-j", "link", "show", "istioin"))[0]["ifindex"]
    moved = [model.Link(l.name, l.kind, l.vni, "10.244.9.3", l.dstport, l.address) for l in NODE_LINKS]
    changes = drv.ensure(pair.node.path, moved)
    assert changes == ["istioin: remote 10.244.1.2 -> 10.244.9.3 (in place)",
                       "istioout: remote 10.244.1.2 -> 10.244.9.3 (in place)"]
    assert json.loads(ip(pair.node, "-j", "link", "show", "istioin"))[0]["ifindex"] == old_index
    assert ip(pair.node, "route", "show", "table", "100") == "10.244.1.5 via 192.168.126.2 dev istioin \n"
    assert drv.observe(pair.node.path, NODE_NAMES) == [drv.desired(l) for l in moved]
    assert drv.ensure(pair.node.path, moved) == []


# ---------------------------------------------------------------- user-space GENEVE


def test_usergeneve_carries_traffic_in_rfc8926_frames(pair):
    drv = UserGeneveDriver()
    drv.check(pair.node.path, pair.zt.path)
    node_changes, zt_changes = pair.ensure(drv)
    assert node_changes[:4] == ["created tap istioin", "istioin: mtu 1450",
                                "istioin: address 192.168.126.1/30", "istioin: up"]
    assert node_changes[-1].startswith("started usergeneve bridge pid ")
    assert [l.show() for l in drv.observe(pair.node.path, NODE_NAMES)] == [
        "istioin: usergeneve id 1000 remote 10.244.1.2 dstport 6081 address 192.168.126.1/30 up",
        "istioout: usergeneve id 1001 remote 10.244.1.2 dstport 6081 address 192.168.127.1/30 up"]
    assert drv.observe(pair.zt.path, ZT_NAMES) == [drv.desired(l) for l in ZT_LINKS]
    assert "tun type tap pi off" in ip(pair.node, "-d", "link", "show", "istioin")

    cap = Capture(pair.hosts["node"], "veth-zt")
    try:
        assert ping(pair.hosts["node"], "192.168.126.2")
        assert ping(pair.hosts["node"], "192.168.127.2")
        pkts = cap.udp(until=lambda ps: {p[3][4:7] for p in ps} >= {b"\x00\x03\xe8", b"\x00\x03\xe9"})
    finally:
        cap.close()
    out = [p for p in pkts if p[0] == NODE_IP]
    back = [p for p in pkts if p[0] == ZT_IP]
    assert out and back
    assert all(p[1] == ZT_IP and p[2] == PORT for p in out)
    assert all(p[1] == NODE_IP and p[2] == PORT for p in back)
    # version 0, no options, no flags, protocol 0x6558, VNI 1000 (0x3e8) / 1001 (0x3e9), reserved 0
    headers = {p[3][:8] for p in out}
    assert headers == {b"\x00\x00\x65\x58\x00\x03\xe8\x00", b"\x00\x00\x65\x58\x00\x03\xe9\x00"}

    st = drv.status(pair.node.path)
    assert st["links"]["istioin"]["tx_frames"] >= 2 and st["links"]["istioin"]["rx_frames"] >= 2
    assert st["links"]["istioout"]["tx_frames"] >= 2 and st["drops"] == {}
    log_lines = [json.loads(l) for l in open(st["log"])]
    assert log_lines[0]["msg"] == "started" and log_lines[0]["pid"] == st["pid"]


def test_usergeneve_drops_a_wrong_outer_source_and_counts_it(pair):
    drv = UserGeneveDriver()
    pair.ensure(drv)
    ip(pair.zt, "addr", "add", f"{STRANGER_IP}/32", "dev", "eth0")
    packet = struct.pack("!BBHI", 0, 0, 0x6558, names.VNI_IN << 8) + inert_frame()
    base = drv.status(pair.node.path)
    tap_before = rx_packets(pair.node, "istioin")

    send_udp(pair.hosts["zt"], STRANGER_IP, NODE_IP, PORT, packet)
    assert wait_for(lambda: drv.status(pair.node.path)["drops"].get("wrong_source") == 1, timeout=3)
    st = drv.status(pair.node.path)
    assert st["links"]["istioin"]["rx_frames"] == base["links"]["istioin"]["rx_frames"]
    assert rx_packets(pair.node, "istioin") == tap_before

    # an unknown VNI from the right source is dropped under its own reason
    send_udp(pair.hosts["zt"], ZT_IP, NODE_IP, PORT, struct.pack("!BBHI", 0, 0, 0x6558, 77 << 8)
             + inert_frame())
    assert wait_for(lambda: drv.status(pair.node.path)["drops"].get("unknown_vni") == 1, timeout=3)
    # control: the same packet from the tunnel's remote reaches the TAP
    send_udp(pair.hosts["zt"], ZT_IP, NODE_IP, PORT, packet)
    assert wait_for(lambda: drv.status(pair.node.path)["links"]["istioin"]["rx_frames"]
                    == base["links"]["istioin"]["rx_frames"] + 1, timeout=3)
    assert rx_packets(pair.node, "istioin") == tap_before + 1
    assert drv.status(pair.node.path)["drops"] == {"unknown_vni": 1, "wrong_source": 1}


def test_usergeneve_supervision_keeps_restarts_and_removes(pair):
    drv = UserGeneveDriver()
    pair.ensure(drv)
    pid = json.loads(pidfile(pair.node).read_text())["pid"]
    assert bridge_pids(pair.node) == [pid]

    # re-apply never flaps
    assert pair.ensure(drv) == ([], [])
    assert bridge_pids(pair.node) == [pid]

    # a configuration change restarts it
    moved = [model.Link(l.name, l.kind, l.vni, l.remote, 6082, l.address) for l in NODE_LINKS]
    changes = drv.ensure(pair.node.path, moved)
    assert len(changes) == 1 and changes[0].startswith("restarted usergeneve bridge pid ")
    assert "(configuration changed)" in changes[0]
    new_pid = json.loads(pidfile(pair.node).read_text())["pid"]
    assert new_pid != pid and not proc_alive(pid)
    assert bridge_pids(pair.node) == [new_pid]
    assert {l.dstport for l in drv.observe(pair.node.path, NODE_NAMES)} == {6082}
    assert drv.ensure(pair.node.path, moved) == []

    # a dead bridge shows as bare TAPs and is restarted
    os.kill(new_pid, signal.SIGKILL)
    assert wait_for(lambda: not proc_alive(new_pid))
    assert {l.kind for l in drv.observe(pair.node.path, NODE_NAMES)} == {"tap"}
    changes = drv.ensure(pair.node.path, moved)
    assert len(changes) == 1 and "(not running)" in changes[0]
    third = json.loads(pidfile(pair.node).read_text())["pid"]
    assert bridge_pids(pair.node) == [third] and third != new_pid

    # remove: process, TAPs and pidfile gone; twice is fine
    assert drv.remove(pair.node.path, NODE_NAMES) == [
        f"stopped usergeneve bridge pid {third}", "deleted tun istioin", "deleted tun istioout"]
    assert not proc_alive(third) and bridge_pids(pair.node) == []
    assert link_names(pair.node) == ["lo", "veth-zt"]
    assert not pidfile(pair.node).exists()
    assert drv.remove(pair.node.path, NODE_NAMES) == []


def test_usergeneve_process_does_not_hold_the_callers_stdio(pair):
    drv = UserGeneveDriver()
    drv.ensure(pair.node.path, NODE_LINKS)
    pid = json.loads(pidfile(pair.node).read_text())["pid"]
    for fd in (0, 1, 2):
        assert os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/null"
    stat = open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()
    ppid, sid = int(stat[1]), int(stat[3])
    # a session of its own, which it does not lead: it can never acquire a terminal
    assert sid != os.getsid(0) and sid != pid
    assert ppid != os.getpid()                        # not our child: never our zombie


def test_usergeneve_process_exits_when_its_taps_are_deleted(pair):
    drv = UserGeneveDriver()
    drv.ensure(pair.node.path, NODE_LINKS)
    pid = json.loads(pidfile(pair.node).read_text())["pid"]
    path = pidfile(pair.node)
    ip(pair.node, "link", "del", "istioin")
    assert wait_for(lambda: not proc_alive(pid), timeout=3)
    assert not path.exists()
    ip(pair.node, "link", "del", "istioout")
    subprocess.run(["ip", "netns", "del", pair.node.spec], check=True)
    assert not proc_alive(pid)


def test_usergeneve_process_exits_when_its_netns_is_deleted(pair):
    drv = UserGeneveDriver()
    drv.ensure(pair.node.path, NODE_LINKS)
    path = pidfile(pair.node)
    pid = json.loads(path.read_text())["pid"]
    # the process itself keeps the netns alive; it must notice the name is gone and leave
    subprocess.run(["ip", "netns", "del", pair.node.spec], check=True)
    assert wait_for(lambda: not proc_alive(pid), timeout=3)
    assert not path.exists()
    reasons = [json.loads(l).get("reason") for l in open(path.with_suffix(".log"))]
    assert reasons[-1] == f"netns {pair.node.path} is gone"


def test_switching_between_usergeneve_and_vxlan(pair):
    user, vx = UserGeneveDriver(), VxlanDriver()
    pair.ensure(user)
    pid = json.loads(pidfile(pair.node).read_text())["pid"]
    node_changes, _ = pair.ensure(vx)
    assert node_changes[0] == f"stopped usergeneve bridge pid {pid}"
    assert node_changes[1].startswith("deleted tun istioin (was istioin: tap id 0 remote none")
    assert not proc_alive(pid) and not pidfile(pair.node).exists()
    assert ping(pair.hosts["node"], "192.168.126.2")
    node_changes, _ = pair.ensure(user)
    assert node_changes[0].startswith("deleted vxlan istioin (was istioin: vxlan id 1000")
    assert ping(pair.hosts["node"], "192.168.127.2")
    pair.remove(user)
    assert bridge_pids(pair.node) == bridge_pids(pair.zt) == []


def test_usergeneve_start_failure_is_one_clear_error_and_leaves_no_process(pair):
    # something else already holds UDP 6081 in the node netns
    squatter = pair.hosts["node"].in_netns(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    try:
        squatter.bind(("0.0.0.0", PORT))
        with pytest.raises(usergeneve.BridgeError) as err:
            UserGeneveDriver().ensure(pair.node.path, NODE_LINKS)
        assert str(err.value) == (f"usergeneve bridge for {pair.node.path} failed to start: "
                                  "bind UDP port 6081: Address already in use")
        assert bridge_pids(pair.node) == [] and not pidfile(pair.node).exists()
    finally:
        squatter.close()
    # once the port is free, the next ensure starts it
    changes = UserGeneveDriver().ensure(pair.node.path, NODE_LINKS)
    assert changes == [changes[0]] and "(not running)" in changes[0]
    assert len(bridge_pids(pair.node)) == 1
