"""The per-pod lines' quick parses (routes, ipset members) agree with the full parsers.

A quick parse may only say "not my shape" (None) or give exactly the object the full parser
gives; everything the full parser refuses, it refuses with the same message and template line.
"""

from __future__ import annotations

import dataclasses
import random
import shutil

import pytest

from helpers import values_with

from noderedirect import desired, render
from noderedirect.bench import bench_values
from noderedirect.model import IpsetEntry, Route
from noderedirect.render import RenderError, parse_ipset, parse_route, quick_ipset, quick_route
from noderedirect.template import Line

ROUTE = "10.244.2.1 via 192.168.126.2 dev istioin src 10.244.1.1 table 100"
ADD = 'add ztunnel-pods-ips 10.244.2.1 comment "6b1f2c3e-0a4d-4c55-9e1a-1b2c3d4e5f05"'


def full(parser, quick_name, text, monkeypatch):
    """The full parser alone (its quick parse switched off): the object, or the error message."""
    with monkeypatch.context() as m:
        m.setattr(render, quick_name, lambda text: None)
        try:
            return parser(Line("t.rules", 7, text), 4)
        except RenderError as e:
            return str(e)


def mutants(base, rng, n):
    """Lines near ``base``: tokens dropped, doubled, swapped, garbled; odd whitespace."""
    junk = ["256", "010", "1.2.3", "::1", "fd00::1", "x", "table", "via", "onlink", "", "\n", "\t",
            '"', "'", "\\", "comment", "-1", "0x10", "1e3", "١٠", "10.0.0.1/24", "default"]
    out = [base]
    for _ in range(n):
        toks = base.split(" ")
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(toks))
            op = rng.randrange(5)
            if op == 0 and len(toks) > 1:
                del toks[i]
            elif op == 1:
                toks.insert(i, rng.choice(junk))
            elif op == 2:
                toks[i] = rng.choice(junk)
            elif op == 3:
                toks[i] = toks[i] + rng.choice(junk)
            else:
                j = rng.randrange(len(toks))
                toks[i], toks[j] = toks[j], toks[i]
        out.append(rng.choice([" ", " ", " ", "  ", "\t", "\n"]).join(toks))
    return out


@pytest.mark.parametrize("parser,quick,quick_name,base", [
    (parse_route, quick_route, "quick_route", ROUTE),
    (parse_route, quick_route, "quick_route", "10.0.0.9 dev veth0 scope link table 102"),
    (parse_route, quick_route, "quick_route", "10.0.0.9 via 10.0.0.1 dev veth0 onlink table 0x66"),
    (parse_ipset, quick_ipset, "quick_ipset", ADD),
    (parse_ipset, quick_ipset, "quick_ipset", "add ztunnel-pods-ips 10.244.2.1"),
])
def test_quick_parse_is_none_or_what_the_full_parser_gives(parser, quick, quick_name, base, monkeypatch):
    rng = random.Random(base)
    taken = refused = 0
    for text in mutants(base, rng, 1500):
        want = full(parser, quick_name, text, monkeypatch)
        got = quick(text)
        if got is not None:
            assert got == want and hash(got) == hash(want) and repr(got) == repr(want), text
            taken += 1
        # and through the parser itself: the same object or the same message
        try:
            assert parser(Line("t.rules", 7, text), 4) == want, text
        except RenderError as e:
            assert str(e) == want, text
        refused += isinstance(want, str)
    assert quick(base) is not None
    assert taken > 5 and refused > 500, (taken, refused)


@pytest.mark.parametrize("text,error", [
    (ROUTE + " extra", "'extra' needs a value"),
    (ROUTE + " mtu 1400", "unknown route keyword 'mtu'"),
    (ROUTE.replace("10.244.2.1", "10.244.2.256"), "'10.244.2.256' is not a destination prefix"),
    (ROUTE.replace("10.244.2.1", "10.244.02.1"), "'10.244.02.1' is not a destination prefix"),
    (ROUTE.replace("192.168.126.2", "192.168.126.x"), "'192.168.126.x' is not an address"),
    (ROUTE.replace("table 100", "table 1oo"), "table is not a number"),
    (ROUTE.replace(" table 100", ""), "every route needs 'table N'"),
    (ROUTE + "\n10.244.2.2", "'10.244.2.2' needs a value"),
])
def test_refused_routes_keep_their_message(text, error):
    assert quick_route(text) is None
    with pytest.raises(RenderError) as e:
        parse_route(Line("rules/legacy/node/routes.rules", 7, text), 4)
    assert str(e.value) == f"rules/legacy/node/routes.rules:7: {error}: {text!r}"


@pytest.mark.parametrize("text,error", [
    (ADD + " x", "expected 'create NAME TYPE …' or 'add NAME IP [comment \"X\"]'"),
    (ADD.replace("10.244.2.1", "10.244.2.1.0"), "'10.244.2.1.0' is not an address"),
    (ADD.replace("10.244.2.1", "10.244.2.01"), "'10.244.2.01' is not an address"),
    (ADD[:-1], "No closing quotation"),
    ('add ztunnel-pods-ips 10.244.2.1\nadd ztunnel-pods-ips 10.244.2.2',
     "expected 'create NAME TYPE …' or 'add NAME IP [comment \"X\"]'"),
    ("add ztunnel-pods-ips 10.244.2.1 note x", "expected 'comment \"TEXT\"'"),
])
def test_refused_ipset_lines_keep_their_message(text, error):
    assert quick_ipset(text) is None
    with pytest.raises(RenderError) as e:
        parse_ipset(Line("rules/legacy/node/ipset.rules", 7, text), 4)
    assert str(e.value) == f"rules/legacy/node/ipset.rules:7: {error}: {text!r}"


def test_quick_shapes_give_the_expected_objects():
    assert quick_route(ROUTE) == Route(table=100, dst="10.244.2.1/32", via="192.168.126.2", dev="istioin",
                                       src="10.244.1.1", family=4)
    assert dataclasses.asdict(quick_route(ROUTE)) == dataclasses.asdict(
        Route(table=100, dst="10.244.2.1/32", via="192.168.126.2", dev="istioin", src="10.244.1.1"))
    assert quick_ipset(ADD) == IpsetEntry(set="ztunnel-pods-ips", ip="10.244.2.1",
                                          comment="6b1f2c3e-0a4d-4c55-9e1a-1b2c3d4e5f05")
    assert quick_ipset('add s 10.0.0.1 comment ""') == IpsetEntry(set="s", ip="10.0.0.1", comment="")
    # shapes left to the full parser: IPv6, a quoted set name, a comment with a quote in it
    assert quick_route("fd00::1 dev eth0 table 100") is None
    assert quick_ipset("add s fd00::1") is None
    assert quick_ipset("add 's' 10.0.0.1") is None
    assert parse_ipset(Line("t", 1, "add 's' 10.0.0.1"), 4) == IpsetEntry(set="s", ip="10.0.0.1")
    escaped = 'add s 10.0.0.1 comment "a\\\\b"'          # shlex reads a\\b as a\b
    assert quick_ipset(escaped) is None
    assert parse_ipset(Line("t", 1, escaped), 4) == IpsetEntry(set="s", ip="10.0.0.1", comment="a\\b")
    assert quick_ipset('add s 10.0.0.1 comment "a\\"') is None


def test_routes_are_built_by_the_constructor_when_route_is_not_a_plain_dataclass(monkeypatch):
    plain = quick_route(ROUTE)
    monkeypatch.setattr(render, "_PLAIN_ROUTE", False)
    built = quick_route(ROUTE)
    assert built == plain and vars(built) == vars(plain)


def test_routes_share_no_state():
    a, b = quick_route(ROUTE), quick_route(ROUTE.replace("2.1 ", "2.2 ", 1))
    assert (a.dst, b.dst) == ("10.244.2.1/32", "10.244.2.2/32")
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.dst = "x"
    assert render._route_tail(ROUTE.partition(" ")[2])["dst"] == "0.0.0.0/32"


# ---------------------------------------------------------------- whole renders


def without_quick_parses(monkeypatch):
    monkeypatch.setattr(render, "QUICK_PARSERS", {})
    monkeypatch.setattr(render, "quick_route", lambda text: None)
    monkeypatch.setattr(render, "quick_ipset", lambda text: None)


@pytest.mark.parametrize("values", [
    lambda: values_with(),
    lambda: values_with(**{"ipset.comments": False, "istioVersion": "1.18"}),
    lambda: bench_values(300),
])
def test_renders_are_the_same_with_and_without_quick_parses(values, monkeypatch):
    v = values()
    fast = desired.render(v, "legacy")
    without_quick_parses(monkeypatch)
    assert desired.render(v, "legacy") == fast
    assert render.show(desired.render(v, "legacy")) == render.show(fast)


@pytest.fixture
def rules(tmp_path):
    shutil.copytree(render.rules_dir(), tmp_path / "rules")
    return tmp_path / "rules"


def edit(rules, rel, old, new):
    f = rules / rel
    text = f.read_text()
    assert old in text
    f.write_text(text.replace(old, new))


@pytest.mark.parametrize("rel,old,new,error", [
    ("legacy/node/routes.rules", "table ${TABLE_INBOUND}\n@end", "table ${TABLE_INBOUND} extra\n@end",
     "rules/legacy/node/routes.rules:7: 'extra' needs a value: "
     "'10.244.1.5 via 192.168.126.2 dev istioin src 10.244.1.1 table 100 extra'"),
    ("legacy/node/routes.rules", "${pod.ip} via", "${pod.ip}.1 via",
     "rules/legacy/node/routes.rules:7: '10.244.1.5.1' is not a destination prefix: "
     "'10.244.1.5.1 via 192.168.126.2 dev istioin src 10.244.1.1 table 100'"),
    ("legacy/node/ipset.rules", 'add ${IPSET} ${pod.ip} comment "${pod.uid}"',
     'add ${IPSET} ${pod.ip}.0 comment "${pod.uid}"',
     "rules/legacy/node/ipset.rules:7: '10.244.1.5.0' is not an address: "
     "'add ztunnel-pods-ips 10.244.1.5.0 comment \"6b1f2c3e-0a4d-4c55-9e1a-1b2c3d4e5f05\"'"),
    ("legacy/node/ipset.rules", 'add ${IPSET} ${pod.ip} comment "${pod.uid}"',
     'add ${IPSET} ${pod.ip} comment "${pod.uid}" ${pod.name}',
     "rules/legacy/node/ipset.rules:7: expected 'create NAME TYPE …' or 'add NAME IP [comment \"X\"]': "
     "'add ztunnel-pods-ips 10.244.1.5 comment \"6b1f2c3e-0a4d-4c55-9e1a-1b2c3d4e5f05\" sleep'"),
])
def test_a_broken_per_pod_line_is_refused_naming_its_template_line(rules, rel, old, new, error):
    edit(rules, rel, old, new)
    with pytest.raises(RenderError) as e:
        desired.render(values_with(), "legacy", rules=rules)
    assert str(e.value).startswith(error)
