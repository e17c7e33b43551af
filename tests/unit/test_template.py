"""The rule-file template language: substitution, conditions, loops and its errors."""

from __future__ import annotations

import pytest

from noderedirect.model import Version
from noderedirect.template import TemplateError, expand

SRC = """\
# comment
a ${X}
@if version >= "1.19" and not flag
new ${X}
@elif flag
flagged
@else
old
@end
@for p in pods
p ${p.ip}
@end
"""


class P:
    def __init__(self, ip):
        self.ip = ip


def texts(src, **ctx):
    return [l.text for l in expand(src, "t.rules", ctx)]


def test_version_comparison_is_numeric_not_lexical():
    assert Version("1.20") > "1.9"
    assert Version("1.20") >= "1.19"
    assert not Version("1.18") >= "1.19"


@pytest.mark.parametrize("ver,flag,middle", [("1.20", False, "new x"), ("1.18", True, "flagged"),
                                             ("1.18", False, "old")])
def test_if_elif_else(ver, flag, middle):
    assert texts(SRC, X="x", version=Version(ver), flag=flag, pods=[P("1"), P("2")]) == [
        "a x", middle, "p 1", "p 2"]


def test_empty_for_and_line_numbers():
    lines = expand(SRC, "t.rules", dict(X="x", version=Version("1.20"), flag=False, pods=[]))
    assert [(l.lineno, l.text) for l in lines] == [(2, "a x"), (4, "new x")]


@pytest.mark.parametrize("src,ctx,msg", [
    ("a ${NOPE}\n", {}, "t.rules:1: unknown name 'NOPE'"),
    ("@if x\na\n", {"x": True}, "missing @end"),
    ("@if __import__('os')\n@end\n", {}, "Call is not allowed"),
    ("a ${flag}\n", {"flag": True}, "is a boolean"),
    ("@for x of y\n@end\n", {}, "@for needs"),
    ("@frobnicate\n", {}, "unexpected @frobnicate"),
    ("a ${p.secret}\n", {"p": P("1")}, "no field 'secret'"),
    ("a ${X\n", {"X": 1}, "malformed placeholder"),
])
def test_errors_name_the_line(src, ctx, msg):
    with pytest.raises(TemplateError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        expand(src, "t.rules", ctx)
