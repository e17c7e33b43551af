"""Applying the legacy design with native nftables (``--backend nft``): desired table, live table,
what differs, and the one transaction that fixes it.

Owns, per legacy netns (node: ``table ip ztunnel-node``, ztunnel: ``table ip ztunnel-tproxy``):

- the desired table: :func:`noderedirect.nft.legacy_nft`'s script, plus the tunnel driver's
  outer-source check. The iptables backend adds that check as iptables rules
  (``driver.extra_rules()``: a ``ztunnel-TUNNEL`` chain hooked into filter INPUT); here it
  becomes two chains of our own table (``filter-INPUT`` → ``filter-ztunnel-TUNNEL``, rules
  T1…Tn), so this backend writes no iptables rule at all;
- reading our table back (``Host.nft_json``) and comparing it with the desired one;
- the plan's changes of kind ``nft`` and the single libnftables transaction per netns that
  carries them out (:func:`transaction`), and what cleanup removes (the table, nothing else).

There are no ipsets with this backend (the set lives in the table), so the planner is handed
the netns without ipsets and iptables rules (:func:`without_firewall`); routes, ip rules,
links and sysctls are planned exactly as for iptables.

How drift is found, from the kernel alone
-----------------------------------------
A process that just started has no memory of what it loaded, so the live table is compared
with the desired script every time. The two are not comparable as written: the kernel stores
bytecode, and libnftables turns it back into rules in its own way (it adds or drops protocol
dependencies, folds mark arithmetic, names priorities). Three ways were measured (this
kernel, nftables 1.0.6, the example node):

1. Text: print the live table with ``nft list`` and compare it with the script. About 1 ms,
   and it works because nft.py writes its scripts in ``nft list`` style. But it holds only
   for one nftables version's printer. A different wording would be reported as drift
   forever, and apply would then fail with "did not converge".
2. Parse the script to JSON without loading it. libnftables cannot do this: ``nft -c``
   checks a script but prints nothing, and ``--echo`` only reports what was really committed.
3. Let the kernel produce the canonical form: load the script into a throwaway, anonymous
   network namespace (:func:`noderedirect.host.nft_scratch_json`), list it as JSON, and
   compare that JSON with the live table's JSON. Both sides then come from the same kernel and
   the same libnftables, so any version compares exactly. It costs 15-30 ms per script
   (unshare itself about 1 ms; the rest is libnftables and the load). The result is cached per process, keyed by script text.

This module uses (3). Set elements change with every pod, so they are kept out of it: the
script loaded into the scratch namespace has an empty set (the *skeleton*). Elements are
compared by value (address and comment) straight from the live JSON, so enrolling a pod
never needs a new canonicalisation. The comparison is structural. Chains are compared by name
and header (type, hook, priority, policy). Rules are compared per chain, in order, keyed by
their comment id (P1…P15, Z1…Z4, ``hook``, T1…), with expressions compared exactly and
counter values ignored. The set declaration is compared, and so is anything else found in the
table. Nothing is ever loaded into the target netns for the comparison.

Applying
--------
Any difference other than set elements replaces the whole table with the full script. The
script itself does create-if-missing, delete, then define, so a failure anywhere leaves the
previous table untouched. When only elements differ, one transaction adds and deletes exactly
those elements, and the rule counters are kept. In both cases each netns gets exactly one
libnftables transaction.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

from . import names, nft
from .host import Host, HostError, NftError, nft_scratch_json
from .model import IptRule, NetnsState, Rendered
from .plan import Change

log = logging.getLogger(__name__)

FAMILY = names.NFT_FAMILY
TUNNEL_RULE_PREFIX = "T"
# the one rule shape the VXLAN driver's outer-source check uses (tunnels/vxlan.py)
_TUNNEL_CHECK = re.compile(r"^! -s (?P<ip>\d+\.\d+\.\d+\.\d+)/32 -p udp -m udp --dport (?P<port>\d+) -j DROP$")
_SHOWN_PROBLEMS = 3       # how many drift details a plan line names before "N more"


class NftPlanError(nft.NftTranslationError):
    """The desired table cannot be built for this netns (names the rule or chain)."""


# ---------------------------------------------------------------- values


@dataclass(frozen=True, order=True)
class Element:
    """One member of a set in our table."""
    set: str
    ip: str
    comment: Optional[str] = None

    def show(self) -> str:
        tail = f' comment "{self.comment}"' if self.comment is not None else ""
        return f"{self.set} {self.ip}{tail}"


@dataclass(frozen=True)
class DesiredTable:
    """Our table in one netns as it should be."""
    role: str
    table: str
    script: str                      # the full transaction: create-if-missing, delete, define
    skeleton: str                    # the same with empty sets: what gets canonicalised
    elements: tuple[Element, ...]

    @property
    def name(self) -> str:
        return f"table {FAMILY} {self.table}"


@dataclass(frozen=True)
class Shape:
    """A table's content without set elements, handles and counter values; every field is
    a JSON string so two shapes compare exactly."""
    chains: dict[str, str]                       # name -> header (type/hook/prio/policy or {})
    rules: dict[str, tuple[tuple[Optional[str], str], ...]]   # chain -> ((comment, expr), …)
    sets: dict[str, str]                         # name -> declaration
    others: tuple[str, ...] = ()                 # any other object kind found in the table

    @property
    def rule_count(self) -> int:
        return sum(len(r) for r in self.rules.values())


@dataclass(frozen=True)
class LiveTable:
    shape: Shape
    elements: tuple[Element, ...]


@dataclass(frozen=True)
class NftOp:
    """What one ``nft`` change runs: the whole-table script, or element statements."""
    text: str
    whole_table: bool = False


# ---------------------------------------------------------------- desired


def without_firewall(ns: NetnsState) -> NetnsState:
    """The netns as the generic planner sees it with this backend: no ipsets, no iptables."""
    return dataclasses.replace(ns, ipsets=(), ipset_entries=(), iptables=())


def _is_tunnel_rule(r: IptRule) -> bool:
    return r.chain == names.CHAIN_TUNNEL or r.target == names.CHAIN_TUNNEL


def _tunnel_blocks(role: str, rules: Sequence[IptRule]) -> list[str]:
    """The driver's outer-source check as two chains of our table: a filter-INPUT base chain
    (iptables filter INPUT's hook and priority) jumping to filter-ztunnel-TUNNEL, whose rules
    drop UDP to the tunnel port from anyone but the tunnel's remote."""
    if not rules:
        return []
    base, chain = nft.nft_chain("filter", "INPUT"), nft.nft_chain("filter", names.CHAIN_TUNNEL)
    ctype, hook, prio = names.NFT_BASE_CHAINS[("filter", "INPUT")]
    drops: list[str] = []
    for r in rules:
        where = f"-t {r.table} -A {r.chain} {r.args}"
        if r.family != 4:
            raise NftPlanError(f"{role}: {where}: IPv6 tunnel rules are not translated")
        if r.chain != names.CHAIN_TUNNEL:
            if (r.table, r.chain, r.args) != ("filter", "INPUT", f"-j {names.CHAIN_TUNNEL}"):
                raise NftPlanError(f"{role}: {where}: only the filter INPUT jump hooks the tunnel check")
            continue
        m = _TUNNEL_CHECK.match(r.args)
        if r.table != "filter" or m is None:
            raise NftPlanError(f"{role}: {where}: not the outer-source check this backend translates "
                               "('! -s IP/32 -p udp -m udp --dport PORT -j DROP')")
        drops.append(f'\t\tip saddr != {m["ip"]} udp dport {int(m["port"])} counter drop '
                     f'comment "{TUNNEL_RULE_PREFIX}{len(drops) + 1}"')
    # nft's name for priority 0, as `nft list` prints it (the comparison uses the kernel's form)
    prio_text = "filter" if prio == 0 else str(prio)
    return ["", f"\tchain {base} {{", f"\t\ttype {ctype} hook {hook} priority {prio_text}; policy accept;",
            f'\t\tcounter jump {chain} comment "{nft.HOOK_COMMENT}"', "\t}",
            "", f"\tchain {chain} {{", *drops, "\t}"]


def _with_blocks(script: str, blocks: list[str], role: str) -> str:
    if not blocks:
        return script
    chain = nft.nft_chain("filter", "INPUT")
    if f"\tchain {chain} {{" in script:
        raise NftPlanError(f"{role}: the rendered table already has chain {chain}; the tunnel check "
                           "cannot be added beside it")
    if not script.endswith("}\n"):
        raise NftPlanError(f"{role}: unexpected end of the rendered nft script")
    return script[:-2] + "\n".join(blocks) + "\n}\n"


def desired_table(ns: NetnsState) -> DesiredTable:
    """Pure: one legacy netns (with the driver's extra rules in ``ns.iptables``) as our table."""
    template = tuple(r for r in ns.iptables if not _is_tunnel_rule(r))
    tunnel = [r for r in ns.iptables if _is_tunnel_rule(r)]
    base = dataclasses.replace(ns, iptables=template)
    blocks = _tunnel_blocks(ns.role, tunnel)
    script = _with_blocks(nft.legacy_nft(base), blocks, ns.role)
    skeleton = _with_blocks(nft.legacy_nft(dataclasses.replace(base, ipset_entries=())), blocks, ns.role)
    elements = tuple(Element(e.set, e.ip, e.comment) for e in ns.ipset_entries)
    return DesiredTable(ns.role, nft.table_name(ns.role), script, skeleton, elements)


def with_scripts(rendered: Rendered) -> Rendered:
    """``rendered`` with ``nft`` filled in: the full script of each netns's table, as apply loads it."""
    return dataclasses.replace(rendered, nft=tuple((ns.role, desired_table(ns).script)
                                                   for ns in rendered.netns))


# ---------------------------------------------------------------- JSON -> shape (pure)


def _objects(doc: dict) -> list[dict]:
    return [o for o in doc.get("nftables", []) if "metainfo" not in o]


def _dump(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _expr(expr: list[dict]) -> str:
    # counters count packets; only their presence is part of the rule
    return _dump([{"counter": None} if "counter" in e else e for e in expr])


def shape(doc: dict, table: str) -> Shape:
    """``list table`` JSON -> Shape (objects of other tables are ignored)."""
    chains: dict[str, str] = {}
    rules: dict[str, list[tuple[Optional[str], str]]] = {}
    sets: dict[str, str] = {}
    others: list[str] = []
    for o in _objects(doc):
        kind, body = next(iter(o.items()))
        if kind == "table" or body.get("table") != table:
            continue
        if kind == "chain":
            chains[body["name"]] = _dump({k: v for k, v in body.items()
                                          if k not in ("family", "table", "name", "handle")})
            rules.setdefault(body["name"], [])
        elif kind == "rule":
            rules.setdefault(body["chain"], []).append((body.get("comment"), _expr(body["expr"])))
        elif kind == "set":
            sets[body["name"]] = _dump({k: v for k, v in body.items()
                                        if k not in ("family", "table", "name", "handle", "elem")})
        else:
            others.append(f"{kind} {body.get('name', '?')}")
    return Shape(chains, {c: tuple(r) for c, r in rules.items()}, sets, tuple(sorted(others)))


def elements(doc: dict, table: str) -> tuple[Element, ...]:
    out: list[Element] = []
    for o in _objects(doc):
        s = o.get("set")
        if s is None or s.get("table") != table:
            continue
        for e in s.get("elem", []):
            if isinstance(e, dict) and "elem" in e:
                out.append(Element(s["name"], str(e["elem"]["val"]), e["elem"].get("comment")))
            else:
                out.append(Element(s["name"], str(e)))
    return tuple(sorted(out))


# ---------------------------------------------------------------- comparison (pure)


def _label(rid: Optional[str]) -> str:
    return rid if rid is not None else "a rule without id"


def _rule_drift(chain: str, want: Sequence[tuple[Optional[str], str]],
                have: Sequence[tuple[Optional[str], str]]) -> list[str]:
    if tuple(want) == tuple(have):
        return []
    want_by = dict(want)
    have_by: dict[Optional[str], list[str]] = {}
    for rid, expr in have:
        have_by.setdefault(rid, []).append(expr)
    out: list[str] = []
    for rid, expr in want:
        if rid not in have_by:
            out.append(f"{chain} {_label(rid)} missing")
        elif expr not in have_by[rid]:
            out.append(f"{chain} {_label(rid)} differs")
    for rid, n in Counter(rid for rid, _ in have).items():
        if rid not in want_by:
            out += [f"{chain} {_label(rid)} unexpected"] * n
        elif n > 1:
            out += [f"{chain} {_label(rid)} duplicated"] * (n - 1)
    return out or [f"{chain} rules out of order"]


def shape_drift(want: Shape, have: Shape) -> tuple[list[str], int]:
    """What differs, one phrase each, and how many rules are involved."""
    problems: list[str] = []
    rules = 0
    for name, header in want.chains.items():
        if name not in have.chains:
            n = len(want.rules.get(name, ()))
            problems.append(f"chain {name} missing ({_plural(n, 'rule')})")
            rules += n
            continue
        if have.chains[name] != header:
            problems.append(f"chain {name} type/hook/priority/policy differs")
        found = _rule_drift(name, want.rules.get(name, ()), have.rules.get(name, ()))
        problems += found
        rules += len(found)
    for name in have.chains:
        if name not in want.chains:
            n = len(have.rules.get(name, ()))
            problems.append(f"chain {name} unexpected ({_plural(n, 'rule')})")
            rules += n
    for name, decl in want.sets.items():
        if name not in have.sets:
            problems.append(f"set {name} missing")
        elif have.sets[name] != decl:
            problems.append(f"set {name} declaration differs")
    problems += [f"set {n} unexpected" for n in have.sets if n not in want.sets]
    problems += [f"{o} unexpected" for o in have.others if o not in want.others]
    return problems, rules


def _plural(n: int, word: str, verb: str = "") -> str:
    s = f"{n} {word}{'' if n == 1 else 's'}"
    return f"{s} {verb if n == 1 else verb.removesuffix('s')}".rstrip() if verb else s


def _summary(t: DesiredTable, want: Shape) -> str:
    sets = ", ".join(f"set {s}: {_plural(sum(1 for e in t.elements if e.set == s), 'element')}"
                     for s in want.sets)
    return (f"{t.name} ({_plural(len(want.chains), 'chain')}, {_plural(want.rule_count, 'rule')}"
            + (f", {sets}" if sets else "") + ")")


def _element_text(op: str, table: str, e: Element) -> str:
    value = f'{e.ip} comment "{e.comment}"' if (op == "add" and e.comment is not None) else e.ip
    return f"{op} element {FAMILY} {table} {e.set} {{ {value} }}\n"


def plan_elements(role: str, t: DesiredTable, have: Iterable[Element]) -> list[Change]:
    """Per-element changes for a table whose structure is right."""
    want_by = {(e.set, e.ip): e for e in t.elements}
    have_by = {(e.set, e.ip): e for e in have}
    out: list[Change] = []
    for key, e in want_by.items():
        cur = have_by.get(key)
        desc = f"{t.name}: set element {e.show()}"
        if cur is None:
            out.append(Change(role, "nft", "add", desc, "missing", obj=NftOp(_element_text("add", t.table, e))))
        elif cur.comment != e.comment:
            # one transaction: the element is never absent to a reader
            text = _element_text("delete", t.table, cur) + _element_text("add", t.table, e)
            out.append(Change(role, "nft", "replace", desc, f"drifted: comment was {cur.comment!r}",
                              obj=NftOp(text), old=cur))
    for key, cur in sorted(have_by.items()):
        if key not in want_by:
            out.append(Change(role, "nft", "delete", f"{t.name}: set element {cur.show()}", "stale",
                              obj=NftOp(_element_text("delete", t.table, cur)), old=cur))
    return out


def plan_table(role: str, t: DesiredTable, want: Shape, live: Optional[LiveTable]) -> list[Change]:
    """Pure: desired table + its canonical shape + what the kernel holds -> changes."""
    whole = NftOp(t.script, whole_table=True)
    if live is None:
        return [Change(role, "nft", "create", _summary(t, want), "missing", obj=whole)]
    problems, rules = shape_drift(want, live.shape)
    out: list[Change] = []
    if problems:
        desc = f"{t.name}: " + (_plural(rules, "rule", "differs") if rules else problems[0])
        shown = problems[:_SHOWN_PROBLEMS]
        more = f"; {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        out.append(Change(role, "nft", "replace", desc, "drifted: " + "; ".join(shown) + more, obj=whole))
    return out + plan_elements(role, t, live.elements)


def transaction(changes: Sequence[Change]) -> str:
    """The one nft script for a netns's ``nft`` changes: the whole-table script when there is
    one (it carries every element too), else the element statements in plan order."""
    ops = [c.obj for c in changes if isinstance(c.obj, NftOp)]
    whole = [op for op in ops if op.whole_table]
    if whole:
        return whole[0].text
    return "".join(op.text for op in ops)


def removal(role: str, live: Optional[LiveTable]) -> list[Change]:
    """Cleanup: our table, if it is there, goes as a whole (nothing else in nft is touched)."""
    if live is None:
        return []
    table = names.NFT_TABLES[role]
    parts = [_plural(len(live.shape.chains), "chain"), _plural(live.shape.rule_count, "rule")]
    if live.shape.sets:
        parts.append(_plural(len(live.elements), "set element"))
    desc = f"table {FAMILY} {table} ({', '.join(parts)})"
    return [Change(role, "nft", "delete", desc, "ours",
                   obj=NftOp(f"delete table {FAMILY} {table}\n", whole_table=True))]


def status_objects(t: DesiredTable, changes: Sequence[Change]) -> list[tuple[str, Optional[Change]]]:
    """(object text, its change or None) for ``status``: the table, then each element."""
    nft_changes = [c for c in changes if c.kind == "nft"]
    table_change = next((c for c in nft_changes if c.action in ("create", "replace")
                         and c.obj is not None and c.obj.whole_table), None)
    out: list[tuple[str, Optional[Change]]] = [(t.name, table_change)]
    for e in t.elements:
        desc = f"{t.name}: set element {e.show()}"
        out.append((desc, table_change if table_change and table_change.action == "create"
                    else next((c for c in nft_changes if c.desc == desc), None)))
    return out


# ---------------------------------------------------------------- the kernel (through Host)


@functools.lru_cache(maxsize=16)
def canonical_shape(skeleton: str, table: str) -> Shape:
    """The shape the kernel gives ``skeleton`` (loaded in a scratch netns, never in a real one).
    Cached per process: the same text on the same kernel and libnftables gives the same form."""
    doc = nft_scratch_json(skeleton, f"list table {FAMILY} {table}")
    return shape(doc, table)


def observe_table(host: Host, table: str) -> Optional[LiveTable]:
    """Our table as the kernel holds it; None when it does not exist."""
    if not _table_present(host, table):
        return None
    doc = host.nft_json(f"list table {FAMILY} {table}")
    return LiveTable(shape(doc, table), elements(doc, table))


# ---------------------------------------------------------------- one element (pod add/remove)


def _table_present(host: Host, table: str) -> bool:
    return any(o["table"]["family"] == FAMILY and o["table"]["name"] == table
               for o in _objects(host.nft_json("list tables")) if "table" in o)


def get_element(host: Host, table: str, set_name: str, ip: str) -> Optional[Element]:
    """The member ``ip`` of our set with its comment, or None. One ``get element`` (the set is
    never listed). :class:`HostError` when our table is not there (nothing applied yet)."""
    try:
        # nft 1.0.x prints `get element` as text even in JSON mode: the listing is read here
        text = host.nft(f"get element {FAMILY} {table} {set_name} {{ {ip} }}")
    except NftError:
        # the kernel answers a missing element, set or table alike (ENOENT): tell them apart
        if not _table_present(host, table):
            raise HostError(f"nft table {FAMILY} {table} does not exist in netns {host.ns.spec}: "
                            "run apply first") from None
        return None
    found = [e for e in _listed_elements(text, set_name) if e.ip == ip]
    return found[0] if found else None


_LISTED = re.compile(r"elements = \{ (.*?) \}", re.S)
_LISTED_ONE = re.compile(r'(\S+?)(?: comment "([^"]*)")?')


def _listed_elements(text: str, set_name: str) -> list[Element]:
    """The elements of a one-set listing (``get element`` output): ``IP [comment "X"]``, comma
    separated, wrapped at will."""
    m = _LISTED.search(text)
    if m is None:
        return []
    out = []
    for part in m.group(1).split(","):
        one = _LISTED_ONE.fullmatch(part.strip())
        if one is not None:
            out.append(Element(set_name, one.group(1), one.group(2)))
    return out


def put_element(host: Host, table: str, want: Element) -> Optional[str]:
    """Make ``want`` a member with exactly its comment: added if absent, re-added in ONE
    transaction (never absent to a reader) if its comment differs. The statement run, or None."""
    have = get_element(host, table, want.set, want.ip)
    if have == want:
        return None
    text = (_element_text("delete", table, have) if have is not None else "") + _element_text("add", table, want)
    host.nft(text)
    return text.strip()


def delete_element(host: Host, table: str, e: Element) -> str:
    text = _element_text("delete", table, e)
    host.nft(text)
    return text.strip()


def iptables_backend_chains(host: Host) -> list[str]:
    """Chains of the iptables backend (``ztunnel-*`` in iptables-nft's tables) in this netns.
    Both backends loaded at once would each act on every packet. iptables-legacy's chains
    are invisible to nft and are not reported."""
    doc = host.nft_json("list chains")
    found = []
    for o in _objects(doc):
        c = o.get("chain")
        if c and c["family"] in ("ip", "ip6") and c["table"] in names.TABLE_ORDER \
                and names.is_owned_chain(c["name"]):
            found.append(f"{c['family']} {c['table']} {c['name']}")
    return found


def plan(host: Host, ns: NetnsState) -> tuple[list[Change], list[str], bool]:
    """This netns's ``nft`` changes, conflicts, and whether our table exists (an anchor)."""
    t = desired_table(ns)
    want = canonical_shape(t.skeleton, t.table)
    live = observe_table(host, t.table)
    conflicts = []
    leftovers = iptables_backend_chains(host)
    if leftovers:
        conflicts.append(f"{ns.role}: the iptables backend's chains are present ({', '.join(leftovers[:3])}"
                         f"{' …' if len(leftovers) > 3 else ''}); both backends would act on every "
                         "packet: run cleanup with --backend iptables first")
    return plan_table(ns.role, t, want, live), conflicts, live is not None


def execute(host: Host, changes: Sequence[Change]) -> None:
    """Run a netns's ``nft`` changes as ONE libnftables transaction."""
    script = transaction(changes)
    if not script:
        return
    host.nft(script)
    log.info("nft transaction netns=%s changes=%d bytes=%d", host.ns.spec, len(changes), len(script))
