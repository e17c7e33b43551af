"""``bench enroll``: how fast the engine programs a node, and how that compares with the original.

Owns the benchmark of the legacy design's node programming: the throwaway network namespaces it
runs in, what is measured and how, the targets, and the report (aligned table or JSON).

Everything kernel-side happens in a node + ztunnel netns pair created for the run (uniquely
named ``nr-bench-{node,zt}-<hex>``, wired kind/ptp style as in ``tests/netns/test_engine.py``)
and removed in a ``finally``, also on Ctrl-C or SIGTERM. The namespace the process runs in is
never changed. Tunnels use the kernel VXLAN driver (deterministic, no user-space bridge process;
GENEVE is the original's device and absent from many kernels), iptables the nft backend.

What is measured (``run``):

- full apply from empty, per pod count: ``Engine.apply()`` on a pair that holds nothing of
  ours, i.e. render the desired state + observe + plan + write + verify (observe + plan again).
  A fresh pair per repeat; the Engine is warm (features probed, netlink sockets open), as in a
  long-running agent. Median over the repeats, with min and max, and the same per phase as the
  engine times them (``Result.timings``; reading overlaps rendering, so rendering is shown as
  part of the first phase).
- re-apply with no changes: the steady-state resync cost on the converged pair.
- incremental ``pod_add`` / ``pod_remove`` (with the UID check) latency, p50/p99 over K pods on
  top of the base state (1000 pods by default), in-process on the long-lived Engine.
- the original's way for the base state: one process per ``ipset add``, per ``ip route add``,
  per ``ip rule add``, per iptables chain and rule, plus the ``bash -c "ip route show … | wc -l"``
  existence check before each pod route; links (netlink) and sysctls (files) as the original
  did them. The engine's own plan must come out empty afterwards (same state). Each run follows
  one full apply of the same pods, so both sides of the ratio see the same machine load.
- peak RSS of this process (``ru_maxrss``), meaningful when the largest run is 5000 pods.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import math
import os
import resource
import secrets
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

from . import names, render, values as values_mod
from .host import Host, HostError, NetnsRef, route_args
from .model import IpRule, NetnsState, Pod, Rendered, Values

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- targets (the issue's, 2 cores)
TARGET_PODS = 1000              # the pod count the apply, incremental and speed-up targets are for
TARGET_APPLY_MS = 100.0         # full apply of 1000 pods
TARGET_P99_MS = 5.0             # incremental enrollment p99 (pod_add and pod_remove)
TARGET_SPEEDUP = 30.0           # vs one process per command
RSS_PODS = 5000
TARGET_RSS_MB = 100.0

DEFAULT_PODS = (100, 1000, 5000)
DEFAULT_REPEAT = 3
DEFAULT_INCREMENTAL = 200
MAX_PODS = 60000                # pod IPs come from a /16 (see bench_values)

BACKEND = "iptables"            # iptables-nft-restore
IPTABLES = "iptables-nft"       # the same backend for the original's way
TUNNEL = "vxlan"

# address plan (kernel-notes.md §2) with a /16 podCIDR, so 5000+ pods fit
POD_CIDR = "10.244.0.0/16"
HOST_IP = "10.244.1.1"
ZT_IP = "10.244.1.2"
ZT_VETH = "veth-zt"
ZT_IF = "eth0"
FIRST_POD_IP = int(ipaddress.IPv4Address("10.244.2.1"))


class BenchError(HostError):
    """The benchmark could not run, or what it ran was not the work it meant to measure."""


# ---------------------------------------------------------------- inputs


def bench_pod(i: int) -> Pod:
    """Pod number ``i``: a UUID-shaped UID (real comment length), an IP from the /16."""
    return Pod(namespace="bench", name=f"pod-{i}", uid=f"00000000-0000-4000-8000-{i:012d}",
               ip=str(ipaddress.IPv4Address(FIRST_POD_IP + i)))


def bench_values(n: int) -> Values:
    """The example node (kernel-notes.md §2) with ``n`` pods, validated like a values file."""
    pods = [dataclasses.asdict(bench_pod(i)) for i in range(n)]
    data = {
        "node": {"name": "bench-node", "internalIP": "172.18.0.2", "podCIDR": POD_CIDR,
                 "hostIP": HOST_IP},
        "ztunnel": {"ip": ZT_IP, "veth": ZT_VETH, "interface": ZT_IF},
        "geneve": {"dstPort": names.GENEVE_DEFAULT_PORT},
        "istioVersion": "1.20",
        "ipset": {"comments": True},
        "pods": [{k: p[k] for k in ("namespace", "name", "uid", "ip")} for p in pods],
    }
    return values_mod.parse(data, source=f"<bench: {n} pods>")


def parse_pod_counts(text: str) -> tuple[int, ...]:
    """``"100,1000,5000"`` -> (100, 1000, 5000): positive, at most MAX_PODS, sorted, unique."""
    counts = set()
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or not 0 < int(part) <= MAX_PODS:
            raise ValueError(f"{part!r} is not a pod count (1-{MAX_PODS})")
        counts.add(int(part))
    if not counts:
        raise ValueError("no pod counts given")
    return tuple(sorted(counts))


def percentile(samples: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p99 of 200 samples is the 2nd largest; of 20, the largest)."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


# ---------------------------------------------------------------- the throwaway netns pair


def _ip(*args: str) -> None:
    cp = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if cp.returncode != 0:
        raise BenchError(f"`ip {shlex.join(args)}` exited {cp.returncode}: {cp.stderr.strip()}")


def _remove_netns(name: str) -> None:
    """Kill anything still inside (nothing should be: VXLAN needs no process), then delete."""
    for _ in range(20):
        cp = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
        pids = [int(p) for p in cp.stdout.split() if p.isdigit()]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    cp = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True)
    if cp.returncode != 0 and os.path.exists(os.path.join("/var/run/netns", name)):
        log.warning("could not remove netns %s: %s", name, cp.stderr.strip())


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Let Ctrl-C / SIGTERM wait until the block is done (cleanup must not be cut short), then
    raise KeyboardInterrupt if one came. Only the main thread can do this; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: arrived.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if arrived:
        raise KeyboardInterrupt


@contextlib.contextmanager
def netns_pair(created: list[str]) -> Iterator[tuple[NetnsRef, NetnsRef]]:
    """A fresh node + ztunnel netns pair, wired like a kind node and its ztunnel pod, removed on
    exit whatever happens. Every name made is appended to ``created`` (for the report)."""
    tag = secrets.token_hex(4)
    node, zt = f"nr-bench-node-{tag}", f"nr-bench-zt-{tag}"
    made: list[str] = []
    try:
        for name in (node, zt):
            # remembered before it exists: an interrupt can land right after `ip` made it
            made.append(name)
            _ip("netns", "add", name)
            created.append(name)
            _ip("-n", name, "link", "set", "lo", "up")
        refs = NetnsRef.resolve(node), NetnsRef.resolve(zt)
        with Host(refs[0]) as nh, Host(refs[1]) as zh:
            # made from inside the node netns: the peer goes straight into the ztunnel netns
            nh.run(["ip", "link", "add", ZT_VETH, "type", "veth", "peer", "name", ZT_IF, "netns", zt])
            for argv in (["ip", "addr", "add", f"{HOST_IP}/32", "dev", ZT_VETH],
                         ["ip", "link", "set", ZT_VETH, "up"],
                         ["ip", "route", "add", f"{ZT_IP}/32", "dev", ZT_VETH, "scope", "link"]):
                nh.run(argv)
            for argv in (["ip", "addr", "add", f"{ZT_IP}/32", "dev", ZT_IF],
                         ["ip", "link", "set", ZT_IF, "up"],
                         ["ip", "route", "add", f"{HOST_IP}/32", "dev", ZT_IF, "scope", "link"],
                         ["ip", "route", "add", "default", "via", HOST_IP, "dev", ZT_IF]):
                zh.run(argv)
            nh.sysctl_set({"net/ipv4/ip_forward": "1"})
        yield refs
    finally:
        with signals_deferred():
            for name in reversed(made):
                _remove_netns(name)


@contextlib.contextmanager
def warm_engine(values: Values, node: NetnsRef, zt: NetnsRef):
    """An Engine as a long-running agent has it: features probed, netlink sockets open."""
    from .apply import Engine

    eng = Engine(values, node, zt, backend=BACKEND, tunnel=TUNNEL)
    try:
        eng.check_features()
        for role in ("node", "ztunnel"):
            eng.observe(NetnsState(role=role))
        yield eng
    finally:
        eng.close()


@contextlib.contextmanager
def private_state_dir() -> Iterator[str]:
    """The engine's state files (sysctls before apply, lock files) go to a temporary folder,
    never to the machine's /run/noderedirect."""
    old = os.environ.get("NODEREDIRECT_STATE_DIR")
    with tempfile.TemporaryDirectory(prefix="nr-bench-state-") as d:
        os.environ["NODEREDIRECT_STATE_DIR"] = d
        try:
            yield d
        finally:
            if old is None:
                os.environ.pop("NODEREDIRECT_STATE_DIR", None)
            else:
                os.environ["NODEREDIRECT_STATE_DIR"] = old


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _stats(samples_s: Sequence[float]) -> dict:
    ms = [_ms(s) for s in samples_s]
    return {"median_ms": round(statistics.median(ms), 3), "min_ms": min(ms), "max_ms": max(ms),
            "samples_ms": ms}


# ---------------------------------------------------------------- the engine's way


# The phases of one Engine.apply(), as the engine times them (Result.timings): reading both
# netns and rendering run side by side, then the plan; the writes; the verification. Rendering
# is also timed on its own (wrapping the engine's render method), shown as part of the first.
PHASES = ("plan", "render", "write", "verify", "other")


@contextlib.contextmanager
def render_clock(eng: Any) -> Iterator[list[float]]:
    """Seconds spent in the engine's render during the next apply() calls (the class is not
    touched: the method is wrapped on this one instance)."""
    spent: list[float] = []
    inner = eng._desired_for

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - start)
    eng._desired_for = timed
    try:
        yield spent
    finally:
        del eng._desired_for


def _phases(total: float, timings: dict[str, float], render: list[float]) -> dict[str, float]:
    """One apply's seconds per phase; ``other`` is the rest (feature check, lock, conflicts).
    ``render`` is inside ``plan`` (the first render of the apply; later ones hit its cache)."""
    out = {"plan": timings.get("observe+render+plan", 0.0), "render": render[0] if render else 0.0,
           "write": timings.get("write", 0.0), "verify": timings.get("verify", 0.0)}
    out["other"] = max(0.0, total - out["plan"] - out["write"] - out["verify"])
    return out


def _timed_apply(eng: Any) -> tuple[float, dict[str, float], Any]:
    with render_clock(eng) as render:
        seconds, res = _timed(eng.apply)
    return seconds, _phases(seconds, res.timings, render), res


def measure_apply(values: Values, repeat: int, created: list[str], progress: Callable[[str], None],
                  then: Optional[Callable[[Any], None]] = None,
                  between: Optional[Callable[[int], None]] = None) -> dict:
    """Full apply from empty, ``repeat`` times on fresh pairs; then, on the last converged pair,
    the re-apply with no changes ``repeat`` times, and ``then(eng)``. Each apply is also split
    into its phases (render, plan, write, verify, other). ``between(r)`` runs after repeat r
    (its pair removed): what is compared with the apply is measured in the same stretch of
    time, so a noisy neighbour skews both sides alike."""
    n = len(values.pods)
    full: list[float] = []
    full_phases: list[dict[str, float]] = []
    out: dict = {"pods": n}
    for r in range(repeat):
        progress(f"full apply, {n} pods ({r + 1}/{repeat})")
        with netns_pair(created) as (node, zt), warm_engine(values, node, zt) as eng:
            seconds, phases, res = _timed_apply(eng)
            if not res.changed or res.plan.conflicts:
                raise BenchError(f"apply from empty of {n} pods changed nothing or conflicted: "
                                 f"{res.plan.conflicts}")
            full.append(seconds)
            full_phases.append(phases)
            if r == repeat - 1:
                out.update(measure_reapply(eng, n, repeat, progress))
                if then is not None:
                    then(eng)
        if between is not None:
            between(r)
    out.update(full=_stats(full), full_phases=_phase_stats(full_phases))
    return out


def measure_reapply(eng: Any, n: int, repeat: int, progress: Callable[[str], None]) -> dict:
    progress(f"re-apply, {n} pods")
    again: list[float] = []
    again_phases: list[dict[str, float]] = []
    for _ in range(repeat):
        seconds, phases, res = _timed_apply(eng)
        if not res.plan.empty:
            raise BenchError(f"re-apply of {n} pods was not empty:\n{res.plan.text()}")
        again.append(seconds)
        again_phases.append(phases)
    return {"reapply": _stats(again), "reapply_phases": _phase_stats(again_phases)}


def _phase_stats(samples: list[dict[str, float]]) -> dict[str, dict]:
    return {phase: _stats([s[phase] for s in samples]) for phase in samples[0]}


def measure_incremental(eng: Any, base: int, k: int, progress: Callable[[str], None]) -> dict:
    """pod_add then pod_remove (with UID) of K new pods on the converged base state, one call
    each, timed one by one. One add/remove pair first is not counted (it opens the IPSet
    socket, which a running agent did long ago)."""
    extra = [bench_pod(base + i) for i in range(k + 1)]
    warm, pods = extra[0], extra[1:]
    eng.pod_add(warm)
    eng.pod_remove(warm.ip, warm.uid)
    progress(f"incremental: {k} x pod_add on {base} pods")
    adds = [_timed(lambda p=p: eng.pod_add(p))[0] for p in pods]
    host = eng.hosts["node"]
    members = host.ipsets(only=lambda name: name == names.IPSET).get(names.IPSET, (None, []))[1]
    routes = host.routes(names.TABLE_INBOUND)
    if len(members) != base + k or len(routes) != base + k + 1:     # + the ztunnel route
        raise BenchError(f"after {k} pod_add on {base} pods: {len(members)} set members and "
                         f"{len(routes)} table-{names.TABLE_INBOUND} routes")
    progress(f"incremental: {k} x pod_remove (with UID check) on {base + k} pods")
    removes = []
    for p in pods:
        seconds, done = _timed(lambda p=p: eng.pod_remove(p.ip, p.uid))
        if len(done) != 2:
            raise BenchError(f"pod_remove {p.ip} did {done}, not one member and one route")
        removes.append(seconds)
    if not eng.plan().empty:
        raise BenchError("after removing the added pods the node differs from the values")

    def summary(samples: list[float]) -> dict:
        return {"p50_ms": _ms(percentile(samples, 50)), "p99_ms": _ms(percentile(samples, 99)),
                "max_ms": _ms(max(samples))}
    return {"base_pods": base, "k": k, "pod_add": summary(adds), "pod_remove": summary(removes),
            "pod_remove_checks_uid": True}


# ---------------------------------------------------------------- the original's way


@dataclass
class OriginalWay:
    """The commands the original ran for one node, one process each (legacy-mode.md W2)."""

    node: list[list[str]] = field(default_factory=list)
    ztunnel: list[list[str]] = field(default_factory=list)
    per_pod: list[tuple[list[str], list[str], list[str]]] = field(default_factory=list)

    @property
    def processes(self) -> int:
        # per pod: ipset add, ip route add, and the check (bash, ip and wc)
        return len(self.node) + len(self.ztunnel) + 5 * len(self.per_pod)


def _rule_argv(r: IpRule) -> list[str]:
    argv = ["ip", "rule", "add", "priority", str(r.priority)]
    if r.fwmark is not None:
        mask = f"/{names.hexmark(r.fwmask)}" if r.fwmask not in (None, names.MARK_WHOLE) else ""
        argv += ["fwmark", names.hexmark(r.fwmark) + mask]
    return argv + (["lookup", str(r.table)] if r.action == "lookup" else ["goto", str(r.goto)])


def _iptables_argvs(state: NetnsState) -> list[list[str]]:
    """``-N`` for each of our chains, then every rule in the templates' (the original's) order."""
    out = []
    for table in names.TABLE_ORDER:
        for chain in render.declared_chains(list(state.iptables), table):
            if names.is_owned_chain(chain):
                out.append([IPTABLES, "-w", "-t", table, "-N", chain])
    for r in state.iptables:
        out.append([IPTABLES, "-w", "-t", r.table, *shlex.split(r.restore_line())])
    return out


def original_commands(rendered: Rendered, pods: Sequence[Pod]) -> OriginalWay:
    way = OriginalWay()
    node, zt = rendered.get("node"), rendered.get("ztunnel")
    pod_ips = {f"{p.ip}/32" for p in pods}
    for s in node.ipsets:
        way.node.append(["ipset", *shlex.split(s.show())])
    way.node += _iptables_argvs(node)
    fixed = [r for r in node.routes if not (r.table == names.TABLE_INBOUND and r.dst in pod_ips)]
    way.node += [["ip", "route", "add", *route_args(r)] for r in fixed]
    way.node += [_rule_argv(r) for r in node.ip_rules]
    by_ip = {r.dst: r for r in node.routes if r.table == names.TABLE_INBOUND and r.dst in pod_ips}
    for e in node.ipset_entries:
        route = by_ip[f"{e.ip}/32"]
        shown = ["ip", "route", "show", "table", str(route.table), route.dst.removesuffix("/32"),
                 "via", route.via, "dev", route.dev, "src", route.src]
        way.per_pod.append((["ipset", *shlex.split(e.show())],
                            ["bash", "-c", f"{shlex.join(shown)} | wc -l"],
                            ["ip", "route", "add", *route_args(route)]))
    way.ztunnel = _iptables_argvs(zt)
    way.ztunnel += [["ip", "route", "add", *route_args(r)] for r in zt.routes]
    way.ztunnel += [_rule_argv(r) for r in zt.ip_rules]
    return way


def run_original(eng: Any, rendered: Rendered, way: OriginalWay) -> None:
    """Program both netns the original's way. Processes are started from the Host's thread
    inside the netns (as the engine's own commands are), so neither side pays for nsenter."""
    node, zt = eng.hosts["node"], eng.hosts["ztunnel"]
    for role, host, argvs in (("ztunnel", zt, way.ztunnel), ("node", node, way.node)):
        want = rendered.get(role)
        eng.driver.ensure(host.ns.path, list(want.links))          # netlink, as the original
        host.sysctl_set({s.key: s.value for s in want.sysctls})     # files, as the original
        for argv in argvs:
            host.run(argv)
    for add_entry, exists, add_route in way.per_pod:
        node.run(add_entry)
        if node.run(exists).stdout.strip() != "1":
            node.run(add_route)


ORIGINAL_INCLUDES = ["ipset create + one `ipset add` per pod",
                     "one `iptables-nft -N` per chain and one `iptables-nft -A/-I` per rule",
                     "one `ip route add` per route (pod routes and fixed ones)",
                     "one `bash -c \"ip route show … | wc -l\"` existence check per pod route",
                     "one `ip rule add` per rule",
                     "links by netlink and sysctls by file, as the original did"]


def original_once(values: Values, created: list[str]) -> tuple[float, OriginalWay]:
    """The original's way once, on a fresh pair; the engine's plan must then be empty."""
    with netns_pair(created) as (node, zt), warm_engine(values, node, zt) as eng:
        rendered = eng.desired()
        way = original_commands(rendered, values.pods)
        seconds = _timed(lambda: run_original(eng, rendered, way))[0]
        left = eng.plan(rendered)
        if not left.empty:
            raise BenchError("the original's way did not produce the engine's state; the "
                             f"engine would still change:\n{left.text()}")
    return seconds, way


# ---------------------------------------------------------------- the run


def base_count(pods: Sequence[int]) -> int:
    """The state the incremental and original's-way runs build on: 1000 pods if measured, else
    the largest count below it, else the smallest."""
    below = [p for p in pods if p <= TARGET_PODS]
    return max(below) if below else min(pods)


def _target(name: str, value: Optional[float], limit: float, unit: str, *, at_least: bool = False,
            measured: bool = True, why_na: str = "") -> dict:
    entry = {"name": name, "target": limit, "unit": unit, "comparison": ">=" if at_least else "<=",
             "value": value}
    if value is None or not measured:
        return {**entry, "result": "n/a", "why": why_na}
    ok = value >= limit if at_least else value <= limit
    return {**entry, "result": "PASS" if ok else "MISS"}


def targets(report: dict) -> list[dict]:
    by_n = {a["pods"]: a for a in report["apply"]}
    inc = report["incremental"]
    at_target = report["base_pods"] == TARGET_PODS
    out = [_target(f"full apply of {TARGET_PODS} pods", by_n.get(TARGET_PODS, {}).get("full", {}).get("median_ms"),
                   TARGET_APPLY_MS, "ms", why_na=f"{TARGET_PODS} pods not measured")]
    for op in ("pod_add", "pod_remove"):
        out.append(_target(f"incremental {op} p99 (on {TARGET_PODS} pods)",
                           inc[op]["p99_ms"] if inc else None, TARGET_P99_MS, "ms",
                           measured=at_target and bool(inc),
                           why_na=f"no incremental run on {TARGET_PODS} pods"))
    out.append(_target(f"speed-up vs one process per command ({TARGET_PODS} pods)",
                       report.get("speedup"), TARGET_SPEEDUP, "x", at_least=True,
                       measured=at_target and report.get("speedup") is not None,
                       why_na="--no-baseline" if report.get("original") is None
                       else f"compared at {report['base_pods']} pods"))
    largest = max(by_n)
    out.append(_target(f"peak RSS ({RSS_PODS} pods)", report["peak_rss_mb"], TARGET_RSS_MB, "MB",
                       measured=largest == RSS_PODS,
                       why_na=f"largest run was {largest} pods, not {RSS_PODS}"))
    return out


def run(pods: Sequence[int] = DEFAULT_PODS, repeat: int = DEFAULT_REPEAT,
        incremental: int = DEFAULT_INCREMENTAL, baseline: bool = True,
        progress: Callable[[str], None] = lambda _msg: None) -> dict:
    """Run every measurement; returns the report (``format_text`` / JSON-ready)."""
    if os.geteuid() != 0:
        raise BenchError("bench enroll needs root (it creates network namespaces)")
    for tool in ("ip", "ipset", IPTABLES, "iptables-nft-restore") + (("bash", "wc") if baseline else ()):
        if shutil.which(tool) is None:
            raise BenchError(f"bench enroll needs {tool!r} on PATH")
    pods = tuple(sorted(set(pods)))
    base = base_count(pods)
    created: list[str] = []
    report: dict = {
        "design": "legacy", "backend": f"{BACKEND} (iptables-nft-restore per table; ipset, routes, links, ip rules over netlink)",
        "tunnel": f"{TUNNEL} (kernel VXLAN stand-in for GENEVE: deterministic, no user-space bridge)",
        "apply_includes": "render desired state + observe + plan + write + verify (observe + plan again); "
                          "reading both netns overlaps rendering",
        "engine": "long-lived Engine: features probed and netlink sockets open before timing; "
                  "process start not included",
        "repeat": repeat, "pods": list(pods), "base_pods": base, "cpus": os.cpu_count(),
        "kernel": os.uname().release, "python": sys.version.split()[0],
        "apply": [], "incremental": None, "original": None, "speedup": None, "netns": created,
    }
    original: list[float] = []
    way: list[OriginalWay] = []

    def original_after(r: int) -> None:
        progress(f"the original's way, {base} pods ({r + 1}/{repeat})")
        seconds, made = original_once(base_values, created)
        original.append(seconds)
        way[:] = [made]

    with private_state_dir():
        for n in pods:
            values = bench_values(n)
            then = between = None
            if n == base:
                base_values = values
                between = original_after if baseline else None
                if incremental > 0:
                    def then(eng: Any, n: int = n) -> None:
                        report["incremental"] = measure_incremental(eng, n, incremental, progress)
            report["apply"].append(measure_apply(values, repeat, created, progress, then, between))
            del values
    if baseline:
        report["original"] = {"pods": base, **_stats(original), "processes": way[0].processes,
                              "includes": ORIGINAL_INCLUDES,
                              "timing": "one run after each full apply of the same pods, on its own pair"}
        ours = next(a for a in report["apply"] if a["pods"] == base)["full"]["median_ms"]
        report["speedup"] = round(report["original"]["median_ms"] / ours, 1)
    report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    report["peak_rss_children_mb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    report["peak_rss_pods"] = max(pods)
    report["netns_left"] = sorted(n for n in created if os.path.exists(os.path.join("/var/run/netns", n)))
    report["targets"] = targets(report)
    return report


# ---------------------------------------------------------------- the table


PHASE_LABELS = (("plan", "read both netns + render, side by side; plan"),
                ("render", "  of which: render desired state"),
                ("write", "write (ztunnel netns + node's inert part side by side, then capture)"),
                ("verify", "verify (read + plan again)"),
                ("other", "other (feature check, lock)"))


def _fmt_ms(ms: Optional[float]) -> str:
    if ms is None:
        return "-"
    if ms >= 1000:
        return f"{ms / 1000:.2f} s"
    return f"{ms:.1f} ms" if ms >= 10 else f"{ms:.2f} ms"


def format_text(report: dict) -> str:
    rows: list[tuple[str, str, str, str, str, str]] = []   # what, pods, value, range, target, result
    tg = {t["name"]: t for t in report["targets"]}

    def verdict(name: str) -> tuple[str, str]:
        t = tg[name]
        sign = "≥" if t.get("comparison") == ">=" else "≤"
        unit = {"ms": " ms", "MB": " MB", "x": "×"}[t["unit"]]
        return f"{sign} {t['target']:g}{unit}", t["result"]

    for a in report["apply"]:
        n = a["pods"]
        target, result = verdict(f"full apply of {TARGET_PODS} pods") if n == TARGET_PODS else ("", "")
        for what, key, phases in (("full apply from empty", "full", "full_phases"),
                                  ("re-apply, no changes (resync)", "reapply", "reapply_phases")):
            s = a[key]
            rows.append((what, str(n), _fmt_ms(s["median_ms"]),
                         f"{_fmt_ms(s['min_ms'])} – {_fmt_ms(s['max_ms'])}",
                         target if key == "full" else "", result if key == "full" else ""))
            for phase, label in PHASE_LABELS:
                p = a[phases][phase]
                if key == "reapply" and phase in ("write", "verify") and p["max_ms"] == 0:
                    continue             # nothing to write, so nothing to verify
                rows.append((f"  {label}", "", _fmt_ms(p["median_ms"]),
                             f"{_fmt_ms(p['min_ms'])} – {_fmt_ms(p['max_ms'])}", "", ""))
    inc = report["incremental"]
    if inc:
        for op in ("pod_add", "pod_remove"):
            label = f"incremental {op} p50" + (" (UID check)" if op == "pod_remove" else "")
            rows.append((label, f"{inc['base_pods']}+{inc['k']}", _fmt_ms(inc[op]["p50_ms"]), "", "", ""))
            target, result = verdict(f"incremental {op} p99 (on {TARGET_PODS} pods)")
            rows.append((f"incremental {op} p99", f"{inc['base_pods']}+{inc['k']}",
                         _fmt_ms(inc[op]["p99_ms"]), f"max {_fmt_ms(inc[op]['max_ms'])}", target, result))
    orig = report["original"]
    if orig:
        rows.append(("original's way (1 process per object)", str(orig["pods"]),
                     _fmt_ms(orig["median_ms"]), f"{_fmt_ms(orig['min_ms'])} – {_fmt_ms(orig['max_ms'])}",
                     f"{orig['processes']} processes", ""))
        target, result = verdict(f"speed-up vs one process per command ({TARGET_PODS} pods)")
        rows.append(("speed-up: original's way / full apply", str(orig["pods"]),
                     f"{report['speedup']:.1f}×", "", target, result))
    target, result = verdict(f"peak RSS ({RSS_PODS} pods)")
    rows.append(("peak RSS of this process", str(report["peak_rss_pods"]),
                 f"{report['peak_rss_mb']:.1f} MB", "", target, result))

    head = ("measurement", "pods", "median", "min – max", "target", "result")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(6)]
    aligns = ("<", ">", ">", ">", "<", "<")

    def line(r: Sequence[str]) -> str:
        return "  ".join(f"{c:{a}{w}}" for c, a, w in zip(r, aligns, widths)).rstrip()

    out = [
        f"noderedirect bench enroll: legacy design, backend {report['backend']}",
        f"tunnel driver: {report['tunnel']}",
        f"apply = {report['apply_includes']}",
        f"{report['engine']}; medians of {report['repeat']} repeats; {report['cpus']} CPUs, "
        f"kernel {report['kernel']}, Python {report['python']}",
        "",
        line(head),
        line(["-" * w for w in widths]),
        *[line(r) for r in rows],
    ]
    if orig:
        out += ["", "original's way includes: " + "; ".join(orig["includes"]) + ".",
                f"original's way timing: {orig['timing']}."]
    na = [t for t in report["targets"] if t["result"] == "n/a"]
    for t in na:
        out.append(f"target not evaluated: {t['name']} ({t['why']})")
    out.append(f"netns used: {len(report['netns'])}, all removed" if not report["netns_left"]
               else f"netns NOT removed: {', '.join(report['netns_left'])}")
    return "\n".join(out) + "\n"
