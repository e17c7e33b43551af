"""Compile rendered iptables rules into something the packet tracer can evaluate.

Owns the interpreter for exactly the iptables vocabulary the rule files use, nothing more:

- matches: ``[!] -i/-o IF``, ``[!] -s/-d ADDR[/LEN]``, ``-p tcp|udp``, ``-m tcp|udp [!] --dport/
  --sport N`` (also ``--dport`` right after ``-p``, as the in-pod rules spell it), ``-m mark [!]
  --mark V[/M]``, ``-m connmark [!] --mark V[/M]``, ``-m set [!] --match-set NAME src|dst``
  (membership from the rendered ipset entries), ``-m owner --socket-exists`` (the packet comes
  from a local socket), ``-m conntrack --ctstate NEW,ESTABLISHED,RELATED``;
- targets: a user chain, ``RETURN``, ``ACCEPT``, ``DROP``, ``MARK --set-xmark|--set-mark``,
  ``CONNMARK --set-xmark|--save-mark|--restore-mark [--nfmask] [--ctmask]``, ``TPROXY``,
  ``REDIRECT``, ``DNAT``, ``SNAT``, ``CT --zone``;
- ``-m comment --comment TEXT`` (quoted as iptables-save prints it) matches everything: the
  rules of other programs (kube-proxy, CNIs) carry it, and a live trace reads those too.

Anything else raises :class:`TraceError` naming the rule, so a template that grows a new match
can never be traced silently wrong. Live rules (``trace --from netns``) may instead be compiled
``lenient``: a rule outside the vocabulary is kept as never matching, with the reason, and the
walker shows a warning hop wherever it skips it.

Rule ids follow :data:`noderedirect.names.RULE_ID_PREFIXES` (P1-P15, F1-F2, I1-I2, O1, N1-N2, NP1, FF1,
Z1-Z4: the position of the rule in its chain, jumps from built-in chains not counted). The
in-pod chains have no ids upstream; here they are numbered the same way with the prefixes of
:data:`INPOD_RULE_IDS` (e.g. ``NOUT4`` = the 4th rule of nat ``ISTIO_OUTPUT``). Live rules are
lined up with the rendered ones instead (:func:`compile_rules` ``reference``), so a deleted or
inserted rule does not renumber its neighbours.

Kernel semantics used (include/uapi/linux/netfilter/xt_*.h and the targets' sources):
``MARK --set-xmark V/M``: ``mark = (mark & ~M) ^ V``; ``CONNMARK --save-mark``:
``ct = (ct & ~ctmask) ^ (mark & nfmask)``; ``--restore-mark``: ``mark = (mark & ~nfmask) ^
(ct & ctmask)``; a mark match is ``(mark & M) == V``.
"""

from __future__ import annotations

import difflib
import ipaddress
import shlex
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

from . import names
from .model import IptRule
from .render import chain_bodies

WHOLE = names.MARK_WHOLE

INPOD_RULE_IDS = {
    ("pod", "raw", names.INPOD_CHAIN_PRERT): "RPR",
    ("pod", "raw", names.INPOD_CHAIN_OUTPUT): "ROUT",
    ("pod", "mangle", names.INPOD_CHAIN_PRERT): "MPR",
    ("pod", "mangle", names.INPOD_CHAIN_OUTPUT): "MOUT",
    ("pod", "nat", names.INPOD_CHAIN_PRERT): "NPR",
    ("pod", "nat", names.INPOD_CHAIN_OUTPUT): "NOUT",
    ("node", "nat", names.INPOD_CHAIN_POSTRT): "HPOST",
}
HOOK_ID = "hook"
CT_STATES = frozenset({"NEW", "ESTABLISHED", "RELATED"})
# trace --from netns --backend nft: a live nft rule that is not the translation of a rendered
# rule keeps its place in its chain as an IptRule whose args are this prefix and the rule as nft
# lists it (noderedirect.trace_live_nft). It is never interpreted: refused, or skipped (lenient).
NFT_RULE_PREFIX = "nft "
NFT_RULE_REASON = "an nft rule that is not the translation of a rendered rule"


class TraceError(Exception):
    """A rule, route or object the tracer cannot interpret; the message names it."""


class View:
    """What a match may look at; the tracer provides it (see trace.Walker)."""

    proto: str
    src: str
    dst: str
    sport: int
    dport: int
    mark: int
    ctmark: int
    ctstate: str
    iif: Optional[str]
    oif: Optional[str]
    local_origin: bool

    def in_set(self, name: str, ip: str) -> bool:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(frozen=True)
class Match:
    short: str                                   # "src ∈ ztunnel-pods-ips"
    test: Callable[[View], bool] = field(compare=False)


@dataclass(frozen=True)
class Target:
    kind: str          # chain | RETURN | ACCEPT | DROP | MARK | CONNMARK-SET | CONNMARK-SAVE |
    #                    CONNMARK-RESTORE | TPROXY | REDIRECT | DNAT | SNAT | CT
    chain: Optional[str] = None
    value: int = 0
    mask: int = WHOLE
    nfmask: int = WHOLE
    ctmask: int = WHOLE
    port: Optional[int] = None
    ip: Optional[str] = None
    zone: Optional[int] = None

    @property
    def terminal(self) -> bool:
        return self.kind in ("ACCEPT", "DROP", "TPROXY", "REDIRECT", "DNAT", "SNAT")

    def short(self) -> str:
        k = self.kind
        if k == "chain":
            return f"jump {self.chain}"
        if k == "MARK":
            return f"MARK {_mv(self.value, self.mask)}"
        if k == "CONNMARK-SET":
            return f"CONNMARK set {_mv(self.value, self.mask)}"
        if k == "CONNMARK-SAVE":
            return f"CONNMARK save (nf {self.nfmask:#x}, ct {self.ctmask:#x})"
        if k == "CONNMARK-RESTORE":
            return f"CONNMARK restore (nf {self.nfmask:#x}, ct {self.ctmask:#x})"
        if k == "TPROXY":
            return f"TPROXY :{self.port} mark {_mv(self.value, self.mask)}"
        if k == "REDIRECT":
            return f"REDIRECT :{self.port}"
        if k in ("DNAT", "SNAT"):
            return f"{k} {self.ip}" + (f":{self.port}" if self.port else "")
        if k == "CT":
            return f"CT zone {self.zone}"
        return k


def _mv(value: int, mask: int) -> str:
    return f"{value:#x}" if mask == WHOLE else f"{value:#x}/{mask:#x}"


@dataclass(frozen=True)
class CompiledRule:
    rid: str                      # "P15", "hook", "NOUT4"
    table: str
    chain: str
    text: str                     # "-A ztunnel-PREROUTING -p tcp -m set … -j MARK …"
    matches: tuple[Match, ...]
    target: Target
    is_hook: bool
    skipped: Optional[str] = None  # lenient: why the rule could not be read (it never matches)

    def matches_view(self, view: View) -> bool:
        return self.skipped is None and all(m.test(view) for m in self.matches)

    @property
    def match_short(self) -> str:
        return ", ".join(m.short for m in self.matches) or "every packet"


@dataclass(frozen=True)
class Ruleset:
    """One netns's rules: (table, chain) -> rules in their final order."""

    netns: str
    chains: dict[tuple[str, str], tuple[CompiledRule, ...]]

    def chain(self, table: str, chain: str) -> tuple[CompiledRule, ...]:
        return self.chains.get((table, chain), ())

    def all_rules(self) -> list[CompiledRule]:
        return [r for body in self.chains.values() for r in body]


# ---------------------------------------------------------------- parsing one rule


class _Parser:
    def __init__(self, rule: IptRule, netns: str, sets: frozenset[str], chains: set[str]):
        self.rule, self.netns, self.sets, self.chains = rule, netns, sets, chains
        self.toks = self._tokens(rule.args)
        self.i = 0
        self.matches: list[Match] = []
        self.proto: Optional[str] = None
        self.module: Optional[str] = None

    def _tokens(self, args: str) -> list[str]:
        # iptables-save double-quotes a comment with spaces; nothing else in the vocabulary is quoted
        if '"' not in args:
            return args.split()
        try:
            return shlex.split(args)
        except ValueError:
            raise self.fail("unbalanced quotes") from None

    def fail(self, msg: str) -> TraceError:
        err = TraceError(f"netns {self.netns}: cannot interpret -t {self.rule.table} -A {self.rule.chain} "
                         f"{self.rule.args}: {msg}")
        err.reason = msg      # what a lenient compile keeps next to the skipped rule
        return err

    def take(self, what: str) -> str:
        if self.i >= len(self.toks):
            raise self.fail(f"{what} is missing")
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def parse(self) -> tuple[tuple[Match, ...], Target]:
        neg = False
        while self.i < len(self.toks):
            tok = self.take("option")
            if tok == "!":
                neg = True
                continue
            if tok == "-j":
                if neg:
                    raise self.fail("'!' before -j")
                target = self.target(self.take("target"))
                if self.i != len(self.toks):
                    raise self.fail(f"unexpected {' '.join(self.toks[self.i:])!r} after the target")
                return tuple(self.matches), target
            self.option(tok, neg)
            neg = False
        raise self.fail("no -j target")

    def add(self, short: str, test: Callable[[View], bool], neg: bool) -> None:
        if neg:
            self.matches.append(Match("not " + short, lambda v, t=test: not t(v)))
        else:
            self.matches.append(Match(short, test))

    def option(self, tok: str, neg: bool) -> None:
        if tok in ("-i", "-o"):
            name = self.take("interface")
            attr = "iif" if tok == "-i" else "oif"
            word = "in" if tok == "-i" else "out"
            if name.endswith("+"):
                stem = name[:-1]
                self.add(f"{word} {name}", lambda v: (getattr(v, attr) or "").startswith(stem), neg)
            else:
                self.add(f"{word} {name}", lambda v: getattr(v, attr) == name, neg)
        elif tok in ("-s", "-d"):
            raw = self.take("address")
            try:
                net = ipaddress.ip_network(raw, strict=False)
            except ValueError:
                raise self.fail(f"{raw!r} is not an address") from None
            if net.version != 4:
                raise self.fail("IPv6 addresses are not traced")
            attr = "src" if tok == "-s" else "dst"
            shown = str(net.network_address) if net.prefixlen == 32 else str(net)
            self.add(f"{attr} {shown}", lambda v: ipaddress.ip_address(getattr(v, attr)) in net, neg)
        elif tok == "-p":
            proto = self.take("protocol")
            if proto not in ("tcp", "udp"):
                raise self.fail(f"protocol {proto!r} (only tcp and udp are traced)")
            if neg:
                raise self.fail("'! -p' is not used by the rule files")
            self.proto = proto
            self.add(proto, lambda v: v.proto == proto, False)
        elif tok == "-m":
            mod = self.take("module")
            if mod not in ("tcp", "udp", "mark", "connmark", "set", "owner", "conntrack", "comment"):
                raise self.fail(f"match module {mod!r} is not interpreted")
            if mod in ("tcp", "udp") and self.proto != mod:
                raise self.fail(f"-m {mod} without -p {mod}")
            self.module = mod
        elif tok in ("--dport", "--sport"):
            if self.proto is None:
                raise self.fail(f"{tok} without -p tcp|udp")
            port = self._int(self.take("port"), "port")
            attr = tok[2:]
            self.add(f"{attr} {port}", lambda v: getattr(v, attr) == port, neg)
        elif tok == "--mark" and self.module in ("mark", "connmark"):
            value, mask = self._mark(self.take("mark"))
            if self.module == "mark":
                self.add(f"mark {_mv(value, mask)}", lambda v: (v.mark & mask) == value, neg)
            else:
                self.add(f"ctmark {_mv(value, mask)}", lambda v: (v.ctmark & mask) == value, neg)
        elif tok == "--match-set" and self.module == "set":
            name = self.take("set name")
            flag = self.take("src|dst")
            if name not in self.sets:
                raise self.fail(f"set {name} is not rendered in this netns")
            if flag not in ("src", "dst"):
                raise self.fail(f"set direction {flag!r} (only src or dst)")
            self.add(f"{flag} ∈ {name}", lambda v: v.in_set(name, getattr(v, flag)), neg)
        elif tok == "--socket-exists" and self.module == "owner":
            self.add("local socket", lambda v: v.local_origin, neg)
        elif tok == "--comment" and self.module == "comment":
            self.take("comment")     # a label, not a match: it never changes the verdict
        elif tok == "--ctstate" and self.module == "conntrack":
            states = frozenset(self.take("states").split(","))
            if not states <= CT_STATES:
                raise self.fail(f"conntrack states {sorted(states - CT_STATES)} are not modelled")
            self.add(f"ctstate {','.join(sorted(states))}", lambda v: v.ctstate in states, neg)
        else:
            raise self.fail(f"option {tok!r} is not interpreted")

    def _int(self, tok: str, what: str) -> int:
        try:
            return int(tok, 0)
        except ValueError:
            raise self.fail(f"{what} {tok!r} is not a number") from None

    def _mark(self, tok: str) -> tuple[int, int]:
        value, _, mask = tok.partition("/")
        return self._int(value, "mark"), (self._int(mask, "mask") if mask else WHOLE)

    def _opts(self, allowed: tuple[str, ...], flags: tuple[str, ...] = ()) -> dict[str, Optional[str]]:
        out: dict[str, Optional[str]] = {}
        while self.i < len(self.toks):
            tok = self.take("target option")
            if tok in flags:
                out[tok] = None
            elif tok in allowed:
                out[tok] = self.take(f"value of {tok}")
            else:
                raise self.fail(f"target option {tok!r} is not interpreted")
        return out

    def target(self, name: str) -> Target:
        if name in ("RETURN", "ACCEPT", "DROP"):
            self._opts(())
            return Target(name)
        if name == "MARK":
            o = self._opts(("--set-xmark", "--set-mark"))
            if len(o) != 1:
                raise self.fail("MARK needs exactly one of --set-xmark/--set-mark")
            (opt, val), = o.items()
            value, mask = self._mark(val or "")
            if opt == "--set-mark":   # "zero the mask bits, OR the value": xmark with mask|value
                mask = mask | value
            return Target("MARK", value=value, mask=mask)
        if name == "CONNMARK":
            o = self._opts(("--set-xmark", "--set-mark", "--nfmask", "--ctmask"),
                           ("--save-mark", "--restore-mark"))
            nf = self._int(o["--nfmask"], "nfmask") if o.get("--nfmask") else WHOLE
            ct = self._int(o["--ctmask"], "ctmask") if o.get("--ctmask") else WHOLE
            if "--save-mark" in o:
                return Target("CONNMARK-SAVE", nfmask=nf, ctmask=ct)
            if "--restore-mark" in o:
                return Target("CONNMARK-RESTORE", nfmask=nf, ctmask=ct)
            setter = o.get("--set-xmark") or o.get("--set-mark")
            if setter is None:
                raise self.fail("CONNMARK needs --save-mark, --restore-mark or --set-xmark")
            value, mask = self._mark(setter)
            if "--set-mark" in o:
                mask = mask | value
            return Target("CONNMARK-SET", value=value, mask=mask)
        if name == "TPROXY":
            o = self._opts(("--on-port", "--on-ip", "--tproxy-mark"))
            if "--on-port" not in o:
                raise self.fail("TPROXY without --on-port")
            value, mask = self._mark(o["--tproxy-mark"]) if o.get("--tproxy-mark") else (0, 0)
            return Target("TPROXY", port=self._int(o["--on-port"] or "", "port"), ip=o.get("--on-ip"),
                          value=value, mask=mask)
        if name == "REDIRECT":
            o = self._opts(("--to-ports", "--to-port"))
            raw = o.get("--to-ports") or o.get("--to-port")
            if raw is None or "-" in raw:
                raise self.fail("REDIRECT needs one --to-ports port")
            return Target("REDIRECT", port=self._int(raw, "port"))
        if name in ("DNAT", "SNAT"):
            opt = "--to-destination" if name == "DNAT" else "--to-source"
            o = self._opts((opt,))
            raw = o.get(opt)
            if not raw:
                raise self.fail(f"{name} needs {opt}")
            ip, _, port = raw.partition(":")
            return Target(name, ip=ip, port=self._int(port, "port") if port else None)
        if name == "CT":
            o = self._opts(("--zone",))
            if "--zone" not in o:
                raise self.fail("CT is only interpreted with --zone")
            return Target("CT", zone=self._int(o["--zone"] or "", "zone"))
        if name in self.chains:
            self._opts(())
            return Target("chain", chain=name)
        raise self.fail(f"target {name!r} is not interpreted")


# ---------------------------------------------------------------- a whole netns


def rule_prefix(role: str, table: str, chain: str) -> Optional[str]:
    return names.RULE_ID_PREFIXES.get((role, table, chain)) or INPOD_RULE_IDS.get((role, table, chain))


def _positional_ids(role: str, table: str, chain: str, body: list[IptRule]) -> list[str]:
    """The rendered numbering: the position in the chain, jumps from built-in chains not counted."""
    builtin = chain in names.BUILTIN_CHAINS.get(table, ())
    prefix = rule_prefix(role, table, chain)
    ids = []
    position = 0
    for r in body:
        if builtin and r.is_hook:
            ids.append(HOOK_ID)
            continue
        position += 1
        ids.append(f"{prefix}{position}" if prefix else f"{table}/{chain}#{position}")
    return ids


def _aligned_ids(role: str, table: str, chain: str, body: list[IptRule],
                 reference: list[IptRule]) -> list[str]:
    """Ids for a live chain: a rule lined up with a rendered rule of the same text (longest
    common subsequence, so P7/P11/P14, which share their text, keep their places) takes its id;
    any other rule is named by its line number (``iptables -L --line-numbers``)."""
    builtin = chain in names.BUILTIN_CHAINS.get(table, ())
    ref_ids = _positional_ids(role, table, chain, reference)
    ids = [HOOK_ID if builtin and r.is_hook else f"{table}/{chain}#{n}" for n, r in enumerate(body, start=1)]
    matcher = difflib.SequenceMatcher(None, [r.args for r in reference], [r.args for r in body],
                                      autojunk=False)
    for block in matcher.get_matching_blocks():
        for k in range(block.size):
            ids[block.b + k] = ref_ids[block.a + k]
    return ids


def compile_rules(netns: str, role: str, rules: tuple[IptRule, ...], sets: frozenset[str], *,
                  declared: Iterable[tuple[str, str]] = (),
                  reference: Optional[tuple[IptRule, ...]] = None,
                  lenient: bool = False) -> Ruleset:
    """Compile every rule of one netns; raises TraceError on the first rule it cannot read.

    ``declared``: every (table, chain) that exists, rules or not (a live netns: an empty
    foreign chain is still a jump target). ``reference``: the rendered rules of this netns, for
    live rules: ids come from lining each chain up with its rendered twin. ``lenient``: a rule
    outside the vocabulary is kept, never matching, with ``skipped`` saying why.
    """
    if any(r.family != 4 for r in rules):
        raise TraceError(f"netns {netns}: IPv6 rules are not traced")
    bodies = chain_bodies(rules)
    chains_by_table: dict[str, set[str]] = {}
    for (table, chain) in list(bodies) + list(declared):
        chains_by_table.setdefault(table, set()).add(chain)
    for r in rules:   # a jump target with no rules still exists (e.g. mangle ztunnel-POSTROUTING)
        t = r.target
        if t and names.is_owned_chain(t):
            chains_by_table.setdefault(r.table, set()).add(t)
    ref_bodies = chain_bodies(reference) if reference is not None else {}
    out: dict[tuple[str, str], tuple[CompiledRule, ...]] = {}
    for (table, chain), body in bodies.items():
        builtin = chain in names.BUILTIN_CHAINS.get(table, ())
        if reference is None:
            ids = _positional_ids(role, table, chain, body)
        else:
            ids = _aligned_ids(role, table, chain, body, ref_bodies.get((table, chain), []))
        compiled = []
        for r, rid in zip(body, ids):
            if r.args.startswith(NFT_RULE_PREFIX):
                compiled.append(_nft_rule(netns, r, rid, lenient))
                continue
            skipped = None
            try:
                matches, target = _Parser(r, netns, sets, chains_by_table.get(table, set())).parse()
            except TraceError as e:
                if not lenient:
                    raise
                matches, target, skipped = (), Target("RETURN"), getattr(e, "reason", str(e))
            compiled.append(CompiledRule(rid=rid, table=table, chain=chain, text=r.save_line(),
                                         matches=matches, target=target,
                                         is_hook=builtin and r.is_hook, skipped=skipped))
        out[(table, chain)] = tuple(compiled)
    return Ruleset(netns=netns, chains=out)


def _nft_rule(netns: str, r: IptRule, rid: str, lenient: bool) -> CompiledRule:
    """A live nft rule with no rendered twin (:data:`NFT_RULE_PREFIX`): never interpreted."""
    if not lenient:
        err = TraceError(f"netns {netns}: cannot interpret {r.args}: {NFT_RULE_REASON}")
        err.reason = NFT_RULE_REASON
        raise err
    return CompiledRule(rid=rid, table=r.table, chain=r.chain, text=r.args, matches=(),
                        target=Target("RETURN"), is_hook=False, skipped=NFT_RULE_REASON)
