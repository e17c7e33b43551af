"""Compare two rendered designs per network namespace and per object kind; map legacy to in-pod.

Two comparisons:

- **One design, two inputs** (two values files, or two Istio eras): netns are paired by role
  (``node``↔``node``, ``ztunnel``↔``ztunnel``, ``pod:NS/NAME``↔the same pod). Per kind, each
  side's objects the other lacks are listed; iptables rules are also compared as text, in order,
  per chain, and shown as unified-diff hunks.
- **Legacy vs in-pod**: the netns do not correspond one to one. The node netns is paired with
  the node netns, and the legacy ztunnel netns with ONE representative pod netns of in-pod mode
  (there is one per ambient pod: "× N pods"). Nothing has the same text on both sides, so the
  per-kind lists are the two footprints side by side, and :data:`MAPPING` says where each legacy
  piece went (inpod-mode.md §5). :func:`map_objects` resolves every row against the rendered
  objects and returns what no row covers, so a rule file that grows an object nobody explained
  shows up in the output and fails the tests.

Objects are :class:`noderedirect.inventory.Item` values; equal text means the same object.
Formatting lives in :mod:`noderedirect.diff_format`. Pure.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Optional

from . import names
from .inventory import KINDS, Item, items
from .model import NetnsState, Rendered

MODE_LABELS = {"legacy": "legacy", "inpod": "in-pod"}


class DiffError(ValueError):
    """Two rendered designs cannot be compared the way they were asked to be."""


# ---------------------------------------------------------------- result types


@dataclass(frozen=True)
class Hunk:
    """Unified-diff lines (``@@``, ``-``, ``+``, `` ``) of one chain's rules, in chain order."""

    chain: str
    lines: tuple[str, ...]


@dataclass(frozen=True)
class KindDiff:
    kind: str
    left: tuple[Item, ...]
    right: tuple[Item, ...]
    only_left: tuple[Item, ...]
    only_right: tuple[Item, ...]
    hunks: tuple[Hunk, ...] = ()

    @property
    def common(self) -> int:
        return len(self.left) - len(self.only_left)

    @property
    def common_items(self) -> tuple[Item, ...]:
        return _multiset_minus(self.left, self.only_left)

    @property
    def same(self) -> bool:
        return not self.only_left and not self.only_right and not self.hunks


@dataclass(frozen=True)
class NetnsDiff:
    """One pair of netns. A role of None means that side has no such netns at all; ``*_note``
    then says why, in words."""

    left_role: Optional[str]
    right_role: Optional[str]
    left_note: str
    right_note: str
    notes: tuple[str, ...]
    kinds: tuple[KindDiff, ...]
    # another pair (its left role) whose differences are exactly these: pods that share
    # their knobs differ the same way, and are printed once
    same_as: Optional[str] = None

    @property
    def same(self) -> bool:
        return (self.left_role is not None and self.right_role is not None
                and all(k.same for k in self.kinds))


@dataclass(frozen=True)
class SideInfo:
    name: str          # "legacy 1.20", "A", …: the column header
    mode: str
    version: str
    source: str        # the values file


@dataclass(frozen=True)
class Match:
    """Selects objects: in netns ``netns`` ("node", "ztunnel", or "pod" = every pod netns), of
    kind ``kind``, whose text contains a match for the regular expression ``pattern``."""

    netns: str
    kind: str
    pattern: str

    def selects(self, role: str, item: Item) -> bool:
        return (_role_class(role) == self.netns and item.kind == self.kind
                and re.search(self.pattern, item.text) is not None)


@dataclass(frozen=True)
class MappingRow:
    topic: str
    legacy_text: str
    inpod_text: str
    legacy: tuple[Match, ...] = ()
    inpod: tuple[Match, ...] = ()


@dataclass(frozen=True)
class Located:
    netns: str
    item: Item


@dataclass(frozen=True)
class MappedRow:
    row: MappingRow
    legacy: tuple[Located, ...]
    inpod: tuple[Located, ...]


@dataclass(frozen=True)
class Mapping:
    rows: tuple[MappedRow, ...]
    new_in_inpod: tuple[MappedRow, ...]
    unmapped_legacy: tuple[Located, ...]
    unmapped_inpod: tuple[Located, ...]


@dataclass(frozen=True)
class Diff:
    left: SideInfo
    right: SideInfo
    cross_mode: bool
    netns: tuple[NetnsDiff, ...]
    mapping: Optional[Mapping] = None

    @property
    def same(self) -> bool:
        return all(n.same for n in self.netns)


# ---------------------------------------------------------------- the legacy -> in-pod mapping


def _rx(*parts: object) -> str:
    return "".join(re.escape(str(p)) for p in parts)


def _mm(value: int) -> str:
    """A ``value/value`` mark match as rule text prints it, escaped for a pattern."""
    return _rx(f"{names.hexmark(value)}/{names.hexmark(value)}")


_IPV4 = r"\d+\.\d+\.\d+\.\d+"
_LEG_PRE = _rx("-A ", names.CHAIN_PREFIX, "PREROUTING ")

# inpod-mode.md §5, row by row, plus the structural row for chains and hooks (§1.2 vs §2.2
# rules 1-6). In-pod patterns cover every era 1.21-1.30 (TPROXY and REDIRECT) and both families.
MAPPING: tuple[MappingRow, ...] = (
    MappingRow(
        "enrolled-pod ipset",
        f"ipset {names.IPSET} (hash:ip, comment = pod UID) with every enrolled pod IP; matched as "
        "src to capture outbound TCP and as dst to exempt host probes.",
        f"Still one hash:ip set per node and family ({names.INPOD_IPSET_V4} / "
        f"{names.INPOD_IPSET_V6}; one {names.INPOD_IPSET_OLD} set in 1.21-1.22), same shape, but "
        "used only to pick host-originated probe traffic for SNAT. Capture no longer reads a "
        "node ipset.",
        legacy=(Match("node", "ipsets", _rx(names.IPSET)),
                Match("node", "ipset_entries", _rx(names.IPSET))),
        inpod=(Match("node", "ipsets", _rx(names.INPOD_IPSET_OLD)),
               Match("node", "ipset_entries", _rx(names.INPOD_IPSET_OLD))),
    ),
    MappingRow(
        "owned chains and their hooks",
        f"Eight {names.CHAIN_PREFIX}* chains in the node's mangle, nat and filter tables (filter "
        "from 1.19), each hooked by a jump inserted at the top of its built-in chain.",
        f"{names.INPOD_CHAIN_PRERT} and {names.INPOD_CHAIN_OUTPUT} in mangle and nat (raw too "
        "with DNS capture) inside every pod netns, hooked by appended jumps; on the node only "
        f"nat {names.INPOD_CHAIN_POSTRT} (see host probes).",
        legacy=(Match("node", "chains", _rx(names.CHAIN_PREFIX)),
                Match("node", "hooks", _rx("-j ", names.CHAIN_PREFIX))),
        inpod=(Match("pod", "chains", _rx(names.INPOD_CHAIN_PREFIX)),
               Match("pod", "hooks", _rx("-j ", names.INPOD_CHAIN_PREFIX))),
    ),
    MappingRow(
        "inbound capture",
        f"Per pod, a host route in table {names.TABLE_INBOUND}: POD_IP via "
        f"{names.TUN_IN_ZTUNNEL} dev {names.LINK_IN} (the table also routes ZT_IP to the "
        "ztunnel veth).",
        f"Gone from the node. Inside the pod, nat {names.INPOD_CHAIN_PRERT} REDIRECTs inbound "
        f"TCP to {names.PORT_INBOUND} (1.21-1.23: mangle TPROXY to {names.PORT_HBONE}/"
        f"{names.PORT_INBOUND}); HBONE reaches ztunnel's :{names.PORT_HBONE} listener in the pod.",
        legacy=(Match("node", "routes", _rx(f"table {names.TABLE_INBOUND}: ")),),
        inpod=(Match("pod", "rules", _rx(f"REDIRECT --to-ports {names.PORT_INBOUND}")),
               Match("pod", "rules", r"-j TPROXY --on-port \d+")),
    ),
    MappingRow(
        "outbound capture",
        f"P15 marks pod TCP {names.hexmark(names.MARK_OUTBOUND)} (src in the ipset); ip rule "
        f"{names.PRIO_OUTBOUND} sends it to table {names.TABLE_OUTBOUND}: default via "
        f"{names.TUN_OUT_ZTUNNEL} dev {names.LINK_OUT}.",
        f"Gone from the node. Inside the pod, nat {names.INPOD_CHAIN_OUTPUT} REDIRECTs outbound "
        f"TCP to {names.PORT_OUTBOUND} (rule 19).",
        legacy=(Match("node", "rules", _rx("--set-xmark ") + _mm(names.MARK_OUTBOUND)),
                Match("node", "ip_rules", _rx(f"{names.PRIO_OUTBOUND}: ")),
                Match("node", "routes", _rx(f"table {names.TABLE_OUTBOUND}: "))),
        inpod=(Match("pod", "rules", _rx(f"-A {names.INPOD_CHAIN_OUTPUT} ") + ".*"
                     + _rx(f"REDIRECT --to-ports {names.PORT_OUTBOUND}")),),
    ),
    MappingRow(
        "skip marks",
        f"Marks {names.hexmark(names.MARK_SKIP)} (skip) and {names.hexmark(names.MARK_CONNSKIP)} "
        "(conn-skip, saved to the connmark) for tunnel traffic, GENEVE packets, ztunnel's own "
        f"traffic and UDP; ip rule {names.PRIO_SKIP} goes straight to the main table.",
        f"One socket mark {names.hexmark(names.INPOD_MARK)} that ztunnel sets on its own sockets "
        "(the rules exclude it), loopback exemptions, and ACCEPT for the probe SNAT source. No "
        "node rule.",
        legacy=(Match("node", "rules", _LEG_PRE + ".*(" + _mm(names.MARK_SKIP) + "|"
                      + _mm(names.MARK_CONNSKIP) + ")"),
                Match("node", "rules", _LEG_PRE + _rx("-i ") + "(" + _rx(names.LINK_IN) + "|"
                      + _rx(names.LINK_OUT) + ")" + _rx(" -j RETURN")),
                Match("node", "rules", _LEG_PRE + r"-p udp -m udp --dport \d+ -j RETURN"),
                Match("node", "rules", _rx("-A ", names.CHAIN_PREFIX) + "(FORWARD|INPUT) .*"
                      + _rx("--save-mark --nfmask ", names.hexmark(names.MARK_CONNSKIP))),
                Match("node", "ip_rules", _rx(f"{names.PRIO_SKIP}: "))),
        inpod=(Match("pod", "rules", _rx("! --mark ", names.hexmark(names.INPOD_MARK))),
               Match("pod", "rules", r"-o lo -j ACCEPT"),
               Match("pod", "rules", r"-i lo -j ACCEPT"),
               Match("pod", "rules", r"--ctstate RELATED,ESTABLISHED -j ACCEPT")),
    ),
    MappingRow(
        "original-source return path",
        f"Mark {names.hexmark(names.MARK_PROXY)} on spoofed-source packets from the ztunnel veth "
        f"(saved to the connmark), restored as {names.hexmark(names.MARK_PROXYRET)} on the far "
        f"side; ip rule {names.PRIO_PROXYRET} -> table {names.TABLE_PROXY}: default via ZT_IP "
        "dev ZT_VETH onlink.",
        f"Connmark {names.hexmark(names.INPOD_TPROXY_MARK)} inside each pod (set from "
        f"{names.hexmark(names.INPOD_MARK)} in mangle {names.INPOD_CHAIN_PRERT}, restored in "
        f"mangle {names.INPOD_CHAIN_OUTPUT}), ip rule {names.INPOD_PRIO} -> table "
        f"{names.INPOD_TABLE}: local default dev lo.",
        legacy=(Match("node", "rules", _rx(names.hexmark(names.MARK_PROXY))),
                Match("node", "rules", _mm(names.MARK_PROXYRET)),
                Match("node", "ip_rules", _rx(f"{names.PRIO_PROXYRET}: ")),
                Match("node", "routes", _rx(f"table {names.TABLE_PROXY}: "))),
        inpod=(Match("pod", "rules", _rx(names.hexmark(names.INPOD_TPROXY_MARK), "/")),
               Match("pod", "ip_rules", _rx("fwmark ", names.hexmark(names.INPOD_TPROXY_MARK))),
               Match("pod", "routes", _rx(f"table {names.INPOD_TABLE}: local default dev lo"))),
    ),
    MappingRow(
        "catch-all ip rule",
        f"ip rule {names.PRIO_INBOUND}: every packet looks up table {names.TABLE_INBOUND} (the "
        "per-pod inbound routes).",
        f"Gone. Table number {names.INPOD_TABLE} is reused, but only inside pod netns and with "
        "another meaning (a local default route on lo).",
        legacy=(Match("node", "ip_rules", _rx(f"{names.PRIO_INBOUND}: ")),),
        inpod=(Match("pod", "routes", _rx(f"table {names.INPOD_TABLE}: ")),),
    ),
    MappingRow(
        "GENEVE tunnels",
        f"{names.LINK_IN} (VNI {names.VNI_IN}) and {names.LINK_OUT} (VNI {names.VNI_OUT}) on the "
        f"node, {names.PLINK_IN} / {names.PLINK_OUT} at the far end in the ztunnel netns.",
        "No counterpart: no tunnels, no encapsulation. Packets reach ztunnel's sockets without "
        "leaving the pod netns.",
        legacy=(Match("node", "links", "."), Match("ztunnel", "links", ".")),
    ),
    MappingRow(
        "ztunnel netns capture",
        f"In the ztunnel netns: TPROXY on {names.PLINK_IN}/{names.PLINK_OUT} to ports "
        f"{names.PORT_HBONE}/{names.PORT_INBOUND}/{names.PORT_OUTBOUND}, ip rules "
        f"{names.ZT_PRIO_TPROXY} and {names.ZT_PRIO_ORGSRC} -> local table "
        f"{names.ZT_TABLE_LOCAL}, and the unused tables {names.ZT_TABLE_OUT}/{names.ZT_TABLE_IN}.",
        "No counterpart: the ztunnel pod's own netns carries no capture rules; ztunnel opens its "
        "listeners inside each workload's netns instead.",
        legacy=(Match("ztunnel", "rules", "."), Match("ztunnel", "ip_rules", "."),
                Match("ztunnel", "routes", ".")),
    ),
    MappingRow(
        "kube-proxy bypass",
        f"nat PREROUTING/POSTROUTING and filter FORWARD ACCEPT mark "
        f"{names.hexmark(names.MARK_OUTBOUND)} so kube-proxy leaves captured traffic alone.",
        "Not needed: ztunnel resolves services itself and HBONE goes to endpoint pod IPs; "
        "traffic to an unknown VIP passes through kube-proxy as usual.",
        legacy=(Match("node", "rules", "^(nat|filter) " + _rx("-A ", names.CHAIN_PREFIX) + r"\S+ "
                      + _rx("-m mark --mark ") + _mm(names.MARK_OUTBOUND) + _rx(" -j ACCEPT")),),
    ),
    MappingRow(
        "DNS capture",
        f"Node nat DNAT of UDP/53 from enrolled pods to ZT_IP:{names.PORT_DNS}.",
        f"Inside the pod: nat REDIRECT of UDP and TCP 53 to {names.PORT_DNS} plus raw CT zone "
        f"{names.INPOD_DNS_ZONE} (1.21-1.23: UDP only, no raw table); switchable per pod.",
        legacy=(Match("node", "rules", _rx("-j DNAT --to-destination ") + _IPV4
                      + _rx(f":{names.PORT_DNS}")),),
        inpod=(Match("pod", "rules", _rx("--dport 53 ") + ".*" + r"REDIRECT --to-ports? "
                     + _rx(names.PORT_DNS)),
               Match("pod", "rules", _rx(f"-j CT --zone {names.INPOD_DNS_ZONE}")),
               Match("pod", "chains", "^(ip6 )?raw "),
               Match("pod", "hooks", "^(ip6 )?raw ")),
    ),
    MappingRow(
        "host probes",
        f"mangle {names.CHAIN_PREFIX}OUTPUT marks host TCP from HostIP {names.hexmark(names.MARK_CONNSKIP)} "
        "(socket-exists and dst in the ipset from 1.20; any packet from HostIP before) so probes "
        "skip ztunnel.",
        f"Node nat {names.INPOD_CHAIN_POSTRT} SNATs the same traffic to the probe address "
        f"({names.INPOD_PROBE_SNAT_V4}); each pod ACCEPTs that source. The skip decision moved "
        "into the pod; the node only tags the source.",
        legacy=(Match("node", "rules", _rx(f"-A {names.CHAIN_PREFIX}OUTPUT ")),),
        inpod=(Match("node", "chains", _rx(names.INPOD_CHAIN_POSTRT)),
               Match("node", "hooks", _rx(names.INPOD_CHAIN_POSTRT)),
               Match("node", "rules", _rx("-j SNAT --to-source ")),
               Match("pod", "rules", _rx(f"-A {names.INPOD_CHAIN_PRERT} -s ") + r"\S+"
                     + _rx(" -p tcp -m tcp -j ACCEPT")),
               Match("pod", "rules", _rx(f"-A {names.INPOD_CHAIN_OUTPUT} -d ") + r"\S+"
                     + _rx(" -p tcp -m tcp -j ACCEPT"))),
    ),
    MappingRow(
        "sysctls",
        "rp_filter=0 on all, default, the ztunnel veth, the tunnels and each pod's host-side "
        "device; accept_local=1 on the ztunnel veth and the tunnels; rp_filter=0 in the ztunnel "
        "netns.",
        "None.",
        legacy=(Match("node", "sysctls", "."), Match("ztunnel", "sysctls", ".")),
    ),
    MappingRow(
        "eBPF variant",
        "eBPF redirection (marks 5678/8765), an alternative to this iptables mode; never "
        "rendered here.",
        "Dropped. From 1.28 an opt-in nftables backend exists instead, still in-pod.",
    ),
)

# in-pod objects with no legacy ancestor (inpod-mode.md §5 last row, §2.2 rules 7a/7b)
NEW_IN_INPOD: tuple[MappingRow, ...] = (
    MappingRow(
        "virtual-interface rerouting",
        "",
        "Per-pod annotation istio.io/reroute-virtual-interfaces: TCP arriving on a listed "
        f"interface is treated as outbound (REDIRECT to {names.PORT_OUTBOUND}, then RETURN).",
        inpod=(Match("pod", "rules", _rx(f"-A {names.INPOD_CHAIN_PRERT} -i ") + r"\S+"
                     + _rx(" -p tcp -j ") + "(" + _rx(f"REDIRECT --to-ports {names.PORT_OUTBOUND}")
                     + "|RETURN)$"),),
    ),
    MappingRow(
        "control plane, not kernel objects",
        "",
        "The ZDS socket and netns-fd handoff to ztunnel, the per-pod netns cache and /proc scan, "
        "pod annotations (redirection, bypass-inbound-capture, dns-capture, "
        "reroute-virtual-interfaces), the CNI plugin blocking pod start, in-pod reconcile, and "
        "ztunnel SO_REUSEPORT upgrades.",
    ),
)


def _role_class(role: str) -> str:
    return role.split(":", 1)[0]


def _located(rendered: Rendered, roles: Optional[Iterable[str]] = None) -> list[Located]:
    out: list[Located] = []
    for ns in rendered.netns:
        if roles is not None and ns.role not in roles:
            continue
        for kind_items in items(ns).values():
            out += [Located(ns.role, it) for it in kind_items]
    return out


def _resolve(row: MappingRow, legacy: list[Located], inpod: list[Located]) -> MappedRow:
    return MappedRow(
        row,
        tuple(lo for lo in legacy if any(m.selects(lo.netns, lo.item) for m in row.legacy)),
        tuple(lo for lo in inpod if any(m.selects(lo.netns, lo.item) for m in row.inpod)),
    )


def map_objects(legacy: Rendered, inpod: Rendered, *, pod_roles: Optional[Iterable[str]] = None) -> Mapping:
    """Resolve :data:`MAPPING` against rendered objects. ``pod_roles`` limits the in-pod objects
    listed per row (the representative pod); the unmapped lists always cover every netns."""
    if legacy.mode != "legacy" or inpod.mode != "inpod":
        raise DiffError(f"map_objects needs (legacy, inpod), got ({legacy.mode}, {inpod.mode})")
    all_leg = _located(legacy)
    all_inp = _located(inpod)
    shown_roles = None
    if pod_roles is not None:
        shown_roles = set(pod_roles) | {r for r in inpod.roles if not r.startswith("pod:")}
    shown_inp = _located(inpod, shown_roles)
    rows = tuple(_resolve(r, all_leg, shown_inp) for r in MAPPING)
    new = tuple(_resolve(r, [], shown_inp) for r in NEW_IN_INPOD)
    every_row = MAPPING + NEW_IN_INPOD
    unmapped_leg = tuple(lo for lo in all_leg
                         if not any(m.selects(lo.netns, lo.item) for r in MAPPING for m in r.legacy))
    unmapped_inp = tuple(lo for lo in all_inp
                         if not any(m.selects(lo.netns, lo.item) for r in every_row for m in r.inpod))
    return Mapping(rows, new, unmapped_leg, unmapped_inp)


# ---------------------------------------------------------------- per-kind comparison


def _multiset_minus(a: tuple[Item, ...], b: tuple[Item, ...]) -> tuple[Item, ...]:
    """Items of ``a`` not matched one-for-one in ``b``, in ``a``'s order."""
    left = Counter(it.text for it in b)
    out = []
    for it in a:
        if left[it.text] > 0:
            left[it.text] -= 1
        else:
            out.append(it)
    return tuple(out)


def _table_of_chain(group: str) -> str:
    return group.rsplit(" ", 1)[0]


def rule_hunks(left: tuple[Item, ...], right: tuple[Item, ...], context: int = 1) -> tuple[Hunk, ...]:
    """Per chain, the rules compared as text in order; a hunk for each chain that differs."""
    chains: list[str] = []
    for it in left + right:
        if it.group not in chains:
            chains.append(it.group)
    out: list[Hunk] = []
    for chain in chains:
        cut = len(_table_of_chain(chain)) + 1   # rule text repeats the table: drop it here
        a = [it.text[cut:] for it in left if it.group == chain]
        b = [it.text[cut:] for it in right if it.group == chain]
        if a == b:
            continue
        lines = list(difflib.unified_diff(a, b, n=context, lineterm=""))[2:]
        out.append(Hunk(chain, tuple(lines)))
    return tuple(out)


def compare_netns(a: Optional[NetnsState], b: Optional[NetnsState], *, ordered_rules: bool) -> tuple[KindDiff, ...]:
    ia = items(a) if a is not None else {k: () for k in KINDS}
    ib = items(b) if b is not None else {k: () for k in KINDS}
    out = []
    for k in KINDS:
        hunks = rule_hunks(ia[k], ib[k]) if (ordered_rules and k == "rules") else ()
        out.append(KindDiff(k, ia[k], ib[k], _multiset_minus(ia[k], ib[k]),
                            _multiset_minus(ib[k], ia[k]), hunks))
    return tuple(out)


# ---------------------------------------------------------------- the two comparisons


def side(rendered: Rendered, source: str, name: Optional[str] = None) -> SideInfo:
    label = f"{MODE_LABELS[rendered.mode]} {rendered.version}"
    return SideInfo(name or label, rendered.mode, str(rendered.version), source)


def diff_same(left: Rendered, right: Rendered, left_side: SideInfo, right_side: SideInfo) -> Diff:
    """One design, two inputs: netns paired by role, rules diffed per chain."""
    if left.mode != right.mode:
        raise DiffError(f"diff_same compares one design, got {left.mode} and {right.mode}")
    roles = list(left.roles) + [r for r in right.roles if r not in left.roles]
    pairs = []
    seen: dict[tuple[KindDiff, ...], str] = {}
    for role in roles:
        a = left.get(role) if role in left.roles else None
        b = right.get(role) if role in right.roles else None
        kinds = compare_netns(a, b, ordered_rules=True)
        twin = seen.get(kinds) if (a and b and role.startswith("pod:")) else None
        if a and b and role.startswith("pod:") and twin is None:
            seen[kinds] = role
        pairs.append(NetnsDiff(
            a and a.role, b and b.role,
            "" if a else f"no {role} netns here", "" if b else f"no {role} netns here",
            (), kinds, same_as=twin))
    return Diff(left_side, right_side, False, tuple(pairs))


def _pod_note(pods: list[NetnsState]) -> tuple[Optional[NetnsState], str]:
    if not pods:
        return None, "no pod netns: the values list no ambient pods"
    rep = pods[0]
    rep_items = items(rep)
    differ = [p.role[4:] for p in pods[1:] if items(p) != rep_items]
    n = len(pods)
    note = f"shown: {rep.role[4:]}, one of {n} pod netns (× {n} pods"
    if n == 1:
        note = f"shown: {rep.role[4:]}, the only pod netns (× 1 pod)"
    elif not differ:
        note += ", all identical)"
    else:
        note += f"; {len(differ)} differ from it: {', '.join(differ)})"
    return rep, note


def diff_modes(left: Rendered, right: Rendered, left_side: SideInfo, right_side: SideInfo) -> Diff:
    """Legacy vs in-pod (either order): node↔node, ztunnel↔one representative pod netns."""
    if {left.mode, right.mode} != {"legacy", "inpod"}:
        raise DiffError(f"diff_modes compares legacy with in-pod, got {left.mode} and {right.mode}")
    legacy, inpod = (left, right) if left.mode == "legacy" else (right, left)
    pods = [ns for ns in inpod.netns if ns.role.startswith("pod:")]
    rep, pod_note = _pod_note(pods)
    node_notes = ("in-pod mode touches the node only with the probe ipset and one SNAT rule per "
                  "family; legacy holds the whole capture machinery here",)
    zt_notes = ("legacy: one ztunnel netns serves every pod on the node",
                f"in-pod: one netns per ambient pod; {pod_note}",
                "in-pod: the ztunnel pod's own netns holds no capture objects at all")
    node = (legacy.get("node"), "", inpod.get("node"), "")      # (legacy, note, in-pod, note)
    zt = (legacy.get("ztunnel"), "", rep, "" if rep else pod_note)
    out = []
    for (lg, lg_note, ip, ip_note), notes in ((node, node_notes), (zt, zt_notes)):
        a, a_note, b, b_note = ((lg, lg_note, ip, ip_note) if left.mode == "legacy"
                                else (ip, ip_note, lg, lg_note))
        out.append(NetnsDiff(a and a.role, b and b.role, a_note, b_note, notes,
                             compare_netns(a, b, ordered_rules=False)))
    mapping = map_objects(legacy, inpod, pod_roles=[rep.role] if rep else [])
    return Diff(left_side, right_side, True, tuple(out), mapping)
