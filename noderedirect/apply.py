"""The engine: observe -> plan -> apply -> verify, for the legacy design in two network namespaces.

It is the only writer. Order, and why:

1. Both netns are read while the templates render (reading waits on the kernel and on
   iptables-save; rendering is pure work), then planned; a conflict (tables/priorities used by
   someone else) refuses the whole apply before anything changes.
2. The ztunnel netns is programmed before the node netns starts capturing, so capture only
   starts once the receiving side (tunnel ends, TPROXY rules, local table) is ready. On a first
   apply (none of our ip rules in the node yet) the node's inert part is written at the same
   time as the ztunnel netns: nothing there steers a packet until the node's iptables rules and
   ip rules exist, and those come after the ztunnel netns is done.
3. Within a netns: links -> sysctls (some name the links) -> ipset (before any rule that
   references it) -> routes (our tables are reached only through our ip rules; written after
   an anchor that marks the netns as ours, so a crash cannot leave them looking foreign) ->
   iptables, one ``iptables-restore --noflush`` per table (with ``--backend nft``: our nft
   table, then the routes) -> ip rules (tables are filled before traffic is
   steered into them) -> then deletions in reverse: stale ip rules, stale routes, stale ipsets
   (after the rules that used them), stale links.
4. Verify: read and plan again; anything left is a ``ConvergenceError`` ("did not converge").

Sysctl values found before the first change are recorded in the state directory so cleanup can
put them back (the original never restored them, W12).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import errno
import fcntl
import ipaddress
import json
import logging
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

from . import desired as desired_mod
from . import names, observe as observe_mod, tunnels
from . import nftapply
from .host import Host, HostError, MissingFeature, NetlinkFailed, NetnsRef, lend
from .model import IpRule, NetnsState, Pod, Rendered, Route, Sysctl, Values
from .plan import Change, NetnsPlan, Observation, ObservedRule, Plan, ownership, plan_netns, removal

log = logging.getLogger(__name__)

ROLES = ("node", "ztunnel")
BACKENDS = {"iptables": "nft", "iptables-nft": "nft", "iptables-legacy": "legacy", "nft": "native"}


class ConvergenceError(HostError):
    """Apply finished but the kernel still differs from the desired state."""


class ConflictError(HostError):
    """Something that is not ours occupies a table, priority or name this design needs."""


def state_dir() -> Path:
    d = Path(os.environ.get("NODEREDIRECT_STATE_DIR", "/run/noderedirect"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def netns_id(ns: NetnsRef) -> str:
    st = os.stat(ns.path)
    return f"{st.st_dev}-{st.st_ino}"


@dataclass
class Result:
    plan: Plan
    applied: list[Change] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    # seconds per phase of an apply: observe+render+plan (side by side), write, verify
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return bool(self.applied)


class Engine:
    """One node: its netns and its ztunnel's netns, with one backend and one tunnel driver."""

    def __init__(self, values: Values, node_ns: NetnsRef, zt_ns: NetnsRef, *,
                 backend: str = "iptables", tunnel: str = "auto", rules: Optional[Path] = None):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}")
        self.values = values
        self.node_ns, self.zt_ns = node_ns, zt_ns
        self.backend = backend
        self.variant = BACKENDS[backend]
        self.rules = rules
        self.hosts = {"node": Host(node_ns), "ztunnel": Host(zt_ns)}
        # the tunnel drivers take netns paths: they get these hosts (threads, sockets) back
        self._lent = contextlib.ExitStack()
        for path, h in {h.ns.path: h for h in reversed(self.hosts.values())}.items():
            self._lent.enter_context(lend(h))         # one per netns: the first host of a path
        self.tunnel_kind = tunnel
        self._driver: Optional[tunnels.TunnelDriver] = None
        self._features_ok = False
        # iptables tables found by this apply's read, per role: what existed before we wrote
        self._tables_seen: dict[str, frozenset[str]] = {}
        self.notes: list[str] = []

    def close(self) -> None:
        self._lent.close()
        for h in self.hosts.values():
            h.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ what we want

    @property
    def driver(self) -> tunnels.TunnelDriver:
        if self._driver is None:
            self._driver = tunnels.select(self.tunnel_kind, self.node_ns.path)
        return self._driver

    def check_features(self) -> None:
        """Missing binaries or kernel features: one line, before anything changes. Checked
        once per Engine: a long-running agent does not probe the kernel on every resync."""
        if self._features_ok:
            return
        self._check_features()
        self._features_ok = True

    def _check_features(self) -> None:
        self.driver.check(self.node_ns.path, self.zt_ns.path)
        feats = self.hosts["node"].features()
        if self.variant == "nft" and not feats.iptables_nft:
            raise MissingFeature("iptables_nft", self.node_ns.spec)
        if self.variant == "legacy" and not feats.iptables_legacy:
            raise MissingFeature("iptables_legacy", self.node_ns.spec)
        if self.variant == "native":
            # no ipset and no iptables with this backend: libnftables, and TPROXY for Z1-Z4
            feats.require("nft_bindings")
            feats.require("tproxy")
            return
        if not feats.ipset:
            raise MissingFeature("ipset", self.node_ns.spec)

    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def node_params(self) -> Values:
        """Fill in what the values left to the kernel: HostIP, the tunnel remote, the GENEVE port."""
        n = self.values.node
        node = self.hosts["node"]
        changes: dict = {}
        if n.host_ip_source != "values":
            host_ip, how = derive_host_ip(node.links(), n.pod_cidr, n.internal_ip)
            changes.update(host_ip=host_ip, host_ip_source=how)
        host_ip = changes.get("host_ip", n.host_ip)
        if not n.tun_host_ip_explicit:
            src = route_source(node, n.ztunnel_ip)
            tun = src or host_ip
            if src and src != host_ip:
                self._note(f"the node reaches ztunnel from {src}, not HostIP {host_ip}: "
                           f"using {src} as the tunnel remote (W13)")
            changes["tun_host_ip"] = tun
        if not n.geneve_port_explicit and n.istio_version >= "1.19":
            port = tunnels.geneve_port(node.links(), n.ztunnel_ip)
            if port != n.geneve_port:
                self._note(f"GENEVE port {names.GENEVE_DEFAULT_PORT} is taken on this node: using {port}")
            changes["geneve_port"] = port
        if not changes:
            return self.values
        return dataclasses.replace(self.values, node=dataclasses.replace(n, **changes))

    def desired(self) -> Rendered:
        return self._desired_for(self.node_params())

    def _desired_for(self, values: Values) -> Rendered:
        # rendering dominates a no-change resync at scale: reuse it while the (derived) values,
        # i.e. everything the templates see, are unchanged
        cached = getattr(self, "_desired_cache", None)
        if cached is not None and cached[0] == values:
            return cached[1]
        rendered = self._render(values)
        self._desired_cache = (values, rendered)
        return rendered

    def _render(self, values: Values) -> Rendered:
        rendered = desired_mod.render(values, "legacy", rules=self.rules)
        out = []
        for ns in rendered.netns:
            links = tuple(self.driver.desired(l) for l in ns.links)
            extra = tuple(self.driver.extra_rules(ns.role, ns.links))
            out.append(dataclasses.replace(ns, links=links, iptables=ns.iptables + extra))
        rendered = dataclasses.replace(rendered, netns=tuple(out))
        if self.variant == "native":
            # the driver's extra rules stay in ns.iptables: nftapply makes them chains of our table
            rendered = nftapply.with_scripts(rendered)
        return rendered

    # ------------------------------------------------------------ what is there

    def _read(self, role: str) -> observe_mod.Observed:
        """Everything of one netns that does not depend on the rendered state."""
        seen = observe_mod.observe(self.hosts[role], role, variant=self.variant,
                                   tables=ownership(role).tables)
        self._tables_seen[role] = seen.iptables_tables
        return seen

    def observe(self, want: NetnsState, seen: Optional[observe_mod.Observed] = None) -> Observation:
        """What the planner compares ``want`` with; ``seen``: this netns read already."""
        if self.variant == "native":
            return self._observe_nft(want)
        host = self.hosts[want.role]
        own = ownership(want.role)
        if seen is None:
            seen = self._read(want.role)
        keys = [s.key for s in want.sysctls]
        values = host.sysctl_get(keys) if keys else {}
        return Observation(
            role=want.role, ipsets=observe_mod.settle_grown_sets(seen.ipsets, want.ipsets),
            ipset_entries=seen.ipset_entries,
            iptables=seen.iptables, chains=frozenset(seen.chains),
            ip_rules=tuple(ObservedRule(o.rule, o.plain, o.text) for o in seen.ip_rules),
            routes=tuple(r for r in seen.routes if r.table in own.tables),
            links=observe_mod.tunnel_links(self.driver, host.ns.path, seen.links,
                                           (l.name for l in want.links)),
            sysctls=tuple(Sysctl(key=k, value=v) for k, v in values.items() if v is not None))

    # reading both netns while rendering: this engine's two netns are fixed and known upfront
    _reads_early = True

    def plan(self, rendered: Optional[Rendered] = None) -> Plan:
        """Observe and plan every netns. Without ``rendered``, the kernel is read while the
        templates render (reading waits on the kernel and iptables-save; rendering is pure work)."""
        self.driver                                  # made once, before the threads use it
        early: dict[str, concurrent.futures.Future] = {}
        with contextlib.ExitStack() as stack:
            if rendered is None and self._reads_early and self.variant != "native":
                values = self.node_params()          # reads the node netns first: not queued behind
                pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(
                    max_workers=len(ROLES), thread_name_prefix="read"))
                early = {role: pool.submit(self._read, role) for role in ROLES}
                rendered = self._desired_for(values)
            elif rendered is None:
                rendered = self.desired()
            wants = list(rendered.netns)
            if len(wants) < 2:
                return Plan(tuple(self._plan_one(ns, early) for ns in wants))
            # the netns are planned side by side: each Host has its own thread and its reads
            # are mostly waiting for the kernel or a tool, so the waits overlap. Reading changes
            # nothing; results (and the first error) come in netns order.
            with concurrent.futures.ThreadPoolExecutor(max_workers=len(wants) - 1,
                                                       thread_name_prefix="plan") as pool:
                later = [pool.submit(self._plan_one, ns, early) for ns in wants[1:]]
                first = self._plan_one(wants[0], early)   # on error the pool still waits
                return Plan((first, *(f.result() for f in later)))

    def _plan_one(self, want: NetnsState, early: dict) -> NetnsPlan:
        seen = early.get(want.role)
        if seen is None:
            return self.plan_one(want)
        return plan_netns(want, self.observe(want, seen.result()), ownership(want.role))

    def plan_one(self, want: NetnsState) -> NetnsPlan:
        if self.variant == "native":
            return self.plan_nft_netns(want)
        return plan_netns(want, self.observe(want), ownership(want.role))

    # ------------------------------------------------------------ changing things

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One writer per node at a time (CLI, controller and lab may race)."""
        path = state_dir() / f"lock-{netns_id(self.node_ns)}"
        with open(path, "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def apply(self, *, dry_run: bool = False) -> Result:
        t0 = time.perf_counter()
        self.notes = []
        self.check_features()
        with self.locked():
            self._tables_seen = {}
            p = self.plan()
            rendered = self.desired()                # the render plan() made (cached)
            t_plan = time.perf_counter()
            if p.conflicts:
                raise ConflictError("refusing to change anything: " + "; ".join(p.conflicts))
            result = Result(plan=p, notes=list(self.notes))
            result.timings["observe+render+plan"] = t_plan - t0
            if dry_run or p.empty:
                result.seconds = time.perf_counter() - t0
                return result
            result.applied += self._write(rendered, p)
            t_write = time.perf_counter()
            after = self.plan(rendered)
            if not after.empty:
                raise ConvergenceError("did not converge; still to change:\n" + after.text())
        result.seconds = time.perf_counter() - t0
        result.timings.update(write=t_write - t_plan, verify=result.seconds - (t_write - t0))
        return result

    def _write(self, rendered: Rendered, p: Plan) -> list[Change]:
        """Both netns, ztunnel's first: capture (the node's iptables rules and ip rules) only
        starts once the receiving side is ready. While the node does not capture yet (none of
        our ip rules there: a first apply), its inert part (links, sysctls, routes in our
        tables, the ipset) is written at the same time as the ztunnel netns."""
        zt_plan, node_plan = p.get("ztunnel"), p.get("node")
        zt_want, node_want = rendered.get("ztunnel"), rendered.get("node")
        replaced = any(c.action == "replace" for q in (zt_plan, node_plan) for c in q.of("link"))
        if not replaced and self._capture_off(node_want, node_plan):
            with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="write") as pool:
                node_first = pool.submit(self._write_inert, node_want, node_plan)
                try:
                    zt_done = self._write_netns(zt_want, zt_plan)
                except BaseException:
                    concurrent.futures.wait([node_first])   # ztunnel's error is the one told
                    raise
                node_done = node_first.result()
            return zt_done + node_done + self._write_steering(node_want, node_plan)
        done: list[Change] = []
        for want, ns_plan in ((zt_want, zt_plan), (node_want, node_plan)):
            if any(c.action == "replace" for c in ns_plan.of("link")):
                # a re-created link takes its routes and per-device sysctls with it (e.g. a
                # new ztunnel IP changes the tunnel remote): replace links first, then plan
                # the rest of this netns again so those come back in this same apply (a link
                # created from nothing had nothing to lose: no second plan then)
                done += self._apply_links(want, ns_plan)
                ns_plan = self.plan_one(want)
            done += self._write_netns(want, ns_plan)
        return done

    @staticmethod
    def _capture_off(want: NetnsState, p: NetnsPlan) -> bool:
        """None of our ip rules is in the node netns now (the plan adds every one of them)."""
        adds = sum(1 for c in p.of("ip_rule") if c.action == "add")
        return bool(want.ip_rules) and adds == len(want.ip_rules)

    def _apply_links(self, want: NetnsState, p: NetnsPlan) -> list[Change]:
        host = self.hosts[want.role]
        changes = self.driver.ensure(host.ns.path, list(want.links))
        log.info("links role=%s changes=%s", want.role, changes)
        return [c for c in p.of("link") if c.action != "delete"]

    def _write_netns(self, want: NetnsState, p: NetnsPlan) -> list[Change]:
        return self._write_inert(want, p) + self._write_steering(want, p)

    # kept for callers that apply one netns plan (cleanup, tests)
    _apply_netns = _write_netns

    def _write_inert(self, want: NetnsState, p: NetnsPlan) -> list[Change]:
        """What steers no packet by itself: links, sysctls (they only loosen checks), the ipset
        (matched only by our iptables rules), routes in our tables (reached only through our
        ip rules). Then :meth:`_write_steering`.

        Routes come after an anchor that says the netns is ours (links, the ipset): a crash
        right after them must not leave routes in tables 100-102 that the next apply would
        take for someone else's. With the nft backend the anchor is our nft table, which
        captures: its routes wait for it in :meth:`_write_steering`."""
        host = self.hosts[want.role]
        done: list[Change] = []
        if any(c.action != "delete" for c in p.of("link")):
            done += self._apply_links(want, p)
        if p.restore:
            self._record_tables(host, want.role)
        sysctl_changes = p.of("sysctl")
        if sysctl_changes:
            self._record_sysctls(host, [c.obj.key for c in sysctl_changes])
            host.sysctl_set({c.obj.key: c.obj.value for c in sysctl_changes})
            done += sysctl_changes
        if p.ipset_script:
            host.ipset_apply_script(p.ipset_script)
            done += [c for c in p.of("ipset") if c.action != "destroy"]
        if self.variant != "native":
            done += self._write_routes(host, p)
        return done

    @staticmethod
    def _write_routes(host: Host, p: NetnsPlan) -> list[Change]:
        routes = p.of("route")
        add = [c.obj for c in routes if c.action in ("add", "replace")]
        drifted = [c.old for c in routes if c.action == "replace"]   # same destination: out first
        if add:
            host.routes_batch(delete=drifted, add=add)
        return [c for c in routes if c.action != "delete"]

    def _write_steering(self, want: NetnsState, p: NetnsPlan) -> list[Change]:
        """iptables (one atomic restore per table), our nft table, ip rules; then deletions in
        reverse dependency order."""
        host = self.hosts[want.role]
        done: list[Change] = []
        for r in p.restore:
            # one atomic iptables-restore per table (kernel-notes §5: atomicity is per table);
            # ip6tables-restore for the IPv6 copy
            host.iptables_restore(r.text, self.variant, family=r.family, noflush=True)
        done += p.of("iptables")
        if p.of("nft"):
            nftapply.execute(host, p.of("nft"))      # one transaction, before ip rules steer
            done += p.of("nft")
        if self.variant == "native":
            done += self._write_routes(host, p)
        for c in p.of("ip_rule"):
            if c.action == "add":
                host.rule_add(c.obj)
        # deletions, in reverse dependency order
        for c in p.of("ip_rule"):
            if c.action == "delete":
                host.rule_del(c.old)
        done += p.of("ip_rule")
        stale = [c for c in p.of("route") if c.action == "delete"]
        if stale:
            host.routes_batch(delete=[c.old for c in stale])
            done += stale
        for c in p.of("ipset"):
            if c.action == "destroy":
                host.run(["ipset", "destroy", c.old.name])
                done.append(c)
        stale_links = [c.old.name for c in p.of("link") if c.action == "delete"]
        if stale_links:
            self.driver.remove(host.ns.path, stale_links)
            done += [c for c in p.of("link") if c.action == "delete"]
        return done

    # ------------------------------------------------------------ the native nft backend

    def plan_nft_netns(self, want: NetnsState) -> NetnsPlan:
        """One netns with ``--backend nft``: our table (nftapply), then routes, ip rules, links
        and sysctls through the same planner as iptables, given the netns without ipsets and
        iptables rules. Our table anchors ownership like our chains do with iptables."""
        changes, conflicts, anchored = nftapply.plan(self.hosts[want.role], want)
        rest = nftapply.without_firewall(want)
        p = plan_netns(rest, self.observe(rest), ownership(want.role), anchored=anchored)
        first = tuple(c for c in p.changes if c.kind in ("link", "sysctl"))
        then = tuple(c for c in p.changes if c.kind not in ("link", "sysctl"))
        return dataclasses.replace(p, changes=first + tuple(changes) + then,
                                   conflicts=tuple(conflicts) + p.conflicts)

    def _observe_nft(self, want: NetnsState) -> Observation:
        """observe() for the nft backend: neither iptables nor ipset is read (or needed)."""
        host = self.hosts[want.role]
        own = ownership(want.role)
        wanted = {l.name for l in want.links}
        link_names = sorted(l.name for l in host.links() if l.name in wanted or names.is_owned_link(l.name))
        keys = [s.key for s in want.sysctls]
        values = host.sysctl_get(keys) if keys else {}
        return Observation(
            role=want.role,
            ip_rules=tuple(ObservedRule(o.rule, o.plain, o.text) for o in host.ip_rules(4)),
            routes=tuple(r for t in own.tables for r in host.routes(t)),
            links=tuple(self.driver.observe(host.ns.path, link_names)) if link_names else (),
            sysctls=tuple(Sysctl(k, v) for k, v in values.items() if v is not None))

    def _nft_removal(self, p: NetnsPlan) -> NetnsPlan:
        """Cleanup with the nft backend: our table as a whole, ahead of the usual removals."""
        live = nftapply.observe_table(self.hosts[p.role], names.NFT_TABLES[p.role])
        return dataclasses.replace(p, changes=tuple(nftapply.removal(p.role, live)) + p.changes)

    # ------------------------------------------------------------ memory of "before"

    def _state_file(self, host: Host) -> Path:
        return state_dir() / f"netns-{netns_id(host.ns)}.json"

    def _load_state(self, host: Host) -> dict:
        f = self._state_file(host)
        return json.loads(f.read_text()) if f.exists() else {}

    def _save_state(self, host: Host, state: dict) -> None:
        f = self._state_file(host)
        tmp = f.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
        os.replace(tmp, f)

    def _record_sysctls(self, host: Host, keys: Sequence[str]) -> None:
        """Remember each key's value from before our first change (never overwrite it)."""
        state = self._load_state(host)
        saved = state.setdefault("sysctls", {})
        new = [k for k in keys if k not in saved]
        if new:
            saved.update({k: v for k, v in host.sysctl_get(new).items() if v is not None})
            self._save_state(host, state)

    def _record_tables(self, host: Host, role: str) -> None:
        """Remember which iptables tables existed before we first wrote one, so cleanup can drop
        the (then empty) tables that only exist because of us."""
        state = self._load_state(host)
        key = f"iptables_tables_{self.variant}"
        if key not in state:
            # the read this apply planned from saw them (nothing writes in between: we hold the lock)
            seen = self._tables_seen.get(role)
            state[key] = sorted(seen if seen is not None else _tables_in_save(host.iptables_save(self.variant)))
            self._save_state(host, state)

    def saved_sysctls(self, role: str) -> dict[str, str]:
        return self._load_state(self.hosts[role]).get("sysctls", {})

    # ------------------------------------------------------------ cleanup

    def cleanup(self, *, dry_run: bool = False) -> Result:
        """Remove exactly what is ours in both netns and restore the recorded sysctls."""
        t0 = time.perf_counter()
        with self.locked():
            plans = []
            for role in ("node", "ztunnel"):
                empty = NetnsState(role=role)
                obs = self.observe(empty)
                saved = self.saved_sysctls(role)
                restore = [Sysctl(k, v) for k, v in sorted(saved.items())]
                plans.append(removal(obs, ownership(role), sysctl_restore=restore))
                if self.variant == "native":
                    plans[-1] = self._nft_removal(plans[-1])
            return self._remove(plans, dry_run, t0)

    def _remove(self, plans: list[NetnsPlan], dry_run: bool, t0: float) -> Result:
        """Carry out cleanup's removal plans (under the caller's lock), netns by netns."""
        result = Result(plan=Plan(tuple(plans)))
        if dry_run:
            return result
        for ns_plan in result.plan.netns:
            result.applied += self._cleanup_netns(ns_plan)
        result.seconds = time.perf_counter() - t0
        return result

    def _cleanup_netns(self, p: NetnsPlan) -> list[Change]:
        host = self.hosts[p.role]
        done: list[Change] = []
        for c in p.of("ip_rule"):
            host.rule_del(c.old)
        stale = [c.old for c in p.of("route")]
        if stale:
            host.routes_batch(delete=stale)
        for r in p.restore:
            host.iptables_restore(r.text, self.variant, family=r.family, noflush=True)
        nftapply.execute(host, p.of("nft"))          # our table only; never a ruleset flush
        for c in p.of("ipset"):
            if c.action == "destroy":
                host.run(["ipset", "destroy", c.old.name])
        links = [c.old.name for c in p.of("link")]
        if links:
            self.driver.remove(host.ns.path, links)
        done += [c for c in p.changes if c.kind != "sysctl"]
        restore = {c.obj.key: c.obj.value for c in p.of("sysctl")}
        if restore:
            present = {k: v for k, v in host.sysctl_get(list(restore)).items() if v is not None}
            host.sysctl_set({k: restore[k] for k in present})
            done += [c for c in p.of("sysctl") if c.obj.key in present]
        self._drop_tables_we_created(host)
        self._state_file(host).unlink(missing_ok=True)
        return done

    def _drop_tables_we_created(self, host: Host) -> None:
        """iptables-nft creates a table on first use and never removes it. A table that did not
        exist before our first apply and now holds nothing (built-in chains, policy ACCEPT, no
        rules) is ours to remove. Without that record we leave every table alone."""
        before = self._load_state(host).get(f"iptables_tables_{self.variant}")
        if before is None or self.variant != "nft":
            return
        text = host.iptables_save(self.variant)
        for table, lines in _save_blocks(text).items():
            if table in before:
                continue
            if all(re.fullmatch(r":[A-Z]+ ACCEPT \[\d+:\d+\]", l) for l in lines):
                host.nft(f"delete table ip {table}")
                log.info("removed empty iptables-nft table=%s netns=%s", table, host.ns.spec)

    # ------------------------------------------------------------ one pod

    def pod_add(self, pod: Pod) -> list[str]:
        """Enroll one pod: its set member and its table-100 route, nothing else.

        The ipset member is one netlink request on the node's long-lived sockets, the route
        another: no process and no listing (a controller calls this per pod event). With
        ``--backend nft`` the member goes into our nft table's set (a ``get element``, then one
        transaction if it is missing or has another comment). Only HostIP is derived, and only
        when the values leave it to the kernel; the rest of :meth:`node_params` does not
        concern one pod.
        """
        n = self.values.node
        host = self.hosts["node"]
        host_ip = (n.host_ip if n.host_ip_source == "values"
                   else derive_host_ip(host.links(), n.pod_cidr, n.internal_ip)[0])
        comment = pod.uid if n.ipset_comments else None
        route = Route(table=names.TABLE_INBOUND, dst=f"{pod.ip}/32", via=str(names.TUN_IN_ZTUNNEL),
                      dev=names.LINK_IN, src=host_ip)
        with self.locked():
            if self.variant == "native":
                done = nftapply.put_element(host, names.NFT_TABLES["node"],
                                            nftapply.Element(names.IPSET, pod.ip, comment))
                entry = done or f"element {names.IPSET} {pod.ip} already there"
            else:
                entry = (f'add {names.IPSET} {pod.ip} comment "{pod.uid}"' if comment is not None
                         else f"add {names.IPSET} {pod.ip}")
                try:
                    host.ipset_add(names.IPSET, pod.ip, comment)     # like -exist: re-adding is fine
                except NetlinkFailed as e:
                    if e.code == errno.ENOENT:
                        raise HostError(f"{names.IPSET} does not exist in {self.node_ns.spec}: "
                                        "run apply first") from None
                    raise
            host.route_replace(route)
        return [entry, f"route replace {route.show_with_table()}"]

    def pod_remove(self, ip: str, uid: Optional[str] = None) -> list[str]:
        """Unenroll one pod. With a UID, the member is removed only if its comment is that UID,
        so a late delete for an old pod never removes a new pod that reused the IP (W14).

        Without a UID: one ipset delete (it says whether the IP was enrolled) and the route
        deletes. With one, the member's comment is read first from a listing of our set only.
        With ``--backend nft``: a ``get element`` first either way, then one delete.
        """
        host = self.hosts["node"]
        done: list[str] = []
        with self.locked():
            if self.variant == "native":
                table = names.NFT_TABLES["node"]
                entry = nftapply.get_element(host, table, names.IPSET, ip)
                if entry is None:
                    return done
                if uid is not None and entry.comment is not None and entry.comment != uid:
                    raise HostError(f"{ip} belongs to pod UID {entry.comment}, not {uid}: left in place")
                done.append(nftapply.delete_element(host, table, entry))
            else:
                if uid is not None:
                    member = host.ipset_entry(names.IPSET, ip)
                    if member is None:
                        return done
                    if member.comment is not None and member.comment != uid:
                        raise HostError(f"{ip} belongs to pod UID {member.comment}, not {uid}: left in place")
                if not host.ipset_del(names.IPSET, ip):
                    return done          # not enrolled: its route, if any, is apply's business
                done.append(f"del {names.IPSET} {ip}")
            for r in host.route_del_prefix(names.TABLE_INBOUND, f"{ip}/32"):
                done.append(f"route del {r.show_with_table()}")
        return done


# ---------------------------------------------------------------- derivations


def _save_blocks(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    table = None
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if line.startswith("*"):
            table = line[1:]
            out[table] = []
        elif line != "COMMIT" and table is not None:
            out[table].append(line)
    return out


def _tables_in_save(text: str) -> set[str]:
    return set(_save_blocks(text))


def derive_host_ip(links, pod_cidr: str, internal_ip: str) -> tuple[str, str]:
    """legacy-mode.md §4.12: the first local address inside the node's podCIDR, else InternalIP."""
    net = ipaddress.ip_network(pod_cidr)
    # like the original: interfaces in kernel order, the first address inside the CIDR wins
    for l in sorted(links, key=lambda l: l.index):
        for a in l.addresses:
            ip = ipaddress.ip_interface(a).ip
            if ip.version == 4 and ip in net:
                return str(ip), f"derived: first address of podCIDR on the node ({l.name})"
    return internal_ip, "derived: node InternalIP (no address of podCIDR on the node)"


def route_source(host: Host, dst: str) -> Optional[str]:
    """The source address the kernel picks to reach ``dst``: the original's UDP-connect trick
    (a connected UDP socket sends nothing; the kernel just routes it), in the netns. None when
    there is no route."""
    def pick() -> Optional[str]:
        family = socket.AF_INET6 if ":" in dst else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            try:
                s.connect((dst, 9))
            except OSError:
                return None
            return s.getsockname()[0]
    return host.in_netns(pick)
