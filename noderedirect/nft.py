"""Native nftables rendering of the legacy design (``--backend nft``).

Owns the translation of one rendered legacy netns (role ``node`` or ``ztunnel``, from
:func:`noderedirect.desired.legacy`) into ONE nft script: a single ``table ip ztunnel-…``
(names in :mod:`noderedirect.names`) holding

- a named ``ipv4_addr`` set in place of the ipset (element ``comment "<uid>"`` when the ipset
  entries carry one; ``size`` = the ipset's maxelem),
- one base chain per iptables built-in chain the templates use, at the hook and priority of
  the iptables table it replaces (``names.NFT_BASE_CHAINS``), named ``<table>-<CHAIN>``,
- one regular chain per ``ztunnel-*`` chain, named ``<table>-ztunnel-<X>`` (the same chain name
  exists in two iptables tables, but nft chain names are per table),
- the rules 1:1, each with ``counter`` (iptables always counts) and its id as comment
  (P1-P15, F1-F2, I1-I2, O1, N1-N2, NP1, FF1, Z1-Z4; jumps from base chains: ``hook``).
  The id is the rule's position in its chain, which is how legacy-mode.md §1.3/§2.5 number them.

Nothing here is written by hand: every rule comes from the typed ``IptRule`` arguments, which
the legacy templates spell in iptables-save canonical form, through a strict translator that
knows exactly the vocabulary those templates use and raises :class:`NftTranslationError` on
anything else. The script text follows ``nft list table`` formatting, so a listing of the loaded
table equals the definition block once counters and the set elements' order and wrapping
are normalised.

The script first creates (no-op if present), deletes and redefines its own table, all in one
transaction: applying it twice gives the same ruleset, and no other table is touched.

Semantic differences that cannot be avoided (details and reasoning in docs/nft.md):

- ``accept`` ends only our base chain. N1/NP1 (nat) and FF1 (filter) no longer skip
  kube-proxy, at any priority: the nat core runs every nat base chain of a hook until one makes a
  NAT binding, and an accept in one filter chain never stops another base chain's drop/reject.
  They are still rendered (1:1, counted) because they are harmless and keep the ids aligned.
- ``tproxy`` is not terminal and, without a transparent listener, falls through instead of
  dropping. Every TPROXY becomes ``tproxy … meta mark set … accept`` (mark set only when a socket
  was assigned, as xt_TPROXY does) followed by a companion ``drop`` with the same matches
  (comment ``"<id> no listener"``), which is what xt_TPROXY does when no socket is found.
- ``-m owner --socket-exists`` becomes ``meta skuid >= 0``: true for packets of sockets that
  have a file; the xt match also matches kernel sockets without a file (TCP control socket:
  RSTs and TIME_WAIT ACKs), nft does not.
- Equal priorities order base chains by registration time; iptables' ``-I`` put our jumps first
  inside the shared built-in chain. Against other tables at the same hook, order is not
  guaranteed (it never was across tables).
- The set lives in our table: iptables rules elsewhere cannot reference it, ``ipset list`` does
  not show it, and ``hashsize`` has no nft equivalent.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import re
from dataclasses import dataclass
from typing import Optional

from . import names
from .model import IpsetEntry, IpsetSet, IptRule, NetnsState, Rendered
from .render import RenderError, chain_bodies

log = logging.getLogger(__name__)

WHOLE = names.MARK_WHOLE

# rule ids by chain: (role, iptables table, chain) -> prefix; the id is prefix + position
RULE_IDS = names.RULE_ID_PREFIXES
HOOK_COMMENT = "hook"
NO_LISTENER = "no listener"

# nft's own names for the standard priorities; `nft list` prints these, so the script does too
_PRIORITY_NAMES = {-300: "raw", -150: "mangle", -100: "dstnat", 0: "filter", 50: "security",
                   100: "srcnat"}

_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")         # no '+' wildcard, no quotes
_IDENT = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")       # unquoted nft identifier
_COMMENT = re.compile(r"^[A-Za-z0-9_.:/ -]{1,128}$")    # what may sit between comment quotes


class NftTranslationError(RenderError):
    """A rendered object the nft backend cannot express; names the rule and the problem."""


@dataclass(frozen=True)
class Translated:
    """One iptables rule in nft: the rule body, and for TPROXY the no-listener drop after it."""

    body: str
    fallback: Optional[str] = None


# ---------------------------------------------------------------- one rule


def _hex(value: int) -> str:
    return f"0x{value:08x}"


def _mark_arg(tok: str, what: str) -> tuple[int, int]:
    """``V/M`` (or ``V``, meaning the whole mark) as two ints, checked to fit 32 bits."""
    val, _, mask = tok.partition("/")
    try:
        v, m = int(val, 0), int(mask, 0) if mask else WHOLE
    except ValueError:
        raise ValueError(f"{what} {tok!r} is not VALUE/MASK") from None
    if not (0 <= v <= WHOLE and 0 <= m <= WHOLE):
        raise ValueError(f"{what} {tok!r} does not fit 32 bits")
    if v & ~m:
        raise ValueError(f"{what} {tok!r} has value bits outside the mask")
    return v, m


def _set_mark(v: int, m: int) -> str:
    """``mark = (mark & ~M) ^ V`` with V inside M, i.e. ``(mark & ~M) | V``, the way nft lists
    it: nft folds the expression into ``mark & (~M | V) | V``."""
    if m == WHOLE:
        return f"meta mark set {_hex(v)}"
    keep = (~m | v) & WHOLE
    if keep == WHOLE:
        return f"meta mark set meta mark | {_hex(v)}"
    if v == 0:
        return f"meta mark set meta mark & {_hex(keep)}"
    return f"meta mark set meta mark & {_hex(keep)} | {_hex(v)}"


def _ifname(tok: str) -> str:
    if not _IFNAME.match(tok):
        raise ValueError(f"interface {tok!r} is not a plain name (wildcards are not translated)")
    return f'"{tok}"'


def _prefix(tok: str) -> str:
    net = ipaddress.ip_network(tok, strict=True)
    if net.version != 4:
        raise ValueError(f"{tok!r} is not IPv4")
    return str(net.network_address) if net.prefixlen == 32 else str(net)


class _Parser:
    """Walks one rule's canonical iptables arguments; every token must be consumed."""

    def __init__(self, rule: IptRule, sets: frozenset[str], chains: dict[str, str]):
        self.rule, self.sets, self.chains = rule, sets, chains
        self.toks = rule.args.split()
        self.i = 0
        self.matches: list[tuple[str, str]] = []   # (kind, nft text); kind "l4proto:tcp" etc.
        self.marks: list[tuple[int, int]] = []     # -m mark V/M seen, for CONNMARK --save-mark
        self.proto: Optional[str] = None

    def take(self, what: str) -> str:
        if self.i >= len(self.toks):
            raise ValueError(f"{what} expected at the end of the rule")
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def expect(self, word: str) -> None:
        tok = self.take(repr(word))
        if tok != word:
            raise ValueError(f"expected {word!r}, found {tok!r}")

    def parse(self) -> Translated:
        while self.i < len(self.toks):
            tok = self.take("an option")
            if tok == "!":
                self.iface_or_addr(self.take("an option after '!'"), negate=True)
            elif tok in ("-i", "-s", "-d"):
                self.iface_or_addr(tok, negate=False)
            elif tok == "-p":
                self.protocol(self.take("a protocol"))
            elif tok == "-m":
                self.module(self.take("a match name"))
            elif tok == "-j":
                target = self.target(self.take("a target"))
                if self.i != len(self.toks):
                    raise ValueError(f"{' '.join(self.toks[self.i:])!r} after the target")
                return target
            else:
                raise ValueError(f"unknown option {tok!r}")
        raise ValueError("rule has no target (-j)")

    # ------------------------------------------------ matches

    def iface_or_addr(self, opt: str, negate: bool) -> None:
        op = "!= " if negate else ""
        if opt == "-i":
            self.matches.append(("iif", f"iifname {op}{_ifname(self.take('an interface'))}"))
        elif opt == "-s":
            self.matches.append(("saddr", f"ip saddr {op}{_prefix(self.take('an address'))}"))
        elif opt == "-d":
            self.matches.append(("daddr", f"ip daddr {op}{_prefix(self.take('an address'))}"))
        else:
            raise ValueError(f"'!' before {opt!r} is not translated")

    def protocol(self, proto: str) -> None:
        if proto not in ("tcp", "udp"):
            raise ValueError(f"protocol {proto!r} is not translated")
        self.proto = proto
        self.matches.append((f"l4proto:{proto}", f"meta l4proto {proto}"))

    def module(self, name: str) -> None:
        if name in ("tcp", "udp"):
            if self.proto != name:
                raise ValueError(f"-m {name} without -p {name} before it")
            self.expect("--dport")
            port = int(self.take("a port"))
            if not 0 < port < 65536:
                raise ValueError(f"port {port} out of range")
            # nft adds (and lists without) the l4proto dependency of a port match
            self.matches = [m for m in self.matches if m[0] != f"l4proto:{name}"]
            self.matches.append(("dport", f"{name} dport {port}"))
        elif name in ("mark", "connmark"):
            self.expect("--mark")
            v, m = _mark_arg(self.take("a mark"), f"-m {name} --mark")
            key = "meta mark" if name == "mark" else "ct mark"
            text = f"{key} {_hex(v)}" if m == WHOLE else f"{key} & {_hex(m)} == {_hex(v)}"
            if name == "mark":
                self.marks.append((v, m))
            self.matches.append((name, text))
        elif name == "set":
            self.expect("--match-set")
            set_name, direction = self.take("a set name"), self.take("src or dst")
            if set_name not in self.sets:
                raise ValueError(f"set {set_name!r} is not defined in this netns")
            if direction not in ("src", "dst"):
                raise ValueError(f"set direction {direction!r} (only a single src or dst)")
            field = "saddr" if direction == "src" else "daddr"
            self.matches.append(("set", f"ip {field} @{set_name}"))
        elif name == "owner":
            self.expect("--socket-exists")
            # meta skuid breaks (no match) when the packet has no socket with a file
            self.matches.append(("owner", "meta skuid >= 0"))
        else:
            raise ValueError(f"match -m {name} is not translated")

    # ------------------------------------------------ targets

    def options(self, allowed: tuple[str, ...]) -> dict[str, Optional[str]]:
        """``--opt [value]`` pairs up to the end of the rule; flags (``--save-mark``) map to None."""
        opts: dict[str, Optional[str]] = {}
        while self.i < len(self.toks):
            opt = self.take("an option")
            if opt not in allowed:
                raise ValueError(f"option {opt!r} is not translated here")
            if opt in opts:
                raise ValueError(f"option {opt!r} given twice")
            nxt = self.toks[self.i] if self.i < len(self.toks) else None
            opts[opt] = None if nxt is None or nxt.startswith("--") else self.take(opt)
        return opts

    def body(self, *statements: str) -> str:
        return " ".join([m[1] for m in self.matches] + ["counter", *statements])

    def target(self, target: str) -> Translated:
        if target == "ACCEPT":
            return Translated(self.body("accept"))
        if target == "RETURN":
            return Translated(self.body("return"))
        if target == "MARK":
            opts = self.options(("--set-xmark",))
            if set(opts) != {"--set-xmark"} or opts["--set-xmark"] is None:
                raise ValueError("MARK needs exactly --set-xmark V/M")
            return Translated(self.body(_set_mark(*_mark_arg(opts["--set-xmark"], "--set-xmark"))))
        if target == "CONNMARK":
            return Translated(self.body(self.connmark_save()))
        if target == "TPROXY":
            return self.tproxy()
        if target == "DNAT":
            opts = self.options(("--to-destination",))
            dest = opts.get("--to-destination")
            if set(opts) != {"--to-destination"} or dest is None:
                raise ValueError("DNAT needs exactly --to-destination IP:PORT")
            ip, _, port = dest.partition(":")
            _prefix(ip + "/32")
            if not port.isdigit() or self.proto is None:
                raise ValueError(f"DNAT {dest!r}: need IP:PORT and a -p protocol")
            return Translated(self.body(f"dnat to {ip}:{int(port)}"))
        if target in self.chains:
            return Translated(self.body(f"jump {self.chains[target]}"))
        raise ValueError(f"target {target!r} is not translated (nor a chain of this table)")

    def connmark_save(self) -> str:
        opts = self.options(("--save-mark", "--nfmask", "--ctmask"))
        if set(opts) != {"--save-mark", "--nfmask", "--ctmask"} or opts["--save-mark"] is not None:
            raise ValueError("CONNMARK needs exactly --save-mark --nfmask M --ctmask M")
        if opts["--nfmask"] is None or opts["--ctmask"] is None:
            raise ValueError("CONNMARK --nfmask and --ctmask need a value")
        nf, ct = int(opts["--nfmask"], 0), int(opts["--ctmask"], 0)
        # ct = (ct & ~M) | (mark & M); nft cannot combine two registers, but after a
        # `-m mark --mark M/M` match (mark & M) == M, so it is exactly ct | M
        if nf != ct or (nf, nf) not in self.marks:
            raise ValueError(f"CONNMARK --save-mark with masks {nf:#x}/{ct:#x} is only translated "
                             f"after -m mark --mark M/M with the same M")
        return f"ct mark set ct mark | {_hex(nf)}"

    def tproxy(self) -> Translated:
        opts = self.options(("--on-port", "--on-ip", "--tproxy-mark"))
        if set(opts) != {"--on-port", "--on-ip", "--tproxy-mark"} or None in opts.values():
            raise ValueError("TPROXY needs exactly --on-port P --on-ip IP --tproxy-mark V/M")
        if self.proto is None:
            raise ValueError("TPROXY needs -p tcp or -p udp")
        port = int(opts["--on-port"])
        if not 0 < port < 65536:
            raise ValueError(f"--on-port {port} out of range")
        ip = _prefix(opts["--on-ip"] + "/32")
        mark = _set_mark(*_mark_arg(opts["--tproxy-mark"], "--tproxy-mark"))
        # statements run left to right and tproxy breaks the rule when no transparent socket
        # is found, so the mark is set only on assignment; accept makes it terminal like
        # xt_TPROXY, and the fallback drops what xt_TPROXY drops (no listener)
        return Translated(self.body(f"tproxy to {ip}:{port}", mark, "accept"),
                          fallback=self.body("drop"))


def translate(rule: IptRule, sets: frozenset[str] = frozenset(),
              chains: Optional[dict[str, str]] = None) -> Translated:
    """One IptRule (canonical iptables-save arguments) as nft rule text.

    ``sets``: set names defined in the same table; ``chains``: iptables chain name -> nft chain
    name for jump targets. Anything outside the legacy templates' vocabulary raises
    :class:`NftTranslationError` naming the rule.
    """
    if rule.family != 4:
        raise NftTranslationError(f"-t {rule.table} -A {rule.chain} {rule.args}: IPv6 rules are not "
                                  "translated (the legacy design is IPv4 only)")
    try:
        return _Parser(rule, sets, chains or {}).parse()
    except ValueError as e:
        raise NftTranslationError(f"-t {rule.table} -A {rule.chain} {rule.args}: {e}") from None


# ---------------------------------------------------------------- one netns


def table_name(role: str) -> str:
    try:
        return names.NFT_TABLES[role]
    except KeyError:
        raise NftTranslationError(f"netns role {role!r} has no nft table (legacy roles: "
                                  f"{', '.join(names.NFT_TABLES)})") from None


def nft_chain(table: str, chain: str) -> str:
    """``mangle`` + ``ztunnel-PREROUTING`` -> ``mangle-ztunnel-PREROUTING``."""
    name = f"{table}-{chain}"
    if not _IDENT.match(name):
        raise NftTranslationError(f"chain {chain!r} of table {table!r} is not a valid nft name")
    return name


def _chain_bodies(rules: tuple[IptRule, ...]) -> dict[tuple[str, str], list[IptRule]]:
    """Rules grouped by chain in their final order (render.chain_bodies); jump targets without
    rules get an empty body."""
    chains = chain_bodies(rules)
    for r in rules:
        t = r.target
        if t and t not in names.BUILTIN_TARGETS and names.is_owned_chain(t):
            chains.setdefault((r.table, t), [])
    return chains


def _chain_order(chains: dict[tuple[str, str], list[IptRule]]) -> list[tuple[str, str]]:
    """Base chains in iptables-save order (table, then kernel hook order), then regular chains
    in the order the base chains jump to them (so P1-P15 come first), any others by name."""
    base = [(t, c) for t in names.TABLE_ORDER for c in names.BUILTIN_CHAINS[t] if (t, c) in chains]
    user: list[tuple[str, str]] = []
    for t, c in base:
        for r in chains[(t, c)]:
            if r.is_hook and (t, r.target) in chains and (t, r.target) not in user:
                user.append((t, r.target))
    rest = sorted((k for k in chains if k not in base and k not in user),
                  key=lambda k: (names.TABLE_ORDER.index(k[0]), k[1]))
    return base + user + rest


def _set_block(s: IpsetSet, entries: list[IpsetEntry]) -> list[str]:
    if s.type != "hash:ip" or s.family != "inet":
        raise NftTranslationError(f"ipset {s.name} ({s.type} family {s.family}): only hash:ip "
                                  "family inet becomes an nft set")
    if not _IDENT.match(s.name):
        raise NftTranslationError(f"ipset name {s.name!r} is not a valid nft set name")
    out = [f"\tset {s.name} {{", "\t\ttype ipv4_addr", f"\t\tsize {s.maxelem}"]
    elems = []
    for e in entries:
        if ipaddress.ip_address(e.ip).version != 4:
            raise NftTranslationError(f"ipset {s.name}: {e.ip} is not IPv4")
        if e.comment is None:
            elems.append(e.ip)
        elif _COMMENT.match(e.comment):
            elems.append(f'{e.ip} comment "{e.comment}"')
        else:
            raise NftTranslationError(f"ipset {s.name}: comment {e.comment!r} of {e.ip} cannot be "
                                      "quoted safely")
    if elems:
        pad = "\t\t\t     "   # where `nft list` continues an element list
        out.append("\t\telements = { " + f",\n{pad}".join(elems) + " }")
    out.append("\t}")
    return out


def _base_chain_header(table: str, chain: str) -> str:
    try:
        ctype, hook, prio = names.NFT_BASE_CHAINS[(table, chain)]
    except KeyError:
        raise NftTranslationError(f"iptables {table} {chain} has no nft base chain mapping") from None
    return f"\t\ttype {ctype} hook {hook} priority {_PRIORITY_NAMES.get(prio, prio)}; policy accept;"


def _rule_lines(role: str, table: str, chain: str, body: list[IptRule], sets: frozenset[str],
                jumpable: dict[str, str]) -> list[str]:
    builtin = chain in names.BUILTIN_CHAINS.get(table, ())
    prefix = RULE_IDS.get((role, table, chain))
    lines: list[str] = []
    position = 0
    for r in body:
        tr = translate(r, sets, jumpable)
        if builtin and r.is_hook:
            lines.append(f'\t\t{tr.body} comment "{HOOK_COMMENT}"')
            continue
        if prefix is None:
            raise NftTranslationError(f"-t {table} -A {chain} {r.args}: no rule id is known for "
                                      f"chain {chain} of table {table} in the {role} netns")
        position += 1
        rid = f"{prefix}{position}"
        lines.append(f'\t\t{tr.body} comment "{rid}"')
        if tr.fallback:
            lines.append(f'\t\t{tr.fallback} comment "{rid} {NO_LISTENER}"')
    return lines


def legacy_nft(ns: NetnsState) -> str:
    """The nft script for one legacy netns: recreate our table atomically with everything in it."""
    table = table_name(ns.role)
    if any(r.family != 4 for r in ns.iptables):
        raise NftTranslationError(f"netns {ns.role}: IPv6 rules are not translated")
    set_names = frozenset(s.name for s in ns.ipsets)
    stray = {e.set for e in ns.ipset_entries} - set_names
    if stray:
        raise NftTranslationError(f"netns {ns.role}: entries for undefined set(s) {sorted(stray)}")
    chains = _chain_bodies(ns.rules_for(4))
    order = _chain_order(chains)
    out = [f"# noderedirect: legacy {ns.role} netns, nft backend. Replaces table "
           f"{names.NFT_FAMILY} {table} only, in one transaction.",
           f"table {names.NFT_FAMILY} {table}",
           f"delete table {names.NFT_FAMILY} {table}",
           f"table {names.NFT_FAMILY} {table} {{"]
    blocks: list[list[str]] = []
    for s in ns.ipsets:
        blocks.append(_set_block(s, [e for e in ns.ipset_entries if e.set == s.name]))
    for ipt_table, chain in order:
        # jump targets resolve within the iptables table: `-t nat -j ztunnel-PREROUTING` is nat's
        jumpable = {c: nft_chain(ipt_table, c) for t, c in chains if t == ipt_table
                    and c not in names.BUILTIN_CHAINS[ipt_table]}
        block = [f"\tchain {nft_chain(ipt_table, chain)} {{"]
        if chain in names.BUILTIN_CHAINS.get(ipt_table, ()):
            block.append(_base_chain_header(ipt_table, chain))
        block += _rule_lines(ns.role, ipt_table, chain, chains[(ipt_table, chain)], set_names,
                             jumpable)
        block.append("\t}")
        blocks.append(block)
    for i, block in enumerate(blocks):
        out += ([""] if i else []) + block
    out.append("}")
    log.debug("rendered nft script role=%s table=%s chains=%d", ns.role, table, len(order))
    return "\n".join(out) + "\n"


def rendered_nft(rendered: Rendered) -> Rendered:
    """``rendered`` with ``nft`` filled in: one (role, script) per legacy netns."""
    if rendered.mode != "legacy":
        raise NftTranslationError(f"the nft backend renders the legacy design only, not {rendered.mode!r}")
    return dataclasses.replace(rendered, nft=tuple((ns.role, legacy_nft(ns)) for ns in rendered.netns))
