"""Checks every rendering must pass, whatever the templates say (pure).

A template bug should fail loudly at render time, never reach the kernel:
- every ``-j``/``-g`` target is a built-in target, an iptables extension target, or a chain
  the same table declares;
- every ``--match-set`` names a set the same netns renders (or, for nft, defines);
- every owned chain is used: jumped to from somewhere in its table;
- every ``lookup`` of an ip rule points at a table that has routes (or main/local/default);
- every route and rule uses the family it was rendered for.
"""

from __future__ import annotations

from typing import Iterable

from . import names
from .model import NetnsState, Rendered
from .render import declared_chains

# targets provided by iptables extensions that our designs use
EXTENSION_TARGETS = frozenset({"MARK", "CONNMARK", "TPROXY", "DNAT", "SNAT", "REDIRECT", "CT",
                               "MASQUERADE", "LOG", "REJECT"})
SYSTEM_TABLES = {253, 254, 255}   # default, main, local


class ConsistencyError(Exception):
    pass


def problems(ns: NetnsState) -> list[str]:
    out: list[str] = []
    sets = {s.name for s in ns.ipsets}
    for fam in sorted({r.family for r in ns.iptables}):
        rules = ns.rules_for(fam)
        for table in sorted({r.table for r in rules}):
            trules = [r for r in rules if r.table == table]
            declared = set(declared_chains(trules, table)) | set(names.BUILTIN_CHAINS[table])
            filled = {r.chain for r in trules}
            jumped = set()
            for r in trules:
                t = r.target
                if t is None:
                    out.append(f"{ns.role}: {table} {r.chain}: rule has no target: {r.args}")
                    continue
                jumped.add(t)
                if t not in names.BUILTIN_TARGETS and t not in EXTENSION_TARGETS and t not in declared:
                    out.append(f"{ns.role}: {table} {r.chain}: jump to undeclared chain {t}")
                elif (names.is_owned_chain(t) and t not in filled
                      and (table, t) not in names.EMPTY_CHAINS_ALLOWED):
                    out.append(f"{ns.role}: {table} {r.chain}: jump to chain {t}, which has no rules "
                               f"(missing chain?)")
                toks = r.args.split()
                for i, tok in enumerate(toks):
                    if tok == "--match-set" and i + 1 < len(toks) and toks[i + 1] not in sets:
                        out.append(f"{ns.role}: {table} {r.chain}: --match-set {toks[i + 1]} is not rendered here")
            for chain in declared - set(names.BUILTIN_CHAINS[table]):
                if chain not in jumped:
                    out.append(f"{ns.role}: {table} chain {chain} is declared but never jumped to")
                if not names.is_owned_chain(chain):
                    out.append(f"{ns.role}: {table} chain {chain} does not carry an owned prefix")
    tables = {r.table for r in ns.routes}
    for rule in ns.ip_rules:
        if rule.action == "lookup" and rule.table not in tables and rule.table not in SYSTEM_TABLES:
            out.append(f"{ns.role}: rule {rule.priority} looks up table {rule.table}, which has no routes")
    for e in ns.ipset_entries:
        if e.set not in sets:
            out.append(f"{ns.role}: entry {e.ip} is for set {e.set}, which is not created")
    return out


def check(rendered: Rendered) -> None:
    found = [p for ns in rendered.netns for p in problems(ns)]
    if found:
        raise ConsistencyError("rendered rules are inconsistent:\n  " + "\n  ".join(found))


def check_all(items: Iterable[Rendered]) -> None:
    for r in items:
        check(r)
