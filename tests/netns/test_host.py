"""Host against the real kernel: each test in its own fresh network namespace."""

from __future__ import annotations

import dataclasses
import errno
import os
import signal
import subprocess
import time

import pytest

from noderedirect.host import (CommandError, Host, HostError, InvalidValue, LinkInfo, NetnsNotFound,
                               RoutesRefused,
                               NetnsRef, NftError, RestoreError)
from noderedirect.model import IpRule, IpsetEntry, IpsetSet, Route

pytestmark = pytest.mark.netns


def ip(ns: NetnsRef, *args: str) -> str:
    """Plain iproute2 inside the netns, independent of the code under test."""
    return subprocess.run(["ip", "-n", ns.spec, *args], check=True, capture_output=True,
                          text=True).stdout


def nsexec(ns: NetnsRef, *argv: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns.spec, *argv], input=input, check=True,
                          capture_output=True, text=True)


def tunnel(ns: NetnsRef, name: str = "istioin", vni: int = 1000, addr: str = "192.168.126.1/30") -> None:
    ip(ns, "link", "add", name, "type", "vxlan", "id", str(vni), "remote", "10.244.1.2", "dstport", "6081")
    ip(ns, "addr", "add", addr, "dev", name)
    ip(ns, "link", "set", name, "up")


# ---------------------------------------------------------------- netns references


def test_resolve_by_name_and_path(netns):
    assert netns.path == f"/var/run/netns/{netns.spec}"
    by_path = NetnsRef.resolve(netns.path)
    assert by_path.path == netns.path and by_path.identity == netns.identity


def test_missing_netns_is_an_error_and_is_not_created():
    name = "nr-missing-" + os.urandom(4).hex()
    with pytest.raises(NetnsNotFound, match=name):
        NetnsRef.resolve(name)
    with pytest.raises(NetnsNotFound):
        Host(name)
    assert not os.path.exists(f"/var/run/netns/{name}")


@pytest.mark.parametrize("spec, words", [
    ("/proc/self/ns/mnt", "not a network namespace"),
    ("..", "not a valid netns name"),
    ("bad name", "not a valid netns name"),
    ("../etc", "not absolute"),
])
def test_resolve_rejects_what_is_not_a_netns(spec, words):
    with pytest.raises(NetnsNotFound, match=words):
        NetnsRef.resolve(spec)


def test_resolve_rejects_a_plain_file(tmp_path):
    f = tmp_path / "net"
    f.write_text("")
    with pytest.raises(NetnsNotFound, match="not a namespace file"):
        NetnsRef.resolve(str(f))


def test_resolve_by_proc_path_and_teardown_kills_processes_inside(netns_factory):
    from conftest import _remove_netns
    ns = netns_factory("pid")
    sleeper = subprocess.Popen(["ip", "netns", "exec", ns.spec, "sleep", "60"])
    try:
        deadline = time.monotonic() + 5
        while not subprocess.run(["ip", "netns", "pids", ns.spec], capture_output=True,
                                 text=True).stdout.split() and time.monotonic() < deadline:
            time.sleep(0.02)
        by_pid = NetnsRef.resolve(f"/proc/{sleeper.pid}/ns/net")
        assert by_pid.identity == ns.identity
        with Host(by_pid) as h:
            assert h.sysctl_get(["net/ipv4/ip_forward"]) == {"net/ipv4/ip_forward": "0"}
        _remove_netns(ns.spec)
        assert sleeper.wait(timeout=5) == -signal.SIGKILL
        assert ns.spec not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    finally:
        if sleeper.poll() is None:
            sleeper.kill()


def test_host_on_a_netns_deleted_after_resolving(netns_factory):
    ns = netns_factory("gone")
    h = Host(ns)
    subprocess.run(["ip", "netns", "del", ns.spec], check=True)
    with pytest.raises(NetnsNotFound, match="is gone"):
        h.links()
    h.close()


# ---------------------------------------------------------------- running inside


def test_run_and_worker_are_inside_the_netns(host, netns):
    inode = str(netns.identity[1])
    assert host.run(["stat", "-L", "-c", "%i", "/proc/self/ns/net"]).stdout.strip() == inode
    assert host.in_netns(lambda: os.stat("/proc/thread-self/ns/net").st_ino) == netns.identity[1]
    # the calling thread did not move
    assert os.stat("/proc/thread-self/ns/net").st_ino != netns.identity[1]
    assert [l.name for l in host.links()] == ["lo"]


def test_command_error_is_one_line_with_context(host, netns):
    with pytest.raises(CommandError) as ei:
        host.run(["ip", "link", "del", "nosuch"])
    e = ei.value
    assert e.cmd == ["ip", "link", "del", "nosuch"]
    assert e.returncode == 1 and e.netns == netns.spec
    assert str(e) == f'`ip link del nosuch` in netns {netns.spec} exited 1: Cannot find device "nosuch"'
    cp = host.run(["ip", "link", "del", "nosuch"], check=False)
    assert cp.returncode == 1


def test_run_rejects_newlines_in_arguments(host):
    with pytest.raises(InvalidValue):
        host.run(["ip", "link", "show", "lo\nx"])


# ---------------------------------------------------------------- links and addresses


def test_links_report_kind_addresses_tunnel_and_peer(host, netns):
    ip(netns, "link", "add", "veth-zt", "type", "veth", "peer", "name", "eth0")
    host.link_add("istioin", "vxlan", vxlan_id=1000, vxlan_group="10.244.1.2", vxlan_port=6081)
    host.link_add("flow", "vxlan", vxlan_id=7, vxlan_collect_metadata=1, vxlan_port=4789)
    ip(netns, "tuntap", "add", "dev", "istioout", "mode", "tap")
    host.addr_add("istioin", "192.168.126.1/30")
    host.link_up("istioin")

    links = {l.name: l for l in host.links()}
    assert links["lo"].kind == "loopback" and links["lo"].up
    assert links["istioin"] == LinkInfo(
        name="istioin", index=links["istioin"].index, kind="vxlan", up=True,
        addresses=("192.168.126.1/30",), vni=1000, remote="10.244.1.2", dstport=6081,
        external=False, peer_ifindex=None, mtu=1500)   # no underlay device given: no -50
    assert links["flow"].external is True and links["flow"].vni == 7
    assert (links["istioout"].kind, links["istioout"].tun_mode, links["istioout"].up) == ("tun", "tap", False)
    assert links["veth-zt"].kind == "veth" and links["veth-zt"].peer_ifindex == links["eth0"].index
    # the address got its broadcast, like the original's netlink AddrAdd
    assert "inet 192.168.126.1/30 brd 192.168.126.3" in ip(netns, "-o", "addr", "show", "dev", "istioin")

    host.addr_del("istioin", "192.168.126.1/30")
    assert host.link("istioin").addresses == ()
    host.link_del("istioout")
    assert host.link("istioout") is None
    with pytest.raises(HostError, match="no link 'istioout'"):
        host.link_up("istioout")
    with pytest.raises(InvalidValue):
        host.addr_add("istioin", "192.168.126.1")


# ---------------------------------------------------------------- ip rules


def test_ip_rules_compare_equal_to_the_model(host, netns):
    ip(netns, "rule", "add", "priority", "100", "fwmark", "0x200/0x200", "goto", "32766")
    ip(netns, "rule", "add", "priority", "102", "fwmark", "0x40/0x40", "lookup", "102")
    ip(netns, "rule", "add", "priority", "103", "lookup", "100")
    ip(netns, "rule", "add", "priority", "20000", "fwmark", "0x400/0xfff", "lookup", "100")
    found = {o.rule: o for o in host.ip_rules()}
    for rule in (IpRule(priority=100, action="goto", goto=32766, fwmark=0x200, fwmask=0x200),
                 IpRule(priority=102, action="lookup", table=102, fwmark=0x40, fwmask=0x40),
                 IpRule(priority=103, action="lookup", table=100),
                 IpRule(priority=20000, action="lookup", table=100, fwmark=0x400, fwmask=0xFFF),
                 IpRule(priority=0, action="lookup", table=255),
                 IpRule(priority=32766, action="lookup", table=254)):
        assert rule in found, rule
        assert found[rule].plain
    assert found[IpRule(priority=102, action="lookup", table=102, fwmark=0x40, fwmask=0x40)].text \
        == "102:\tfrom all fwmark 0x40/0x40 lookup 102"


def test_rule_with_more_selectors_is_not_plain_and_blocks_delete(host, netns):
    ip(netns, "rule", "add", "priority", "103", "lookup", "100")
    ip(netns, "rule", "add", "priority", "103", "iif", "lo", "lookup", "100")
    ip(netns, "rule", "add", "priority", "104", "not", "from", "10.1.0.0/16", "lookup", "100")
    at = [o for o in host.ip_rules() if o.rule.priority in (103, 104)]
    assert [(o.plain, o.text) for o in at] == [
        (True, "103:\tfrom all lookup 100"),
        (False, "103:\tfrom all iifname lo lookup 100"),
        (False, "104:\tnot from 10.1.0.0/16 lookup 100"),
    ]
    ours = IpRule(priority=103, action="lookup", table=100)
    with pytest.raises(HostError, match="could match '103:\tfrom all iifname lo lookup 100'"):
        host.rule_del(ours)
    ip(netns, "rule", "del", "priority", "103", "iif", "lo", "lookup", "100")
    # a plain rule with a mark also matches a mark-less delete request
    ip(netns, "rule", "add", "priority", "103", "fwmark", "0x1", "lookup", "100")
    with pytest.raises(HostError, match="could match '103:\tfrom all fwmark 0x1 lookup 100'"):
        host.rule_del(ours)
    ip(netns, "rule", "del", "priority", "103", "fwmark", "0x1", "lookup", "100")
    host.rule_del(ours)
    assert "103:" not in ip(netns, "rule", "show")
    with pytest.raises(HostError, match="not found"):
        host.rule_del(ours)


def test_rule_add_writes_what_ip_rule_shows(host, netns):
    host.rule_add(IpRule(priority=100, action="goto", goto=32766, fwmark=0x200, fwmask=0x200))
    host.rule_add(IpRule(priority=101, action="lookup", table=101, fwmark=0x100, fwmask=0x100))
    host.rule_add(IpRule(priority=103, action="lookup", table=100))
    shown = ip(netns, "rule", "show")
    assert "100:\tfrom all fwmark 0x200/0x200 goto 32766\n" in shown
    assert "101:\tfrom all fwmark 0x100/0x100 lookup 101\n" in shown
    assert "103:\tfrom all lookup 100\n" in shown
    host.rule_del(IpRule(priority=101, action="lookup", table=101, fwmark=0x100, fwmask=0x100))
    assert "101:" not in ip(netns, "rule", "show")


# ---------------------------------------------------------------- routes


def _node_links(netns):
    ip(netns, "link", "add", "veth-zt", "type", "veth", "peer", "name", "eth0")
    ip(netns, "addr", "add", "10.244.1.1/32", "dev", "veth-zt")
    ip(netns, "link", "set", "veth-zt", "up")
    ip(netns, "link", "set", "eth0", "up")
    tunnel(netns)


def test_routes_compare_equal_to_the_model(host, netns):
    _node_links(netns)
    ip(netns, "route", "add", "10.244.1.5/32", "via", "192.168.126.2", "dev", "istioin",
       "src", "10.244.1.1", "table", "100")
    ip(netns, "route", "add", "10.244.1.2", "dev", "veth-zt", "scope", "link", "table", "100")
    ip(netns, "route", "add", "default", "via", "10.244.1.2", "dev", "veth-zt", "onlink", "table", "102")
    ip(netns, "route", "add", "local", "default", "dev", "lo", "scope", "host", "table", "101")
    assert sorted(host.routes(100)) == sorted([
        Route(table=100, dst="10.244.1.5/32", via="192.168.126.2", dev="istioin", src="10.244.1.1"),
        Route(table=100, dst="10.244.1.2/32", dev="veth-zt", scope="link"),
    ])
    assert host.routes(102) == [Route(table=102, dst="0.0.0.0/0", via="10.244.1.2", dev="veth-zt", onlink=True)]
    assert host.routes(101) == [Route(table=101, dst="0.0.0.0/0", type="local", dev="lo", scope="host")]
    # the /30 of the tunnel address: reported, and marked as made by the kernel
    main = {o.route: o for o in host.routes_detailed(254)}
    connected = Route(table=254, dst="192.168.126.0/30", dev="istioin", src="192.168.126.1", scope="link")
    assert main[connected].kernel and main[connected].protocol == "kernel"
    assert not any(o.kernel for o in host.routes_detailed(100))


def test_route_add_replace_del_write_what_ip_route_shows(host, netns):
    _node_links(netns)
    r = Route(table=100, dst="10.244.1.5/32", via="192.168.126.2", dev="istioin", src="10.244.1.1")
    host.route_add(r)
    assert ip(netns, "route", "show", "table", "100").strip() == r.show()
    with pytest.raises(HostError, match="File exists"):
        host.route_add(r)
    moved = Route(table=100, dst="10.244.1.5/32", dev="veth-zt", scope="link")
    host.route_replace(moved)
    assert ip(netns, "route", "show", "table", "100").strip() == moved.show()
    with pytest.raises(HostError):
        host.route_del(r)          # full spec: the old next hop no longer matches
    host.route_del(moved)
    assert ip(netns, "route", "show", "table", "100").strip() == ""
    # a route someone else made (proto static) is deleted by its spec all the same
    ip(netns, "route", "add", "10.244.1.7/32", "dev", "veth-zt", "scope", "link", "proto", "static",
       "table", "100")
    host.route_del(Route(table=100, dst="10.244.1.7/32", dev="veth-zt", scope="link"))
    assert host.routes(100) == []
    local = Route(table=100, dst="0.0.0.0/0", type="local", dev="lo", scope="host")
    host.route_add(local)
    assert host.routes(100) == [local]
    onlink = Route(table=102, dst="0.0.0.0/0", via="10.244.1.2", dev="veth-zt", onlink=True)
    host.route_add(onlink)
    assert host.routes(102) == [onlink]


def test_routes_batch_names_every_refused_route_and_applies_the_rest(host, netns):
    _node_links(netns)
    a = Route(table=100, dst="10.244.1.5/32", via="192.168.126.2", dev="istioin", src="10.244.1.1")
    b = Route(table=100, dst="10.244.1.6/32", via="192.168.126.2", dev="istioin", src="10.244.1.1")
    c = Route(table=100, dst="10.244.1.7/32", via="192.168.126.2", dev="istioin", src="10.244.1.1")
    gone = Route(table=100, dst="10.244.1.8/32", via="192.168.126.2", dev="no-such-dev")
    host.routes_batch(add=[a])
    with pytest.raises(RoutesRefused) as ei:
        host.routes_batch(add=[b, a, gone, c])
    e = ei.value
    assert e.total == 4
    assert [(op, r, code) for op, r, code, _ in e.refused] == [("add", a, errno.EEXIST),
                                                                ("add", gone, errno.ENODEV)]
    text = str(e)
    assert f"netns {netns.spec}: the kernel refused 2 of 4 route changes" in text
    assert "add '10.244.1.5 via 192.168.126.2 dev istioin src 10.244.1.1 table 100': File exists" in text
    # not atomic: the routes around the refused ones were applied
    assert sorted(host.routes(100)) == sorted([a, b, c])
    with pytest.raises(RoutesRefused) as ei:
        host.routes_batch(delete=[a, gone])
    assert [r for _, r, _, _ in ei.value.refused] == [gone]
    host.routes_batch(delete=[b, c])
    assert host.routes(100) == []


def test_routes_batch_delete_is_exact(host, netns):
    """A delete names every field the route has: one with another next hop, scope, source or
    table stays. (A field the request leaves out is a wildcard for the kernel, as with
    ``ip route del``; the routes deleted are always observed ones, every field given.)"""
    _node_links(netns)
    a = Route(table=100, dst="10.244.1.5/32", via="192.168.126.2", dev="istioin", src="10.244.1.1")
    host.routes_batch(add=[a])
    for other in (dataclasses.replace(a, src="10.244.1.9"), dataclasses.replace(a, via="192.168.126.3"),
                  dataclasses.replace(a, scope="link"), dataclasses.replace(a, table=101)):
        with pytest.raises(RoutesRefused):
            host.routes_batch(delete=[other])
    assert host.routes(100) == [a]
    # the protocol is not part of a delete (ip route del leaves it open too)
    subprocess.run(["ip", "-n", netns.spec, "route", "replace", "10.244.1.5", "via", "192.168.126.2",
                    "dev", "istioin", "src", "10.244.1.1", "table", "100", "proto", "static"], check=True)
    host.routes_batch(delete=[a])
    assert host.routes(100) == []


def test_routes_batch_many_in_several_datagrams(host, netns):
    _node_links(netns)
    routes = [Route(table=100, dst=f"10.245.{i // 250}.{i % 250 + 1}/32", via="192.168.126.2",
                    dev="istioin", src="10.244.1.1") for i in range(700)]
    host.routes_batch(add=routes)
    assert sorted(host.routes(100)) == sorted(routes)
    # every request of the last datagrams refused (they exist): all named, none lost
    with pytest.raises(RoutesRefused) as ei:
        host.routes_batch(add=routes[300:])
    assert [r for _, r, _, _ in ei.value.refused] == routes[300:]
    host.routes_batch(delete=routes)
    assert host.routes(100) == []


def test_route_values_are_validated(host):
    with pytest.raises(InvalidValue):
        host.routes_batch(add=[Route(table=100, dst="10.244.1.5/32", dev="istio in")])
    with pytest.raises(InvalidValue):
        host.routes_batch(add=[Route(table=100, dst="10.244.1.5/24", dev="lo")])


# ---------------------------------------------------------------- ipset


def test_ipset_restore_and_save_compare_equal(host):
    s = IpsetSet(name="ztunnel-pods-ips")
    entries = [IpsetEntry(set=s.name, ip="10.244.1.5", comment="6b1f2c3e-0a4d-4c55-9e1a-1b2c3d4e5f05"),
               IpsetEntry(set=s.name, ip="10.244.1.6", comment="7c2e3d4f-1b5e-4d66-8f2b-2c3d4e5f6a06")]
    host.ipset_restore("\n".join([s.show()] + [e.show() for e in entries]) + "\n")
    got = host.ipsets()
    assert list(got) == [s.name]
    assert got[s.name][0] == s
    assert sorted(got[s.name][1]) == sorted(entries)


def test_ipset_restore_error_names_the_line(host, netns):
    text = "create a hash:ip comment\nadd a 10.0.0.1\nadd nosuch 10.0.0.2\n"
    with pytest.raises(RestoreError) as ei:
        host.ipset_restore(text)
    e = ei.value
    assert e.lineno == 3 and e.table is None
    assert e.context[-1] == ">3: add nosuch 10.0.0.2"
    assert f"`ipset restore` in netns {netns.spec} exited 1: ipset v" in str(e)
    assert "The set with the given name does not exist" in str(e)


# ---------------------------------------------------------------- iptables


@pytest.mark.parametrize("variant", ["nft", "legacy"])
def test_iptables_restore_error_names_table_line_and_context(host, netns, variant):
    text = ("*nat\n"
            ":ztunnel-PREROUTING - [0:0]\n"
            "-A ztunnel-PREROUTING -m mark --mark 0x100/0x100 -j ACCEPT\n"
            "COMMIT\n"
            "*mangle\n"
            ":ztunnel-PREROUTING - [0:0]\n"
            "-A ztunnel-PREROUTING -i istioin -j RETURN\n"
            "-A ztunnel-PREROUTING -p tcp -m set --match-set ztunnel-pods-ips src -j MARK --set-xmark 0x100/0x100\n"
            "COMMIT\n")
    with pytest.raises(RestoreError) as ei:
        host.iptables_restore(text, variant)
    e = ei.value
    assert (e.table, e.lineno, e.returncode) == ("mangle", 8, 2)
    assert e.cmd[0] == f"iptables-{variant}-restore" and "--noflush" in e.cmd
    assert e.context == [" 6: :ztunnel-PREROUTING - [0:0]",
                         " 7: -A ztunnel-PREROUTING -i istioin -j RETURN",
                         ">8: -A ztunnel-PREROUTING -p tcp -m set --match-set ztunnel-pods-ips src -j MARK --set-xmark 0x100/0x100",
                         " 9: COMMIT"]
    msg = str(e)
    assert msg.splitlines()[0].endswith("Set ztunnel-pods-ips doesn't exist.")
    assert "table mangle, line 8" in msg and "-m set --match-set ztunnel-pods-ips" in msg
    # atomic per table only (kernel-notes §5): nat was committed, mangle was not
    saved = host.iptables_save(variant)
    assert "-A ztunnel-PREROUTING -m mark --mark 0x100/0x100 -j ACCEPT" in saved
    assert "-i istioin" not in saved


@pytest.mark.parametrize("variant", ["nft", "legacy"])
def test_iptables_check_and_save(host, variant):
    check = ["-t", "mangle", "-C", "PREROUTING", "-j", "ztunnel-PREROUTING"]
    assert host.iptables(variant, check, check=False).returncode != 0
    host.iptables_restore("*mangle\n:ztunnel-PREROUTING - [0:0]\n-I PREROUTING -j ztunnel-PREROUTING\nCOMMIT\n",
                          variant)
    assert host.iptables(variant, check).returncode == 0
    saved = host.iptables_save(variant, table="mangle", counters=True)
    assert "[0:0] -A PREROUTING -j ztunnel-PREROUTING" in saved
    with pytest.raises(InvalidValue):
        host.iptables_save("iptables", 4)


# ---------------------------------------------------------------- nftables


def test_nft_runs_inside_the_netns(host, netns):
    host.nft("add table inet nrtest\nadd chain inet nrtest c { type filter hook prerouting priority 0; }")
    tables = [x["table"]["name"] for x in host.nft_json("list tables")["nftables"] if "table" in x]
    assert tables == ["nrtest"]
    assert "table inet nrtest" in nsexec(netns, "nft", "list", "tables").stdout
    # the netns's own nft sees it; the caller's namespace does not
    assert "nrtest" not in subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    with pytest.raises(NftError) as ei:
        host.nft("add rule inet nrtest nosuchchain accept")
    first, *rest = str(ei.value).splitlines()
    assert first == f"nft in netns {netns.spec} failed (rc -1): Error: Could not process rule: No such file or directory"
    assert rest[0] == "add rule inet nrtest nosuchchain accept" and "^^^" in rest[1]


# ---------------------------------------------------------------- sysctls


def test_sysctls_are_per_netns(host, netns):
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        outside = f.read().strip()
    assert host.sysctl_get(["net/ipv4/ip_forward", "net/ipv4/conf/nosuch/rp_filter"]) == {
        "net/ipv4/ip_forward": "0", "net/ipv4/conf/nosuch/rp_filter": None}
    old = host.sysctl_set({"net/ipv4/ip_forward": "1", "net/ipv4/conf/lo/rp_filter": "2"})
    assert old == {"net/ipv4/ip_forward": "0", "net/ipv4/conf/lo/rp_filter": "0"}
    assert nsexec(netns, "cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip() == "1"
    assert host.sysctl_get(["net/ipv4/conf/lo/rp_filter"]) == {"net/ipv4/conf/lo/rp_filter": "2"}
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        assert f.read().strip() == outside
    with pytest.raises(HostError, match="nosuch"):
        host.sysctl_set({"net/ipv4/conf/nosuch/rp_filter": "0"})


@pytest.mark.parametrize("key", ["kernel/hostname", "net/../kernel/hostname", "/net/ipv4/ip_forward",
                                 "net/ipv4/ip_forward\n", "net.ipv4.ip_forward"])
def test_sysctl_keys_outside_net_are_refused(host, key):
    with pytest.raises(InvalidValue):
        host.sysctl_get([key])
    with pytest.raises(InvalidValue):
        host.sysctl_set({key: "1"})
