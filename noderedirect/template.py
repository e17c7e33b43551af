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
A template is compiled once per text into small functions (a render expands an @for body once
per pod); ``_interpret``, the line-by-line walk, defines what a template means and reports
structural mistakes. Nothing here knows what a mark or a route is.
"""

from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)\}")
_FOR = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s+in\s+(.+)")
_MISS = object()    # "no such field", where None is a value


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


def _resolve(ctx: dict[str, Any], dotted: str, head: str, rest: "list[str] | tuple[str, ...]",
             where: str) -> Any:
    """The value of ``dotted`` (split once into ``head`` and ``rest``): each part a dict key,
    else a public attribute."""
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

        def lookup(ctx: dict[str, Any], where: str) -> Any:
            if name in ctx:
                return ctx[name]
            raise TemplateError(where, f"unknown name {name!r}")
        return lookup
    if isinstance(n, ast.Attribute):
        # _resolve's rule (a dict key, else a public attribute) without building a context per
        # evaluation; the message names the field as "_.attr", as it always has
        inner, attr, dotted = _build(n.value, expr), n.attr, "_." + n.attr
        public = not attr.startswith("_")

        def field(ctx: dict[str, Any], where: str) -> Any:
            val = inner(ctx, where)
            if isinstance(val, dict) and attr in val:
                return val[attr]
            if public:
                found = getattr(val, attr, _MISS)
                if found is not _MISS:
                    return found
            raise TemplateError(where, f"{dotted!r}: no field {attr!r}")
        return field
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


def _interpret(source: str, filename: str, ctx: dict[str, Any]) -> list[Line]:
    """The reference expansion: walks every source line, active or not, so a structural mistake
    (an unknown directive, a missing @end …) is reported where the walk meets it. Compiled
    programs (below) must produce exactly what this produces; templates they cannot compile
    come here."""
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
        m = _FOR.fullmatch(spec.strip())
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


# ---------------------------------------------------------------- compiled programs
#
# Every render expands the same few rule files, and an @for body once per pod. So a template is
# compiled once per text into a tree of small functions ("steps"): which lines belong to which
# block, what each placeholder names and which @for binds it are worked out here, not per line
# per pod. Only well-formed templates are compiled; one with a structural mistake (unknown
# directive, missing @end, bad @for) goes to _interpret, which reports the mistake where its walk
# meets it. A compiled program yields exactly the lines, and raises exactly the errors, that
# _interpret would: a step that cannot take its quick way hands the line to `substitute`.

# (ctx, out, memo): append (lineno, text) pairs to out. memo lives for one expansion and holds
# each line's placeholders that no @for binds, resolved once (they cannot change within it).
Step = Callable[[dict[str, Any], list, dict], None]


class _Malformed(Exception):
    """The template's structure is broken; _interpret reports how, and where."""


def _expression(expr: str, where: str) -> Compiled:
    """An @if/@elif/@for expression, vetted now. A bad one raises only when it is evaluated, as
    in _interpret: a branch that is never taken may hold anything."""
    try:
        return _compiled(expr.strip())
    except ValueError as e:
        msg = str(e)

        def refused(ctx: dict[str, Any], where: str) -> Any:
            raise TemplateError(where, msg)
        return refused
    except Exception:       # anything odder (a recursion limit …): the reference walk decides
        raise _Malformed from None


def _getter(head: str, rest: tuple[str, ...]) -> Callable[[dict[str, Any]], Any]:
    """``${head.a.b}`` for a head an @for binds: the value, or _MISS where _resolve would refuse.
    Same rule as _resolve: a dict key first, then a public attribute."""
    if any(part.startswith("_") for part in rest):
        def private(ctx: dict[str, Any]) -> Any:
            try:
                return _resolve(ctx, head, head, rest, "")
            except TemplateError:
                return _MISS
        return private
    if len(rest) == 1:              # ${pod.ip}: the usual shape
        (part,) = rest

        def field(ctx: dict[str, Any]) -> Any:
            val = ctx[head]         # bound by an enclosing @for: always there
            if isinstance(val, dict) and part in val:
                return val[part]
            return getattr(val, part, _MISS)
        return field

    def path(ctx: dict[str, Any]) -> Any:
        val = ctx[head]
        for part in rest:
            if isinstance(val, dict) and part in val:
                val = val[part]
            else:
                val = getattr(val, part, _MISS)
                if val is _MISS:
                    return _MISS
        return val
    return path


def _reference(ctx: dict[str, Any]) -> None:
    return None


def _prepare(text: str, ctx: dict[str, Any], bound: frozenset[str]) -> Callable[[dict[str, Any]], Any]:
    """A line's text as a function of the @for variables: every other placeholder is resolved
    now and folded into the literal text. The function gives the text, or None when the line
    must go to `substitute` (which then names the first bad placeholder, in line order)."""
    try:
        literals, placeholders = _pieces(text)
        parts = [literals[0]]
        getters = []
        for (name, head, rest), lit in zip(placeholders, literals[1:]):
            if head in bound:
                getters.append(_getter(head, rest))
                parts.append(lit)
                continue
            val = _resolve(ctx, name, head, rest, "")
            if val is None or isinstance(val, bool):
                return _reference
            parts[-1] += str(val) + lit
    except Exception:       # a bad placeholder or value: substitute raises it, in line order
        return _reference
    if not getters:
        const = parts[0]
        return lambda ctx: const
    if len(getters) == 1:
        (get,), (before, after) = getters, parts

        def one(ctx: dict[str, Any]) -> Any:
            val = get(ctx)
            if val is _MISS or val is None or val is True or val is False:
                return None
            return before + str(val) + after
        return one
    if len(getters) == 2:           # ${pod.ip} … "${pod.uid}"
        (get1, get2), (before, middle, after) = getters, parts

        def two(ctx: dict[str, Any]) -> Any:
            val = get1(ctx)             # in line order, as substitute goes
            if val is _MISS or val is None or val is True or val is False:
                return None
            first = str(val)
            val = get2(ctx)
            if val is _MISS or val is None or val is True or val is False:
                return None
            return before + first + middle + str(val) + after
        return two

    def many(ctx: dict[str, Any]) -> Any:
        out = [parts[0]]
        for get, lit in zip(getters, parts[1:]):
            val = get(ctx)
            if val is _MISS or val is None or val is True or val is False:
                return None
            out.append(str(val))
            out.append(lit)
        return "".join(out)
    return many


class _LoopLine:
    """A text line inside an @for: prepared once per expansion (see _prepare), then its text
    per item."""

    __slots__ = ("lineno", "where", "text", "bound")

    def __init__(self, lineno: int, where: str, text: str, bound: frozenset[str]):
        self.lineno, self.where, self.text, self.bound = lineno, where, text, bound

    def formatter(self, ctx: dict[str, Any], memo: dict) -> Callable[[dict[str, Any]], Any]:
        fmt = memo.get(self.lineno)
        if fmt is None:
            fmt = memo[self.lineno] = _prepare(self.text, ctx, self.bound)
        return fmt

    def __call__(self, ctx: dict[str, Any], out: list, memo: dict) -> None:
        line = self.formatter(ctx, memo)(ctx)
        if line is None:
            line = substitute(self.text, ctx, self.where)
        out.append((self.lineno, line))


def _text_step(lineno: int, where: str, text: str, bound: frozenset[str]) -> Step:
    if bound:
        return _LoopLine(lineno, where, text, bound)

    def once(ctx: dict[str, Any], out: list, memo: dict) -> None:
        # outside any @for: substituted once per expansion anyway
        out.append((lineno, substitute(text, ctx, where)))
    return once


def _sequence(steps: list[Step]) -> Step:
    if len(steps) == 1:
        return steps[0]

    def run(ctx: dict[str, Any], out: list, memo: dict) -> None:
        for step in steps:
            step(ctx, out, memo)
    return run


def _compile_block(raw: tuple, pos: int, stop: tuple[str, ...],
                   bound: frozenset[str]) -> tuple[list[Step], int, str]:
    """Steps up to a directive in ``stop``; mirrors _interpret's ``block``."""
    steps: list[Step] = []
    while pos < len(raw):
        lineno, where, stripped, kind, word, rest = raw[pos]
        if kind == _DIRECTIVE:
            if word in stop:
                return steps, pos, word
            pos += 1
            if word == "if":
                step, pos = _compile_if(raw, pos, rest, where, bound)
            elif word == "for":
                step, pos = _compile_for(raw, pos, rest, where, bound)
            else:
                raise _Malformed
            steps.append(step)
            continue
        pos += 1
        if kind == _TEXT:
            steps.append(_text_step(lineno, where, stripped, bound))
    if stop:
        raise _Malformed
    return steps, pos, ""


def _compile_if(raw: tuple, pos: int, expr: str, where: str,
                bound: frozenset[str]) -> tuple[Step, int]:
    # (condition, its line, body); an @else has no condition. As in _interpret, conditions are
    # evaluated in order until one holds, and an @elif after an @else is never evaluated.
    branches: list[tuple[Optional[Compiled], str, Step]] = []
    cond: Optional[Compiled] = _expression(expr, where)
    while True:
        body, pos, word = _compile_block(raw, pos, ("elif", "else", "end"), bound)
        branches.append((cond, where, _sequence(body)))
        _, where, stripped, _, _, _ = raw[pos]
        pos += 1
        if word == "end":
            break
        cond = _expression(stripped[5:], where) if word == "elif" else None

    def step(ctx: dict[str, Any], out: list, memo: dict) -> None:
        for cond, where, body in branches:
            if cond is None or cond(ctx, where):
                body(ctx, out, memo)
                return
    return step, pos


def _compile_for(raw: tuple, pos: int, spec: str, where: str,
                 bound: frozenset[str]) -> tuple[Step, int]:
    m = _FOR.fullmatch(spec.strip())
    if not m:
        raise _Malformed
    name = m.group(1)
    items_of = _expression(m.group(2), where)
    body, pos, _ = _compile_block(raw, pos, ("end",), bound | {name})
    run = _sequence(body)
    only = body[0] if len(body) == 1 and isinstance(body[0], _LoopLine) else None

    def step(ctx: dict[str, Any], out: list, memo: dict) -> None:
        items = list(items_of(ctx, where))
        if not items:
            return
        # one dict for all items: a body only reads its context, and the loop variable is the
        # only name that changes between items
        inner = dict(ctx)
        if only is None:
            for item in items:
                inner[name] = item
                run(inner, out, memo)
            return
        # a one-line body (the per-pod line): the line's text per item, without a step per item
        lineno, fmt = only.lineno, only.formatter(inner, memo)
        for item in items:
            inner[name] = item
            line = fmt(inner)
            if line is None:
                line = substitute(only.text, inner, only.where)
            out.append((lineno, line))
    return step, pos + 1


@functools.lru_cache(maxsize=64)
def _program(source: str, filename: str) -> Optional[Step]:
    """The compiled template, or None when its structure is broken (see _interpret)."""
    try:
        steps, _, _ = _compile_block(_scan(source, filename), 0, (), frozenset())
    except (_Malformed, RecursionError):
        return None
    return _sequence(steps)


def expand_texts(source: str, filename: str, ctx: dict[str, Any]) -> list[tuple[int, str]]:
    """Expand a template into (line number, substituted text) pairs (comments and blanks
    dropped): :func:`expand` without a Line per line, for callers that make one only when a
    line needs naming."""
    program = _program(source, filename)
    if program is None:
        return [(line.lineno, line.text) for line in _interpret(source, filename, ctx)]
    out: list[tuple[int, str]] = []
    program(ctx, out, {})
    return out


def expand(source: str, filename: str, ctx: dict[str, Any]) -> list[Line]:
    """Expand a template into substituted lines (comments and blanks dropped)."""
    return [Line(filename, lineno, text) for lineno, text in expand_texts(source, filename, ctx)]


def tokens(line: Line) -> Iterator[str]:
    return iter(line.text.split())
