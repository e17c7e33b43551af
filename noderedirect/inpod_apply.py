"""The in-pod engine: observe -> plan -> apply -> verify for the in-pod design (inpod-mode.md §2-§3).

The same machinery as the legacy :class:`~noderedirect.apply.Engine` (it is a subclass): the
planner (:func:`noderedirect.plan.plan_netns` with ``ownership(role, "inpod")``: chains
``ISTIO_*``, rule priority 32764 and table 100 inside pod netns), the same host calls and the
same per-netns apply (``Engine._write_netns``: the ipset script, routes, one
``iptables-restore --noflush`` per table, ip rules, then deletions). What differs:

- **the netns**: the node's (the probe ipset and the ``ISTIO_POSTRT`` SNAT rule) and one per
  ambient pod (roles ``pod:<namespace>/<name>``), given as ``{pod uid: NetnsRef}``; no ztunnel
  netns, no tunnels, no sysctls;
- **the canonical form**: in-pod templates keep upstream's spelling so the restore text matches
  the upstream goldens byte for byte, but ``iptables-save`` prints the kernel's canonical form.
  The planner compares observed with desired, so the desired rules are rewritten into that form
  first (:func:`canonical`, exactly the normalisations of inpod-mode.md §2.4; the netns tests
  check them against ``iptables-save`` on both backends);
- **order**: pod netns first, the node last (the probe set only matters once a pod is enrolled);
- **one pod** (:meth:`InpodEngine.pod_add`): what the node agent does per pod (§2.1, §3.2) — a
  ``*-save`` probe, then upstream's restore text in one ``iptables-restore`` call, the ip rule
  and the table-100 route inside the pod's netns, and the pod's entry in the node's probe set.

IPv6 (``inpod.ipv6: true``, 1.23+) is applied as upstream's node agent applies it: every
per-family step is done for both families — ``ip6tables-restore --noflush`` with the v6 rule file
per table, ``ip -6 rule`` 32764 and ``ip -6 route local ::/0 dev lo table 100`` in each pod
netns (the route is skipped where the pod's ``lo`` has IPv6 disabled, as 1.23+ does), the
node's v6 ``ISTIO_POSTRT`` and its ``istio-inpod-probes-v6`` set (family inet6; entries for
pods with an IPv6 address). No sysctls in either family. With IPv6 off nothing IPv6 is read or
written. The native nft backend of in-pod mode (1.28+) is not implemented.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import re
import time
from pathlib import Path
from typing import Mapping, Optional

from . import desired as desired_mod
from . import names, observe as observe_mod
from .apply import ConflictError, ConvergenceError, Engine, Result, _save_blocks
from .host import IPTABLES_WAIT, Host, HostError, MissingFeature, NetlinkFailed, NetnsRef
from .model import IptRule, NetnsState, Pod, Rendered, Route, Values
from .plan import NetnsPlan, Observation, ObservedRule, ownership, plan_netns, removal
from .render import restore_text

log = logging.getLogger(__name__)

BACKENDS = ("iptables", "iptables-nft", "iptables-legacy")

# 1.23+ leaves out the v6 table-100 route when the pod's lo has IPv6 disabled (#51712)
LO_IPV6_OFF = "net/ipv6/conf/lo/disable_ipv6"
# the state-file key of the ip6tables-nft tables that existed before our first IPv6 write
_IP6_TABLES_KEY = "ip6tables_tables_nft"


class InpodError(HostError):
    """The in-pod engine cannot do what was asked (a pod without a netns, a backend)."""


# ---------------------------------------------------------------- canonical form (§2.4)


_BARE_ADDR = re.compile(r"(?<!\S)(-[sd]) ([0-9A-Fa-f.:]+)(?=\s|$)")


def canonical(rule: IptRule) -> IptRule:
    """One rule in upstream's spelling -> as ``iptables-save`` prints it (inpod-mode.md §2.4):

    - a bare ``-s``/``-d`` address gets its prefix length (``/32``, ``/128``);
    - ``--to-port N`` (upstream's UDP DNS rule) is ``--to-ports N``;
    - ``-p tcp [!] --dport`` gets the implicit ``-m tcp``;
    - ``-m owner --socket-exists -p tcp`` is printed protocol first;
    - TPROXY without ``--on-ip`` (1.21-1.23) shows ``--on-ip 0.0.0.0`` (``::`` for IPv6);
    - ``-p tcp -i lo`` is printed interface first.

    Legacy templates are written canonically already; this is only for in-pod rules.
    """
    a = rule.args
    a = _BARE_ADDR.sub(lambda m: f"{m[1]} {m[2]}/{32 if '.' in m[2] else 128}", a)
    a = re.sub(r"--to-port (?=\d)", "--to-ports ", a)
    a = re.sub(r"-p tcp (! )?--dport", lambda m: f"-p tcp -m tcp {m[1] or ''}--dport", a)
    a = a.replace("-m owner --socket-exists -p tcp", "-p tcp -m owner --socket-exists")
    on_ip = "0.0.0.0" if rule.family == 4 else "::"
    a = re.sub(r"(--on-port \d+) (--tproxy-mark)", rf"\1 --on-ip {on_ip} \2", a)
    a = a.replace("-p tcp -i lo", "-i lo -p tcp")
    return dataclasses.replace(rule, args=a)


def canonical_route(route: Route) -> Route:
    """A route as the kernel reports it back. IPv6 routes have no scope (the kernel ignores the
    ``scope host`` upstream asks for on ``local ::/0``), so the v6 route is compared without it."""
    if route.family == 6 and route.scope is not None:
        return dataclasses.replace(route, scope=None)
    return route


def canonical_netns(ns: NetnsState) -> NetnsState:
    return dataclasses.replace(ns, iptables=tuple(canonical(r) for r in ns.iptables),
                               routes=tuple(canonical_route(r) for r in ns.routes))


def pod_role(pod: Pod) -> str:
    return f"pod:{pod.key}"


def _ip(family: int) -> str:
    """``ip`` or ``ip -6``, as a step of :meth:`InpodEngine.pod_add` is reported."""
    return "ip -6" if family == 6 else "ip"


# ---------------------------------------------------------------- the engine


class InpodEngine(Engine):
    """One node in in-pod mode: its netns and the netns of each ambient pod on it."""

    _reads_early = False     # the pod netns come and go: each is read when it is planned

    def __init__(self, values: Values, node_ns: NetnsRef, pods: Mapping[str, NetnsRef], *,
                 backend: str = "iptables", rules: Optional[Path] = None):
        if backend not in BACKENDS:
            raise InpodError(f"backend {backend!r}: in-pod mode is applied with "
                             f"{', '.join(BACKENDS)} (its native nft backend is not implemented)")
        # the legacy engine's per-netns machinery, pointed at the node alone; the ztunnel
        # Host it makes is never started (in-pod mode has no ztunnel netns to program)
        super().__init__(values, node_ns, node_ns, backend=backend, rules=rules)
        self.hosts.pop("ztunnel").close()
        self._ip6tables_ok = False
        self.pod_ns: dict[str, NetnsRef] = {}
        self._pods_by_role: dict[str, Pod] = {}
        by_uid = {p.uid: p for p in values.pods}
        for uid, ref in pods.items():
            if uid not in by_uid:
                raise InpodError(f"netns given for pod UID {uid}, which the values do not list")
            self._add_pod(by_uid[uid], NetnsRef.resolve(ref))
        missing = [p.key for p in values.pods if p.uid not in self.pod_ns]
        if missing:
            raise InpodError(f"no network namespace for the ambient pod(s) {', '.join(missing)}: "
                             "in-pod rules live inside each pod's netns")

    def _add_pod(self, pod: Pod, ref: NetnsRef) -> None:
        role = pod_role(pod)
        self.pod_ns[pod.uid] = ref
        self._pods_by_role[role] = pod
        if role not in self.hosts:
            self.hosts[role] = Host(ref)

    @property
    def families(self) -> tuple[int, ...]:
        """The iptables/rule/route families this engine reads and writes: (4, 6) with IPv6 on."""
        return (4, 6) if desired_mod.inpod_ipv6(self.values) else (4,)

    # ------------------------------------------------------------ what we want

    def check_features(self) -> None:
        feats = self.hosts["node"].features()
        if self.variant == "nft" and not feats.iptables_nft:
            raise MissingFeature("iptables_nft", self.node_ns.spec,
                                 "install iptables or use --backend iptables-legacy")
        if self.variant == "legacy" and not feats.iptables_legacy:
            raise MissingFeature("iptables_legacy", self.node_ns.spec, "use --backend iptables (nft)")
        if not feats.ipset:
            raise MissingFeature("ipset", self.node_ns.spec, "install ipset (the probe set needs it)")
        if 6 in self.families and not self._ip6tables_ok:
            self._check_ip6tables()
            self._ip6tables_ok = True

    def _check_ip6tables(self) -> None:
        """IPv6 needs the kernel's IPv6 stack and ip6tables of the chosen variant; probed once in
        the node netns with reads that create nothing (no table appears by listing it)."""
        node = self.hosts["node"]
        if node.sysctl_get([LO_IPV6_OFF]).get(LO_IPV6_OFF) is None:
            raise MissingFeature("ip6tables", self.node_ns.spec, "the kernel has no IPv6 (no /proc/sys/net/ipv6)")
        if self.variant == "nft":
            argv = ["ip6tables-nft", "-w", IPTABLES_WAIT, "-t", "filter", "-S"]
        else:
            argv = ["ip6tables-legacy-save"]
        cp = node.run(argv, check=False, timeout=10)
        if cp.returncode != 0:
            first = next((l.strip() for l in cp.stderr.splitlines() if l.strip()), f"exit {cp.returncode}")
            raise MissingFeature("ip6tables", self.node_ns.spec, f"{' '.join(argv)}: {first}")

    def node_params(self) -> Values:
        # in-pod rules use no HostIP, tunnel remote or GENEVE port: nothing to derive
        return self.values

    def desired(self) -> Rendered:
        """The rendered in-pod design, every iptables rule and route in canonical form, fitted to
        each pod's netns (:meth:`_fit`)."""
        rendered = desired_mod.render(self.values, "inpod", rules=self.rules)
        return dataclasses.replace(rendered, netns=tuple(canonical_netns(self._fit(ns)) for ns in rendered.netns))

    def _fit(self, ns: NetnsState) -> NetnsState:
        """The run-time check of 1.23+: no v6 table-100 route in a pod netns whose ``lo`` has
        IPv6 disabled (the kernel would refuse it). The ip rule and ip6tables rules stay."""
        if not ns.role.startswith("pod:") or not any(r.family == 6 for r in ns.routes):
            return ns
        if self.hosts[ns.role].sysctl_get([LO_IPV6_OFF]).get(LO_IPV6_OFF) != "1":
            return ns
        log.info("role=%s: lo has IPv6 disabled, no IPv6 table-%d route", ns.role, names.INPOD_TABLE)
        return dataclasses.replace(ns, routes=tuple(r for r in ns.routes if r.family != 6))

    # ------------------------------------------------------------ what is there

    def observe(self, want: NetnsState) -> Observation:
        host = self.hosts[want.role]
        own = ownership(want.role, "inpod")
        seen = observe_mod.observe(host, want.role, variant=self.variant, tables=own.tables,
                                   families=self.families)
        return Observation(
            role=want.role, ipsets=observe_mod.settle_grown_sets(seen.ipsets, want.ipsets),
            ipset_entries=seen.ipset_entries, iptables=seen.iptables,
            chains=frozenset(seen.chains), chains6=frozenset(seen.chains6),
            ip_rules=tuple(ObservedRule(o.rule, o.plain, o.text) for o in seen.ip_rules),
            routes=tuple(r for r in seen.routes if r.table in own.tables))

    def plan_one(self, want: NetnsState) -> NetnsPlan:
        return plan_netns(want, self.observe(want), ownership(want.role, "inpod"), families=self.families)

    # ------------------------------------------------------------ changing things

    def apply(self, *, dry_run: bool = False) -> Result:
        t0 = time.perf_counter()
        self.check_features()
        with self.locked():
            rendered = self.desired()
            p = self.plan(rendered)
            if p.conflicts:
                raise ConflictError("refusing to change anything: " + "; ".join(p.conflicts))
            result = Result(plan=p)
            if dry_run or p.empty:
                result.seconds = time.perf_counter() - t0
                return result
            # pods first: the node's probe SNAT only matters for enrolled pods
            order = [ns.role for ns in rendered.netns if ns.role != "node"] + ["node"]
            for role in order:
                ns_plan = p.get(role)
                if ns_plan.changes:
                    result.applied += self._apply_netns(rendered.get(role), ns_plan)
            after = self.plan(rendered)
            if not after.empty:
                raise ConvergenceError("did not converge; still to change:\n" + after.text())
        result.seconds = time.perf_counter() - t0
        return result

    def cleanup(self, *, dry_run: bool = False) -> Result:
        """Remove exactly what is ours in the node netns and every pod netns."""
        t0 = time.perf_counter()
        with self.locked():
            plans = []
            for role in ["node"] + sorted(r for r in self.hosts if r != "node"):
                obs = self.observe(NetnsState(role=role))
                plans.append(removal(obs, ownership(role, "inpod"), families=self.families))
            return self._remove(plans, dry_run, t0)

    # ------------------------------------------------------------ IPv6 tables we created

    def _record_tables(self, host: Host, role: str) -> None:
        """As the legacy engine does for IPv4, and for the IPv6 tables too when IPv6 is on:
        ip6tables-nft creates ``ip6`` tables on first use that cleanup then drops again."""
        super()._record_tables(host, role)
        if 6 not in self.families or self.variant != "nft":
            return
        state = self._load_state(host)
        if _IP6_TABLES_KEY not in state:
            # called before this netns is written: what the save shows existed before us
            state[_IP6_TABLES_KEY] = sorted(_save_blocks(host.iptables_save(self.variant, family=6)))
            self._save_state(host, state)

    def _drop_tables_we_created(self, host: Host) -> None:
        """The legacy engine's IPv4 clean-up of empty tables it created, then the same for IPv6
        (only with a record from before our first IPv6 write; without one nothing is dropped)."""
        super()._drop_tables_we_created(host)
        before = self._load_state(host).get(_IP6_TABLES_KEY)
        if before is None or self.variant != "nft":
            return
        for table, lines in _save_blocks(host.iptables_save(self.variant, family=6)).items():
            if table not in before and all(re.fullmatch(r":[A-Z]+ ACCEPT \[\d+:\d+\]", l) for l in lines):
                host.nft(f"delete table ip6 {table}")
                log.info("removed empty ip6tables-nft table=%s netns=%s", table, host.ns.spec)

    # ------------------------------------------------------------ one pod

    def pod_add(self, pod: Pod, netns: "NetnsRef | str | None" = None) -> list[str]:
        """Enroll one pod the way the node agent does (inpod-mode.md §2.1, §3.2), with no
        full observe/plan of the node:

        1. inside the pod's netns: an ``iptables-save`` probe (1.25+ does it too); with no
           ``ISTIO_*`` chain there, upstream's restore text in ONE ``iptables-restore
           --noflush`` call, then the table-100 local route and the ip rule 32764. A netns
           that already holds our chains goes through the planner instead (repair, no
           duplicate jumps);
        2. in the node's netns: the pod's IP in the probe set, comment = pod UID.

        With IPv6 on, each step is done for both families: an ``ip6tables-save`` probe too, one
        ``ip6tables-restore --noflush`` with the v6 file after the v4 one, the v6 route (unless
        the pod's lo has IPv6 disabled) and rule, and the pod's IPv6 address in the v6 set.

        Returns what was done, one line per step.
        """
        if netns is not None:
            self._add_pod(pod, NetnsRef.resolve(netns))
        if pod.uid not in self.pod_ns:
            raise InpodError(f"no network namespace known for pod {pod.key} (uid {pod.uid})")
        families = self.families
        if 6 in families and not self._ip6tables_ok:
            self._check_ip6tables()
            self._ip6tables_ok = True
        values = dataclasses.replace(self.values, pods=(pod,))
        rendered = desired_mod.render(values, "inpod", rules=self.rules)
        want = self._fit(rendered.get(pod_role(pod)))
        host = self.hosts[pod_role(pod)]
        done: list[str] = []
        with self.locked():
            saving = [host.iptables_save_start(self.variant, family=fam) for fam in families]
            saved = [s.result().stdout for s in saving]
            ours = ":" + names.INPOD_CHAIN_PREFIX
            if any(line.startswith(ours) for text in saved for line in text.splitlines()):
                # not a fresh pod netns: converge it through the planner
                canon = canonical_netns(want)
                ns_plan = self.plan_one(canon)
                if ns_plan.conflicts:
                    raise ConflictError("; ".join(ns_plan.conflicts))
                self._apply_netns(canon, ns_plan)
                done += [c.line() for c in ns_plan.changes]
            else:
                for fam in families:
                    rules = want.rules_for(fam)
                    host.iptables_restore(restore_text(rules), self.variant, family=fam, noflush=True)
                    tool = "iptables-restore" if fam == 4 else "ip6tables-restore"
                    done.append(f"{tool} --noflush: {len(rules)} rules")
                for r in want.routes:
                    host.route_replace(r)
                    # v4 lines read as they always did; the v6 route is marked ``ip -6``
                    tag = "ip -6 " if r.family == 6 else ""
                    done.append(f"{tag}route replace {r.show_with_table()}")
                have = {o.rule for fam in families for o in host.ip_rules(fam) if o.plain}
                for r in want.ip_rules:
                    if r not in have:
                        host.rule_add(r)
                        done.append(f"{_ip(r.family)} rule add {r.show().replace(chr(9), ' ')}")
            node = self.hosts["node"]
            node_state = rendered.get("node")
            for e in node_state.ipset_entries:
                try:
                    node.ipset_add(e.set, e.ip, e.comment)
                except NetlinkFailed as err:
                    if err.code == errno.ENOENT:
                        raise InpodError(f"{e.set} does not exist in {self.node_ns.spec}: "
                                         "run apply first") from None
                    raise
                done.append(e.show())
        if all(p.uid != pod.uid for p in self.values.pods):
            self.values = dataclasses.replace(self.values, pods=self.values.pods + (pod,))
        return done

    def release(self, pod: Pod) -> None:
        """Forget a pod without touching the kernel: its netns worker stops, and the engine no
        longer plans it (what it holds stays). For callers that enroll many pods and keep
        none of them in view."""
        host = self.hosts.pop(pod_role(pod), None)
        if host is not None:
            host.close()
        self.pod_ns.pop(pod.uid, None)
        self._pods_by_role.pop(pod_role(pod), None)
        self.values = dataclasses.replace(self.values,
                                          pods=tuple(p for p in self.values.pods if p.uid != pod.uid))

    def pod_remove(self, pod: Pod) -> list[str]:
        """Unenroll one pod that keeps running (§4.7): its probe-set entry (only if the comment
        is its UID), then everything of ours inside its netns. With IPv6 on, its IPv6 address
        leaves the v6 set the same way, and both families are cleaned inside its netns."""
        done: list[str] = []
        node = self.hosts["node"]
        wanted = sorted({(e.set, e.ip) for e in desired_mod.render(
            dataclasses.replace(self.values, pods=(pod,)), "inpod", rules=self.rules).get("node").ipset_entries})
        with self.locked():
            # every entry is checked before any is removed: a reused address leaves both in place
            found = [(s, ip, node.ipset_entry(s, ip)) for s, ip in wanted]
            for s, ip, entry in found:
                if entry is not None and entry.comment not in (None, pod.uid):
                    raise InpodError(f"{ip} in {s} belongs to pod UID {entry.comment}, not {pod.uid}")
            for s, ip, entry in found:
                if entry is not None and node.ipset_del(s, ip):
                    done.append(f"del {s} {ip}")
            role = pod_role(pod)
            if role in self.hosts:
                p = removal(self.observe(NetnsState(role=role)), ownership(role, "inpod"),
                            families=self.families)
                self._cleanup_netns(p)
                done += [c.line() for c in p.changes]
        self.values = dataclasses.replace(self.values,
                                          pods=tuple(p for p in self.values.pods if p.uid != pod.uid))
        return done
