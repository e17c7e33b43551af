"""Kernel -> values: what one network namespace holds, in the model's shapes.

:func:`observe` reads everything the planner compares against the rendered state, through a
:class:`~noderedirect.host.Host`. It makes no decisions: foreign iptables rules, ip rules and
routes are reported next to ours (the planner decides what it owns). The only filter is on
ipsets, whose names alone say whose they are, and on the iptables tables the designs use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

from . import names
from .host import (Host, LinkInfo, ObservedIpRule, ObservedRoute, SavedChain, parse_iptables_chains,
                   parse_iptables_save)
from .model import IpsetEntry, IpsetSet, IptRule, Link, Route, Sysctl
from .tunnels import TunnelDriver, _links as tunnel_links_mod
from .tunnels._kernel import KernelTunnelDriver

log = logging.getLogger(__name__)

IPTABLES_TABLES = names.TABLE_ORDER     # raw, mangle, nat, filter


@dataclass(frozen=True)
class Observed:
    role: str
    ipsets: tuple[IpsetSet, ...] = ()
    ipset_entries: tuple[IpsetEntry, ...] = ()
    # every rule of raw/mangle/nat/filter, ours and foreign, built-in chains included,
    # in iptables-save order (per family)
    iptables: tuple[IptRule, ...] = ()
    # declared chains per (table, chain), so empty owned chains are visible too; family 4
    # chains win over family 6 ones of the same name (see chains6)
    chains: dict[tuple[str, str], SavedChain] = field(default_factory=dict)
    chains6: dict[tuple[str, str], SavedChain] = field(default_factory=dict)
    ip_rules: tuple[ObservedIpRule, ...] = ()
    routes: tuple[Route, ...] = ()          # every route of the tables asked for
    kernel_routes: tuple[Route, ...] = ()   # the subset the kernel made itself (proto kernel)
    links: tuple[LinkInfo, ...] = ()
    sysctls: tuple[Sysctl, ...] = ()        # the keys asked for; value None = no such file
    variant: str = "nft"
    # the iptables tables iptables-save showed (``*mangle`` …), family 4, chains or not
    iptables_tables: frozenset[str] = frozenset()
    tables: tuple[int, ...] = ()
    families: tuple[int, ...] = (4,)

    def rules_in(self, table: str, chain: Optional[str] = None, family: int = 4) -> list[IptRule]:
        return [r for r in self.iptables
                if r.table == table and r.family == family and (chain is None or r.chain == chain)]

    def link(self, name: str) -> Optional[LinkInfo]:
        return next((l for l in self.links if l.name == name), None)

    def sysctl(self, key: str) -> Optional[str]:
        return next((s.value for s in self.sysctls if s.key == key), None)


def observe(host: Host, role: str, *, variant: str = "nft", tables: Iterable[int] = (100, 101, 102),
            sysctl_keys: Iterable[str] = (), families: Iterable[int] = (4,)) -> Observed:
    """Read one netns. ``variant`` picks the iptables binaries ('nft' or 'legacy')."""
    families = tuple(families)
    tables = tuple(int(t) for t in tables)

    # iptables-save runs while the netlink reads below go on (no -t: a named legacy table
    # would be created just by saving it)
    saving = {fam: host.iptables_save_start(variant, family=fam) for fam in families}
    try:
        sets, entries = _ipsets(host)
        ip_rules = tuple(r for fam in families for r in host.ip_rules(fam))
        found: list[ObservedRoute] = [o for fam in families for t in tables
                                      for o in host.routes_detailed(t, fam)]
        links = tuple(host.links())
        keys = tuple(sysctl_keys)
        values = host.sysctl_get(keys) if keys else {}
    except BaseException:
        for started in saving.values():          # no process left behind unwaited
            with contextlib.suppress(Exception):
                started.result(check=False)
        raise
    rules: list[IptRule] = []
    chains: dict[tuple[str, str], SavedChain] = {}
    chains6: dict[tuple[str, str], SavedChain] = {}
    present: frozenset[str] = frozenset()
    for fam in families:
        text = saving[fam].result().stdout
        if fam == 4:
            present = frozenset(line[1:].strip() for line in text.splitlines() if line.startswith("*"))
        rules += [r for r in parse_iptables_save(text, fam) if r.table in IPTABLES_TABLES]
        target = chains if fam == 4 else chains6
        for c in parse_iptables_chains(text, fam):
            if c.table in IPTABLES_TABLES:
                target[(c.table, c.chain)] = c

    obs = Observed(
        role=role, ipsets=sets, ipset_entries=entries, iptables=tuple(rules),
        chains=chains, chains6=chains6, ip_rules=ip_rules,
        routes=tuple(o.route for o in found),
        kernel_routes=tuple(o.route for o in found if o.kernel),
        links=links,
        sysctls=tuple(Sysctl(key=k, value=values[k]) for k in keys),
        variant=variant, iptables_tables=present, tables=tables, families=families)
    log.debug("observed netns=%s role=%s rules=%d ip_rules=%d routes=%d entries=%d",
              host.ns.spec, role, len(rules), len(ip_rules), len(found), len(entries))
    return obs


def _ipsets(host: Host) -> tuple[tuple[IpsetSet, ...], tuple[IpsetEntry, ...]]:
    sets: list[IpsetSet] = []
    entries: list[IpsetEntry] = []
    # foreign sets (kube-proxy, kube-router …) can be large: only ours are parsed
    for name, (s, members) in sorted(host.ipsets(only=names.is_owned_ipset).items()):
        if names.is_owned_ipset(name):
            sets.append(s)
            entries += members
    return tuple(sets), tuple(entries)


def settle_grown_sets(seen: Sequence[IpsetSet], wanted: Sequence[IpsetSet]) -> tuple[IpsetSet, ...]:
    """Report a hash set the kernel has grown with the size it was created with.

    The kernel rounds a hash set's ``hashsize`` up to a power of two and doubles it as members
    arrive (never shrinking it), and ``ipset save`` shows the current size: past a few
    thousand members ``hashsize 1024`` reads back as 2048. A set found with a larger power-of-two
    size than wanted, and otherwise exactly as wanted, is the set we made; without this every
    apply would rebuild it, and the rebuilt twin would grow again (never converging).
    """
    want = {s.name: s for s in wanted}
    out = []
    for s in seen:
        w = want.get(s.name)
        if (w is not None and s.type.startswith("hash:") and s.hashsize > w.hashsize
                and s.hashsize & (s.hashsize - 1) == 0 and dataclasses.replace(s, hashsize=w.hashsize) == w):
            s = w
        out.append(s)
    return tuple(out)


def tunnel_links(driver: TunnelDriver, netns_path: str, links: Sequence[LinkInfo],
                 wanted: Iterable[str]) -> tuple[Link, ...]:
    """Our links (wanted or owned by name) in model.Link shape, as ``driver`` sees them.

    A kernel-device driver's ``observe()`` is a function of the link list alone (it reads the
    links and which tun devices are TAPs, which LinkInfo.tun_mode already says), so the list
    just read is converted here instead of asking the driver to open its own netlink session
    and thread (~5 ms per netns and plan). Other drivers (user-space GENEVE looks at its bridge
    process too) are asked; none is asked when none of the links exists.
    """
    wanted = set(wanted)
    present = sorted(l.name for l in links if l.name in wanted or names.is_owned_link(l.name))
    if not present:
        return ()
    if isinstance(driver, KernelTunnelDriver):
        by_name = {l.name: l for l in links}
        return tuple(tunnel_links_mod.to_model(by_name[n], by_name[n].tun_mode == "tap") for n in present)
    return tuple(driver.observe(netns_path, present))

