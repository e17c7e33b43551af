"""The host layer's fast paths against the kernel's own tools: bare-netlink route and link
reads (and their reuse of what the last read decoded), prefix deletes, single ipset members
through netlink, and commands started from the netns thread."""

from __future__ import annotations

import errno
import json
import subprocess

import pytest

from noderedirect.host import CommandError, NetlinkFailed, parse_ipset_save
from noderedirect.model import IpsetEntry, Route

pytestmark = pytest.mark.netns


def ip(ns, *args: str) -> str:
    return subprocess.run(["ip", "-n", ns.spec, *args], check=True, capture_output=True, text=True).stdout


def sh(ns, *argv: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns.spec, *argv], check=True, capture_output=True,
                          text=True).stdout


@pytest.fixture
def wired(netns):
    ip(netns, "link", "add", "va", "type", "veth", "peer", "name", "vb")
    for dev, addr in (("va", "10.1.0.1/24"), ("vb", "10.2.0.1/24")):
        ip(netns, "addr", "add", addr, "dev", dev)
        ip(netns, "link", "set", dev, "up")
    return netns


def test_route_reads_follow_changes_and_renames(host, wired):
    ip(wired, "route", "add", "10.9.0.0/16", "via", "10.1.0.2", "dev", "va", "table", "100")
    ip(wired, "route", "add", "10.8.0.1", "dev", "vb", "scope", "link", "table", "100")
    first = host.routes(100)
    assert host.routes(100) == first            # a second read (from what the first decoded)
    ip(wired, "route", "replace", "10.9.0.0/16", "via", "10.1.0.3", "dev", "va", "table", "100")
    assert Route(table=100, dst="10.9.0.0/16", via="10.1.0.3", dev="va") in host.routes(100)
    assert Route(table=100, dst="10.9.0.0/16", via="10.1.0.2", dev="va") not in host.routes(100)
    # same message bytes, other interface name: must not come from the previous read
    ip(wired, "link", "set", "vb", "down")
    ip(wired, "link", "set", "vb", "name", "vc")
    ip(wired, "link", "set", "vc", "up")
    ip(wired, "route", "replace", "10.8.0.1", "dev", "vc", "scope", "link", "table", "100")
    assert Route(table=100, dst="10.8.0.1/32", dev="vc", scope="link") in host.routes(100)
    assert host.routes(100, family=6) == [] and host.routes(4242) == []


def test_route_del_prefix_removes_exactly_that_prefix(host, wired):
    ip(wired, "route", "add", "10.9.0.1", "via", "10.1.0.2", "dev", "va", "table", "100")
    ip(wired, "route", "add", "10.9.0.1", "via", "10.2.0.2", "dev", "vb", "table", "100", "metric", "5")
    ip(wired, "route", "add", "10.9.0.0/24", "via", "10.1.0.2", "dev", "va", "table", "100")
    gone = host.route_del_prefix(100, "10.9.0.1/32")
    assert sorted(gone) == sorted([Route(table=100, dst="10.9.0.1/32", via="10.1.0.2", dev="va"),
                                   Route(table=100, dst="10.9.0.1/32", via="10.2.0.2", dev="vb")])
    assert host.routes(100) == [Route(table=100, dst="10.9.0.0/24", via="10.1.0.2", dev="va")]
    assert host.route_del_prefix(100, "10.9.0.1/32") == []
    assert host.route_del_prefix(4242, "10.9.0.1/32") == []


def test_links_agree_with_ip_link(host, wired):
    ip(wired, "link", "add", "istioin", "type", "vxlan", "id", "1000", "remote", "10.244.1.2",
       "dstport", "6081")
    ip(wired, "addr", "add", "192.168.126.1/30", "dev", "istioin")
    ip(wired, "tuntap", "add", "dev", "tp0", "mode", "tap")
    shown = {l["ifname"]: l for l in json.loads(ip(wired, "-j", "-d", "addr", "show"))}
    got = {l.name: l for l in host.links()}
    assert set(got) == set(shown) == {"lo", "va", "vb", "istioin", "tp0"}
    for name, l in shown.items():
        info = l.get("linkinfo", {})
        assert got[name].index == l["ifindex"] and got[name].mtu == l["mtu"], name
        assert got[name].up == ("UP" in l["flags"]), name
        assert got[name].addresses == tuple(f"{a['local']}/{a['prefixlen']}" for a in l["addr_info"]
                                            if a["family"] == "inet"), name
        assert got[name].kind == info.get("info_kind", "loopback" if name == "lo" else None), name
    vx = shown["istioin"]["linkinfo"]["info_data"]
    assert (got["istioin"].vni, got["istioin"].remote, got["istioin"].dstport, got["istioin"].external) == \
        (vx["id"], vx["remote"], vx["port"], False)
    assert got["tp0"].tun_mode == "tap"
    assert got["va"].peer_ifindex == got["vb"].index


def test_ipset_members_one_by_one(host):
    sh(host.ns, "ipset", "create", "ztunnel-pods-ips", "hash:ip", "comment")
    sh(host.ns, "ipset", "create", "plain", "hash:ip")
    host.ipset_add("ztunnel-pods-ips", "10.244.2.1", "uid-1")
    host.ipset_add("ztunnel-pods-ips", "10.244.2.1", "uid-2")       # like -exist: re-commented
    host.ipset_add("ztunnel-pods-ips", "10.244.2.2")
    assert host.ipset_entry("ztunnel-pods-ips", "10.244.2.1") == IpsetEntry("ztunnel-pods-ips", "10.244.2.1", "uid-2")
    assert host.ipset_entry("ztunnel-pods-ips", "10.244.2.2") == IpsetEntry("ztunnel-pods-ips", "10.244.2.2", None)
    assert host.ipset_entry("ztunnel-pods-ips", "10.244.2.3") is None
    assert host.ipset_entry("nosuch", "10.244.2.1") is None
    assert sorted(host.ipsets()["ztunnel-pods-ips"][1]) == [
        IpsetEntry("ztunnel-pods-ips", "10.244.2.1", "uid-2"), IpsetEntry("ztunnel-pods-ips", "10.244.2.2", None)]
    assert host.ipset_del("ztunnel-pods-ips", "10.244.2.1") is True
    assert host.ipset_del("ztunnel-pods-ips", "10.244.2.1") is False
    assert host.ipset_del("nosuch", "10.244.2.1") is False
    with pytest.raises(NetlinkFailed) as missing:
        host.ipset_add("nosuch", "10.244.2.1", "uid-1")
    assert missing.value.code == errno.ENOENT
    with pytest.raises(NetlinkFailed, match="created without comment support"):
        host.ipset_add("plain", "10.244.2.1", "uid-1")


def test_ipset_entry_and_reads_at_scale_agree_with_ipset_save(host):
    n = 3000
    lines = ["create ztunnel-pods-ips hash:ip family inet hashsize 1024 maxelem 65536 comment"]
    lines += [f'add ztunnel-pods-ips 10.244.{2 + i // 250}.{1 + i % 250} comment "uid-{i}"' for i in range(n)]
    host.ipset_restore("\n".join(lines) + "\n")
    saved = parse_ipset_save(sh(host.ns, "ipset", "save"))["ztunnel-pods-ips"][1]
    assert len(saved) == n
    for e in (saved[0], saved[n // 2], saved[-1]):
        assert host.ipset_entry("ztunnel-pods-ips", e.ip) == e
    assert host.ipset_entry("ztunnel-pods-ips", "10.244.250.250") is None
    assert sorted(host.ipsets()["ztunnel-pods-ips"][1]) == sorted(saved)
    host.ipset_add("ztunnel-pods-ips", saved[5].ip, "uid-changed")
    again = host.ipsets()["ztunnel-pods-ips"][1]        # partly from what the last read parsed
    assert IpsetEntry("ztunnel-pods-ips", saved[5].ip, "uid-changed") in again
    assert saved[5] not in again and len(again) == n


def test_commands_run_inside_the_netns(host, wired):
    assert host.run(["ip", "-o", "link", "show", "va"]).stdout.split(":")[1].strip().startswith("va")
    inode = subprocess.run(["stat", "-L", "-c", "%i", host.ns.path], capture_output=True, text=True).stdout
    assert host.run(["stat", "-L", "-c", "%i", "/proc/self/ns/net"]).stdout == inode
    with pytest.raises(CommandError) as missing:
        host.run(["no-such-command-here"])
    assert missing.value.returncode == 127 and "No such file" in missing.value.stderr
