"""Compiled templates mean exactly what the line-by-line walk (`_interpret`) means.

Every rule file is expanded through a compiled program; `_interpret` is the reference. These
tests hold the two to the same lines and the same errors (type, message, file:line), on the
real rule files and on thousands of generated templates, well-formed and not.
"""

from __future__ import annotations

import random

import pytest

from helpers import values_with

from noderedirect import desired
from noderedirect.model import Pod, Version
from noderedirect.render import rules_dir
from noderedirect.template import TemplateError, _interpret, _program, expand, expand_texts


class P:
    def __init__(self, ip, uid=None, veth=None):
        self.ip, self.uid, self.veth = ip, uid, veth
        self.on = True
        self._secret = "hidden"


def outcome(fn, src, ctx):
    """What an expansion gives: its (lineno, text) pairs, or the error it raised."""
    try:
        return [(line.lineno, line.text) for line in fn(src, "t.rules", dict(ctx))]
    except Exception as e:      # the exact type and message are what is compared
        return (type(e).__name__, str(e))


def same(src, ctx):
    want = outcome(_interpret, src, ctx)
    assert outcome(expand, src, ctx) == want, src
    return want


# ---------------------------------------------------------------- the real rule files


def rule_files():
    base = rules_dir()
    return sorted(p.relative_to(base).as_posix() for p in base.rglob("*.rules"))


@pytest.mark.parametrize("rel", rule_files())
def test_every_rule_file_is_compiled(rel):
    text = (rules_dir() / rel).read_text(encoding="utf-8")
    assert _program(text, f"rules/{rel}") is not None


def pods_with_veths(n):
    return [{"namespace": "default", "name": f"p{i}", "uid": f"uid-{i}", "ip": f"10.244.1.{10 + i}",
             **({"veth": f"veth{i}"} if i % 2 else {})} for i in range(n)]


@pytest.mark.parametrize("changes", [
    {},
    {"istioVersion": "1.18", "dnsCapture": True, "ipset.comments": False},
    {"istioVersion": "1.19", "pods": pods_with_veths(5)},
    {"pods": []},
])
def test_legacy_rule_files_expand_as_the_walk_does(changes):
    ctx = desired.context(values_with(**changes))
    for rel in rule_files():
        if rel.startswith("legacy/"):
            ctx["family"] = 4
            assert same((rules_dir() / rel).read_text(encoding="utf-8"), ctx) != []


def test_inpod_pod_rule_files_expand_as_the_walk_does():
    values = values_with(**{"inpod.ipv6": True, "inpod.istioVersion": "1.25"})
    pod = Pod(namespace="a", name="b", uid="u", ip="10.244.1.9", dns_capture=True, ingress=True,
              virtual_interfaces=("tun0", "tun1"), ip6="fd00::9")
    base = desired.inpod_pod_context(values, pod)
    for fam in (4, 6):
        ctx = {**base, **base["per_family"][fam], "family": fam}
        for rel in rule_files():
            if rel.startswith("inpod/pod/"):
                same((rules_dir() / rel).read_text(encoding="utf-8"), ctx)


# ---------------------------------------------------------------- what compiling must keep


CTX = {"X": "x", "N": 3, "NONE": None, "FLAG": True, "flag": False, "version": Version("1.20"),
       "pods": [P("10.0.0.1", "u1"), P("10.0.0.2", "u2", "veth2"), P("10.0.0.3", None, "veth3")],
       "dicts": [{"ip": "10.1.0.1", "uid": None}, {"ip": "10.1.0.2", "uid": "d2"}],
       "groups": [[P("10.2.0.1")], [], [P("10.2.1.1"), P("10.2.1.2")]], "empty": []}


@pytest.mark.parametrize("src,want", [
    # a name the loop binds and one it does not, in the same line
    ("@for p in pods\n${p.ip} via ${X}\n@end\n",
     [(2, "10.0.0.1 via x"), (2, "10.0.0.2 via x"), (2, "10.0.0.3 via x")]),
    # the loop variable shadows a top-level name inside the loop only
    ("@for X in pods\n${X.ip}\n@end\n${X}\n",
     [(2, "10.0.0.1"), (2, "10.0.0.2"), (2, "10.0.0.3"), (4, "x")]),
    # per-item conditions, dict items, nested loops over the outer item
    ("@for p in pods\n@if p.veth\n${p.veth} ${p.ip}\n@end\n@end\n",
     [(3, "veth2 10.0.0.2"), (3, "veth3 10.0.0.3")]),
    ("@for d in dicts\n${d.ip}\n@end\n", [(2, "10.1.0.1"), (2, "10.1.0.2")]),
    ("@for g in groups\n@for p in g\n${p.ip} ${N}\n@end\n@end\n",
     [(3, "10.2.0.1 3"), (3, "10.2.1.1 3"), (3, "10.2.1.2 3")]),
    # an empty loop never looks at its body; an untaken branch never evaluates
    ("@for p in empty\n${p.nope} ${NOPE}\n@end\n@if flag\n@if __import__('os')\n@end\n${NOPE}\n@end\n", []),
    ("@if FLAG\na\n@else\nb\n@elif NOPE\nc\n@end\n", [(2, "a")]),
])
def test_compiled_lines(src, want):
    assert same(src, CTX) == want


@pytest.mark.parametrize("src,error", [
    # errors inside a loop name the template line, on the first item that has them
    ("@for p in pods\nok\n${p.uid} x\n@end\n", "t.rules:3: ${p.uid} has no value here"),
    ("@for d in dicts\n${d.uid}\n@end\n", "t.rules:2: ${d.uid} has no value here"),
    ("@for p in pods\n${p.nope}\n@end\n", "t.rules:2: 'p.nope': no field 'nope'"),
    ("@for p in pods\n${p._secret}\n@end\n", "t.rules:2: 'p._secret': no field '_secret'"),
    ("@for p in pods\n${FLAG} ${p.nope}\n@end\n", "t.rules:2: ${FLAG} is a boolean; use it in @if"),
    ("@for p in pods\n${p.on}\n@end\n", "t.rules:2: ${p.on} is a boolean; use it in @if"),
    ("@for p in pods\n${p.ip} ${p.on}\n@end\n", "t.rules:2: ${p.on} is a boolean; use it in @if"),
    ("@for p in pods\n${p.ip} ${p.ip} ${p.on}\n@end\n", "t.rules:2: ${p.on} is a boolean; use it in @if"),
    # the first bad placeholder of a line is the one named, bound by the loop or not
    ("@for p in pods\n${p.nope} ${NOPE}\n@end\n", "t.rules:2: 'p.nope': no field 'nope'"),
    ("@for p in pods\n${NOPE} ${p.nope}\n@end\n", "t.rules:2: unknown name 'NOPE'"),
    ("@for p in pods\n${p.ip} ${X\n@end\n", "t.rules:2: malformed placeholder in '${p.ip} ${X'"),
    ("@for p in pods\n@if p.nope\n@end\n@end\n", "t.rules:2: '_.nope': no field 'nope'"),
    ("@for p in pods\n@if p.veth\n@elif NOPE\n@end\n@end\n", "t.rules:3: unknown name 'NOPE'"),
    ("@for p in NOPE\n@end\n", "t.rules:1: unknown name 'NOPE'"),
    ("@if flag\n@elif 1 +\n@end\n", "t.rules:2: bad expression '1 +'"),
    # a structural mistake is reported where the walk meets it, after earlier runtime errors
    ("${NOPE}\n@frobnicate\n", "t.rules:1: unknown name 'NOPE'"),
    ("ok\n@frobnicate\n${NOPE}\n", "t.rules:2: unexpected @frobnicate"),
    ("@for p in pods\n${p.ip}\n", "t.rules:2: missing @end"),
    ("@end\n", "t.rules:1: unexpected @end"),
])
def test_compiled_errors(src, error):
    got = same(src, CTX)
    assert got[0] == "TemplateError" and got[1].startswith(error), got


def test_a_non_list_loop_fails_as_it_always_did():
    assert same("@for p in N\n@end\n", CTX) == ("TypeError", "'int' object is not iterable")


def test_structurally_broken_templates_take_the_walk():
    assert _program("@if flag\na\n", "t.rules") is None
    assert _program("@for p of pods\n@end\n", "t.rules") is None
    assert _program("@if flag\na\n@end\n", "t.rules") is not None
    with pytest.raises(TemplateError, match=r"^t\.rules:2: missing @end"):
        expand_texts("@if flag\na\n", "t.rules", CTX)


def test_one_expansion_does_not_leak_into_the_next():
    src = "@for p in pods\n${p.ip} ${X}\n@end\n"
    assert expand_texts(src, "t.rules", {**CTX, "X": "one"})[0] == (2, "10.0.0.1 one")
    assert expand_texts(src, "t.rules", {**CTX, "X": "two"})[0] == (2, "10.0.0.1 two")
    with pytest.raises(TemplateError, match="unknown name 'X'"):
        expand_texts(src, "t.rules", {k: v for k, v in CTX.items() if k != "X"})


# ---------------------------------------------------------------- generated templates

EXPRS = ["flag", "not flag", "FLAG and N > 2", 'version >= "1.19"', "p.veth", "p.nope", "NOPE",
         "p._secret", "d.ip", "N in (1, 3)", "__import__('os')", "1 +", "", "g", "X == 'x' or flag"]
LOOPS = ["p in pods", "d in dicts", "g in groups", "p in g", "p in empty", "p in NOPE", "p in N",
         "p in X", "X in pods"]
PLACEHOLDERS = ["${X}", "${N}", "${NONE}", "${FLAG}", "${NOPE}", "${p.ip}", "${p.uid}", "${p.veth}",
                "${p._secret}", "${p.nope}", "${p.on}", "${d.ip}", "${d.uid}", "${d.items}", "${g}", "${p}",
                "${X.upper}", "${X", "$X", "${ X}", "{X}"]


def gen_text(rng):
    return " ".join(rng.choice(PLACEHOLDERS) if rng.random() < 0.6 else rng.choice(["a", "-j", "10.0.0.9"])
                    for _ in range(rng.randint(1, 4)))


def gen_block(rng, depth):
    out = []
    for _ in range(rng.randint(0, 4)):
        r = rng.random()
        if r < 0.45 or depth > 2:
            out.append(rng.choice([gen_text(rng), gen_text(rng), "# c", ""]))
        elif r < 0.75:
            out.append(f"@if {rng.choice(EXPRS)}")
            out += gen_block(rng, depth + 1)
            for _ in range(rng.randint(0, 2)):
                out.append(f"@elif {rng.choice(EXPRS)}" if rng.random() < 0.7 else "@else")
                out += gen_block(rng, depth + 1)
            out.append("@end")
        else:
            out.append(f"@for {rng.choice(LOOPS)}")
            out += gen_block(rng, depth + 1)
            out.append("@end")
    return out


def gen_template(rng):
    lines = gen_block(rng, 0)
    if rng.random() < 0.15:     # break it: drop, add or garble a directive line
        pos = rng.randint(0, len(lines))
        lines.insert(pos, rng.choice(["@end", "@else", "@elif flag", "@frob", "@for p of pods", "@if"]))
    return "\n".join(lines) + "\n"


def test_generated_templates_expand_as_the_walk_does():
    rng = random.Random(20240611)
    kinds = {"lines": 0, "errors": 0, "walked": 0}
    for _ in range(3000):
        src = gen_template(rng)
        got = same(src, CTX)
        kinds["errors" if isinstance(got, tuple) else "lines"] += 1
        kinds["walked"] += _program(src, "t.rules") is None
    # the generator really covers all three cases
    assert min(kinds.values()) > 150, kinds


class Counted:
    """A value that counts how often it is turned into text."""

    def __init__(self):
        self.calls = 0

    def __str__(self):
        self.calls += 1
        return "c"


@pytest.mark.parametrize("body", ["${p.ip} ${C}\n", "${p.ip} ${C}\n@if p.veth\n${C} ${p.veth}\n@end\n"])
def test_names_no_loop_binds_are_resolved_once_per_expansion(body):
    c = Counted()
    lines = expand_texts(f"@for p in pods\n{body}@end\n", "t.rules", {**CTX, "C": c})
    assert [text for _, text in lines][:2] == ["10.0.0.1 c", "10.0.0.2 c"]
    assert c.calls == body.count("${C}")
