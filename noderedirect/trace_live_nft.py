"""Reading the native nft backend back for ``trace --from netns --backend nft``.

Owns the translation of what the kernel holds in our nft table (``table ip ztunnel-node`` in the
node netns, ``table ip ztunnel-tproxy`` in the ztunnel pod's; written by
:mod:`noderedirect.nftapply` from :mod:`noderedirect.nft`'s scripts) back into the tracer's
vocabulary: the rendered iptables rules each live nft rule was translated from, and the
members of the nft set as the ipset members the tracer matches on.

A live rule is interpreted only when BOTH its comment (the rule id: P1…P15, Z1…Z4, ``hook``,
T1…) and its expression equal a rule of the translation of the rendered state. The
translation's expressions are the kernel's own canonical form (the desired table's skeleton
loaded into a scratch netns, :func:`noderedirect.nftapply.canonical_shape`), compared exactly,
counter values aside. A TPROXY rule (Z1-Z3) counts only with its ``"<id> no listener"`` drop
right after it: the pair is what xt_TPROXY does. Anything else in our table (an unknown id, a
changed expression, a lone half of a TPROXY pair, a rule in a chain that is not ours, a changed
base-chain hook or priority) is not interpreted: it is listed as ``unsupported``, naming the
chain and the rule as ``nft list`` prints it, and keeps its place in its chain as an
uninterpretable rule (:data:`noderedirect.trace_rules.NFT_RULE_PREFIX`), so ``--lenient`` shows
a warning hop where the walk passes it. Rules that are missing are simply missing.

Other tables:

- iptables-nft's tables (``ip raw|mangle|nat|filter``, e.g. kube-proxy's KUBE-* chains) are read
  as iptables rules, as with ``--backend iptables``, except where the tracer would have to
  guess: rules in a built-in chain whose hook and priority one of our base chains also holds
  (the kernel orders two base chains of equal priority by registration time, which nothing
  shows; and our ``accept`` ends only our chain), chains of the iptables backend (``ztunnel-*``:
  both backends at once), rules matching an ipset named like our nft set, and a table
  iptables-nft cannot list. Those are ``unsupported``.
- Base chains of any other table of family ip, inet or netdev see the traced packets and are
  not read: ``unsupported`` too. ip6, arp and bridge tables never see routed IPv4 packets.

Read-only: only ``list`` commands run in the netns; the canonical form comes from a scratch
netns that nothing else can enter.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import re
from dataclasses import dataclass
from typing import Optional

from . import names, nft, nftapply
from .host import Host, HostError
from .model import IpsetEntry, IpsetSet, IptRule, NetnsState
from .observe import Observed
from .render import chain_bodies
from .trace_rules import NFT_RULE_PREFIX
from .tunnels.vxlan import VxlanDriver

log = logging.getLogger(__name__)

FAMILY = names.NFT_FAMILY
# families whose base chains see routed IPv4 packets (netdev: ingress/egress of every device)
TRACED_FAMILIES = ("ip", "inet", "netdev")
_COUNTER = re.compile(r"\bcounter packets \d+ bytes \d+")


class NftReadError(HostError):
    """The translation of the rendered state does not line up with its own canonical listing."""


# ---------------------------------------------------------------- what our table should hold


@dataclass(frozen=True)
class Origin:
    """The rendered rule one nft rule was translated from; ``part`` 1 is a TPROXY's drop."""
    rule: IptRule
    part: int = 0
    parts: int = 1


@dataclass(frozen=True)
class Reference:
    """Our table as the apply writes it for the rendered state, in the kernel's canonical form,
    with the origin of every rule."""
    table: str
    shape: nftapply.Shape
    origins: dict[str, dict[tuple[Optional[str], str], Origin]]   # chain -> (comment, expr) -> origin
    chains: dict[str, tuple[str, str]]          # nft chain -> (iptables table, chain)
    sets: dict[str, IpsetSet]


def with_tunnel_check(ns: NetnsState) -> NetnsState:
    """``ns`` plus the VXLAN driver's outer-source check, the only driver extra the nft backend
    turns into chains of our table (filter-INPUT -> filter-ztunnel-TUNNEL, T1…)."""
    extra = tuple(VxlanDriver().extra_rules(ns.role, ns.links))
    return dataclasses.replace(ns, iptables=ns.iptables + extra)


def reference(ns: NetnsState) -> Reference:
    """The translation of one rendered legacy netns (``ns.iptables`` as the apply had them)."""
    want = nftapply.desired_table(ns)
    shape = nftapply.canonical_shape(want.skeleton, want.table)
    origins: dict[str, dict[tuple[Optional[str], str], Origin]] = {}
    chains: dict[str, tuple[str, str]] = {}
    for (table, chain), body in chain_bodies(ns.iptables).items():
        name = nft.nft_chain(table, chain)
        chains[name] = (table, chain)
        origins[name] = _line_up(want.table, name, body, shape.rules.get(name, ()))
    for name in shape.chains:      # a chain without rules (mangle-ztunnel-POSTROUTING)
        if name not in chains:
            chains[name] = _iptables_chain(want.table, name)
            origins[name] = {}
    return Reference(want.table, shape, origins, chains, {s.name: s for s in ns.ipsets})


def _line_up(table: str, chain: str, body: list[IptRule],
             listed: tuple[tuple[Optional[str], str], ...]) -> dict[tuple[Optional[str], str], Origin]:
    """Rendered rules against the canonical rules of their chain, in order: one nft rule each,
    two for TPROXY (the rule, then ``"<id> no listener"``)."""
    out: dict[tuple[Optional[str], str], Origin] = {}
    k = 0
    for r in body:
        parts = 2 if r.target == "TPROXY" else 1
        if k + parts > len(listed):
            raise NftReadError(f"table {FAMILY} {table} chain {chain}: the translation lists "
                               f"{len(listed)} rules, fewer than the rendered rules need")
        first = listed[k][0]
        if parts == 2 and listed[k + 1][0] != f"{first} {nft.NO_LISTENER}":
            raise NftReadError(f"table {FAMILY} {table} chain {chain}: {first} is not followed by "
                               f"its '{nft.NO_LISTENER}' drop in the translation")
        for p in range(parts):
            out.setdefault(listed[k + p], Origin(r, p, parts))
        k += parts
    if k != len(listed):
        raise NftReadError(f"table {FAMILY} {table} chain {chain}: the translation lists "
                           f"{len(listed)} rules for {k} rendered ones")
    return out


def _iptables_chain(table: str, name: str) -> tuple[str, str]:
    ipt_table, _, chain = name.partition("-")
    if ipt_table not in names.TABLE_ORDER or nft.nft_chain(ipt_table, chain) != name:
        raise NftReadError(f"table {FAMILY} {table}: chain {name} is no iptables table's chain")
    return ipt_table, chain


# ---------------------------------------------------------------- our live table


@dataclass(frozen=True)
class NftReading:
    """Our live table in the tracer's vocabulary. ``occupied``: the iptables built-in chains
    whose hook and priority one of our live base chains holds."""
    iptables: tuple[IptRule, ...] = ()
    chains: tuple[tuple[str, str], ...] = ()
    ipsets: tuple[IpsetSet, ...] = ()
    entries: tuple[IpsetEntry, ...] = ()
    occupied: frozenset[tuple[str, str]] = frozenset()
    unsupported: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


def table_present(host: Host, table: str) -> bool:
    doc = host.nft_json("list tables")
    return any(o["table"]["family"] == FAMILY and o["table"]["name"] == table
               for o in doc.get("nftables", []) if "table" in o)


def read_table(host: Host, rendered: NetnsState) -> NftReading:
    """Our table in ``host``'s netns, mapped back onto ``rendered`` (the legacy netns of the
    same role, rendered from the values the apply used)."""
    table = names.NFT_TABLES[rendered.role]
    if not table_present(host, table):
        return NftReading(notes=(f"netns {host.ns.spec}: no table {FAMILY} {table} (the nft "
                                 "backend's); if the node was programmed with another backend, "
                                 "pass it with --backend",))
    doc = host.nft_json(f"list table {FAMILY} {table}")
    live = nftapply.shape(doc, table)
    listing = listed_rules(host.nft(f"list table {FAMILY} {table}"))
    tunnel_chain = nft.nft_chain("filter", names.CHAIN_TUNNEL)
    ref = reference(with_tunnel_check(rendered) if tunnel_chain in live.chains else rendered)
    rules, chains, occupied, bad = _map_chains(table, live, listing, ref)
    sets, entries, set_bad, notes = _sets(table, doc, live, ref)
    log.debug("nft table=%s live rules=%d read as=%d unsupported=%d", table, live.rule_count, len(rules),
              len(bad) + len(set_bad))
    return NftReading(iptables=tuple(rules), chains=tuple(chains), ipsets=sets, entries=entries,
                      occupied=frozenset(occupied), unsupported=tuple(bad + set_bad), notes=tuple(notes))


def _map_chains(table: str, live: nftapply.Shape, listing: dict[str, list[str]], ref: Reference
                ) -> tuple[list[IptRule], list[tuple[str, str]], set[tuple[str, str]], list[str]]:
    """Every live chain against the reference: the rules as rendered rules (an uninterpretable
    one as a placeholder in its place), the chains as iptables chains, the built-in chains our
    base chains stand for, and what is not interpreted."""
    rules: list[IptRule] = []
    chains: list[tuple[str, str]] = []
    occupied: set[tuple[str, str]] = set()
    bad: list[str] = []
    for name, header in live.chains.items():
        found = live.rules.get(name, ())
        labels = _labels(found, listing.get(name, []))
        where = f"table {FAMILY} {table} chain {name}"
        if name not in ref.chains:
            if _is_base(header):
                bad.append(f"{where}: a base chain that is not ours ({_header_text(header)})")
            bad += [f"{where}: rule '{l}': not a chain of ours" for l in labels]
            continue
        ipt = ref.chains[name]
        chains.append(ipt)
        if header != ref.shape.chains.get(name):
            bad.append(f"{where}: declared '{_header_text(header)}', not as translated "
                       f"('{_header_text(ref.shape.chains.get(name, '{}'))}')")
        if ipt[1] in names.BUILTIN_CHAINS.get(ipt[0], ()):
            occupied.add(ipt)
        for rule, label, reason in map_chain(found, ref.origins.get(name, {}), labels):
            if rule is None:
                bad.append(f"{where}: rule '{label}': {reason}")
                rule = IptRule(table=ipt[0], chain=ipt[1], args=f"{NFT_RULE_PREFIX}chain {name}: {label}")
            rules.append(rule)
    return rules, chains, occupied, bad


def _labels(found: tuple[tuple[Optional[str], str], ...], texts: list[str]) -> list[str]:
    """How each live rule is named: its ``nft list`` line, or (when the text listing raced a
    change and does not line up) its position and id."""
    if len(texts) == len(found):
        return texts
    return [f"#{i}" + (f' comment "{c}"' if c is not None else "") for i, (c, _) in enumerate(found, start=1)]


def map_chain(found: tuple[tuple[Optional[str], str], ...],
              origins: dict[tuple[Optional[str], str], Origin],
              labels: list[str]) -> list[tuple[Optional[IptRule], str, str]]:
    """Pure: one chain's live rules, in order, as (rendered rule, label, "") when the rule is a
    translation of ours, else (None, label, why). A TPROXY pair becomes one rendered rule."""
    out: list[tuple[Optional[IptRule], str, str]] = []
    i = 0
    while i < len(found):
        origin = origins.get(found[i])
        if origin is not None and origin.part == 0:
            if origin.parts == 1:
                out.append((dataclasses.replace(origin.rule, op="-A"), labels[i], ""))
                i += 1
                continue
            after = origins.get(found[i + 1]) if i + 1 < len(found) else None
            if after is not None and after.rule == origin.rule and after.part == 1:
                # live order is what the walk follows: -A keeps it through chain_bodies
                out.append((dataclasses.replace(origin.rule, op="-A"), labels[i], ""))
                i += 2
                continue
            why = (f"{found[i][0]} without its '{found[i][0]} {nft.NO_LISTENER}' drop right after it "
                   "(xt_TPROXY drops when no listener is found)")
        elif origin is not None:
            why = "a no-listener drop without its tproxy rule right before it"
        else:
            why = _why_unknown(found[i][0], origins)
        out.append((None, labels[i], why))
        i += 1
    return out


def _why_unknown(comment: Optional[str], origins: dict[tuple[Optional[str], str], Origin]) -> str:
    same_id = [o for (c, _), o in origins.items() if c == comment]
    if same_id:
        r = same_id[0].rule
        return f"not the translation of {comment} (-t {r.table} {r.save_line()})"
    if comment is None:
        return "no rule id (comment)"
    return f"no rule of ours in this chain has the id {comment!r}"


def listed_rules(text: str) -> dict[str, list[str]]:
    """``nft list table`` text -> chain -> its rule lines as printed (counter values dropped).
    Read by position next to the JSON listing, which has the same rules in the same order."""
    out: dict[str, list[str]] = {}
    chain: Optional[str] = None
    for line in text.splitlines():
        stripped = line.strip()
        if line.startswith("\tchain ") and stripped.endswith("{"):
            chain = stripped[len("chain "):-1].strip()
            out[chain] = []
        elif chain is not None and line == "\t}":
            chain = None
        elif chain is not None and stripped and not stripped.startswith(("type ", "comment ", "policy ")):
            out[chain].append(_COUNTER.sub("counter", stripped))
    return out


def _is_base(header: str) -> bool:
    return '"hook"' in header


def _header_text(header: str) -> str:
    """A chain header (shape JSON) the way nft prints it: ``type filter hook prerouting
    priority -150; policy accept`` (a regular chain: ``regular chain``)."""
    h = json.loads(header)
    if "hook" not in h:
        return "regular chain"
    return f"type {h.get('type')} hook {h.get('hook')} priority {h.get('prio')}; policy {h.get('policy')}"


def _sets(table: str, doc: dict, live: nftapply.Shape, ref: Reference
          ) -> tuple[tuple[IpsetSet, ...], tuple[IpsetEntry, ...], list[str], list[str]]:
    """Our set as the ipset the rendered rules name, and its members; a set declared otherwise
    or a member that is not one IPv4 address is not interpreted."""
    sets: list[IpsetSet] = []
    entries: list[IpsetEntry] = []
    bad: list[str] = []
    notes: list[str] = []
    for name, decl in live.sets.items():
        where = f"table {FAMILY} {table} set {name}"
        if name not in ref.sets:
            notes.append(f"{where}: not ours (no rule of ours matches it)")
            continue
        if decl != ref.shape.sets.get(name):
            bad.append(f"{where}: declared otherwise than the translation of ipset {name}")
        sets.append(ref.sets[name])
    wanted = {s.name for s in sets}
    for e in nftapply.elements(doc, table):
        if e.set not in wanted:
            continue
        try:
            ipaddress.IPv4Address(e.ip)
        except ValueError:
            bad.append(f"table {FAMILY} {table} set {e.set}: element {e.ip!r} is not one IPv4 address")
            continue
        entries.append(IpsetEntry(set=e.set, ip=e.ip, comment=e.comment))
    notes += [f"table {FAMILY} {table}: {o} (not read; no rule of ours uses it)" for o in live.others]
    return tuple(sets), tuple(entries), bad, notes


# ---------------------------------------------------------------- other tables


def foreign_chains(host: Host, iptables_tables: frozenset[str]) -> list[str]:
    """Base chains of other nft tables that see the traced packets and are not read: any of
    family ip/inet/netdev except iptables-nft's own tables, which are read as iptables rules
    (``iptables_tables``: those iptables-nft-save listed); one it could not list is named too."""
    doc = host.nft_json("list chains")
    bad: list[str] = []
    for o in doc.get("nftables", []):
        c = o.get("chain")
        if c is None or "hook" not in c or c["family"] not in TRACED_FAMILIES:
            continue
        if names.is_owned_nft_table(c["family"], c["table"]):
            continue
        where = f"nft table {c['family']} {c['table']} base chain {c['name']}"
        if c["family"] == FAMILY and c["table"] in names.TABLE_ORDER:
            if c["table"] not in iptables_tables:
                bad.append(f"{where}: iptables-nft cannot list this table, so its rules are not read")
            continue
        bad.append(f"{where} (type {c.get('type')} hook {c['hook']} priority {c.get('prio')}): its rules "
                   "are not read, and the tracer cannot order another table's base chains against ours")
    return bad


def iptables_beside(obs: Observed, ours: NftReading
                    ) -> tuple[list[IptRule], list[tuple[str, str]], list[str]]:
    """iptables-nft's rules (family 4) that can be walked next to our table, their declared
    chains, and what cannot (see the module docstring)."""
    keep: list[IptRule] = []
    bad: list[str] = []
    counted: dict[tuple[str, str], int] = {}
    backend_chains: list[tuple[str, str]] = []
    set_names = {s.name for s in ours.ipsets} | set(names.OWNED_IPSETS)
    for r in obs.iptables:
        if r.family != 4:
            continue
        if names.is_owned_chain(r.chain) or (r.target is not None and names.is_owned_chain(r.target)):
            owned = (r.table, r.chain if names.is_owned_chain(r.chain) else r.target)
            if owned not in backend_chains:
                backend_chains.append(owned)
            continue
        if (r.table, r.chain) in ours.occupied:
            counted[(r.table, r.chain)] = counted.get((r.table, r.chain), 0) + 1
            continue
        toks = r.args.split()
        named = {toks[i + 1] for i, t in enumerate(toks[:-1]) if t == "--match-set"}
        if named & set_names:
            bad.append(f"iptables-nft rule '-t {r.table} {r.save_line()}': matches ipset "
                       f"{', '.join(sorted(named & set_names))}, not the nft set of that name")
            continue
        keep.append(r)
    for table, chain in backend_chains:
        bad.append(f"iptables-nft {table} chain {chain}: the iptables backend's, beside our nft table "
                   "(both would act on every packet; trace the one you mean with --backend)")
    for (table, chain), n in counted.items():
        nft_name = nft.nft_chain(table, chain)
        bad.append(f"iptables-nft {table} {chain} ({n} rule{'' if n == 1 else 's'}): a base chain at "
                   f"the hook and priority of our {nft_name}; which of the two runs first is not known")
    declared = [k for k in obs.chains if not names.is_owned_chain(k[1])]
    return keep, declared, bad

