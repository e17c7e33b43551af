"""The measured comparison of the two designs: the same lab, the same pods, one machine.

Owns ``noderedirect compare``: it builds the lab (:mod:`noderedirect.lab.topology`) once per
design under a unique prefix — the legacy design, then the in-pod design — measures, and tears
each lab down whatever happens. What it measures, per design:

- **kernel objects** per netns and per additional pod, as :mod:`noderedirect.summary` counts the
  rendered design (the lab's values), checked against what is really in the lab's kernel after
  apply (every difference is listed); and the total for N pods (``fixed + N × per pod``);
- **rules on the path**: the packet walk (:mod:`noderedirect.trace`, with the stand-in ztunnel's
  behaviour: no HBONE) of sleep → httpbin, rules matched per packet in the node netns and in the
  other netns, and the first-packet and steady-state paths it predicts; plus what the lab's
  counters say one such request really hit (our rules including the jumps into our chains) and
  where its TCP packets went (tunnel, ``veth-zt``, the pods' ``lo``);
- **enrollment time per pod** (p50/p99) for each N: the engine's per-pod path
  (:meth:`noderedirect.apply.Engine.pod_add`: an ipset entry and a route;
  :meth:`noderedirect.inpod_apply.InpodEngine.pod_add`: a ``*-save`` probe, one restore, a route
  and an ip rule inside the pod's netns, the probe-set entry), and for in-pod also ztunnel's
  share, the listener set made inside the pod's netns (:func:`noderedirect.lab.ztunnel.listener_set`).
  The N pods are extra, unwired pods (in-pod: a netns each, made before the clock starts) with
  addresses from 10.245.0.0/16, so N can exceed a /24;
- **connect latency** (p50/p99 of the TCP handshake as the client sees it, and of a whole
  ``GET /``) and **throughput** (a 16 MiB body) through the stand-in ztunnel;
- **another CNI's rules in the node netns**: the lab's scenarios (kernel-notes.md §11) run
  plain, with a masquerade rule, and with a mark in Cilium's 0x0F00 nibble (after our rules, and
  before them), and each scenario is reported as holding or not against that design's own
  expectation. Measured, never inferred.

Timings are wall-clock on this machine, with the stand-in ztunnel (a Python relay), so they
compare the designs' kernel paths and per-pod work, not Istio's ztunnel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import math
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

from . import names, summary as summary_mod, trace as trace_mod, values as values_mod
from .host import Host, NetnsRef
from .inventory import KINDS, LABELS
from .model import Pod, Values
from .plan import ownership

log = logging.getLogger(__name__)

MODES = ("legacy", "inpod")
MODE_LABEL = {"legacy": "legacy", "inpod": "in-pod"}
DEFAULT_PODS = (10, 100, 1000)
QUICK_PODS = (3, 10)
DEFAULT_CONNECTS = 200
QUICK_CONNECTS = 20
TRANSFER = 16 * 1024 * 1024
FOUR_MB = 4_000_000
ENROLL_NET = ipaddress.IPv4Network("10.245.0.0/16")     # the extra pods' addresses
MAX_PODS = 4000
VARIANT = {"iptables": "nft", "iptables-legacy": "legacy"}
KIND_ROWS = ("netns",) + KINDS

# another CNI's rules, added to (and removed from) the node netns: (name, description, rules)
# Cilium keeps its "magic" marks in the 0x0F00 nibble (bpf/lib/common.h: 0x200 to-proxy, 0x400
# overlay, 0xa00/0xb00 proxy, 0xc00 host, ...) and writes them with a 0xf00 mask; the legacy
# design keeps 0x100/0x200/0x040 there (legacy-mode.md §3.3, W7). Where the rule lands
# relative to ours depends on who programmed the chain last, so both orders are measured.
CNI_VARIANTS: tuple[tuple[str, str, tuple[tuple[str, ...], ...]], ...] = (
    ("plain", "the lab as built", ()),
    ("masquerade", "nat POSTROUTING -s 10.244.0.0/16 ! -d 10.244.0.0/16 -j MASQUERADE (appended)",
     (("-t", "nat", "-A", "POSTROUTING", "-s", "10.244.0.0/16", "!", "-d", "10.244.0.0/16",
       "-j", "MASQUERADE"),)),
    ("mark-after", "mangle PREROUTING -j MARK --set-xmark 0x200/0xf00 appended (after our jump)",
     (("-t", "mangle", "-A", "PREROUTING", "-j", "MARK", "--set-xmark", "0x200/0xf00"),)),
    ("mark-first", "the same mark rule inserted at the top of mangle PREROUTING (before our jump)",
     (("-t", "mangle", "-I", "PREROUTING", "1", "-j", "MARK", "--set-xmark", "0x200/0xf00"),)),
)


class CompareError(Exception):
    """The comparison could not be run (bad options, a lab that would not build)."""


# ---------------------------------------------------------------- options and results


@dataclass(frozen=True)
class Options:
    pods: tuple[int, ...] = DEFAULT_PODS
    connects: int = DEFAULT_CONNECTS
    transfer: int = TRANSFER
    transfer_runs: int = 5
    backend: str = "iptables"
    prefix: Optional[str] = None          # default: a fresh nrcmp<hex>
    quick: bool = False

    def __post_init__(self) -> None:
        if not self.pods or any(n < 1 or n > MAX_PODS for n in self.pods):
            raise CompareError(f"--pods {','.join(map(str, self.pods))}: each N must be 1..{MAX_PODS}")
        if self.connects < 2:
            raise CompareError(f"--connects {self.connects}: at least 2")
        if self.backend not in VARIANT:
            raise CompareError(f"--backend {self.backend}: one of {', '.join(VARIANT)} (both designs "
                               "are measured with the same iptables backend)")

    @classmethod
    def quick_options(cls, **kw) -> "Options":
        return cls(**{"pods": QUICK_PODS, "connects": QUICK_CONNECTS, "transfer_runs": 1,
                      "quick": True, **kw})


@dataclass(frozen=True)
class Stats:
    """Milliseconds: the nearest-rank p50 and p99 of ``n`` samples, their mean and sum."""
    n: int
    p50: float
    p99: float
    mean: float
    total: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> "Stats":
        ms = sorted(s * 1000 for s in seconds)
        if not ms:
            raise CompareError("no samples")
        rank = lambda q: ms[max(0, math.ceil(q * len(ms)) - 1)]   # noqa: E731
        return cls(len(ms), round(rank(0.50), 3), round(rank(0.99), 3),
                   round(sum(ms) / len(ms), 3), round(sum(ms), 1))


@dataclass(frozen=True)
class Outcome:
    """One scenario under one CNI variant: what was seen, and whether it is what the design promises."""
    holds: bool
    seen: str
    expected: str


@dataclass
class DesignResult:
    mode: str
    version: str
    backend: str
    tunnel: Optional[str]
    objects: dict[str, dict[str, int]] = field(default_factory=dict)        # column -> row -> n
    object_labels: dict[str, str] = field(default_factory=dict)
    object_notes: list[str] = field(default_factory=list)
    observed: dict[str, dict[str, int]] = field(default_factory=dict)       # netns -> row -> n
    observed_notes: list[str] = field(default_factory=list)
    objects_at: dict[int, dict[str, int]] = field(default_factory=dict)     # N -> {objects, netns}
    walk: dict[str, Any] = field(default_factory=dict)
    measured_path: dict[str, Any] = field(default_factory=dict)
    enroll: dict[int, Stats] = field(default_factory=dict)
    enroll_listeners: dict[int, Stats] = field(default_factory=dict)
    enroll_total: dict[int, Stats] = field(default_factory=dict)
    latency: dict[str, Stats] = field(default_factory=dict)
    throughput: dict[str, float] = field(default_factory=dict)               # MB/s (10^6 B/s)
    cni: dict[str, dict[str, Outcome]] = field(default_factory=dict)        # variant -> scenario -> outcome
    seconds: float = 0.0


@dataclass
class Report:
    options: Options
    designs: dict[str, DesignResult]
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- progress


class Progress:
    """How the steps are reported; the default says nothing."""

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[Callable[[str], None]]:
        yield lambda detail: None


QUIET = Progress()


# ---------------------------------------------------------------- the scenarios


@dataclass(frozen=True)
class Scenario:
    number: int
    name: str
    src: str
    dst: str
    port: int = 8000
    path: str = "/"
    bind: Optional[str] = None


SCENARIOS = (
    Scenario(1, "sleep → httpbin", "sleep", "httpbin"),
    Scenario(2, "sleep → plain-a", "sleep", "plain-a"),
    Scenario(3, "sleep → external", "sleep", "external"),
    Scenario(4, "plain-a → httpbin", "plain-a", "httpbin"),
    Scenario(5, "external → httpbin", "external", "httpbin"),
    Scenario(6, "node (HostIP) → httpbin", "node-1", "httpbin"),
    Scenario(7, "plain-a → plain-b", "plain-a", "plain-b"),
    Scenario(8, "external → plain-a", "external", "plain-a"),
    Scenario(9, "sleep → httpbin, 4 MB", "sleep", "httpbin", path=f"/bytes/{FOUR_MB}"),
    Scenario(10, "external → httpbin, 4 MB", "external", "httpbin", path=f"/bytes/{FOUR_MB}"),
    Scenario(11, "external → httpbin:15008", "external", "httpbin", port=names.PORT_HBONE),
    Scenario(12, "node (InternalIP) → httpbin", "node-1", "httpbin", bind="172.18.0.2"),
)

SLEEP, HTTPBIN, PLAIN_A = "10.244.1.5", "10.244.1.6", "10.244.1.7"
HOST_IP, INTERNAL_IP, EXTERNAL = "10.244.1.1", "172.18.0.2", "172.18.0.3"


@dataclass(frozen=True)
class Expect:
    legs: tuple                  # legacy: listener ports; in-pod: (pod, listener) pairs
    result: str                  # "ok" (HTTP 200, whole body) | "reset" | "fails"
    client: Optional[str] = None  # the IP the server must see

    def text(self, mode: str) -> str:
        if self.legs:
            where = (", ".join(str(p) for p in self.legs) if mode == "legacy"
                     else ", ".join(f"{p}@{pod}" for pod, p in self.legs))
        else:
            where = "not captured"
        tail = {"ok": f"HTTP 200, client {self.client}", "reset": "reset", "fails": "fails"}[self.result]
        return f"{where}; {tail}"


def expect(mode: str, sc: Scenario, variant: str) -> Expect:
    """What each design promises (kernel-notes.md §11; in-pod: docs/compare.md). A masquerade
    rule is the other CNI doing its job: traffic leaving the pod network then carries the
    node's address, in both designs."""
    masq = variant == "masquerade"
    if mode == "legacy":
        table = {
            1: Expect((15001,), "ok", SLEEP), 2: Expect((15001,), "ok", SLEEP),
            3: Expect((15001,), "ok", INTERNAL_IP if masq else SLEEP),
            4: Expect((15006,), "ok", PLAIN_A), 5: Expect((15006,), "ok", EXTERNAL),
            6: Expect((), "ok", HOST_IP), 7: Expect((), "ok", PLAIN_A), 8: Expect((), "ok", EXTERNAL),
            9: Expect((15001,), "ok", SLEEP), 10: Expect((15006,), "ok", EXTERNAL),
            11: Expect((15008,), "reset"),
            12: Expect((15006,), "fails"),        # by design: kernel-notes.md §3
        }
    else:
        probe = names.INPOD_PROBE_SNAT_V4
        both = (("sleep", 15001), ("httpbin", 15006))
        table = {
            1: Expect(both, "ok", SLEEP), 2: Expect((("sleep", 15001),), "ok", SLEEP),
            3: Expect((("sleep", 15001),), "ok", INTERNAL_IP if masq else SLEEP),
            4: Expect((("httpbin", 15006),), "ok", PLAIN_A),
            5: Expect((("httpbin", 15006),), "ok", EXTERNAL),
            6: Expect((), "ok", probe), 7: Expect((), "ok", PLAIN_A), 8: Expect((), "ok", EXTERNAL),
            9: Expect(both, "ok", SLEEP), 10: Expect((("httpbin", 15006),), "ok", EXTERNAL),
            11: Expect((("httpbin", 15008),), "reset"),
            12: Expect((), "ok", probe),          # every node socket is SNATed: the probe bypass
        }
    return table[sc.number]


def judge(mode: str, sc: Scenario, variant: str, t) -> Outcome:
    """Compare one observed request (:class:`noderedirect.lab.paths.Trace`) with :func:`expect`."""
    want = expect(mode, sc, variant)
    if mode == "legacy":
        legs = tuple(l.listener for l in t.legs)
        where = ", ".join(str(l) for l in legs) or "not captured"
    else:
        legs = tuple((t.pod_of(l), l.listener) for l in t.legs)
        where = ", ".join(f"{p}@{pod}" for pod, p in legs) or "not captured"
    r = t.response
    size = int(sc.path.rpartition("/")[2]) if sc.path.startswith("/bytes/") else None
    client = (t.server_client or "").rpartition(":")[0] or None
    if r.error:
        result, tail = ("reset" if r.error == "ECONNRESET" else "fails"), r.error
    elif r.status == 200 and (size is None or len(r.body) == size):
        result, tail = "ok", f"HTTP 200, client {client}"
    else:
        result, tail = "fails", f"HTTP {r.status}, {len(r.body)} bytes"
    holds = legs == want.legs and (result == want.result or (want.result == "fails" and result == "reset"))
    if holds and want.result == "ok":
        holds = client == want.client
    return Outcome(holds, f"{where}; {tail}", want.text(mode))


# ---------------------------------------------------------------- kernel objects


def rendered_objects(values: Values, mode: str
                     ) -> tuple[dict[str, dict[str, int]], dict[str, str], list[str]]:
    """summary.py's columns for one design (per netns kind, the total, the cost of +1 pod),
    their labels, and summary.py's notes."""
    s = summary_mod.summarize(values)
    d = next(x for x in s.designs if x.mode == mode)
    return ({c.key: dict(c.counts) for c in d.columns}, {c.key: c.label for c in d.columns},
            list(s.notes) + list(d.notes))


def objects_at(values: Values, mode: str, ns: Sequence[int]) -> dict[int, dict[str, int]]:
    """Kernel objects (every kind, hooks and rules counted once) and netns touched for N pods:
    the total without pods plus N times summary.py's measured cost of one more pod."""
    s = summary_mod.summarize(values, pods=0)
    d = next(x for x in s.designs if x.mode == mode)
    base, per = d.column("total"), d.column("per_pod")
    total = lambda col: sum(col.get(k) for k in KINDS)   # noqa: E731
    return {n: {"objects": total(base) + n * total(per),
                "netns": base.get("netns") + n * per.get("netns")} for n in ns}


def observed_objects(host: Host, role: str, mode: str, variant: str,
                     sysctl_want: dict[str, str]) -> dict[str, int]:
    """Our objects in one netns as the kernel shows them, counted like summary.py counts the
    rendered ones: owned sets and members, owned chains, jumps into them and their rules (and
    ours inside built-in chains), ip rules at our priorities, routes in our tables, our links,
    and the sysctls that hold the value the design sets."""
    from . import observe as observe_mod
    from .inventory import counts
    from .model import NetnsState

    own = ownership(role, mode)
    seen = observe_mod.observe(host, role, variant=variant, tables=own.tables)
    markers = own.builtin_markers

    def ours(r) -> bool:
        return (names.is_owned_chain(r.chain) or r.is_hook
                or (r.chain in names.BUILTIN_CHAINS.get(r.table, ())
                    and any(m in r.args + " " for m in markers)))
    rules = tuple(r for r in seen.iptables if ours(r))
    ip_rules = tuple(o.rule for o in seen.ip_rules if o.rule.priority in own.rule_prios and o.plain)
    routes = tuple(r for r in seen.routes if r.table in own.tables and r not in seen.kernel_routes)
    ns = NetnsState(role=role, ipsets=seen.ipsets, ipset_entries=seen.ipset_entries,
                    iptables=rules, ip_rules=ip_rules, routes=routes)
    c = counts(ns)
    # empty owned chains (declared, no rule and no jump) are invisible to the rule list
    declared = {(t, ch) for (t, ch) in seen.chains if names.is_owned_chain(ch)}
    c["chains"] = max(c["chains"], len(declared))
    c["links"] = sum(1 for l in seen.links if names.is_owned_link(l.name))
    got = host.sysctl_get(list(sysctl_want)) if sysctl_want else {}
    c["sysctls"] = sum(1 for k, v in sysctl_want.items() if got.get(k) == v)
    return {"netns": 1, **{k: c.get(k, 0) for k in KINDS}, "iptables": c["iptables"]}


# ---------------------------------------------------------------- paths (packet walk)


def _path_text(t: trace_mod.Trace, kind: str) -> str:
    """One line per leg: netns in order, with the rules that matched, non-main route tables,
    tunnels and the receiving socket."""
    out = []
    for leg in t.legs:
        segs: list[list[str]] = []
        cur = None
        for p in leg.packets:
            if p.kind != kind:
                continue
            for h in p.hops:
                if h.netns != cur:
                    cur = h.netns
                    segs.append([h.netns])
                item = None
                if h.rule and h.rule != "hook":
                    item = h.rule
                elif h.stage == "routing" and h.route and h.route.table not in ("main", "local"):
                    item = f"table {h.route.table}"
                elif h.stage == "tunnel":
                    item = f"tunnel {h.device}"
                elif h.stage == "lo":
                    item = "lo"
                elif h.stage == "socket" and h.socket:
                    item = f"→ {h.socket.name}" + (f" :{h.socket.port}" if h.socket.port else "")
                if item and (len(segs[-1]) == 1 or segs[-1][-1] != item):
                    segs[-1].append(item)
        if segs:
            out.append(" → ".join(f"{s[0]}[{', '.join(s[1:])}]" if len(s) > 1 else s[0] for s in segs))
    return " | ".join(out)


def packet_walk(values: Values, mode: str) -> dict[str, Any]:
    """sleep → httpbin through the rendered rules, with the stand-in's behaviour (no HBONE)."""
    t = trace_mod.trace_scenario(values, mode, "sleep-httpbin", zt=trace_mod.ZtunnelModel(hbone=False))
    out: dict[str, Any] = {"verdict": t.verdict(), "per_packet": {}, "paths": {}}
    for kind in trace_mod.PACKET_KINDS:
        hits = [h for p in t.packets() if p.kind == kind for h in p.hops if h.rule and h.rule != "hook"]
        out["per_packet"][kind] = {
            "node": sum(1 for h in hits if h.netns == "node"),
            "other": sum(1 for h in hits if h.netns != "node"),
            "legs": sum(1 for p in t.packets() if p.kind == kind),
        }
        out["paths"][kind] = _path_text(t, kind)
    return out


def owned_counter_total(host: Host, variant: str, markers: Sequence[str] = ()) -> int:
    """Packets counted by every rule of ours in one netns: rules of our chains, jumps into them,
    and rules of ours in built-in chains (recognised by ``markers``, plan.Ownership's)."""
    total, table = 0, None
    for line in host.iptables_save(variant, counters=True).splitlines():
        if line.startswith("*"):
            table = line[1:]
            continue
        if not line.startswith("["):
            continue
        counts_, _, rest = line.partition("] ")
        toks = rest.split()
        if len(toks) < 2 or toks[0] != "-A":
            continue
        chain = toks[1]
        target = toks[toks.index("-j") + 1] if "-j" in toks[:-1] else ""
        builtin_ours = (chain in names.BUILTIN_CHAINS.get(table or "", ())
                        and any(m in rest + " " for m in markers))
        if names.is_owned_chain(chain) or names.is_owned_chain(target) or builtin_ours:
            total += int(counts_.lstrip("[").split(":")[0])
    return total


# ---------------------------------------------------------------- measurements in a lab


def _percentiles_by_n(samples: list[float], ns: Sequence[int]) -> dict[int, Stats]:
    """Pods are enrolled one after the other; N pods from empty are the first N samples."""
    return {n: Stats.of(samples[:n]) for n in sorted(ns)}


def extra_pods(n: int) -> list[Pod]:
    hosts = ENROLL_NET.hosts()
    out = []
    for i in range(1, n + 1):
        ip = str(next(hosts))
        uid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"noderedirect-compare/pod-{i}"))
        out.append(Pod(namespace="compare", name=f"pod-{i}", uid=uid, ip=ip))
    return out


class LabRun:
    """One design's lab, up, with the helpers the measurements share."""

    def __init__(self, rec, mode: str, backend: str):
        from .lab import paths

        self.rec, self.mode, self.backend = rec, mode, backend
        self.lab = rec.lab
        self.variant = VARIANT[backend]
        self.obs = paths.Observer(rec)

    def close(self) -> None:
        self.obs.close()

    def netns_path(self, name: str) -> str:
        from .lab import procs
        return procs.netns_path(self.lab.endpoint(name).netns)

    def host(self, key: str) -> Host:
        return self.obs.hosts[key]

    def flush_conntrack(self) -> None:
        for h in self.obs.hosts.values():
            h.run(["conntrack", "-F"], check=False)

    def request(self, sc: Scenario):
        from .lab import paths
        self.flush_conntrack()
        return paths.trace_request(self.rec, sc.src, sc.dst, sc.port, sc.path, bind=sc.bind,
                                   timeout=15.0, observer=self.obs)


def measure_objects(run: LabRun, values: Values, res: DesignResult, ns: Sequence[int]) -> None:
    res.objects, res.object_labels, res.object_notes = rendered_objects(values, run.mode)
    res.objects_at = objects_at(values, run.mode, ns)
    with _engine(run) as eng:
        rendered = eng.desired()
    for state in rendered.netns:
        key = _netns_key(run, state.role)
        want = {s.key: s.value for s in state.sysctls}
        host = run.host(key)
        got = observed_objects(host, state.role, run.mode, run.variant, want)
        res.observed[key] = got
        ref = {k: v for k, v in _netns_counts(state).items()}
        diff = [f"{LABELS.get(k, k)} {got[k]} observed / {ref[k]} rendered"
                for k in KINDS if got[k] != ref[k]]
        if diff:
            res.observed_notes.append(f"{key}: " + "; ".join(diff))


def _netns_counts(state) -> dict[str, int]:
    from .inventory import counts
    return {"netns": 1, **counts(state)}


def _netns_key(run: LabRun, role: str) -> str:
    if role == "node":
        return "node-1"
    if role == "ztunnel":
        return "ztunnel-1"
    return role.rpartition("/")[2]


@contextlib.contextmanager
def _engine(run: LabRun):
    from .lab import topology
    with topology.engine_for(run.lab, 1, run.rec.values["node-1"], run.rec.tunnel or run.lab.tunnel) as eng:
        yield eng


def measure_path(run: LabRun, res: DesignResult) -> None:
    """One sleep → httpbin request: the counters of all our rules, per netns, and TCP packets."""
    roles = {"node-1": "node"}
    roles.update({"ztunnel-1": "ztunnel"} if run.mode == "legacy"
                 else {"sleep": "pod:default/sleep", "httpbin": "pod:default/httpbin"})
    markers = {k: ownership(role, run.mode).builtin_markers for k, role in roles.items()}
    keys = list(roles)
    run.flush_conntrack()
    before = {k: owned_counter_total(run.host(k), run.variant, markers[k]) for k in keys}
    t = run.request(SCENARIOS[0])
    after = {k: owned_counter_total(run.host(k), run.variant, markers[k]) for k in keys}
    hits = {k: after[k] - before[k] for k in keys}
    tcp = {
        "istioout (into the tunnel)": t.tcp_on("node-1", names.LINK_OUT, "out"),
        "istioin (into the tunnel)": t.tcp_on("node-1", names.LINK_IN, "out"),
        "veth-zt (ztunnel pod)": t.tcp_on("node-1", "veth-zt"),
    }
    if run.mode == "inpod":
        tcp["sleep lo"] = t.tcp_on("sleep", "lo", "in")
        tcp["httpbin lo"] = t.tcp_on("httpbin", "lo", "in")
    res.measured_path = {"ok": t.response.ok, "rule_hits": hits, "tcp": tcp,
                         "legs": [f"{l.listener}" + (f"@{t.pod_of(l)}" if run.mode == "inpod" else "")
                                  for l in t.legs]}


def measure_latency(run: LabRun, res: DesignResult, connects: int) -> None:
    from .lab import client, procs

    pairs = (("sleep → httpbin", "sleep", HTTPBIN), ("sleep → plain-a", "sleep", PLAIN_A),
             ("plain-a → plain-b (no mesh)", "plain-a", "10.244.1.8"))
    for label, src, dst in pairs:
        path = run.netns_path(src)
        conn: list[float] = []
        for _ in range(connects):
            s = procs.socket_in_netns(path)
            try:
                s.settimeout(5)
                t0 = time.perf_counter()
                s.connect((dst, 8000))
                conn.append(time.perf_counter() - t0)
            finally:
                s.close()
        res.latency[f"connect {label}"] = Stats.of(conn)
        reqs = []
        for _ in range(connects):
            r = client.request(path, dst, 8000, "/", timeout=5)
            if not r.ok:
                raise CompareError(f"{label}: GET / failed during the latency run: {r.error or r.status}")
            reqs.append(r.seconds)
        res.latency[f"GET / {label}"] = Stats.of(reqs)


def measure_throughput(run: LabRun, res: DesignResult, size: int, runs: int) -> None:
    from .lab import client

    for label, src, dst in (("sleep → httpbin", "sleep", HTTPBIN), ("sleep → plain-a", "sleep", PLAIN_A),
                            ("plain-a → plain-b (no mesh)", "plain-a", "10.244.1.8")):
        rates = []
        for _ in range(runs):
            r = client.request(run.netns_path(src), dst, 8000, f"/bytes/{size}", timeout=120)
            if not r.ok or len(r.body) != size:
                raise CompareError(f"{label}: {size} bytes failed: {r.error or r.status} ({len(r.body)} bytes)")
            rates.append(size / r.seconds / 1e6)
        res.throughput[label] = round(sorted(rates)[len(rates) // 2], 1)


def measure_cni(run: LabRun, res: DesignResult, scenarios: Sequence[Scenario]) -> None:
    node = run.host("node-1")
    for variant, _desc, rules in CNI_VARIANTS:
        for r in rules:
            node.iptables(run.variant, list(r))
        try:
            res.cni[variant] = {str(sc.number): judge(run.mode, sc, variant, run.request(sc))
                                for sc in scenarios}
        finally:
            for r in rules:
                node.iptables(run.variant, _delete_form(r))
            run.flush_conntrack()


def _delete_form(rule: tuple[str, ...]) -> list[str]:
    """``-t T -A|-I C [pos] ARGS`` -> ``-t T -D C ARGS``."""
    out = list(rule)
    i = next(k for k, t in enumerate(out) if t in ("-A", "-I"))
    if out[i] == "-I" and out[i + 2].isdigit():
        del out[i + 2]
    out[i] = "-D"
    return out


def measure_enrollment(run: LabRun, res: DesignResult, ns: Sequence[int],
                       progress: Callable[[str], None]) -> None:
    """Enroll max(N) extra pods one by one through the engine's per-pod path, timing each."""
    from .lab import topology, ztunnel as zt_mod

    pods = extra_pods(max(ns))
    rules_t: list[float] = []
    lst_t: list[float] = []
    if run.mode == "legacy":
        with _engine(run) as eng:
            for pod in pods:
                t0 = time.perf_counter()
                eng.pod_add(pod)
                rules_t.append(time.perf_counter() - t0)
        res.enroll = _percentiles_by_n(rules_t, ns)
        return
    netns = [f"{run.lab.prefix}e{i}" for i in range(1, len(pods) + 1)]
    topology.add_netns(run.lab.prefix, netns)
    progress(f"{len(netns)} pod netns made")
    try:
        with _engine(run) as eng:
            for pod, name in zip(pods, netns):
                ref = NetnsRef.resolve(name)
                t0 = time.perf_counter()
                eng.pod_add(pod, ref)
                t1 = time.perf_counter()
                socks = zt_mod.listener_set(ref.path)
                t2 = time.perf_counter()
                for s in socks:
                    s.close()
                eng.release(pod)
                rules_t.append(t1 - t0)
                lst_t.append(t2 - t1)
    finally:
        topology.remove_netns(run.lab.prefix, netns)
    res.enroll = _percentiles_by_n(rules_t, ns)
    res.enroll_listeners = _percentiles_by_n(lst_t, ns)
    res.enroll_total = _percentiles_by_n([a + b for a, b in zip(rules_t, lst_t)], ns)


# ---------------------------------------------------------------- the whole run


def base_prefix() -> str:
    return f"nrcmp{secrets.token_hex(3)}"


def check_prefix(base: str) -> None:
    """The two labs are ``<base>l-`` and ``<base>i-``: both must be valid lab prefixes."""
    from .lab import topology
    for mode in MODES:
        topology.Lab(prefix=f"{base}{mode[0]}-")


def measure_design(mode: str, opts: Options, prefix: str, progress: Progress) -> DesignResult:
    from .lab import topology

    t0 = time.monotonic()
    lab = topology.Lab(prefix=prefix, mode=mode, backend=opts.backend)
    values = values_mod.parse(lab.values_data(1), source=f"lab {prefix} node-1")
    version = str(values.node.istio_version if mode == "legacy" else values.node.inpod_version)
    res = DesignResult(mode=mode, version=version, backend=opts.backend, tunnel=None)
    label = MODE_LABEL[mode]
    if topology.Record.load(prefix) is not None or any(topology.netns_exists(n) for n in lab.all_netns()):
        # compare removes the labs it builds: it must never adopt (and then remove) another one
        raise CompareError(f"a lab with prefix {prefix!r} (or one of its namespaces) exists already; "
                           "use another --prefix")
    try:
        with progress.step(f"{label}: lab up ({prefix})") as detail:
            up = topology.up(lab)
            res.tunnel = up.record.tunnel
            detail(f"{up.seconds:.1f} s" + (f", tunnel {up.record.tunnel}" if up.record.tunnel else ""))
        run = LabRun(up.record, mode, opts.backend)
        try:
            with progress.step(f"{label}: kernel objects, rendered and observed"):
                measure_objects(run, values, res, opts.pods)
            with progress.step(f"{label}: packet walk and one request's counters"):
                res.walk = packet_walk(values, mode)
                measure_path(run, res)
            with progress.step(f"{label}: connect latency ({opts.connects} connects, {opts.connects} GETs per pair)"):
                measure_latency(run, res, opts.connects)
            with progress.step(f"{label}: throughput ({opts.transfer} bytes × {opts.transfer_runs})"):
                measure_throughput(run, res, opts.transfer, opts.transfer_runs)
            with progress.step(f"{label}: scenarios with another CNI's rules in the node netns"):
                measure_cni(run, res, SCENARIOS)
            with progress.step(f"{label}: enrollment of {max(opts.pods)} pods") as detail:
                measure_enrollment(run, res, opts.pods, detail)
        finally:
            run.close()
    finally:
        with progress.step(f"{label}: lab down"):
            topology.down(prefix)
    res.seconds = round(time.monotonic() - t0, 1)
    log.info("compare design=%s prefix=%s seconds=%.1f broken=%s", mode, prefix, res.seconds,
             {v: sorted(n for n, o in sc.items() if not o.holds) for v, sc in res.cni.items()})
    return res


def run(opts: Options, progress: Progress = QUIET) -> Report:
    t0 = time.monotonic()
    base = opts.prefix or base_prefix()
    designs = {}
    for mode in MODES:
        designs[mode] = measure_design(mode, opts, f"{base}{mode[0]}-", progress)
    return Report(options=opts, designs=designs, seconds=round(time.monotonic() - t0, 1))


# ---------------------------------------------------------------- output: data


def to_json(r: Report) -> dict[str, Any]:
    def stats(d: dict) -> dict:
        return {str(k): dataclasses.asdict(v) for k, v in d.items()}

    out: dict[str, Any] = {
        "options": {**dataclasses.asdict(r.options), "pods": list(r.options.pods)},
        "seconds": r.seconds, "notes": list(r.notes), "designs": {},
    }
    for mode, d in r.designs.items():
        out["designs"][mode] = {
            "mode": d.mode, "istio_version": d.version, "backend": d.backend, "tunnel": d.tunnel,
            "seconds": d.seconds,
            "objects": {"rendered": d.objects, "labels": d.object_labels, "notes": d.object_notes,
                        "observed": d.observed,
                        "observed_notes": d.observed_notes,
                        "at_n": {str(n): v for n, v in d.objects_at.items()}},
            "walk": d.walk, "measured_path": d.measured_path,
            "enroll": {"rules": stats(d.enroll), "listeners": stats(d.enroll_listeners),
                       "total": stats(d.enroll_total or d.enroll)},
            "latency_ms": stats(d.latency), "throughput_mb_s": d.throughput,
            "cni": {v: {n: dataclasses.asdict(o) for n, o in sc.items()} for v, sc in d.cni.items()},
        }
    return out


def from_json(data: dict[str, Any]) -> Report:
    """A report saved with :func:`to_json`, back (to print or draw it again without measuring)."""
    def stats(d: dict) -> dict[int, Stats]:
        return {int(k): Stats(**v) for k, v in d.items()}
    try:
        o = data["options"]
        opts = Options(**{**o, "pods": tuple(o["pods"])})
        designs = {}
        for mode, x in data["designs"].items():
            objs = x["objects"]
            d = DesignResult(mode=x["mode"], version=x["istio_version"], backend=x["backend"],
                             tunnel=x["tunnel"], seconds=x.get("seconds", 0.0))
            d.objects, d.object_labels = objs["rendered"], objs["labels"]
            d.object_notes = list(objs.get("notes", []))
            d.observed, d.observed_notes = objs["observed"], list(objs["observed_notes"])
            d.objects_at = {int(n): v for n, v in objs["at_n"].items()}
            d.walk, d.measured_path = x["walk"], x["measured_path"]
            d.enroll = stats(x["enroll"]["rules"])
            d.enroll_listeners = stats(x["enroll"]["listeners"])
            d.enroll_total = stats(x["enroll"]["total"]) if d.enroll_listeners else {}
            d.latency = {k: Stats(**v) for k, v in x["latency_ms"].items()}
            d.throughput = dict(x["throughput_mb_s"])
            d.cni = {v: {n: Outcome(**oc) for n, oc in sc.items()} for v, sc in x["cni"].items()}
            designs[mode] = d
        return Report(options=opts, designs=designs, seconds=data.get("seconds", 0.0),
                      notes=list(data.get("notes", [])))
    except (KeyError, TypeError, ValueError) as e:
        raise CompareError(f"not a compare report (JSON written by `compare --json`): {e}") from None


# ---------------------------------------------------------------- output: tables


@dataclass(frozen=True)
class Table:
    title: str
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    notes: tuple[str, ...] = ()


def _ms(s: Optional[Stats]) -> str:
    return "-" if s is None else (f"{s.p50:.3f}" if s.p50 < 1 else f"{s.p50:.2f}" if s.p50 < 10 else f"{s.p50:.1f}")


def _ms99(s: Optional[Stats]) -> str:
    return "-" if s is None else (f"{s.p99:.3f}" if s.p99 < 1 else f"{s.p99:.2f}" if s.p99 < 10 else f"{s.p99:.1f}")


def tables(r: Report) -> list[Table]:
    L, I = r.designs["legacy"], r.designs["inpod"]
    out: list[Table] = []

    # 1. objects per netns and per pod (summary.py), checked against the lab's kernel
    lcols = [k for k in ("node", "ztunnel", "per_pod") if k in L.objects]
    icols = [k for k in ("node", "pod", "per_pod") if k in I.objects]
    heads = (("kind",) + tuple(f"legacy {L.object_labels[k]}" for k in lcols)
             + tuple(f"in-pod {I.object_labels[k]}" for k in icols))
    rows = tuple((summary_mod.ROW_LABELS[row],) + tuple(str(L.objects[k][row]) for k in lcols)
                 + tuple(str(I.objects[k][row]) for k in icols) for row in summary_mod.ROWS)
    notes = []
    for d in (L, I):
        seen = ", ".join(d.observed)
        notes.append(f"{MODE_LABEL[d.mode]}: counted again in the lab's kernel after apply ({seen}): "
                     + ("the same numbers" if not d.observed_notes else "; ".join(d.observed_notes)))
    notes.append("'+1 pod' is summary.py's measured cost of one more pod (rendered with N and N+1 pods)")
    notes += sorted({n for d in (L, I) for n in d.object_notes})
    out.append(Table("Kernel objects per netns and per pod (rendered; summary.py)", heads, rows, tuple(notes)))

    # 2. objects for N pods
    rows = tuple((str(n), str(L.objects_at[n]["objects"]), str(L.objects_at[n]["netns"]),
                  str(I.objects_at[n]["objects"]), str(I.objects_at[n]["netns"]))
                 for n in sorted(L.objects_at))
    out.append(Table("Kernel objects on a node with N ambient pods",
                     ("N pods", "legacy objects", "legacy netns", "in-pod objects", "in-pod netns"), rows,
                     ("objects: every kind, iptables rules and jumps counted once; total without pods "
                      "+ N × '+1 pod'",)))

    # 3. rules on the path
    kinds = {"first": "first packets (SYN)", "reply": "replies (SYN-ACK)", "next": "later packets (ACK)"}
    rows = tuple((kinds[k], str(L.walk["per_packet"][k]["node"]), str(L.walk["per_packet"][k]["other"]),
                  str(I.walk["per_packet"][k]["node"]), str(I.walk["per_packet"][k]["other"]))
                 for k in trace_mod.PACKET_KINDS)
    lh, ih = L.measured_path["rule_hits"], I.measured_path["rule_hits"]
    rows += (("one request, every packet: counter sum (measured, incl. jumps)",
              str(lh.get("node-1", 0)), str(lh.get("ztunnel-1", 0)),
              str(ih.get("node-1", 0)), str(ih.get("sleep", 0) + ih.get("httpbin", 0))),)
    lt, it = L.measured_path["tcp"], I.measured_path["tcp"]
    rows += (("TCP packets into istioout / on veth-zt (measured)",
              f"{lt['istioout (into the tunnel)']} / {lt['veth-zt (ztunnel pod)']}", "",
              f"{it['istioout (into the tunnel)']} / {it['veth-zt (ztunnel pod)']}", ""),
             ("TCP packets on the pods' lo (measured: sleep / httpbin)", "", "", "",
              f"{it.get('sleep lo', 0)} / {it.get('httpbin lo', 0)}"))
    out.append(Table("Rules a packet of sleep → httpbin matches (packet walk, summed over its legs)",
                     ("packet", "legacy: node netns", "legacy: ztunnel netns", "in-pod: node netns",
                      "in-pod: pod netns"), rows,
                     ("packet walk: noderedirect.trace with the stand-in's behaviour (no HBONE); "
                      "jumps into our chains are not counted there, but are in the measured row",)))

    # 4. paths
    rows = []
    for d in (L, I):
        for k, label in (("first", "first packet"), ("next", "steady state")):
            rows.append((MODE_LABEL[d.mode], label, d.walk["paths"][k]))
    out.append(Table("First-packet and steady-state paths of sleep → httpbin (packet walk; '|' separates connections)",
                     ("design", "packet", "netns[rules matched, tables, tunnels, socket]"), tuple(rows)))

    # 5. enrollment
    rows = tuple((str(n), _ms(L.enroll[n]), _ms99(L.enroll[n]), _ms(I.enroll[n]), _ms99(I.enroll[n]),
                  _ms(I.enroll_listeners.get(n)), _ms(I.enroll_total.get(n)), _ms99(I.enroll_total.get(n)),
                  f"{L.enroll[n].total / 1000:.2f} / {(I.enroll_total.get(n) or I.enroll[n]).total / 1000:.2f}")
                 for n in sorted(L.enroll))
    out.append(Table("Enrollment time per pod, ms (N pods enrolled one after another)",
                     ("N", "legacy p50", "legacy p99", "in-pod rules p50", "in-pod rules p99",
                      "in-pod listeners p50", "in-pod total p50", "in-pod total p99", "all N, s (legacy / in-pod)"),
                     rows,
                     ("legacy: Engine.pod_add (ipset entry + table-100 route in the node netns); in-pod: "
                      "InpodEngine.pod_add (iptables-save probe, one iptables-restore, route and ip rule in "
                      "the pod netns, probe-set entry in the node) + ztunnel's listener set made inside "
                      "the pod netns. Neither counts the Kubernetes API or ZDS round trips.",)))

    # 6. latency
    rows = tuple((k, _ms(L.latency[k]), _ms99(L.latency[k]), _ms(I.latency.get(k)), _ms99(I.latency.get(k)))
                 for k in L.latency)
    out.append(Table(f"Latency through the stand-in ztunnel, ms ({r.options.connects} samples each)",
                     ("what", "legacy p50", "legacy p99", "in-pod p50", "in-pod p99"), rows,
                     ("connect: the TCP handshake as the client sees it (with the capture point); GET /: "
                      "a whole request with Connection: close. In-pod sleep → httpbin crosses two "
                      "stand-in relays (15001 in sleep, 15006 in httpbin), legacy one.",)))

    # 7. throughput
    rows = tuple((k, f"{L.throughput[k]:.1f}", f"{I.throughput.get(k, 0):.1f}") for k in L.throughput)
    out.append(Table(f"Throughput, MB/s ({r.options.transfer} bytes, median of {r.options.transfer_runs})",
                     ("what", "legacy", "in-pod"), rows,
                     ("the relay is Python: these numbers rank paths on this machine, not ztunnel",)))

    # 8. another CNI
    heads = ("scenario",) + tuple(f"{MODE_LABEL[d.mode]}: {v}" for d in (L, I) for v, _, _ in CNI_VARIANTS)
    rows = []
    broken: dict[tuple[str, str], dict[str, list[str]]] = {}
    for sc in SCENARIOS:
        cells = []
        for d in (L, I):
            for v, _, _ in CNI_VARIANTS:
                o = d.cni.get(v, {}).get(str(sc.number))
                if o is None:
                    cells.append("-")
                    continue
                cells.append("holds" if o.holds else "BROKEN")
                if not o.holds:
                    broken.setdefault((d.mode, v), {}).setdefault(_why(o), []).append(str(sc.number))
        rows.append((f"{sc.number} {sc.name}",) + tuple(cells))
    notes = [f"{v}: {desc}" for v, desc, _ in CNI_VARIANTS]
    for (mode, v), items in broken.items():
        notes.append(f"{MODE_LABEL[mode]} with {v}: " + "; ".join(
            f"{why}: {', '.join(nums)}" for why, nums in items.items()))
    out.append(Table("Scenarios with another CNI's rules in the node netns (each against its own design's "
                     "expectation)", heads, tuple(rows), tuple(notes)))
    return out


def _why(o: Outcome) -> str:
    """A broken scenario in a few words (scenarios that broke the same way are grouped)."""
    if o.seen.startswith("not captured; HTTP 200") and not o.expected.startswith("not captured"):
        return "not captured, yet HTTP 200 straight from the server (the ztunnel is bypassed)"
    return f"{o.seen} (expected {o.expected})"


def _header(r: Report) -> str:
    L, I = r.designs["legacy"], r.designs["inpod"]
    return (f"legacy (Istio {L.version}, {L.backend}, tunnel {L.tunnel}) vs in-pod (Istio {I.version}, "
            f"{I.backend}): one lab each, same pods, same machine; {r.seconds:.0f} s"
            + (" (--quick)" if r.options.quick else ""))


def to_text(r: Report) -> str:
    out = [f"noderedirect compare: {_header(r)}"]
    for i, t in enumerate(tables(r), 1):
        out += ["", f"{i}. {t.title}"]
        widths = [max(len(t.headers[c]), *(len(row[c]) for row in t.rows)) for c in range(len(t.headers))]
        if sum(widths) + 2 * len(widths) > 160 and len(t.headers) == 3:
            # the paths: one block per row
            for row in t.rows:
                out.append(f"  {row[0]}, {row[1]}:")
                out.append(f"    {row[2]}")
        else:
            fmt = lambda row: "  ".join((row[c].ljust(widths[c]) if c == 0 else row[c].rjust(widths[c]))  # noqa: E731
                                        for c in range(len(row))).rstrip()
            out.append(fmt(t.headers))
            out.append("  ".join("-" * w for w in widths))
            out += [fmt(row) for row in t.rows]
        out += [f"  note: {n}" for n in t.notes]
    return "\n".join(out) + "\n"


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|") or " "


def to_markdown(r: Report, chart: Optional[str] = None) -> str:
    out = ["## noderedirect compare", "", _header(r), ""]
    if chart:
        out += [f"![legacy vs in-pod]({chart})", ""]
    for t in tables(r):
        out += [f"### {t.title}", "", "| " + " | ".join(_md_cell(h) for h in t.headers) + " |",
                "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(t.headers))) + "|"]
        if len(t.headers) == 3 and t.headers[0] == "design":
            out[-1] = "|:---|:---|:---|"
            out += ["| " + " | ".join([_md_cell(row[0]), _md_cell(row[1]), f"`{_md_cell(row[2])}`"]) + " |"
                    for row in t.rows]
        else:
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
        if t.notes:
            out.append("")
            out += [f"- {n}" for n in t.notes]
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------- output: chart


COLORS = {"legacy": "#4c78a8", "inpod": "#f58518"}
CHART_W, CHART_H = 1000, 640


def _esc(s: str) -> str:
    from xml.sax.saxutils import escape
    return escape(s)


def _nice_step(raw: float) -> float:
    """1, 2 or 5 times a power of ten, at least ``raw``."""
    if raw <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(raw))
    return next(m * exp for m in (1, 2, 5, 10) if m * exp >= raw)


def _panel(x0: float, y0: float, w: float, h: float, title: str, groups: list[str],
           series: dict[str, list[float]], unit: str, log_scale: bool = False) -> list[str]:
    """A grouped bar chart: one group per label, one bar per design, value on top."""
    parts = [f'<text x="{x0 + w / 2:.1f}" y="{y0 + 18:.1f}" text-anchor="middle" font-size="14" '
             f'font-weight="bold">{_esc(title)}</text>']
    top, bottom, left = y0 + 34, y0 + h - 40, x0 + 46
    right = x0 + w - 10
    vals = [v for vs in series.values() for v in vs if v > 0]
    vmax = max(vals) if vals else 1.0
    if log_scale:
        lo = 10 ** math.floor(math.log10(min(vals))) if vals else 0.1
        hi = 10 ** math.ceil(math.log10(vmax)) if vals else 1.0
        scale = lambda v: 0.0 if v <= 0 else (math.log10(v) - math.log10(lo)) / max(math.log10(hi) - math.log10(lo), 1e-9)  # noqa: E731
        ticks = [10 ** e for e in range(int(math.log10(lo)), int(math.log10(hi)) + 1)]
    else:
        hi = vmax * 1.15
        scale = lambda v: v / hi   # noqa: E731
        step = _nice_step(hi / 5)
        ticks = [round(step * i, 10) for i in range(0, int(hi / step) + 1)]
    for t in ticks:
        y = bottom - scale(t) * (bottom - top)
        label = f"{t:g}"
        parts.append(f'<line x1="{left:.1f}" y1="{y:.1f}" x2="{right:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 4:.1f}" y="{y + 4:.1f}" text-anchor="end" font-size="10" fill="#555">{label}</text>')
    parts.append(f'<line x1="{left:.1f}" y1="{bottom:.1f}" x2="{right:.1f}" y2="{bottom:.1f}" stroke="#333"/>')
    parts.append(f'<text x="{x0 + 10:.1f}" y="{(top + bottom) / 2:.1f}" font-size="11" fill="#333" '
                 f'transform="rotate(-90 {x0 + 10:.1f} {(top + bottom) / 2:.1f})" text-anchor="middle">{_esc(unit)}</text>')
    gw = (right - left) / max(len(groups), 1)
    bw = min(38.0, gw / (len(series) + 1))
    for gi, g in enumerate(groups):
        gx = left + gi * gw + (gw - bw * len(series)) / 2
        for si, (mode, vs) in enumerate(series.items()):
            v = vs[gi]
            bh = scale(v) * (bottom - top)
            x = gx + si * bw
            parts.append(f'<rect x="{x:.1f}" y="{bottom - bh:.1f}" width="{bw - 3:.1f}" height="{bh:.1f}" '
                         f'fill="{COLORS[mode]}"/>')
            text = f"{v:.3g}" if v < 1000 else f"{v:.0f}"
            parts.append(f'<text x="{x + (bw - 3) / 2:.1f}" y="{bottom - bh - 3:.1f}" text-anchor="middle" '
                         f'font-size="10">{text}</text>')
        parts.append(f'<text x="{left + gi * gw + gw / 2:.1f}" y="{bottom + 14:.1f}" text-anchor="middle" '
                     f'font-size="11">{_esc(g)}</text>')
    return parts


def chart_svg(r: Report) -> str:
    L, I = r.designs["legacy"], r.designs["inpod"]
    w, h = CHART_W / 2, (CHART_H - 40) / 2
    ns = sorted(L.enroll)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{CHART_W}" height="{CHART_H}" '
             f'font-family="DejaVu Sans, sans-serif">', f'<rect width="{CHART_W}" height="{CHART_H}" fill="white"/>']
    parts += _panel(0, 0, w, h, "Enrollment per pod, p50 (ms, log)", [f"N={n}" for n in ns],
                    {"legacy": [L.enroll[n].p50 for n in ns],
                     "inpod": [(I.enroll_total.get(n) or I.enroll[n]).p50 for n in ns]}, "ms", log_scale=True)
    objs = ["node netns", "+1 pod", f"N={max(ns)}"]
    total = lambda d, col: sum(d.objects[col][k] for k in KINDS)   # noqa: E731
    parts += _panel(w, 0, w, h, "Kernel objects (log)", objs,
                    {"legacy": [total(L, "node"), total(L, "per_pod"), L.objects_at[max(ns)]["objects"]],
                     "inpod": [total(I, "node"), total(I, "per_pod"), I.objects_at[max(ns)]["objects"]]},
                    "objects", log_scale=True)
    lat = [k for k in L.latency if k.startswith("GET /")]
    parts += _panel(0, h, w, h, "GET / latency, p50 (ms)", [k[6:].replace(" (no mesh)", "") for k in lat],
                    {"legacy": [L.latency[k].p50 for k in lat], "inpod": [I.latency[k].p50 for k in lat]}, "ms")
    tp = list(L.throughput)
    parts += _panel(w, h, w, h, f"Throughput, {r.options.transfer // (1024 * 1024)} MiB body (MB/s)",
                    [k.replace(" (no mesh)", "") for k in tp],
                    {"legacy": [L.throughput[k] for k in tp], "inpod": [I.throughput[k] for k in tp]}, "MB/s")
    ly = CHART_H - 16
    for i, mode in enumerate(MODES):
        x = CHART_W / 2 - 120 + i * 140
        parts.append(f'<rect x="{x:.1f}" y="{ly - 10:.1f}" width="12" height="12" fill="{COLORS[mode]}"/>')
        d = r.designs[mode]
        parts.append(f'<text x="{x + 16:.1f}" y="{ly:.1f}" font-size="12">{MODE_LABEL[mode]} ({d.version})</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def write_chart(r: Report, path: str) -> str:
    """``.svg``: the SVG; ``.png``: rendered with diagram.py's librsvg/cairo path. Returns the format."""
    svg = chart_svg(r)
    if path.endswith(".svg"):
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(svg)
        return "svg"
    if not path.endswith(".png"):
        raise CompareError(f"--chart {path}: use a .png or .svg file name")
    from .diagram import render_png
    render_png(svg, path)
    return "png"
