"""The nft rendering of the legacy design: golden scripts, 1:1 rule ids, a strict translator.

The goldens under tests/golden/render/ are snapshots of our own output, reviewed against
legacy-mode.md §1.3/§2.5 and kernel-notes.md §6; regenerate only with
``NODEREDIRECT_UPDATE_GOLDENS=1``.
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from contextlib import redirect_stderr, redirect_stdout

import pytest

from goldens import assert_golden
from helpers import EXAMPLE, values_with

from noderedirect import cli, desired, names, nft
from noderedirect.model import IptRule, NetnsState

NODE_IDS = ([f"P{i}" for i in range(1, 16)] + ["F1", "F2", "I1", "I2", "O1", "N1", "NP1", "FF1"])
ZTUNNEL_IDS = ["Z1", "Z2", "Z3", "Z4"]
COMMENT = re.compile(r' comment "([^"]*)"$')


def scripts(**changes) -> dict[str, str]:
    return dict(nft.rendered_nft(desired.legacy(values_with(**changes))).nft)


def comments(script: str) -> list[str]:
    return [m.group(1) for line in script.splitlines() if (m := COMMENT.search(line))]


def ids(script: str) -> Counter:
    """Rule ids only: not hooks, not the TPROXY no-listener companions."""
    return Counter(c for c in comments(script)
                   if c != nft.HOOK_COMMENT and not c.endswith(nft.NO_LISTENER))


def rule(args: str, table: str = "mangle", chain: str = "ztunnel-PREROUTING", **kw) -> IptRule:
    return IptRule(table=table, chain=chain, args=args, **kw)


# ---------------------------------------------------------------- goldens


@pytest.mark.parametrize("role", ["node", "ztunnel"])
def test_golden_scripts_for_the_example_values(role):
    assert_golden(f"render/legacy-1.20-{role}.nft", scripts()[role])


def test_script_starts_by_replacing_only_its_own_table():
    for role, script in scripts().items():
        table = names.NFT_TABLES[role]
        lines = [line for line in script.splitlines() if not line.startswith("#")]
        assert lines[:3] == [f"table ip {table}", f"delete table ip {table}", f"table ip {table} {{"]
        # no other table, no flush ruleset
        assert re.findall(r"^(?:table|delete table|flush)\b.*$", script, re.M) == [
            f"table ip {table}", f"delete table ip {table}", f"table ip {table} {{"]


# ---------------------------------------------------------------- ids: 1:1 with the reference


@pytest.mark.parametrize("version,dns,expected", [
    ("1.20", False, NODE_IDS),
    ("1.20", True, NODE_IDS + ["N2"]),
    ("1.19", False, NODE_IDS),
    ("1.18", False, [i for i in NODE_IDS if i != "FF1"]),
])
def test_every_node_rule_id_appears_exactly_once(version, dns, expected):
    got = ids(scripts(istioVersion=version, dnsCapture=dns)["node"])
    assert got == Counter(expected)


def test_every_ztunnel_rule_id_appears_once_and_each_tproxy_has_its_drop():
    script = scripts()["ztunnel"]
    assert ids(script) == Counter(ZTUNNEL_IDS)
    assert [c for c in comments(script) if c.endswith(nft.NO_LISTENER)] == [
        "Z1 no listener", "Z2 no listener", "Z3 no listener"]


@pytest.mark.parametrize("role", ["node", "ztunnel"])
def test_one_nft_rule_per_iptables_rule(role):
    ns = desired.legacy(values_with(dnsCapture=True)).get(role)
    script = scripts(dnsCapture=True)[role]
    tproxies = sum(1 for r in ns.iptables if r.target == "TPROXY")
    assert len(comments(script)) == len(ns.iptables) + tproxies
    assert comments(script).count(nft.HOOK_COMMENT) == sum(1 for r in ns.iptables if r.is_hook)


def test_every_tproxy_is_followed_by_accept_and_its_drop():
    lines = [line.strip() for line in scripts()["ztunnel"].splitlines() if "comment" in line]
    for i, line in enumerate(lines):
        if " tproxy to " in line:
            assert re.search(r" tproxy to 127\.0\.0\.1:\d+ meta mark set meta mark & 0xfffff400 "
                             r"\| 0x00000400 accept comment", line), line
            matches = line.split(" counter ")[0]
            assert lines[i + 1].startswith(matches + " counter drop comment"), lines[i + 1]


def test_the_set_replaces_the_ipset_with_uid_comments():
    script = scripts()["node"]
    assert ('elements = { 10.244.1.5 comment "6b1f2c3e-0a4d-4c55-9e1a-1b2c3d4e5f05",\n'
            '\t\t\t     10.244.1.6 comment "7c2e3d4f-1b5e-4d66-8f2b-2c3d4e5f6a06" }') in script
    plain = scripts(**{"ipset.comments": False})["node"]
    assert "elements = { 10.244.1.5,\n\t\t\t     10.244.1.6 }" in plain
    empty = scripts(pods=[])["node"]
    assert "elements" not in empty and "set ztunnel-pods-ips {" in empty


def test_base_chains_sit_at_the_priorities_of_the_tables_they_replace():
    script = scripts()["node"]
    heads = dict(re.findall(r"chain (\S+) \{\n\t\ttype (.*?); policy accept;", script))
    assert heads == {
        "mangle-PREROUTING": "filter hook prerouting priority mangle",
        "mangle-INPUT": "filter hook input priority mangle",
        "mangle-FORWARD": "filter hook forward priority mangle",
        "mangle-OUTPUT": "route hook output priority mangle",
        "mangle-POSTROUTING": "filter hook postrouting priority mangle",
        "nat-PREROUTING": "nat hook prerouting priority dstnat",
        "nat-POSTROUTING": "nat hook postrouting priority srcnat",
        "filter-FORWARD": "filter hook forward priority filter",
    }


def test_dns_capture_rule_n2():
    line = next(line for line in scripts(dnsCapture=True)["node"].splitlines() if '"N2"' in line)
    assert line.strip() == ('ip saddr @ztunnel-pods-ips udp dport 53 counter '
                            'dnat to 10.244.1.2:15053 comment "N2"')


def test_era_1_19_o1_is_the_wide_host_ip_rule():
    line = next(line for line in scripts(istioVersion="1.19")["node"].splitlines() if '"O1"' in line)
    assert line.strip() == 'ip saddr 10.244.1.1 counter meta mark set 0x00000220 comment "O1"'


# ---------------------------------------------------------------- the translator


@pytest.mark.parametrize("args,expected", [
    ("-i istioin -j MARK --set-xmark 0x200/0x200",
     'iifname "istioin" counter meta mark set meta mark | 0x00000200'),
    ("! -i veth-zt -m connmark --mark 0x210/0x210 -j MARK --set-xmark 0x40/0x40",
     'iifname != "veth-zt" ct mark & 0x00000210 == 0x00000210 counter meta mark set meta mark | 0x00000040'),
    ("! -s 10.244.1.2/32 -i veth-zt -j MARK --set-xmark 0x210/0x210",
     'ip saddr != 10.244.1.2 iifname "veth-zt" counter meta mark set meta mark | 0x00000210'),
    ("-s 10.244.0.0/16 -j RETURN", "ip saddr 10.244.0.0/16 counter return"),
    ("-p udp -m udp --dport 6081 -j RETURN", "udp dport 6081 counter return"),
    ("-p udp -j MARK --set-xmark 0x220/0x220", "meta l4proto udp counter meta mark set meta mark | 0x00000220"),
    ("-m mark --mark 0x220/0x220 -j CONNMARK --save-mark --nfmask 0x220 --ctmask 0x220",
     "meta mark & 0x00000220 == 0x00000220 counter ct mark set ct mark | 0x00000220"),
    ("! -d 10.244.1.2/32 -i eth0 -p tcp -j MARK --set-xmark 0x4d3/0xfff",
     'ip daddr != 10.244.1.2 iifname "eth0" meta l4proto tcp counter '
     'meta mark set meta mark & 0xfffff4d3 | 0x000004d3'),
    ("-j MARK --set-xmark 0x0/0x200", "counter meta mark set meta mark & 0xfffffdff"),
    ("-m mark --mark 0x100/0x100 -j ACCEPT", "meta mark & 0x00000100 == 0x00000100 counter accept"),
])
def test_translation_of_each_form(args, expected):
    assert nft.translate(rule(args)).body == expected


def test_tproxy_translation_and_its_fallback():
    tr = nft.translate(rule("-i pistioin -p tcp -m tcp --dport 15008 -j TPROXY --on-port 15008 "
                            "--on-ip 127.0.0.1 --tproxy-mark 0x400/0xfff", chain="PREROUTING"))
    assert tr.body == ('iifname "pistioin" tcp dport 15008 counter tproxy to 127.0.0.1:15008 '
                       'meta mark set meta mark & 0xfffff400 | 0x00000400 accept')
    assert tr.fallback == 'iifname "pistioin" tcp dport 15008 counter drop'


@pytest.mark.parametrize("value,mask", [(0x200, 0x200), (0x4d3, 0xfff), (0x220, 0xffffffff),
                                        (0x0, 0x200), (0x40, 0x40), (0x400, 0xfff)])
def test_set_mark_algebra_equals_xmark(value, mask):
    """nft's ``mark & A | B`` (as rendered) computes iptables' ``(mark & ~M) ^ V``."""
    text = nft._set_mark(value, mask)
    m = re.fullmatch(r"meta mark set (?:meta mark(?: & (0x[0-9a-f]{8}))?(?: \| (0x[0-9a-f]{8}))?|(0x[0-9a-f]{8}))", text)
    assert m, text
    for before in (0, 0xffffffff, 0x100, 0x4d3, 0x12345678, 0x220, 0xdeadbeef):
        if m.group(3):
            after = int(m.group(3), 16)
        else:
            after = before & (int(m.group(1), 16) if m.group(1) else 0xffffffff)
            after |= int(m.group(2), 16) if m.group(2) else 0
        assert after == (before & ~mask & 0xffffffff) ^ value, (hex(before), text)


@pytest.mark.parametrize("args,problem", [
    ("-m comment --comment x -j RETURN", "match -m comment is not translated"),
    ("-m multiport --dports 1,2 -j RETURN", "match -m multiport is not translated"),
    ("-p icmp -j RETURN", "protocol 'icmp' is not translated"),
    ("! -p tcp -j RETURN", "'!' before '-p' is not translated"),
    ("-i veth+ -j RETURN", "wildcards are not translated"),
    ("-o eth0 -j RETURN", "unknown option '-o'"),
    ("-m tcp --dport 80 -j RETURN", "-m tcp without -p tcp"),
    ("-m set --match-set other-set src -j RETURN", "set 'other-set' is not defined"),
    ("-m set --match-set ztunnel-pods-ips src,dst -j RETURN", "set direction 'src,dst'"),
    ("-j CONNMARK --save-mark --nfmask 0x220 --ctmask 0x220", "only translated after -m mark"),
    ("-m mark --mark 0x220/0x220 -j CONNMARK --save-mark --nfmask 0x220 --ctmask 0xffff", "only translated"),
    ("-j CONNMARK --restore-mark", "option '--restore-mark' is not translated"),
    ("-j MARK --set-xmark 0x300/0x200", "value bits outside the mask"),
    ("-j MARK --set-mark 0x200", "option '--set-mark' is not translated"),
    ("-j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x400/0xfff", "needs -p tcp"),
    ("-m mark --mark 0x220/0x220 -j CONNMARK --save-mark --nfmask --ctmask 0x220", "need a value"),
    ("-p tcp -j TPROXY --on-port 0 --on-ip 127.0.0.1 --tproxy-mark 0x400/0xfff", "out of range"),
    ("-j DROP", "target 'DROP' is not translated"),
    ("-j LOG", "target 'LOG' is not translated"),
    ("-g ztunnel-X", "unknown option '-g'"),
    ("-j RETURN -p tcp", "'-p tcp' after the target"),
    ("-p tcp", "no target"),
])
def test_translator_rejects_what_it_does_not_know(args, problem):
    with pytest.raises(nft.NftTranslationError) as e:
        nft.translate(rule(args), sets=frozenset({names.IPSET}))
    assert problem in str(e.value)
    assert args in str(e.value)   # the message names the rule


def test_rejects_ipv6_unknown_roles_and_chains_without_ids():
    with pytest.raises(nft.NftTranslationError, match="IPv6"):
        nft.translate(rule("-j RETURN", family=6))
    with pytest.raises(nft.NftTranslationError, match="role 'pod:default/sleep'"):
        nft.legacy_nft(NetnsState(role="pod:default/sleep"))
    stray = NetnsState(role="node", iptables=(rule("-j RETURN", chain="ztunnel-EXTRA"),))
    with pytest.raises(nft.NftTranslationError, match="no rule id is known for chain ztunnel-EXTRA"):
        nft.legacy_nft(stray)
    raw = NetnsState(role="ztunnel", iptables=(rule("-j RETURN", table="raw", chain="PREROUTING"),))
    with pytest.raises(nft.NftTranslationError, match="raw PREROUTING has no nft base chain"):
        nft.legacy_nft(raw)


def test_inpod_rendering_is_refused():
    with pytest.raises(nft.NftTranslationError, match="legacy design only"):
        nft.rendered_nft(desired.inpod(values_with()))


# ---------------------------------------------------------------- the command line


def run_cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = cli.main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def test_render_backend_nft_prints_the_scripts_instead_of_iptables():
    rc, out, _ = run_cli("render", "-f", str(EXAMPLE), "--backend", "nft")
    assert rc == 0
    expected = scripts()
    for role in ("node", "ztunnel"):
        assert f"# netns {role} (legacy mode, Istio 1.20)\n## nftables (nft -f input)\n{expected[role]}" in out
    assert "iptables-save" not in out and "ipset save" not in out
    assert "## ip rules (ip rule show)" in out and "## routes" in out


def test_render_backend_nft_kind_iptables_is_the_script_alone():
    rc, out, _ = run_cli("render", "-f", str(EXAMPLE), "--backend", "nft", "--netns", "ztunnel",
                         "--kind", "iptables")
    assert rc == 0
    assert out == ("# netns ztunnel (legacy mode, Istio 1.20)\n## nftables (nft -f input)\n"
                   + scripts()["ztunnel"])


def test_render_backend_nft_json_carries_the_scripts():
    rc, out, _ = run_cli("render", "-f", str(EXAMPLE), "--backend", "nft", "-o", "json")
    assert rc == 0
    assert json.loads(out)["nft"] == scripts()


def test_render_backend_nft_inpod_is_a_usage_error():
    rc, out, err = run_cli("render", "-f", str(EXAMPLE), "--backend", "nft", "--mode", "inpod")
    assert (rc, out) == (2, "")
    assert err == ("noderedirect: --backend nft renders the legacy design only; --mode inpod is "
                   "not supported with it yet\n")


def test_only_our_exact_tables_are_owned():
    assert names.is_owned_nft_table("ip", "ztunnel-node")
    assert names.is_owned_nft_table("ip", "ztunnel-tproxy")
    assert not names.is_owned_nft_table("inet", "ztunnel-node")
    assert not names.is_owned_nft_table("ip", "ztunnel-other")
