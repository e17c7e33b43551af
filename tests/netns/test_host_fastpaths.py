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


def _link_details(ns, dev: str) -> dict:
    """`ip -d -j link show` of one device without what differs between two equal devices."""
    [d] = json.loads(ip(ns, "-d", "-j", "link", "show", "dev", dev))
    for k in ("ifindex", "address", "broadcast", "operstate", "linkinfo_slave", "link_index"):
        d.pop(k, None)
    return d


def _v4_addrs(ns, dev: str) -> list[dict]:
    return json.loads(ip(ns, "-4", "-j", "addr", "show", "dev", dev))[0]["addr_info"] \
        if json.loads(ip(ns, "-4", "-j", "addr", "show", "dev", dev)) else []


def test_tunnel_links_and_addresses_as_ip_makes_them(host, netns_factory):
    """A VXLAN device, its MTU, address and up state made on bare netlink are the kernel state
    `ip` makes from the same words (compared field by field with `ip -d -j`)."""
    theirs = netns_factory()
    for ns in (host.ns, theirs):
        ip(ns, "link", "add", "veth-zt", "type", "veth", "peer", "name", "eth0")
        ip(ns, "addr", "add", "10.244.1.1/32", "dev", "veth-zt")
        ip(ns, "link", "set", "veth-zt", "up")
        ip(ns, "route", "add", "10.244.1.2", "dev", "veth-zt", "scope", "link")
    host.link_add("istioin", "vxlan", vxlan_id=1000, vxlan_group="10.244.1.2", vxlan_port=6081,
                  vxlan_learning=0)
    host.link_set_mtu("istioin", 1450)
    host.addr_add("istioin", "192.168.126.1/30")
    host.link_up("istioin")
    ip(theirs, "link", "add", "istioin", "type", "vxlan", "id", "1000", "remote", "10.244.1.2",
       "dstport", "6081", "nolearning")
    ip(theirs, "link", "set", "istioin", "mtu", "1450")
    ip(theirs, "addr", "add", "192.168.126.1/30", "brd", "+", "dev", "istioin")
    ip(theirs, "link", "set", "istioin", "up")
    assert _link_details(host.ns, "istioin") == _link_details(theirs, "istioin")
    assert _v4_addrs(host.ns, "istioin") == _v4_addrs(theirs, "istioin")
    assert [(a["local"], a["prefixlen"], a["broadcast"]) for a in _v4_addrs(host.ns, "istioin")] == \
        [("192.168.126.1", 30, "192.168.126.3")]

    # the route lookup behind the tunnel MTU: output device and source address
    veth = next(l for l in host.links() if l.name == "veth-zt")
    assert host.route_get("10.244.1.2") == (veth.index, "10.244.1.1")
    assert host.route_get("203.0.113.9") is None          # no default route here

    host.link_down("istioin")
    assert "UP" not in json.loads(ip(host.ns, "-j", "link", "show", "dev", "istioin"))[0]["flags"]
    host.addr_del("istioin", "192.168.126.1/30")
    assert _v4_addrs(host.ns, "istioin") == []
    with pytest.raises(NetlinkFailed) as ei:
        host.link_add("istioin", "vxlan", vxlan_id=1000, vxlan_group="10.244.1.2", vxlan_port=6081)
    assert ei.value.code == errno.EEXIST and "add vxlan link istioin" in str(ei.value)
    with pytest.raises(NetlinkFailed) as ei:
        host.addr_del("istioin", "192.168.126.1/30")
    assert "delete address 192.168.126.1/30 from istioin" in str(ei.value)


def test_ip_rules_on_bare_netlink_equal_the_ones_ip_makes(host, netns_factory):
    """Rules added on bare netlink read back (`ip -d -j rule show`) as the same rules `ip rule
    add` makes, table > 255 and a rule without a mark included; an identical one is refused."""
    from noderedirect.model import IpRule

    theirs = netns_factory()
    rules = [IpRule(priority=100, action="goto", goto=32766, fwmark=0x200, fwmask=0x200),
             IpRule(priority=101, action="lookup", table=101, fwmark=0x100, fwmask=0x100),
             IpRule(priority=103, action="lookup", table=100),
             IpRule(priority=20000, action="lookup", table=1000, fwmark=0x400, fwmask=0xfff)]
    for r in rules:
        host.rule_add(r)
        prio, _, rest = r.show().partition(":")
        ip(theirs, "rule", "add", "priority", prio, *rest.split())

    def shown(ns) -> list[dict]:
        return [{k: v for k, v in d.items() if k != "protocol"}
                for d in json.loads(ip(ns, "-d", "-j", "rule", "show"))]
    assert shown(host.ns) == shown(theirs)
    assert [o.rule for o in host.ip_rules() if o.rule.priority in (100, 101, 103, 20000)] == rules
    with pytest.raises(NetlinkFailed) as ei:
        host.rule_add(rules[1])
    assert ei.value.code == errno.EEXIST
