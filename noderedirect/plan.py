"""Desired vs observed -> an ordered, human-readable plan (pure).

The plan says, per network namespace and object kind, exactly what apply will change and why
("missing", "drifted: was …", "stale", "duplicate"), plus the iptables-restore text per table
(and per family: ip6tables-restore for the IPv6 copy) that makes the iptables part of it one
atomic call per table.

Ownership (what we may change) is decided here, from the kernel alone:
- iptables: chains named ``ztunnel-*``/``ISTIO_*``; jumps from built-in chains into them; and
  in the legacy ztunnel netns the four TPROXY/MARK rules in built-in mangle PREROUTING,
  recognised by their interfaces (``pistioin``/``pistioout``) or the org-src mark.
- ipsets named as in names.OWNED_IPSETS; links named as in names.OWNED_LINKS.
- ip rules at the design's priorities and routes in the design's tables — but only once the
  netns is ours (an anchor object exists). Before that, anything found there is a conflict and
  apply refuses before changing anything. A rule at our priority with selectors we never
  render (from/to/iif …) is always a conflict.
Foreign objects are never part of a plan, so apply cannot touch them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, NamedTuple, Optional, Sequence

from . import names
from .model import IpRule, IpsetEntry, IpsetSet, IptRule, Link, NetnsState, Route, Sysctl
from .render import declared_chains

# above this share of changed members a set is rebuilt in a twin and swapped in atomically
REBUILD_SHARE = 0.5
TMP_SUFFIX = "-tmp"


@dataclass(frozen=True)
class ObservedRule:
    """An ip rule as found: ``plain`` is False when it has selectors we never render."""
    rule: IpRule
    plain: bool = True
    text: str = ""


@dataclass(frozen=True)
class Observation:
    """What the planner needs to know about one netns (filled by observe.py + the tunnel driver)."""
    role: str
    ipsets: tuple[IpsetSet, ...] = ()
    ipset_entries: tuple[IpsetEntry, ...] = ()
    iptables: tuple[IptRule, ...] = ()                 # all rules, all tables, in chain order
    chains: frozenset = frozenset()                    # declared (table, chain) pairs, IPv4
    chains6: frozenset = frozenset()                   # the same for IPv6 (ip6tables-save)
    ip_rules: tuple[ObservedRule, ...] = ()
    routes: tuple[Route, ...] = ()                     # every route in the design's tables
    links: tuple[Link, ...] = ()                       # our link names only, as the driver sees them
    sysctls: tuple[Sysctl, ...] = ()                   # the keys the design sets (value None = absent)


@dataclass(frozen=True)
class Change:
    role: str
    kind: str            # link | sysctl | ipset | iptables | route | ip_rule
    action: str          # add | delete | replace | set | create | rewrite | destroy | rebuild | hook | unhook
    desc: str
    reason: str = ""
    obj: Any = None
    old: Any = None

    def line(self) -> str:
        why = f"  ({self.reason})" if self.reason else ""
        return f"{self.role:<8} {self.kind:<8} {self.action:<8} {self.desc}{why}"


class Restore(NamedTuple):
    """One atomic ``iptables-restore --noflush`` call (``ip6tables-restore`` for family 6)."""
    family: int
    table: str
    text: str


@dataclass(frozen=True)
class NetnsPlan:
    role: str
    changes: tuple[Change, ...] = ()
    conflicts: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    restore: tuple[Restore, ...] = ()           # one per (family, table), IPv4 first
    ipset_script: str = ""                      # ipset restore text (adds, dels, create, swap)

    def of(self, kind: str) -> list[Change]:
        return [c for c in self.changes if c.kind == kind]


@dataclass(frozen=True)
class Plan:
    netns: tuple[NetnsPlan, ...] = field(default_factory=tuple)

    @property
    def changes(self) -> list[Change]:
        return [c for ns in self.netns for c in ns.changes]

    @property
    def conflicts(self) -> list[str]:
        return [c for ns in self.netns for c in ns.conflicts]

    @property
    def warnings(self) -> list[str]:
        return [w for ns in self.netns for w in ns.warnings]

    @property
    def empty(self) -> bool:
        return not self.changes

    def text(self) -> str:
        out = [c.line() for c in self.changes]
        out += [f"CONFLICT {c}" for c in self.conflicts]
        out += [f"warning  {w}" for w in self.warnings]
        if not out:
            return "no changes\n"
        return "\n".join(out) + "\n"

    def get(self, role: str) -> NetnsPlan:
        for ns in self.netns:
            if ns.role == role:
                return ns
        raise KeyError(role)


@dataclass(frozen=True)
class Ownership:
    """What a design owns in one netns, by number (see module docstring)."""
    rule_prios: tuple[int, ...]
    tables: tuple[int, ...]
    rule_marks: frozenset = frozenset()          # fwmark values our rules at those priorities use
    builtin_markers: tuple[str, ...] = ()        # text that marks our rules in built-in chains


def ownership(role: str, mode: str = "legacy") -> Ownership:
    if mode == "legacy" and role == "node":
        return Ownership(names.LEGACY_NODE_RULE_PRIOS, names.LEGACY_NODE_TABLES,
                         frozenset({names.MARK_SKIP, names.MARK_OUTBOUND, names.MARK_PROXYRET}))
    if mode == "legacy" and role == "ztunnel":
        return Ownership(names.LEGACY_ZTUNNEL_RULE_PRIOS, names.LEGACY_ZTUNNEL_TABLES,
                         frozenset({names.ZT_MARK_TPROXY, names.ZT_MARK_ORGSRC}),
                         (f"-i {names.PLINK_IN} ", f"-i {names.PLINK_OUT} ",
                          f"--set-xmark {names.hexmark(names.ZT_MARK_ORGSRC)}/{names.hexmark(names.ZT_MARK_MASK)}"))
    if mode == "inpod":
        prios = (names.INPOD_PRIO,) if role.startswith("pod:") else ()
        tables = (names.INPOD_TABLE,) if role.startswith("pod:") else ()
        return Ownership(prios, tables, frozenset({names.INPOD_TPROXY_MARK}))
    raise ValueError(f"no ownership rules for {mode} {role}")


# ---------------------------------------------------------------- helpers


def _is_owned_builtin_rule(r: IptRule, own: Ownership) -> bool:
    args = r.args + " "
    return any(m in args for m in own.builtin_markers)


def holds(obs: Observation, own: Ownership) -> bool:
    """Does this netns already carry our anchors (so its tables/priorities are ours)?"""
    if obs.ipsets or obs.links:
        return True
    if any(names.is_owned_chain(c) for _, c in obs.chains | obs.chains6):
        return True
    return any(_is_owned_builtin_rule(r, own) for r in obs.iptables
               if r.chain in names.BUILTIN_CHAINS.get(r.table, ()))


def family_tag(family: int) -> str:
    """How a plan line marks the IPv6 copy of a rule, route or chain (as ``ip -6``/``iptables -6``
    do); IPv4 is unmarked, so IPv4-only plans read as they always did."""
    return "-6 " if family == 6 else ""


def _rule_desc(r: IpRule) -> str:
    return family_tag(r.family) + r.show().replace(":\t", ": ")


# ---------------------------------------------------------------- per kind


def plan_links(role: str, want: Sequence[Link], have: Sequence[Link]) -> list[Change]:
    out: list[Change] = []
    have_by = {l.name: l for l in have}
    want_names = {l.name for l in want}
    for l in want:
        cur = have_by.get(l.name)
        if cur is None:
            out.append(Change(role, "link", "create", l.show(), "missing", obj=l))
        elif cur != l:
            out.append(Change(role, "link", "replace", l.show(), f"drifted: was {cur.show()}", obj=l, old=cur))
    for name, cur in sorted(have_by.items()):
        if name not in want_names:
            out.append(Change(role, "link", "delete", cur.show(), "stale", old=cur))
    return out


def plan_sysctls(role: str, want: Sequence[Sysctl], have: Sequence[Sysctl]) -> list[Change]:
    have_by = {s.key: s.value for s in have}
    out = []
    for s in want:
        cur = have_by.get(s.key)
        if cur != s.value:
            reason = "missing" if cur is None else f"drifted: was {cur}"
            out.append(Change(role, "sysctl", "set", s.show(), reason, obj=s,
                              old=Sysctl(s.key, cur) if cur is not None else None))
    return out


def plan_ipsets(role: str, want_sets: Sequence[IpsetSet], want_entries: Sequence[IpsetEntry],
                have_sets: Sequence[IpsetSet], have_entries: Sequence[IpsetEntry]) -> tuple[list[Change], str]:
    """Changes plus one script for ``ipset -exist restore``. A re-specified or heavily changed set
    is built in a twin and swapped in, so readers never see it half-filled; small changes are
    per entry. Stale sets are only listed: apply destroys them after the rules that use them."""
    out: list[Change] = []
    script: list[str] = []
    have_set_by = {s.name: s for s in have_sets}
    want_set_names = {s.name for s in want_sets}
    for s in want_sets:
        want = {e.ip: e for e in want_entries if e.set == s.name}
        have = {e.ip: e for e in have_entries if e.set == s.name}
        cur = have_set_by.get(s.name)
        add = [e for ip, e in want.items() if ip not in have]
        delete = [e for ip, e in have.items() if ip not in want]
        recomment = [e for ip, e in want.items() if ip in have and have[ip].comment != e.comment]
        churn = len(add) + len(delete) + len(recomment)
        rebuild = cur is None or cur != s or (have and churn > REBUILD_SHARE * max(len(have), 1) and churn > 8)
        if cur is None:
            out.append(Change(role, "ipset", "create", f"{s.show()} ({len(want)} entries)", "missing", obj=s))
            script.append(s.show())
            script += [e.show() for e in want.values()]
            continue
        if rebuild:
            reason = f"drifted: was {cur.show()}" if cur != s else f"{churn} of {len(have)} members change"
            tmp = IpsetSet(**{**s.__dict__, "name": s.name + TMP_SUFFIX})
            out.append(Change(role, "ipset", "rebuild", f"{s.show()} ({len(want)} entries, swapped in)",
                              reason, obj=s, old=cur))
            script.append(tmp.show())
            script.append(f"flush {tmp.name}")          # a twin left by an interrupted apply
            script += [IpsetEntry(tmp.name, e.ip, e.comment).show() for e in want.values()]
            script.append(f"swap {tmp.name} {s.name}")
            script.append(f"destroy {tmp.name}")
            continue
        for e in add:
            out.append(Change(role, "ipset", "add", e.show(), "missing", obj=e))
            script.append(e.show())
        for e in recomment:
            out.append(Change(role, "ipset", "replace", e.show(),
                              f"drifted: comment was {have[e.ip].comment!r}", obj=e, old=have[e.ip]))
            script.append(e.show())                     # with -exist, add replaces the comment
        for e in delete:
            out.append(Change(role, "ipset", "delete", f"del {e.set} {e.ip}", "stale", old=e))
            script.append(f"del {e.set} {e.ip}")
    for name, cur in sorted(have_set_by.items()):
        if name not in want_set_names:
            out.append(Change(role, "ipset", "destroy", cur.show(), "stale", old=cur))
    text = "".join(l + "\n" for l in script if l)
    return out, text


def plan_routes(role: str, want: Sequence[Route], have: Sequence[Route]) -> list[Change]:
    out = []
    have_set = Counter(have)
    # a route with the same destination in the same table but other attributes is drift: the
    # first such route in kernel order, found by key (a scan per route was quadratic)
    first_by_key: dict[tuple[int, str, str], Route] = {}
    for h in have:
        first_by_key.setdefault((h.table, h.dst, h.type), h)
    for r in want:
        if have_set[r] == 0:
            old = first_by_key.get((r.table, r.dst, r.type))
            reason = f"drifted: was {old.show()}" if old else "missing"
            out.append(Change(role, "route", "replace" if old else "add",
                              family_tag(r.family) + r.show_with_table(), reason, obj=r, old=old))
    replaced = {c.old for c in out if c.old is not None}
    want_set = set(want)
    for h in have:
        if h not in want_set and h not in replaced:
            out.append(Change(role, "route", "delete", family_tag(h.family) + h.show_with_table(), "stale", old=h))
    return out


def plan_ip_rules(role: str, want: Sequence[IpRule], have: Sequence[ObservedRule],
                  own: Ownership) -> tuple[list[Change], list[str]]:
    out: list[Change] = []
    conflicts: list[str] = []
    ours = [o for o in have if o.rule.priority in own.rule_prios]
    for o in ours:
        if not o.plain:
            conflicts.append(f"{role}: ip rule '{o.text or _rule_desc(o.rule)}' sits at priority "
                             f"{o.rule.priority}, which this design uses, and is not one of ours")
    counts = Counter(o.rule for o in ours if o.plain)
    for r in want:
        if counts[r] == 0:
            out.append(Change(role, "ip_rule", "add", _rule_desc(r), "missing", obj=r))
        elif counts[r] > 1:
            for _ in range(counts[r] - 1):
                out.append(Change(role, "ip_rule", "delete", _rule_desc(r), "duplicate", old=r))
    want_set = set(want)
    for o in ours:
        if o.plain and o.rule not in want_set:
            out.append(Change(role, "ip_rule", "delete", _rule_desc(o.rule), "stale", old=o.rule))
    return out, conflicts


def plan_iptables(role: str, want: Sequence[IptRule], have: Sequence[IptRule],
                  have_chains: Iterable[tuple[str, str]], own: Ownership,
                  family: int = 4) -> tuple[list[Change], list[Restore], list[str]]:
    """Chain-level diff -> changes, one restore text per table, warnings (one family:
    ``have_chains`` are that family's declared chains).

    Owned chains whose content differs are rewritten whole (``:chain - [0:0]`` flushes it in
    --noflush mode); unchanged chains are not mentioned, so their counters survive.
    """
    changes: list[Change] = []
    restores: list[Restore] = []
    tag = family_tag(family)
    warnings: list[str] = []
    want = [r for r in want if r.family == family]
    have = [r for r in have if r.family == family]
    have_chains = set(have_chains)
    tables = [t for t in names.TABLE_ORDER
              if any(r.table == t for r in want)
              or any(tb == t and names.is_owned_chain(c) for tb, c in have_chains)
              or any(r.table == t and (r.is_hook or _is_owned_builtin_rule(r, own)) for r in have)]
    for table in tables:
        w = [r for r in want if r.table == table]
        h = [r for r in have if r.table == table]
        builtins = names.BUILTIN_CHAINS[table]
        want_chains = [c for c in declared_chains(w, table) if names.is_owned_chain(c)]
        want_body = {c: [r.args for r in w if r.chain == c and r.op == "-A"] for c in want_chains}
        have_owned = sorted(c for tb, c in have_chains if tb == table and names.is_owned_chain(c))
        have_body = {c: [r.args for r in h if r.chain == c] for c in have_owned}
        pre: list[str] = []      # chain declarations
        body: list[str] = []     # -D / -A / -I / -X lines
        post: list[str] = []

        # owned chains: create / rewrite / delete
        for c in want_chains:
            if c not in have_body:
                changes.append(Change(role, "iptables", "create",
                                      f"{tag}{table} chain {c} ({len(want_body[c])} rules)", "missing"))
            elif have_body[c] != want_body[c]:
                changes.append(Change(role, "iptables", "rewrite", f"{tag}{table} chain {c}",
                                      _chain_drift(have_body[c], want_body[c])))
            else:
                continue
            pre.append(f":{c} - [0:0]")
            body += [f"-A {c} {a}" for a in want_body[c]]
        stale_chains = [c for c in have_owned if c not in want_body]

        # hooks: every wanted jump exactly once; none to stale chains
        want_hooks = [r for r in w if r.is_hook]
        for r in want_hooks:
            present = [x for x in h if x.chain == r.chain and x.args == r.args]
            if not present:
                changes.append(Change(role, "iptables", "hook", f"{tag}{table} -I {r.chain} 1 {r.args}",
                                      "missing"))
                post.append(f"-I {r.chain} 1 {r.args}")
            for _ in present[1:]:
                changes.append(Change(role, "iptables", "unhook", f"{tag}{table} -D {r.chain} {r.args}",
                                      "duplicate"))
                body.insert(0, f"-D {r.chain} {r.args}")
            if present:
                first = next(x for x in h if x.chain == r.chain)
                if first.args != r.args:
                    warnings.append(f"{role}: {tag}{table} {r.chain}: our jump to {r.target} is not first "
                                    f"(below '{first.args}'); traffic that rule accepts skips ours")
        want_hook_keys = {(r.chain, r.args) for r in want_hooks}
        for x in h:
            if x.chain in builtins and x.is_hook and (x.chain, x.args) not in want_hook_keys:
                changes.append(Change(role, "iptables", "unhook", f"{tag}{table} -D {x.chain} {x.args}", "stale"))
                body.insert(0, f"-D {x.chain} {x.args}")

        # our rules inside built-in chains (legacy ztunnel netns): exact sequence at the top
        for chain in builtins:
            want_in = [r.args for r in w if r.chain == chain and not r.is_hook]
            have_in = [x.args for x in h if x.chain == chain and not x.is_hook and _is_owned_builtin_rule(x, own)]
            if not want_in and not have_in:
                continue
            chain_rules = [x.args for x in h if x.chain == chain]
            ok = have_in == want_in and _contiguous(chain_rules, want_in)
            if ok:
                continue
            reason = "missing" if not have_in else _chain_drift(have_in, want_in)
            changes.append(Change(role, "iptables", "rewrite", f"{tag}{table} {chain}: our {len(want_in)} rules",
                                  reason))
            for a in have_in:
                body.insert(0, f"-D {chain} {a}")
            post += [f"-I {chain} {i + 1} {a}" for i, a in enumerate(want_in)]

        for c in stale_chains:
            changes.append(Change(role, "iptables", "destroy", f"{tag}{table} chain {c}", "stale"))
            pre.append(f":{c} - [0:0]")
            post.append(f"-X {c}")
        lines = pre + body + post
        if lines:
            restores.append(Restore(family, table, f"*{table}\n" + "".join(l + "\n" for l in lines) + "COMMIT\n"))
    return changes, restores, warnings


def _contiguous(chain: list[str], seq: list[str]) -> bool:
    n = len(seq)
    return any(chain[i:i + n] == seq for i in range(len(chain) - n + 1)) if n else True


def _chain_drift(have: list[str], want: list[str]) -> str:
    missing = [a for a in want if a not in have]
    extra = [a for a in have if a not in want]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing, first: {missing[0]}")
    if extra:
        parts.append(f"{len(extra)} unexpected, first: {extra[0]}")
    if not parts:
        parts.append("same rules in another order")
    return "drifted: " + "; ".join(parts)


# ---------------------------------------------------------------- whole netns


def plan_netns(want: NetnsState, obs: Observation, own: Ownership, *, families: Sequence[int] = (4,),
               anchored: bool = False) -> NetnsPlan:
    """``anchored``: the netns is known to be ours by an anchor ``obs`` cannot show (the nft
    backend's table), so routes and rules at our numbers are ours, not conflicts."""
    role = want.role
    changes: list[Change] = []
    conflicts: list[str] = []
    warnings: list[str] = []

    owned_routes = [r for r in obs.routes if r.table in own.tables]
    if not (anchored or holds(obs, own)):
        for o in obs.ip_rules:
            if o.rule.priority in own.rule_prios and o.rule not in set(want.ip_rules):
                conflicts.append(f"{role}: ip rule priority {o.rule.priority} is already used by "
                                 f"'{o.text or _rule_desc(o.rule)}' (not ours)")
        want_routes = set(want.routes)
        foreign = [r for r in owned_routes if r not in want_routes]
        for t in sorted({r.table for r in foreign}):
            first = next(r for r in foreign if r.table == t)
            conflicts.append(f"{role}: route table {t} is already used ('{first.show()}' and "
                             f"{sum(1 for r in foreign if r.table == t) - 1} more; not ours)")

    changes += plan_links(role, want.links, obs.links)
    changes += plan_sysctls(role, want.sysctls, obs.sysctls)
    ich, script = plan_ipsets(role, want.ipsets, want.ipset_entries, obs.ipsets, obs.ipset_entries)
    changes += ich
    restores: list[Restore] = []
    for fam in families:
        have_chains = obs.chains if fam == 4 else obs.chains6
        c, r, w = plan_iptables(role, want.iptables, obs.iptables, have_chains, own, fam)
        changes += c
        restores += r
        warnings += w
    changes += plan_routes(role, want.routes, owned_routes)
    rch, rconf = plan_ip_rules(role, want.ip_rules, obs.ip_rules, own)
    changes += rch
    conflicts += rconf
    return NetnsPlan(role=role, changes=tuple(changes), conflicts=tuple(conflicts),
                     warnings=tuple(warnings), restore=tuple(restores), ipset_script=script)


def plan(wants: Sequence[NetnsState], observations: Sequence[Observation], mode: str = "legacy") -> Plan:
    obs_by = {o.role: o for o in observations}
    return Plan(tuple(plan_netns(w, obs_by.get(w.role, Observation(w.role)), ownership(w.role, mode))
                      for w in wants))


def removal(obs: Observation, own: Ownership, *, sysctl_restore: Optional[Sequence[Sysctl]] = None,
            families: Sequence[int] = (4,)) -> NetnsPlan:
    """What cleanup removes: the plan towards an empty desired state (foreign objects untouched),
    for the iptables families in ``families`` (``obs`` read with the same ones)."""
    empty = NetnsState(role=obs.role)
    p = plan_netns(empty, obs, own, families=families)
    changes = [c for c in p.changes]
    for s in sysctl_restore or ():
        changes.append(Change(obs.role, "sysctl", "set", s.show(), "restore the value from before apply", obj=s))
    # conflicts do not block cleanup: with nothing desired we only delete what is ours
    return NetnsPlan(role=p.role, changes=tuple(changes), warnings=p.warnings, restore=p.restore,
                     ipset_script=p.ipset_script)
