"""User-space GENEVE wire format (RFC 8926), bridge configuration, and the VXLAN driver's rules."""

from __future__ import annotations

import struct

import pytest

from noderedirect import model, tunnels
from noderedirect.tunnels.usergeneve_main import (Drop, LinkSpec, config_hash, decap, encap,
                                                  validate)
from noderedirect.tunnels.vxlan import VxlanDriver

FRAME = bytes(range(6)) * 2 + b"\x08\x00" + b"x" * 46


def test_encap_header_is_rfc8926_without_options():
    pkt = encap(1001, FRAME)
    assert pkt[:8] == b"\x00\x00\x65\x58\x00\x03\xe9\x00"
    assert pkt[8:] == FRAME
    assert decap(pkt) == (1001, FRAME)


def test_decap_skips_non_critical_options():
    option = struct.pack("!HBB", 0x0102, 0x03, 1) + b"abcd"        # class, type, len=1 word
    pkt = struct.pack("!BBHI", 2, 0, 0x6558, 1000 << 8) + option + FRAME
    assert decap(pkt) == (1000, FRAME)


@pytest.mark.parametrize("pkt, reason", [
    (b"\x00\x00\x65", "short"),
    (struct.pack("!BBHI", 0x40, 0, 0x6558, 1000 << 8) + FRAME, "version"),
    (struct.pack("!BBHI", 0, 0, 0x0800, 1000 << 8) + FRAME, "protocol"),
    (struct.pack("!BBHI", 0, 0x80, 0x6558, 1000 << 8) + FRAME, "oam"),
    (struct.pack("!BBHI", 1, 0x40, 0x6558, 1000 << 8) + b"\0" * 4 + FRAME, "critical_option"),
    (struct.pack("!BBHI", 0, 0, 0x6558, 1000 << 8) + b"\0" * 10, "short"),
])
def test_decap_drops_with_a_reason(pkt, reason):
    with pytest.raises(Drop) as err:
        decap(pkt)
    assert err.value.reason == reason


def test_link_spec_round_trip_and_validation():
    spec = LinkSpec.parse("istioin,1000,10.244.1.2,6081")
    assert spec == LinkSpec("istioin", 1000, "10.244.1.2", 6081)
    assert LinkSpec.parse(spec.arg()) == spec
    for bad in ("istioin,1000,10.244.1.2", "istioin,0,10.244.1.2,6081",
                "istioin,16777216,10.244.1.2,6081", "istioin,1000,not-an-ip,6081",
                "istioin,1000,10.244.1.2,0", "a-very-long-interface,1,10.0.0.1,6081"):
        with pytest.raises(ValueError):
            LinkSpec.parse(bad)
    with pytest.raises(ValueError, match="VNI 1000 on port 6081 given twice"):
        validate([spec, LinkSpec("other", 1000, "10.0.0.9", 6081)])
    with pytest.raises(ValueError, match="istioin given twice"):
        validate([spec, LinkSpec("istioin", 1001, "10.244.1.2", 6081)])


def test_config_hash_ignores_order_and_sees_every_field():
    a, b = LinkSpec("istioin", 1000, "10.244.1.2", 6081), LinkSpec("istioout", 1001, "10.244.1.2", 6081)
    assert config_hash([a, b]) == config_hash([b, a])
    for changed in (LinkSpec("istioin", 1002, "10.244.1.2", 6081),
                    LinkSpec("istioin", 1000, "10.244.1.3", 6081),
                    LinkSpec("istioin", 1000, "10.244.1.2", 6082)):
        assert config_hash([changed, b]) != config_hash([a, b])


def test_vxlan_extra_rules_one_drop_per_remote_and_port():
    links = [model.Link("istioin", "vxlan", 1000, "10.244.1.2", 6081, "192.168.126.1/30"),
             model.Link("istioout", "vxlan", 1001, "10.244.1.2", 6081, "192.168.127.1/30"),
             model.Link("other", "vxlan", 7, "10.244.1.3", 6082, "192.168.128.1/30")]
    rules = VxlanDriver().extra_rules("node", links)
    assert [r.restore_line() for r in rules] == [
        "-I INPUT -j ztunnel-TUNNEL",
        "-A ztunnel-TUNNEL ! -s 10.244.1.2/32 -p udp -m udp --dport 6081 -j DROP",
        "-A ztunnel-TUNNEL ! -s 10.244.1.3/32 -p udp -m udp --dport 6082 -j DROP",
    ]
    assert all(r.table == "filter" for r in rules) and rules[0].is_hook
    assert VxlanDriver().extra_rules("node", []) == []


def test_desired_kind_per_driver_and_unknown_kind():
    link = model.Link("istioin", "geneve", 1000, "10.244.1.2", 6081, "192.168.126.1/30")
    assert [tunnels.driver(k).desired(link).kind for k in tunnels.KINDS] == list(tunnels.KINDS)
    assert tunnels.driver("usergeneve").extra_rules("node", [link]) == []
    with pytest.raises(ValueError, match="unknown tunnel kind 'gre'"):
        tunnels.select("gre", "/nonexistent")
