"""Every rendering is self-consistent; and the checker really catches each kind of mistake."""

from __future__ import annotations

import dataclasses

import pytest

from helpers import values_with

from noderedirect import consistency, desired
from noderedirect.model import IpRule, IptRule


@pytest.mark.parametrize("version", ["1.18", "1.19", "1.20"])
@pytest.mark.parametrize("dns", [False, True])
def test_legacy_renderings_are_consistent(version, dns):
    r = desired.legacy(values_with(istioVersion=version, dnsCapture=dns))
    assert [p for ns in r.netns for p in consistency.problems(ns)] == []


def mutate(ns, **kw):
    return dataclasses.replace(ns, **kw)


@pytest.fixture
def node():
    return desired.legacy(values_with()).get("node")


def test_catches_jump_to_missing_chain(node):
    bad = mutate(node, iptables=node.iptables + (IptRule("mangle", "ztunnel-OUTPUT", "-j ztunnel-NOPE"),))
    assert "node: mangle ztunnel-OUTPUT: jump to chain ztunnel-NOPE, which has no rules (missing chain?)" in consistency.problems(bad)


def test_catches_unused_owned_chain(node):
    rules = tuple(r for r in node.iptables if not (r.is_hook and r.target == "ztunnel-INPUT"))
    assert "node: mangle chain ztunnel-INPUT is declared but never jumped to" in consistency.problems(
        mutate(node, iptables=rules))


def test_catches_match_set_without_set(node):
    assert any("--match-set ztunnel-pods-ips is not rendered" in p
               for p in consistency.problems(mutate(node, ipsets=(), ipset_entries=())))


def test_catches_lookup_of_empty_table(node):
    rules = node.ip_rules + (IpRule(priority=104, action="lookup", table=104),)
    assert "node: rule 104 looks up table 104, which has no routes" in consistency.problems(
        mutate(node, ip_rules=rules))


def test_render_refuses_an_inconsistent_template(tmp_path):
    import shutil
    from noderedirect.render import RenderError, rules_dir

    shutil.copytree(rules_dir(), tmp_path / "rules")
    f = tmp_path / "rules" / "legacy" / "node" / "iptables.rules"
    f.write_text(f.read_text() + "-t mangle -A ztunnel-OUTPUT -j ztunnel-MISSING\n")
    with pytest.raises(RenderError, match="ztunnel-MISSING"):
        desired.render(values_with(), "legacy", rules=tmp_path / "rules")
