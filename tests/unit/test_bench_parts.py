"""The benchmark's pure parts: pod counts, percentiles, the original's commands, target verdicts;
and the host layer's fast paths it relies on, checked against the slow, obvious versions."""

from __future__ import annotations

import ipaddress
import shlex
import struct

import pytest

from noderedirect import _netlink, bench, desired
from noderedirect.host import (InvalidValue, _save_tokens, _v4_prefix_text, check_ip,
                               parse_ipset_save)


def test_parse_pod_counts():
    assert bench.parse_pod_counts("100,1000,5000") == (100, 1000, 5000)
    assert bench.parse_pod_counts(" 5, 5,1") == (1, 5)
    for bad in ("0", "x", "60001", "", "1,,2", "-3"):
        with pytest.raises(ValueError):
            bench.parse_pod_counts(bad)


def test_percentile_is_nearest_rank():
    twenty = [float(i) for i in range(20, 0, -1)]
    assert bench.percentile(twenty, 99) == 20.0 and bench.percentile(twenty, 50) == 10.0
    assert bench.percentile([float(i) for i in range(1, 201)], 99) == 198.0
    assert bench.percentile([3.0], 99) == 3.0


def test_base_count():
    assert bench.base_count((100, 1000, 5000)) == 1000
    assert bench.base_count((50,)) == 50
    assert bench.base_count((2000, 3000)) == 2000
    assert bench.base_count((10, 500, 2000)) == 500


def test_bench_values_pods_are_distinct_and_in_the_pod_cidr():
    v = bench.bench_values(5000)
    net = ipaddress.ip_network(bench.POD_CIDR)
    assert len({p.ip for p in v.pods}) == 5000 and len({p.uid for p in v.pods}) == 5000
    assert all(ipaddress.ip_address(p.ip) in net for p in v.pods)
    assert {bench.HOST_IP, bench.ZT_IP}.isdisjoint(p.ip for p in v.pods)
    assert v.pods[0].uid == "00000000-0000-4000-8000-000000000000" and len(v.pods[0].uid) == 36


def test_original_commands_one_process_per_object():
    values = bench.bench_values(2)
    way = bench.original_commands(desired.render(values), values.pods)
    assert way.per_pod[0] == (
        ["ipset", "add", "ztunnel-pods-ips", "10.244.2.1", "comment", "00000000-0000-4000-8000-000000000000"],
        ["bash", "-c", "ip route show table 100 10.244.2.1 via 192.168.126.2 dev istioin src 10.244.1.1 | wc -l"],
        ["ip", "route", "add", "unicast", "10.244.2.1/32", "via", "192.168.126.2", "dev", "istioin",
         "src", "10.244.1.1", "scope", "global", "table", "100"])
    assert len(way.per_pod) == 2
    assert way.node[0] == ["ipset", "create", "ztunnel-pods-ips", "hash:ip", "family", "inet", "hashsize",
                           "1024", "maxelem", "65536", "comment"]
    # every chain exists before the first rule that uses it
    first_rule = next(i for i, a in enumerate(way.node) if "-N" not in a and a[0] == "iptables-nft")
    assert all(a[4] == "-N" for a in way.node[1:first_rule])
    assert ["iptables-nft", "-w", "-t", "nat", "-N", "ztunnel-PREROUTING"] in way.node[1:first_rule]
    assert ["iptables-nft", "-w", "-t", "mangle", "-I", "PREROUTING", "-j", "ztunnel-PREROUTING"] in way.node
    assert ["ip", "rule", "add", "priority", "100", "fwmark", "0x200/0x200", "goto", "32766"] in way.node
    assert ["ip", "rule", "add", "priority", "103", "lookup", "100"] in way.node
    assert ["ip", "rule", "add", "priority", "20003", "fwmark", "0x4d3/0xfff", "lookup", "100"] in way.ztunnel
    # no pod route among the fixed ones
    assert not any("10.244.2.1/32" in a for a in way.node + way.ztunnel)
    assert way.processes == len(way.node) + len(way.ztunnel) + 2 * 5


def _report(**over) -> dict:
    report = {"apply": [{"pods": 1000, "full": {"median_ms": 120.0}}, {"pods": 5000, "full": {"median_ms": 900.0}}],
              "base_pods": 1000, "incremental": {"pod_add": {"p99_ms": 1.5}, "pod_remove": {"p99_ms": 6.0}},
              "original": {"median_ms": 4800.0}, "speedup": 40.0, "peak_rss_mb": 99.0}
    report.update(over)
    return report


def test_targets_verdicts():
    got = {t["name"]: (t["value"], t["result"]) for t in bench.targets(_report())}
    assert got == {"full apply of 1000 pods": (120.0, "MISS"),
                   "incremental pod_add p99 (on 1000 pods)": (1.5, "PASS"),
                   "incremental pod_remove p99 (on 1000 pods)": (6.0, "MISS"),
                   "speed-up vs one process per command (1000 pods)": (40.0, "PASS"),
                   "peak RSS (5000 pods)": (99.0, "PASS")}


def test_targets_not_judged_where_not_measured():
    report = _report(apply=[{"pods": 1000, "full": {"median_ms": 80.0}}], original=None, speedup=None,
                     incremental=None)
    got = {t["name"]: (t["result"], t.get("why")) for t in bench.targets(report)}
    assert got["full apply of 1000 pods"] == ("PASS", None)
    assert got["speed-up vs one process per command (1000 pods)"] == ("n/a", "--no-baseline")
    assert got["incremental pod_add p99 (on 1000 pods)"] == ("n/a", "no incremental run on 1000 pods")
    assert got["peak RSS (5000 pods)"] == ("n/a", "largest run was 1000 pods, not 5000")


# ---------------------------------------------------------------- host fast paths


@pytest.mark.parametrize("line", [
    'add s 10.0.0.1 comment "uid-1"', "add s 10.0.0.1", 'add s 10.0.0.1 comment "a b"',
    'add s 10.0.0.1 comment "a\\"b"', "add s 1.1.1.1 comment 'x'", 'add s 1.1.1.1 comment ""',
    'add s 1.1.1.1 comment "x" timeout 5', 'add s 1.1.1.1 comment"x"', 'add s 1.1.1.1 comment "x"y',
    "create s hash:ip family inet hashsize 1024 maxelem 65536 comment bucketsize 12 initval 0x1"])
def test_save_tokens_split_like_shlex(line):
    assert _save_tokens(line) == shlex.split(line)


def test_parse_ipset_save_only_parses_the_sets_asked_for():
    text = ("create kube hash:ip family inet hashsize 1024 maxelem 65536\nadd kube 10.9.9.9\n"
            "add kube 'unbalanced\n"        # would make shlex fail: proves the line is skipped
            "create ztunnel-pods-ips hash:ip family inet hashsize 1024 maxelem 65536 comment\n"
            'add ztunnel-pods-ips 10.244.2.1 comment "uid-1"\n')
    got = parse_ipset_save(text, only=lambda n: n.startswith("ztunnel-"))
    assert list(got) == ["ztunnel-pods-ips"]
    assert [(e.ip, e.comment) for e in got["ztunnel-pods-ips"][1]] == [("10.244.2.1", "uid-1")]
    with pytest.raises(ValueError):
        parse_ipset_save(text)


@pytest.mark.parametrize("prefix", ["10.0.0.0/8", "10.0.0.1/8", "010.0.0.0/8", "10.0.0.0/08", "10.0.0.0/33",
                                    "0.0.0.0/0", "1.2.3.4/32", "1.2.3.4", "::/0", "10.0.0.0/²",
                                    " 10.0.0.0/8", "256.0.0.0/8", "1.2.3.4/-1"])
def test_v4_prefix_fast_path_agrees_with_ipaddress(prefix):
    try:
        slow = str(ipaddress.ip_network(prefix, strict=True))
    except ValueError:
        slow = None
    fast = _v4_prefix_text(prefix)
    # the fast path accepts only what ipaddress accepts unchanged; the rest goes to ipaddress
    assert fast is None or fast == slow == prefix
    if slow == prefix and ":" not in prefix:
        assert fast == prefix


@pytest.mark.parametrize("addr", ["1.2.3.4", "01.2.3.4", "1.2.3", "1.2.3.256", " 1.2.3.4", "0.0.0.0"])
def test_check_ip_fast_path_agrees_with_ipaddress(addr):
    try:
        slow = str(ipaddress.IPv4Address(addr))
    except ValueError:
        slow = None
    if slow is None:
        with pytest.raises(InvalidValue):
            check_ip(addr, 4)
    else:
        assert check_ip(addr, 4) == check_ip(addr) == slow


def _msg(payload: bytes, mtype: int = 24) -> _netlink.Message:
    return _netlink.Message(mtype, payload, 0, len(payload))


def test_decode_route_multipath_and_large_table():
    hop_attrs = _netlink.nla(_netlink.RTA_GATEWAY, bytes([10, 1, 0, 3]))
    hop = struct.pack("=HBBi", 8 + len(hop_attrs), 0x4, 0, 7) + hop_attrs     # RTNH_F_ONLINK
    payload = (struct.pack("=BBBBBBBBI", 2, 24, 0, 0, 252, 3, 0, 1, 0)
               + _netlink.nla(_netlink.RTA_TABLE, struct.pack("=I", 1000))
               + _netlink.nla(_netlink.RTA_DST, bytes([10, 7, 0, 0]))
               + _netlink.nla(_netlink.RTA_MULTIPATH, hop))
    r = _netlink.decode_route(_msg(payload))
    assert (r.table, r.dst, r.dst_len, r.gateway, r.oif, r.flags & 0x4, r.multipath, r.protocol) == \
        (1000, "10.7.0.0", 24, "10.1.0.3", 7, 0x4, True, 3)


def test_ipset_find_reads_only_the_matching_member():
    def member(ip: bytes, comment: bytes) -> bytes:
        ip_attr = _netlink.nla(_netlink.IPSET_ATTR_IP | _netlink.NLA_F_NESTED,
                               _netlink.nla(_netlink.IPSET_ATTR_IPADDR_IPV4 | _netlink.NLA_F_NET_BYTEORDER, ip))
        return _netlink.nla(_netlink.IPSET_ATTR_DATA | _netlink.NLA_F_NESTED,
                            ip_attr + _netlink.nla(_netlink.IPSET_ATTR_COMMENT, comment + b"\0"))
    adt = _netlink.nla(_netlink.IPSET_ATTR_ADT | _netlink.NLA_F_NESTED,
                       member(bytes([10, 0, 0, 1]), b"uid-a") + member(bytes([10, 0, 0, 2]), b"uid-b"))
    msg = _msg(struct.pack("=BBH", 2, 0, 0) + _netlink.nla(_netlink.IPSET_ATTR_SETNAME, b"s\0") + adt)
    assert _netlink.ipset_find([msg], bytes([10, 0, 0, 2])) == (True, "uid-b")
    assert _netlink.ipset_find([msg], bytes([10, 0, 0, 3])) is None
    # the address bytes elsewhere (here: in a comment) are no member; the real one still is
    decoy = member(bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]) + b"x")

    def listing(*members: bytes) -> _netlink.Message:
        return _msg(struct.pack("=BBH", 2, 0, 0)
                    + _netlink.nla(_netlink.IPSET_ATTR_ADT | _netlink.NLA_F_NESTED, b"".join(members)))
    assert _netlink.ipset_find([listing(decoy, member(bytes([10, 0, 0, 2]), b"uid-b"))],
                               bytes([10, 0, 0, 2])) == (True, "uid-b")
    assert _netlink.ipset_find([listing(decoy)], bytes([10, 0, 0, 2])) is None


def test_parse_ipset_save_reuses_known_lines_only_for_sets_it_parses():
    text = ("create ztunnel-pods-ips hash:ip family inet hashsize 1024 maxelem 65536 comment\n"
            'add ztunnel-pods-ips 10.244.2.1 comment "uid-1"\nadd ztunnel-pods-ips 10.244.2.2\n')
    known: dict = {}
    first = parse_ipset_save(text, known=known)
    assert set(known) == {'add ztunnel-pods-ips 10.244.2.1 comment "uid-1"', "add ztunnel-pods-ips 10.244.2.2"}
    again = parse_ipset_save(text, known=known)
    assert again == first == parse_ipset_save(text)
    assert again["ztunnel-pods-ips"][1][0] is first["ztunnel-pods-ips"][1][0]    # reused, not re-parsed
    # a known member line of a set that is not in this text (or not asked for) is not reported
    assert parse_ipset_save(text.splitlines()[1] + "\n", known=known) == {}
    assert parse_ipset_save(text, only=lambda n: n == "other", known=known) == {}
