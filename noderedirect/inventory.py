"""One netns's kernel objects as labelled items, by kind: what ``diff`` compares and ``summary`` counts.

This module decides what counts as ONE object of each kind, so a diff and a count can never
disagree. iptables content is split three ways: the owned chains, the hooks (jumps from a
built-in chain into an owned chain) and every other rule. Each item carries the text the
kernel's own tools would show, prefixed where a kind spans several tables (``mangle``,
``table 100:``) and with ``ip6`` for IPv6, so equal text means the same object. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import names
from .model import IptRule, NetnsState
from .render import declared_chains, sort_routes

# in display order; the keys of every diff and summary
KINDS = ("ipsets", "ipset_entries", "chains", "hooks", "rules", "ip_rules", "routes", "links",
         "sysctls")
LABELS = {
    "ipsets": "ipsets",
    "ipset_entries": "ipset entries",
    "chains": "owned chains",
    "hooks": "hooks",
    "rules": "iptables rules",
    "ip_rules": "ip rules",
    "routes": "routes",
    "links": "links",
    "sysctls": "sysctls",
}


@dataclass(frozen=True, order=True)
class Item:
    """One kernel object. ``group`` is where it lives inside its kind: the table of a chain or
    hook, ``TABLE CHAIN`` of a rule (rules are diffed per chain), the route table of a route."""

    kind: str
    group: str
    text: str


def _table_label(table: str, family: int) -> str:
    return table if family == 4 else f"ip6 {table}"


def _ipt_items(rules: tuple[IptRule, ...]) -> dict[str, list[Item]]:
    out: dict[str, list[Item]] = {"chains": [], "hooks": [], "rules": []}
    for fam in sorted({r.family for r in rules}):
        frules = [r for r in rules if r.family == fam]
        for table in names.TABLE_ORDER:
            trules = [r for r in frules if r.table == table]
            if not trules:
                continue
            tl = _table_label(table, fam)
            # owned only: the restore builder's pass B would also "declare" an extension target
            # written last without options (``-j LOG``), which is no chain at all
            out["chains"] += [Item("chains", tl, f"{tl} {c}") for c in declared_chains(trules, table)
                              if names.is_owned_chain(c)]
            for r in trules:
                # restore_line keeps the operation: "-I POSTROUTING 1" and "-A POSTROUTING" are
                # different objects (in-pod 1.27 moved its host hook to the top)
                if r.is_hook:
                    out["hooks"].append(Item("hooks", tl, f"{tl} {r.restore_line()}"))
                else:
                    out["rules"].append(Item("rules", f"{tl} {r.chain}", f"{tl} {r.restore_line()}"))
    return out


def items(ns: NetnsState) -> dict[str, tuple[Item, ...]]:
    """Every object of ``ns`` by kind (all of :data:`KINDS`, possibly empty), in a stable order:
    issue order for iptables, ``ip rule``/``ip route`` order for rules and routes."""
    out: dict[str, list[Item]] = {k: [] for k in KINDS}
    out["ipsets"] = [Item("ipsets", "", s.show()) for s in ns.ipsets]
    out["ipset_entries"] = [Item("ipset_entries", e.set, e.show()) for e in ns.ipset_entries]
    out.update(_ipt_items(ns.iptables))
    for r in sorted(ns.ip_rules, key=lambda r: (r.family, r.priority)):
        prefix = "" if r.family == 4 else "ip6 "
        out["ip_rules"].append(Item("ip_rules", prefix.strip(), prefix + r.show().replace("\t", " ")))
    for fam in sorted({r.family for r in ns.routes}):
        for table in sorted({r.table for r in ns.routes if r.family == fam}):
            group = f"table {table}" if fam == 4 else f"ip6 table {table}"
            for r in sort_routes(r for r in ns.routes if r.family == fam and r.table == table):
                out["routes"].append(Item("routes", group, f"{group}: {r.show()}"))
    out["links"] = [Item("links", "", link.show()) for link in ns.links]
    out["sysctls"] = [Item("sysctls", "", s.show()) for s in ns.sysctls]
    return {k: tuple(v) for k, v in out.items()}


def counts(ns: NetnsState) -> dict[str, int]:
    """Number of objects per kind, plus ``iptables``: every rule including the hooks."""
    its = items(ns)
    c = {k: len(its[k]) for k in KINDS}
    c["iptables"] = c["hooks"] + c["rules"]
    return c
