"""Reading a live netns for ``trace --from netns``: the kernel's state in the shape the tracer uses.

Owns the translation of what :func:`noderedirect.observe.observe` reports through a
:class:`~noderedirect.host.Host` into a :class:`~noderedirect.topology_model.LiveState`
(a :class:`~noderedirect.model.NetnsState` plus what the rendered state never needs):

- every iptables rule of raw/mangle/nat/filter (IPv4) of the chosen variant, foreign ones
  included, and every declared chain (an empty foreign chain is still a jump target);
- every IPv4 ip rule, and the routes of tables 100-102, main, local and any other table a
  rule looks up (a foreign ``lookup 200`` is followed as the kernel would);
- the owned ipsets and their members (foreign sets are not read: a rule matching one cannot be
  interpreted);
- every link with its addresses; istioin/istioout/pistioin/pistioout with the tunnel's VNI,
  remote and port (kernel GENEVE/VXLAN devices from netlink, a user-space GENEVE TAP from its
  bridge's record);
- ``net.ipv4.ip_forward``.

With ``--backend nft`` (the native nft backend) our rules and set are read from our nft table
instead, by :mod:`noderedirect.trace_live_nft`: each live nft rule becomes the rendered
iptables rule it was translated from when its rule id AND its expression match that
translation (the caller passes the rendered netns: the values the apply used), the set's
members become the ipset members. A rule with an unknown id or a changed expression, other
tables' base chains, and iptables-nft rules that share a hook and priority with our base
chains (their order is not knowable) are ``unsupported``; iptables-nft's other rules (KUBE-*
chains …) are read as with ``--backend iptables``.

What the tracer's model cannot express is listed, as the kernel shows it, in ``unsupported``
(an ip rule with ``from``/``to``/``iif`` selectors or a ``blackhole`` action, a ``blackhole`` or
``throw`` route …): the topology refuses it, or leaves it out with ``--lenient``. Broadcast
routes of the local table are dropped silently: only unicast connections are traced.

Read-only: nothing in the netns changes.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Iterable, Optional

from . import names, trace_live_nft, tunnels
from .host import Host, HostError, LinkInfo
from .model import IpRule, IpsetEntry, IpsetSet, IptRule, Link, NetnsState, Route
from .observe import Observed, observe, tunnel_links
from .topology_model import TABLE_LOCAL, TABLE_MAIN, LiveState

log = logging.getLogger(__name__)

# --backend -> observe()'s iptables variant; the native nft backend reads iptables-nft's tables
# too (other programs' rules), beside our nft table
VARIANTS = {"iptables": "nft", "iptables-nft": "nft", "iptables-legacy": "legacy", "nft": "nft"}
NFT_BACKEND = "nft"
DESIGN_TABLES = names.LEGACY_NODE_TABLES          # 100, 101, 102 (the ztunnel netns uses the same numbers)
ALWAYS_TABLES = DESIGN_TABLES + (TABLE_MAIN, TABLE_LOCAL)
SYSCTL_FORWARD = "net/ipv4/ip_forward"     # observe() takes slashed keys
TRACED_ROUTE_TYPES = ("unicast", "local")


class LiveReadError(HostError):
    """The netns cannot be read the way asked (unknown backend, missing netns …)."""


@dataclass(frozen=True)
class _Firewall:
    """The packet-filter half of a live netns, whichever backend wrote it."""
    iptables: tuple[IptRule, ...]
    chains: tuple[tuple[str, str], ...]
    ipsets: tuple[IpsetSet, ...]
    entries: tuple[IpsetEntry, ...]
    unsupported: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


def read(netns: str, role: str, backend: str = "iptables",
         rendered: Optional[NetnsState] = None) -> LiveState:
    """What ``netns`` holds now, for the netns of ``role`` ("node" or "ztunnel").

    ``rendered``: with ``backend="nft"``, the legacy netns of this role rendered from the values
    the apply used; each live nft rule is interpreted as the rendered rule it translates."""
    if backend not in VARIANTS:
        raise LiveReadError(f"--backend {backend}: trace --from netns reads iptables, "
                            "iptables-legacy or nft")
    if backend == NFT_BACKEND and (rendered is None or rendered.role != role):
        raise LiveReadError(f"--backend nft: reading netns {netns} needs the rendered {role} netns "
                            "to map the nft rules back to")
    with Host(netns) as host:
        looked_up = {r.rule.table for r in host.ip_rules(4)
                     if r.rule.action == "lookup" and r.rule.table is not None}
        tables = tuple(sorted(set(ALWAYS_TABLES) | looked_up))
        obs = observe(host, role, variant=VARIANTS[backend], tables=tables, sysctl_keys=(SYSCTL_FORWARD,))
        if backend == NFT_BACKEND:
            fw = _nft_firewall(host, obs, rendered)
        else:
            fw = _Firewall(iptables=tuple(r for r in obs.iptables if r.family == 4),
                           chains=tuple(obs.chains), ipsets=obs.ipsets, entries=obs.ipset_entries,
                           notes=tuple(_backend_notes(host, obs, role, backend)))
    links = _links(host.ns.path, obs.links)
    routes, bad_routes = _routes(obs.routes)
    rules, bad_rules = _ip_rules(obs)
    state = NetnsState(role=role, ipsets=fw.ipsets, ipset_entries=fw.entries, iptables=fw.iptables,
                       ip_rules=rules, routes=routes, links=links, sysctls=obs.sysctls)
    unsupported = list(fw.unsupported) + bad_rules + bad_routes
    log.debug("live netns=%s role=%s backend=%s rules=%d ip_rules=%d routes=%d links=%d unsupported=%d",
              netns, role, backend, len(state.iptables), len(rules), len(routes), len(links),
              len(unsupported))
    return LiveState(netns=str(netns), state=state, chains=fw.chains,
                     unsupported=tuple(f"netns {netns}: {x}" for x in unsupported),
                     notes=fw.notes)


def _nft_firewall(host: Host, obs: Observed, rendered: NetnsState) -> _Firewall:
    """Our nft table mapped back onto the rendered rules, plus iptables-nft's rules where they
    can be walked beside it (trace_live_nft)."""
    ours = trace_live_nft.read_table(host, rendered)
    foreign = trace_live_nft.foreign_chains(host, obs.iptables_tables)
    beside, declared, bad = trace_live_nft.iptables_beside(obs, ours)
    notes = list(ours.notes)
    notes += [f"netns {host.ns.spec}: ipset {s.name} (the iptables backend's) is present; the nft set "
              "of our table is what the rules match" for s in obs.ipsets if names.is_owned_ipset(s.name)]
    chains = tuple(dict.fromkeys(tuple(declared) + ours.chains))
    return _Firewall(iptables=tuple(beside) + ours.iptables, chains=chains, ipsets=ours.ipsets,
                     entries=ours.entries, unsupported=ours.unsupported + tuple(foreign) + tuple(bad),
                     notes=tuple(notes))


def _ip_rules(obs: Observed) -> tuple[tuple[IpRule, ...], list[str]]:
    rules: list[IpRule] = []
    bad: list[str] = []
    for o in obs.ip_rules:
        if o.rule.family != 4:
            continue
        if o.plain and o.rule.action in ("lookup", "goto"):
            rules.append(o.rule)
        else:
            bad.append(f"ip rule '{o.text}'")
    return tuple(rules), bad


def _routes(found: Iterable[Route]) -> tuple[tuple[Route, ...], list[str]]:
    routes: list[Route] = []
    bad: list[str] = []
    for r in found:
        if r.family != 4:
            continue
        if r.table == TABLE_LOCAL and r.type == "broadcast":
            continue
        if r.type not in TRACED_ROUTE_TYPES:
            bad.append(f"route '{r.show_with_table()}'")
            continue
        if r.table == TABLE_LOCAL and r.type == "local" and r.scope == "host":
            # a local route's scope is always host; the tracer's routes leave it implied
            r = dataclasses.replace(r, scope=None)
        routes.append(r)
    return tuple(routes), bad


def _links(netns_path: str, links: list[LinkInfo]) -> tuple[Link, ...]:
    """Every link as model.Link; our tunnel links with their parameters, through the tunnel
    driver that can see them (a TAP's VNI and remote live in its bridge's record)."""
    taps = any(l.kind == "tun" and names.is_owned_link(l.name) for l in links)
    driver = tunnels.driver("usergeneve" if taps else "vxlan")
    owned = {l.name: l for l in tunnel_links(driver, netns_path, links, names.OWNED_LINKS)}
    out = []
    for info in links:
        if info.name in owned:
            out.append(owned[info.name])
        else:
            out.append(Link(name=info.name, kind=info.kind or "link", vni=info.vni or 0,
                            remote=info.remote or "none", dstport=info.dstport or 0,
                            address=",".join(info.addresses), up=info.up))
    return tuple(out)


def _backend_notes(host: Host, obs: Observed, role: str, backend: str) -> list[str]:
    """Say so when the design's rules are not where this backend looks: the node may be
    programmed with the other iptables variant, or with the native nft backend."""
    notes: list[str] = []
    # the node's rules live in ztunnel-* chains; the ztunnel netns's (Z1-Z4) in mangle
    # PREROUTING, where they name pistioin/pistioout
    if any(names.is_owned_chain(c) for (_t, c) in obs.chains) or any(
            w in names.OWNED_LINKS for r in obs.iptables for w in r.args.split()):
        return notes
    notes.append(f"netns {host.ns.spec}: none of the design's rules in the {backend} rules; if the "
                 "node was programmed with another backend, pass it with --backend")
    table = names.NFT_TABLES.get(role)
    if table is None:
        return notes
    try:
        doc = host.nft_json("list tables")
    except HostError as e:       # no libnftables: the hint above is all we can say
        log.debug("nft tables not listed netns=%s: %s", host.ns.spec, e)
        return notes
    for item in doc.get("nftables", []):
        t: Optional[dict] = item.get("table")
        if t and names.is_owned_nft_table(t.get("family", ""), t.get("name", "")):
            notes.append(f"netns {host.ns.spec} holds nft table {t['family']} {t['name']} (the native "
                         "nft backend): pass --backend nft to trace it")
    return notes
