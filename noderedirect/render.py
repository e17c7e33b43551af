"""Desired state + rules/ templates -> typed kernel objects, and their text forms.

A family folder (``rules/legacy/node`` …) holds one file per object kind. Each file is expanded
by :mod:`noderedirect.template` and every resulting line is parsed into a value from
:mod:`noderedirect.model`; a line that does not parse is a :class:`RenderError` naming the
template line. Pure: reads template files, nothing else.

Text forms:
- :func:`save_text`: iptables-save canonical form (chains sorted, rules grouped by chain).
- :func:`restore_text`: the upstream restore builder (``-N`` passes A and B, rules in issue
  order, tables sorted) — the in-pod goldens are byte-for-byte this.
- :func:`show_netns`: every kind of one netns, the way the kernel's tools print it.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from . import names
from .model import (IpRule, IpsetEntry, IpsetSet, IptRule, Link, NetnsState, Rendered, Route,
                    Sysctl)
from .template import Line, TemplateError, expand_texts


class RenderError(Exception):
    """A template produced a line that is not a valid object of its kind."""


_SOURCE_RULES = Path(__file__).resolve().parent.parent / "rules"
_INSTALLED_RULES = Path(sys.prefix) / "share" / "noderedirect" / "rules"


def rules_dir() -> Path:
    """Where the rule files are: $NODEREDIRECT_RULES, the source tree, or the installed share/."""
    env = os.environ.get("NODEREDIRECT_RULES")
    candidates = [Path(env)] if env else []
    candidates += [_SOURCE_RULES, _INSTALLED_RULES]
    for c in candidates:
        if (c / "legacy" / "node").is_dir():
            return c
    raise RenderError("cannot find the rules/ folder (set NODEREDIRECT_RULES)")


# ---------------------------------------------------------------- per-kind line parsers


def _fail(line: Line, msg: str) -> RenderError:
    return RenderError(f"{line.where}: {msg}: {line.text!r}")


def _int(line: Line, tok: str, what: str) -> int:
    try:
        return int(tok, 0)
    except ValueError:
        raise _fail(line, f"{what} is not a number") from None


def parse_iptables(line: Line, family: int) -> IptRule:
    toks = line.text.split()
    if len(toks) < 4 or toks[0] != "-t" or toks[1] not in names.BUILTIN_CHAINS:
        raise _fail(line, "expected '-t TABLE -A|-I CHAIN ARGS'")
    table, op, chain = toks[1], toks[2], toks[3]
    rest = toks[4:]
    if op == "-I" and rest and rest[0].isdigit():
        op, rest = f"-I {rest[0]}", rest[1:]
    elif op not in ("-A", "-I"):
        raise _fail(line, f"operation {op!r} is not -A or -I")
    if not rest:
        raise _fail(line, "rule has no arguments")
    if any(t in ("-t", "-A", "-I", "-D", "-F", "-X", "-N", "-P") for t in rest):
        raise _fail(line, "a rule may not contain another command")
    return IptRule(table=table, chain=chain, args=" ".join(rest), op=op, family=family)


# canonical dotted-quad IPv4 (no leading zeros, each part 0-255): exactly the IPv4 text that
# ipaddress accepts, matched without building an address (one per pod per line at scale)
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_CANONICAL_V4 = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}", re.ASCII)


# `add SET IP [comment "TEXT"]` with a canonical IPv4 address, the per-pod line, parsed without
# shlex (it dominates at scale). The set name holds no whitespace, quote or backslash and the
# comment no `"` or backslash, so shlex would read exactly these tokens; anything else (an IPv6
# member …) takes the general path.
_ADD = re.compile(r"""add ([^\s"'\\]+) (""" + _CANONICAL_V4.pattern + r""")(?: comment "([^"\\]*)")?""")


def quick_ipset(text: str) -> Optional[IpsetEntry]:
    """The plain ``add`` line as an entry, or None: not that shape, or not valid (parse_ipset
    then decides, and names the error)."""
    m = _ADD.fullmatch(text)
    if m is None:
        return None
    return IpsetEntry(*m.groups())     # (set, ip, comment): the field order


def parse_ipset(line: Line, family: int) -> IpsetSet | IpsetEntry:
    entry = quick_ipset(line.text)
    if entry is not None:
        return entry
    try:
        toks = shlex.split(line.text)
    except ValueError as e:
        raise _fail(line, str(e)) from None
    if len(toks) >= 3 and toks[0] == "create":
        opts: dict[str, Any] = {"name": toks[1], "type": toks[2]}
        i = 3
        while i < len(toks):
            if toks[i] == "comment":
                i += 1
                continue
            if toks[i] in ("family", "hashsize", "maxelem") and i + 1 < len(toks):
                opts[toks[i]] = toks[i + 1] if toks[i] == "family" else _int(line, toks[i + 1], toks[i])
                i += 2
                continue
            raise _fail(line, f"unknown ipset option {toks[i]!r}")
        return IpsetSet(comment="comment" in toks[3:], **opts)
    if len(toks) in (3, 5) and toks[0] == "add":
        _addr(line, toks[2])
        comment = None
        if len(toks) == 5:
            if toks[3] != "comment":
                raise _fail(line, "expected 'comment \"TEXT\"'")
            comment = toks[4]
        return IpsetEntry(set=toks[1], ip=toks[2], comment=comment)
    raise _fail(line, "expected 'create NAME TYPE …' or 'add NAME IP [comment \"X\"]'")


def _is_addr(tok: str) -> bool:
    return _CANONICAL_V4.fullmatch(tok) is not None or _parses_as_addr(tok)


@functools.lru_cache(maxsize=1024)
def _parses_as_addr(tok: str) -> bool:
    try:
        ipaddress.ip_address(tok)
        return True
    except ValueError:
        return False


def _addr(line: Line, tok: str) -> None:
    if not _is_addr(tok):
        raise _fail(line, f"{tok!r} is not an address")


def _mark(line: Line, tok: str) -> tuple[int, Optional[int]]:
    val, _, mask = tok.partition("/")
    return _int(line, val, "mark"), (_int(line, mask, "mask") if mask else None)


def parse_ip_rule(line: Line, family: int) -> IpRule:
    toks = line.text.split()
    # a leading -4/-6 is ip's own family switch (`ip -6 rule add …`)
    if toks and toks[0] in ("-4", "-6"):
        family = int(toks.pop(0)[1])
    kw: dict[str, Any] = {"family": family}
    i = 0
    while i < len(toks):
        key = toks[i]
        if i + 1 >= len(toks):
            raise _fail(line, f"{key!r} needs a value")
        val = toks[i + 1]
        if key in ("priority", "pref"):
            kw["priority"] = _int(line, val, "priority")
        elif key == "fwmark":
            kw["fwmark"], kw["fwmask"] = _mark(line, val)
        elif key in ("lookup", "table"):
            kw["action"], kw["table"] = "lookup", _int(line, val, "table")
        elif key == "goto":
            kw["action"], kw["goto"] = "goto", _int(line, val, "goto target")
        else:
            raise _fail(line, f"unknown ip rule keyword {key!r}")
        i += 2
    if "priority" not in kw or "action" not in kw:
        raise _fail(line, "an ip rule needs a priority and lookup/goto")
    return IpRule(**kw)


def _route_keywords(toks: list[str]) -> dict[str, Any] | str:
    """The keywords after a route's destination: their values, or what is wrong with them."""
    kw: dict[str, Any] = {}
    i = 0
    while i < len(toks):
        key = toks[i]
        if key == "onlink":
            kw["onlink"] = True
            i += 1
            continue
        if i + 1 >= len(toks):
            return f"{key!r} needs a value"
        val = toks[i + 1]
        if key in ("via", "src"):
            if not _is_addr(val):
                return f"{val!r} is not an address"
            kw[key] = val
        elif key == "dev":
            kw["dev"] = val
        elif key == "scope":
            if val not in ("link", "host", "global"):
                return f"scope {val!r}"
            kw["scope"] = None if val == "global" else val
        elif key == "table":
            try:
                kw["table"] = int(val, 0)
            except ValueError:
                return "table is not a number"
        else:
            return f"unknown route keyword {key!r}"
        i += 2
    if "table" not in kw:
        return "every route needs 'table N'"
    return kw


@functools.lru_cache(maxsize=256)
def _route_tail(rest: str) -> Optional[dict[str, Any]]:
    """A route line's keywords after an IPv4 destination, parsed once per distinct text (the
    per-pod routes of a node differ only in their destination): the fields of such a route,
    destination aside, or None when they do not parse. Shared between calls: never modified."""
    kw = _route_keywords(rest.split())
    if isinstance(kw, str):
        return None
    return dict(vars(Route(dst="0.0.0.0/32", family=4, **kw)))


# A frozen dataclass's __init__ sets each field through object.__setattr__, which at one route
# per pod was most of a route's parse. While Route keeps its fields in the instance dict and runs
# nothing after __init__, filling that dict from _route_tail's fields builds the same value.
_PLAIN_ROUTE = not hasattr(Route, "__slots__") and not hasattr(Route, "__post_init__")


def quick_route(text: str) -> Optional[Route]:
    """``IP KEYWORDS…`` with a canonical IPv4 destination (the per-pod /32 route, which dominates
    at scale) as a route, or None: not that shape, or not valid (parse_route then decides, and
    names the error). The same keyword rules as parse_route: _route_keywords."""
    dst, sep, rest = text.partition(" ")
    if not sep or _CANONICAL_V4.fullmatch(dst) is None:
        return None
    fields = _route_tail(rest)
    if fields is None:
        return None
    if not _PLAIN_ROUTE:
        return Route(**{**fields, "dst": dst + "/32"})
    route = object.__new__(Route)
    route.__dict__.update(fields, dst=dst + "/32")
    return route


def parse_route(line: Line, family: int) -> Route:
    quick = quick_route(line.text)
    if quick is not None:
        return quick
    toks = line.text.split()
    kw: dict[str, Any] = {}
    if toks and toks[0] in ("local", "unicast", "blackhole"):
        kw["type"] = toks.pop(0)
    if not toks:
        raise _fail(line, "route has no destination")
    dst = toks.pop(0)
    try:
        net = ipaddress.ip_network({"default": "0.0.0.0/0", "default6": "::/0"}.get(dst, dst), strict=True)
    except ValueError:
        raise _fail(line, f"{dst!r} is not a destination prefix") from None
    kw["dst"], kw["family"] = str(net), net.version
    rest = _route_keywords(toks)
    if isinstance(rest, str):
        raise _fail(line, rest)
    kw.update(rest)
    return Route(**kw)


def parse_link(line: Line, family: int) -> Link:
    toks = line.text.split()
    if len(toks) < 3 or toks[1] != "type":
        raise _fail(line, "expected 'NAME type KIND …'")
    kw: dict[str, Any] = {"name": toks[0], "kind": toks[2]}
    i = 3
    while i < len(toks):
        key = toks[i]
        if key in ("up", "down"):
            kw["up"] = key == "up"
            i += 1
            continue
        if i + 1 >= len(toks):
            raise _fail(line, f"{key!r} needs a value")
        val = toks[i + 1]
        if key == "id":
            kw["vni"] = _int(line, val, "id")
        elif key == "remote":
            _addr(line, val)
            kw["remote"] = val
        elif key == "dstport":
            kw["dstport"] = _int(line, val, "dstport")
        elif key == "address":
            try:
                ipaddress.ip_interface(val)
            except ValueError:
                raise _fail(line, f"{val!r} is not an address/prefix") from None
            kw["address"] = val
        else:
            raise _fail(line, f"unknown link keyword {key!r}")
        i += 2
    missing = {"vni", "remote", "dstport", "address"} - kw.keys()
    if missing:
        raise _fail(line, f"link lacks {', '.join(sorted(missing))}")
    return Link(**kw)


def parse_sysctl(line: Line, family: int) -> Sysctl:
    key, sep, value = line.text.partition("=")
    key, value = key.strip(), value.strip()
    if not sep or not key or not value or " " in key or not key.startswith("net/"):
        raise _fail(line, "expected 'net/…/KEY = VALUE'")
    if ".." in key.split("/"):
        raise _fail(line, "'..' in a sysctl path")
    return Sysctl(key=key, value=value)


PARSERS: dict[str, tuple[str, Callable[[Line, int], Any]]] = {
    "ipset.rules": ("ipsets", parse_ipset),
    "iptables.rules": ("iptables", parse_iptables),
    "ip-rules.rules": ("ip_rules", parse_ip_rule),
    "routes.rules": ("routes", parse_route),
    "links.rules": ("links", parse_link),
    "sysctls.rules": ("sysctls", parse_sysctl),
}
# the per-pod lines' checked quick parses (text -> object, or None: the parser above decides)
QUICK_PARSERS: dict[str, Callable[[str], Any]] = {
    "ipset.rules": quick_ipset,
    "routes.rules": quick_route,
}


def render_family(family_dir: str, ctx: dict[str, Any], role: str,
                  families: Iterable[int] = (4,), base: Optional[Path] = None) -> NetnsState:
    """Expand every rule file of one folder into a NetnsState.

    Files that can differ per IP family (iptables) are expanded once per family with
    ``family``, ``LO`` and ``PROBE`` set accordingly by the caller's ``ctx['per_family']``.
    """
    base = base or rules_dir()
    folder = base / family_dir
    if not folder.is_dir():
        raise RenderError(f"no rule folder {folder}")
    found: dict[str, list] = {k: [] for k in ("ipsets", "ipset_entries", "iptables", "ip_rules",
                                              "routes", "links", "sysctls")}
    for fname in sorted(os.listdir(folder)):
        if not fname.endswith(".rules"):
            continue
        if fname not in PARSERS:
            raise RenderError(f"{folder / fname}: unknown rule file (expected one of {', '.join(PARSERS)})")
        kind, parser = PARSERS[fname]
        quick = QUICK_PARSERS.get(fname)
        text = (folder / fname).read_text(encoding="utf-8")
        rel = f"rules/{family_dir}/{fname}"
        fams = tuple(families) if kind == "iptables" else (4,)
        for fam in fams:
            fctx = dict(ctx)
            fctx.update(ctx.get("per_family", {}).get(fam, {}))
            fctx["family"] = fam
            try:
                lines = expand_texts(text, rel, fctx)
            except TemplateError as e:
                raise RenderError(str(e)) from None
            objs, entries = found[kind], found["ipset_entries"]
            for lineno, line_text in lines:
                obj = quick(line_text) if quick else None
                if obj is None:
                    obj = parser(Line(rel, lineno, line_text), fam)
                if type(obj) is IpsetEntry:
                    entries.append(obj)
                else:
                    objs.append(obj)
    return NetnsState(role=role, **{k: tuple(v) for k, v in found.items()})


# ---------------------------------------------------------------- iptables text forms


def chain_bodies(rules: Iterable[IptRule]) -> dict[tuple[str, str], list[IptRule]]:
    """Rules grouped by (table, chain) in their final order: ``-I [N]`` inserts (at the top by
    default), ``-A`` appends — the order iptables-save shows and rule ids number."""
    chains: dict[tuple[str, str], list[IptRule]] = {}
    for r in rules:
        body = chains.setdefault((r.table, r.chain), [])
        if r.op.startswith("-I"):
            _, _, pos = r.op.partition(" ")
            body.insert(int(pos) - 1 if pos else 0, r)
        else:
            body.append(r)
    return chains


def _tables_in(rules: Iterable[IptRule]) -> list[str]:
    present = {r.table for r in rules}
    return [t for t in names.TABLE_ORDER if t in present]


def declared_chains(rules: list[IptRule], table: str) -> list[str]:
    """Upstream's -N derivation: pass A (chains appended to), then pass B (jump targets)."""
    seen: list[str] = []
    for r in rules:
        if r.table == table and r.chain not in names.BUILTIN_TARGETS and r.chain not in seen:
            seen.append(r.chain)
    for r in rules:
        toks = r.args.split()
        if (r.table == table and len(toks) >= 2 and toks[-2] == "-j"
                and toks[-1] not in names.BUILTIN_TARGETS and toks[-1] not in seen):
            seen.append(toks[-1])
    return seen


def restore_text(rules: Iterable[IptRule]) -> str:
    """The restore input exactly as Istio's builder writes it (inpod-mode.md §2.3)."""
    rules = list(rules)
    out: list[str] = []
    for table in sorted({r.table for r in rules}):
        out.append(f"* {table}")
        out += [f"-N {c}" for c in declared_chains(rules, table)]
        out += [r.restore_line() for r in rules if r.table == table]
        out.append("COMMIT")
    return "".join(line + "\n" for line in out)


def save_text(rules: Iterable[IptRule], tables: Optional[Iterable[str]] = None) -> str:
    """What iptables-save shows for these rules alone: user chains declared and sorted, rules
    grouped by chain (built-in chains in kernel order first, then user chains by name), order
    within a chain as issued (``-I`` lands on top). Built-in policy lines are omitted."""
    rules = list(rules)
    out: list[str] = []
    for table in (tables or _tables_in(rules)):
        trules = [r for r in rules if r.table == table]
        builtins = names.BUILTIN_CHAINS[table]
        chains: dict[str, list[str]] = {}
        for r in trules:
            chains.setdefault(r.chain, [])
        for c in declared_chains(trules, table):
            chains.setdefault(c, [])
        for r in trules:
            body = chains[r.chain]
            if r.op.startswith("-I"):
                pos = int(r.op.split()[1]) - 1 if " " in r.op else 0
                body.insert(pos, r.args)
            else:
                body.append(r.args)
        user = sorted(c for c in chains if c not in builtins)
        out.append(f"*{table}")
        out += [f":{c} - [0:0]" for c in user]
        for c in [b for b in builtins if b in chains] + user:
            out += [f"-A {c} {a}" for a in chains[c]]
        out.append("COMMIT")
    return "".join(line + "\n" for line in out)


# ---------------------------------------------------------------- whole-netns text


def sort_routes(routes: Iterable[Route]) -> list[Route]:
    """The order ``ip route show table N`` lists them: by destination, longer prefix first."""
    def key(r: Route):
        net = ipaddress.ip_network(r.dst)
        return (r.family, int(net.network_address), -net.prefixlen, r.type)
    return sorted(routes, key=key)


def show_netns(ns: NetnsState, kinds: Optional[Iterable[str]] = None, iptables_form: str = "save") -> str:
    kinds = tuple(kinds or ("ipsets", "iptables", "ip_rules", "routes", "links", "sysctls"))
    out: list[str] = []

    def section(title: str, lines: list[str]) -> None:
        out.append(f"## {title}")
        out.extend(lines if lines else ["(none)"])
        out.append("")

    if "ipsets" in kinds:
        section("ipsets (ipset save)", [s.show() for s in ns.ipsets] + [e.show() for e in ns.ipset_entries])
    if "iptables" in kinds:
        for fam in sorted({r.family for r in ns.iptables}) or [4]:
            rules = ns.rules_for(fam)
            cmd = "iptables" if fam == 4 else "ip6tables"
            if iptables_form == "restore":
                section(f"{cmd} ({cmd}-restore input)", restore_text(rules).splitlines())
            else:
                section(f"{cmd} ({cmd}-save)", save_text(rules).splitlines())
    # IPv6 rules and routes print exactly like their v4 twins, so they get their own sections
    if "ip_rules" in kinds:
        section("ip rules (ip rule show)", [r.show() for r in sorted(ns.ip_rules) if r.family == 4])
        v6_rules = [r.show() for r in sorted(ns.ip_rules) if r.family == 6]
        if v6_rules:
            section("ip rules (ip -6 rule show)", v6_rules)
    if "routes" in kinds:
        for fam, cmd in ((4, "ip route"), (6, "ip -6 route")):
            froutes = [r for r in ns.routes if r.family == fam]
            if fam == 6 and not froutes:
                continue
            lines: list[str] = []
            for table in sorted({r.table for r in froutes}):
                lines.append(f"table {table}:")
                lines += [f"  {r.show()}" for r in sort_routes(r for r in froutes if r.table == table)]
            section(f"routes ({cmd} show table N)", lines)
    if "links" in kinds:
        section("links", [link.show() for link in ns.links])
    if "sysctls" in kinds:
        section("sysctls", [s.show() for s in ns.sysctls])
    return "\n".join(out).rstrip("\n") + "\n"


def show(rendered: Rendered, roles: Optional[Iterable[str]] = None,
         kinds: Optional[Iterable[str]] = None, iptables_form: str = "save") -> str:
    parts = []
    for ns in rendered.netns:
        if roles and ns.role not in roles and ns.role.split(":")[0] not in roles:
            continue
        parts.append(f"# netns {ns.role} ({rendered.mode} mode, Istio {rendered.version})\n"
                     + show_netns(ns, kinds, iptables_form))
    return "\n".join(parts)


def to_json(rendered: Rendered) -> dict[str, Any]:
    from dataclasses import asdict

    def ns_json(ns: NetnsState) -> dict[str, Any]:
        d = {k: [asdict(o) for o in getattr(ns, k)] for k in
             ("ipsets", "ipset_entries", "ip_rules", "routes", "links", "sysctls")}
        d["iptables"] = [dict(asdict(r), line=r.restore_line()) for r in ns.iptables]
        d["iptables_save"] = {str(f): save_text(ns.rules_for(f)) for f in sorted({r.family for r in ns.iptables})}
        d["role"] = ns.role
        return d

    return {"mode": rendered.mode, "istio_version": str(rendered.version),
            "netns": [ns_json(ns) for ns in rendered.netns],
            **({"nft": {role: text for role, text in rendered.nft}} if rendered.nft else {})}
