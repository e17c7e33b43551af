"""The rule-file template language (files under rules/).

A rule file is plain text in the syntax of the kernel tool it feeds (iptables arguments,
``ip route``/``ip rule`` arguments, ``ipset`` save lines …) with four additions:

- ``# …`` on its own line is a comment; blank lines are ignored.
- ``${NAME}`` and ``${item.field}`` are substituted. Names come from :mod:`noderedirect.names`
  and from the validated values (see :func:`noderedirect.desired.context`). An unknown name is
  an error, never an empty string.
- ``@if EXPR`` / ``@elif EXPR`` / ``@else`` / ``@end`` keep or drop lines. EXPR is a small
  expression: names, ``a.b``, strings, numbers, ``== != < <= > >=``, ``in``, ``and or not``.
- ``@for NAME in EXPR`` / ``@end`` repeats lines for each item of a list.

Expansion yields (file, line number, text) so every later error can point at its template line.
Nothing here knows what a mark or a route is.
"""

from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)\}")


class TemplateError(Exception):
    def __init__(self, where: str, msg: str):
        super().__init__(f"{where}: {msg}")
        self.where = where


@dataclass(frozen=True)
class Line:
    file: str
    lineno: int
    text: str

    @property
    def where(self) -> str:
        return f"{self.file}:{self.lineno}"


def _lookup(ctx: dict[str, Any], dotted: str, where: str) -> Any:
    head, *rest = dotted.split(".")
    return _resolve(ctx, dotted, head, rest, where)


def _resolve(ctx: dict[str, Any], dotted: str, head: str, rest: "list[str] | tuple[str, ...]",
             where: str) -> Any:
    """``_lookup`` with the name already split (placeholders are split once per line)."""
    if head not in ctx:
        raise TemplateError(where, f"unknown name {head!r}")
    val = ctx[head]
    for part in rest:
        if isinstance(val, dict) and part in val:
            val = val[part]
        elif hasattr(val, part) and not part.startswith("_"):
            val = getattr(val, part)
        else:
            raise TemplateError(where, f"{dotted!r}: no field {part!r}")
    return val


_ALLOWED = (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.Compare,
            ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.In, ast.NotIn, ast.Name,
            ast.Load, ast.Attribute, ast.Constant, ast.Tuple, ast.List)


@functools.lru_cache(maxsize=512)
def _parse(expr: str) -> ast.Expression:
    """Parse and vet an expression once (a loop evaluates the same @if for every item)."""
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"bad expression {expr!r}: {e.msg}") from None
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED):
            raise ValueError(f"{type(node).__name__} is not allowed in {expr!r}")
    return tree


_COMPARE = {ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b,
            ast.Lt: lambda a, b: a < b, ast.LtE: lambda a, b: a <= b,
            ast.Gt: lambda a, b: a > b, ast.GtE: lambda a, b: a >= b,
            ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b}

Compiled = Callable[[dict[str, Any], str], Any]


def _build(n: ast.AST, expr: str) -> Compiled:
    """One vetted node as a function of (ctx, where): a loop evaluates the same @if for every
    item, so the tree is walked once, not once per item."""
    if isinstance(n, ast.Expression):
        return _build(n.body, expr)
    if isinstance(n, ast.Constant):
        value = n.value
        return lambda ctx, where: value
    if isinstance(n, (ast.Tuple, ast.List)):
        elts = [_build(e, expr) for e in n.elts]
        return lambda ctx, where: tuple(e(ctx, where) for e in elts)
    if isinstance(n, ast.Name):
        name = n.id
        return lambda ctx, where: _lookup(ctx, name, where)
    if isinstance(n, ast.Attribute):
        inner, dotted = _build(n.value, expr), "_." + n.attr
        return lambda ctx, where: _lookup({"_": inner(ctx, where)}, dotted, where)
    if isinstance(n, ast.UnaryOp):          # `not` is the only unary operator allowed
        operand = _build(n.operand, expr)
        return lambda ctx, where: not operand(ctx, where)
    if isinstance(n, ast.BoolOp):
        vals = [_build(v, expr) for v in n.values]
        if isinstance(n.op, ast.And):
            return lambda ctx, where: all(v(ctx, where) for v in vals)
        return lambda ctx, where: any(v(ctx, where) for v in vals)
    if isinstance(n, ast.Compare):
        left = _build(n.left, expr)
        pairs = [(_COMPARE[type(op)], _build(c, expr)) for op, c in zip(n.ops, n.comparators)]

        def compare(ctx: dict[str, Any], where: str) -> bool:
            a = left(ctx, where)
            for op, comp in pairs:
                b = comp(ctx, where)
                if not op(a, b):
                    return False
                a = b
            return True
        return compare

    def cannot(ctx: dict[str, Any], where: str) -> Any:  # pragma: no cover
        raise TemplateError(where, f"cannot evaluate {expr!r}")
    return cannot


@functools.lru_cache(maxsize=512)
def _compiled(expr: str) -> Compiled:
    return _build(_parse(expr), expr)


def evaluate(expr: str, ctx: dict[str, Any], where: str) -> Any:
    try:
        fn = _compiled(expr.strip())
    except ValueError as e:
        raise TemplateError(where, str(e)) from None
    return fn(ctx, where)


@functools.lru_cache(maxsize=4096)
def _pieces(text: str) -> tuple[tuple[str, ...], tuple[tuple[str, str, tuple[str, ...]], ...]]:
    """A line split once into literal text and placeholders (loops reuse the split); each
    placeholder is (dotted name, head, rest of the path)."""
    literals, names_ = [], []
    pos = 0
    for m in _VAR.finditer(text):
        literals.append(text[pos:m.start()])
        head, *rest = m.group(1).split(".")
        names_.append((m.group(1), head, tuple(rest)))
        pos = m.end()
    literals.append(text[pos:])
    if "${" in "".join(literals):
        raise ValueError(f"malformed placeholder in {text!r}")
    return tuple(literals), tuple(names_)


def substitute(text: str, ctx: dict[str, Any], where: str) -> str:
    try:
        literals, placeholders = _pieces(text)
    except ValueError as e:
        raise TemplateError(where, str(e)) from None
    out = [literals[0]]
    for (name, head, rest), lit in zip(placeholders, literals[1:]):
        val = _resolve(ctx, name, head, rest, where)
        if val is None:
            raise TemplateError(where, f"${{{name}}} has no value here")
        if isinstance(val, bool):
            raise TemplateError(where, f"${{{name}}} is a boolean; use it in @if")
        out.append(str(val))
        out.append(lit)
    return "".join(out)


_TEXT, _SKIP, _DIRECTIVE = 0, 1, 2


@functools.lru_cache(maxsize=64)
def _scan(source: str, filename: str) -> tuple[tuple[int, str, str, int, str, str], ...]:
    """Each source line once: (lineno, where, stripped text, kind, directive word, rest).
    A loop body is walked once per item; this work is not repeated per item."""
    out = []
    for i, line in enumerate(source.splitlines()):
        stripped = line.rstrip("\n").strip()
        where = f"{filename}:{i + 1}"
        if stripped.startswith("@"):
            word, _, rest = stripped[1:].partition(" ")
            out.append((i + 1, where, stripped, _DIRECTIVE, word, rest))
        elif not stripped or stripped.startswith("#"):
            out.append((i + 1, where, stripped, _SKIP, "", ""))
        else:
            out.append((i + 1, where, stripped, _TEXT, "", ""))
    return tuple(out)


def expand(source: str, filename: str, ctx: dict[str, Any]) -> list[Line]:
    """Expand a template into substituted lines (comments and blanks dropped)."""
    raw = _scan(source, filename)
    pos = 0

    def block(ctx: dict[str, Any], active: bool, stop: tuple[str, ...]) -> tuple[list[Line], str]:
        nonlocal pos
        out: list[Line] = []
        n = len(raw)
        while pos < n:
            lineno, where, stripped, kind, word, rest = raw[pos]
            if kind == _DIRECTIVE:
                if word in stop:
                    return out, word
                pos += 1
                if word == "if":
                    out += _if(ctx, active, rest, where)
                elif word == "for":
                    out += _for(ctx, active, rest, where)
                else:
                    raise TemplateError(where, f"unexpected @{word}")
                continue
            pos += 1
            if kind == _SKIP:
                continue
            if active:
                out.append(Line(filename, lineno, substitute(stripped, ctx, where)))
        if stop:
            raise TemplateError(f"{filename}:{len(raw)}", f"missing @end (expected one of {stop})")
        return out, ""

    def _if(ctx, active, expr, where) -> list[Line]:
        nonlocal pos
        taken = False
        out: list[Line] = []
        cond = bool(evaluate(expr, ctx, where)) if active else False
        while True:
            lines, word = block(ctx, active and cond and not taken, ("elif", "else", "end"))
            out += lines
            taken = taken or cond
            _, w2, stripped, _, _, _ = raw[pos]
            pos += 1
            if word == "end":
                return out
            if word == "elif":
                cond = bool(evaluate(stripped[5:], ctx, w2)) if active and not taken else False
            else:
                cond = True

    def _for(ctx, active, spec, where) -> list[Line]:
        nonlocal pos
        m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)\s+in\s+(.+)", spec.strip())
        if not m:
            raise TemplateError(where, f"@for needs 'NAME in EXPR', got {spec!r}")
        items = list(evaluate(m.group(2), ctx, where)) if active else []
        start = pos
        out: list[Line] = []
        if not items:
            _, word = block(ctx, False, ("end",))
            pos += 1
            return out
        for item in items:
            pos = start
            lines, _ = block({**ctx, m.group(1): item}, active, ("end",))
            out += lines
        pos += 1
        return out

    lines, _ = block(ctx, True, ())
    return lines


def tokens(line: Line) -> Iterator[str]:
    return iter(line.text.split())
