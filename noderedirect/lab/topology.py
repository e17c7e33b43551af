"""The lab's shape and life cycle: a Kubernetes-like node (or two) built from network namespaces.

Owns two things:

- **the shape** (:class:`Lab`, pure): which namespaces exist, which pods run where, every
  address (DESIGN.md's address plan, kernel-notes.md §2) and the values file each node's
  engine gets. Every namespace name starts with the lab's prefix (default ``nrlab-``), so
  several labs (and test runs) can exist side by side.
- **the life cycle** (:func:`up`, :func:`down`, :func:`status`): building that shape in the
  kernel, wired the way kind's ptp CNI does it, applying the redirection through the same
  :class:`noderedirect.apply.Engine` the ``apply`` command uses (there is no second code path),
  and starting the stand-in ztunnel of each node and one test server process for all pods.

What the wiring looks like (per node, ``k`` = 1 or 2)::

    pod netns:   eth0 = POD_IP/32, "HOST_IP dev eth0 scope link", "default via HOST_IP"
    node netns:  veth<hash> (peer of the pod's eth0) = HOST_IP/32, "POD_IP dev veth<hash> scope host"
                 veth-zt (peer of the ztunnel pod's eth0), eth0 = INTERNAL_IP/24 on the underlay,
                 ip_forward=1 (kernel-notes.md §4: required), the other node's pod CIDR via its
                 InternalIP
    underlay:    a bridge in its own netns joining every node's eth0 and the external host
    external:    eth0 = 172.18.0.3/24, 10.244.0.0/16 via node 1 (10.244.2.0/24 via node 2)

Nothing is created in the machine's own network namespace: veths are created inside the node
(or underlay) netns with their peer moved straight into the pod's netns.

**In-pod mode** (``Lab(mode="inpod")``, ``lab up --mode inpod``): the same namespaces and
wiring, but the redirection is the in-pod design, applied by
:class:`noderedirect.inpod_apply.InpodEngine` (the same planner and host calls): the in-pod
rules, ip rule 32764 and table 100 inside each mesh pod's netns; in the node only the probe
set and the ``ISTIO_POSTRT`` SNAT rule; no tunnels, no capture rules on the node, nothing in
the ztunnel pod's netns. The stand-in ztunnel still runs from the ztunnel pod's netns, but
makes its listeners inside each mesh pod's netns (``--inpod``).

Everything ``up`` creates is recorded in a state file (``<state dir>/lab-<name>.json``) *before*
it is created, so ``down`` removes exactly that, from any process, after any crash: our
processes through their pidfiles, tunnel TAPs and bridges through the tunnel driver, then
whatever still runs inside each namespace, then the namespaces.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import yaml

from .. import names
from ..host import Host, HostError, NetnsRef
from . import procs

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "nrlab-"
BACKENDS = ("iptables", "iptables-legacy", "nft")
MODES = ("legacy", "inpod")
INPOD_BACKENDS = ("iptables", "iptables-legacy")     # in-pod's native nft is not implemented
POD_DEVICES = ("eth0", "lo")       # in-pod mode: TCP counted on these inside each mesh pod
TUNNELS = ("auto", "geneve", "usergeneve", "vxlan")
MAX_NODES = 2
MAX_EXTRA_PODS = 200
K8S_NAMESPACE = "default"
SERVER_PORT = 8000
ISTIO_VERSION = "1.20"

UNDERLAY_NET = ipaddress.IPv4Network("172.18.0.0/24")
EXTERNAL_IP = "172.18.0.3"
ALL_PODS = "10.244.0.0/16"
BRIDGE = "br0"
POD_IF = "eth0"
NODE_UPLINK = "eth0"
ZTUNNEL_VETH = "veth-zt"
# node index -> (InternalIP, pod CIDR): DESIGN.md's address plan
NODE_PLAN = {1: ("172.18.0.2", "10.244.1.0/24"), 2: ("172.18.0.4", "10.244.2.0/24")}

READY_TIMEOUT = 15.0       # seconds for a lab process to report ready
STATE_VERSION = 1

_PREFIX = re.compile(r"^[a-z0-9][a-z0-9.-]{0,30}-$")


class LabError(Exception):
    """The lab could not be built, inspected or removed; the message says what to do."""


class LabConflict(LabError):
    """A lab with this prefix exists with other parameters, or a namespace name is taken."""


# ---------------------------------------------------------------- the shape (pure)


@dataclass(frozen=True)
class LabNode:
    index: int
    internal_ip: str
    pod_cidr: str

    @property
    def name(self) -> str:
        return f"node-{self.index}"

    @property
    def host_ip(self) -> str:
        """legacy GetHostIP on kind: the first address of the pod CIDR, the gateway of every pod."""
        return str(ipaddress.IPv4Network(self.pod_cidr).network_address + 1)

    @property
    def ztunnel_ip(self) -> str:
        return str(ipaddress.IPv4Network(self.pod_cidr).network_address + 2)

    def pod_ip(self, host: int) -> str:
        return str(ipaddress.IPv4Network(self.pod_cidr).network_address + host)


@dataclass(frozen=True)
class LabPod:
    """A pod (or the ztunnel pod) on one node."""

    name: str
    node: int
    ip: str
    mesh: bool
    ztunnel: bool = False

    @property
    def uid(self) -> str:
        """Stable per name, so values files and ipset comments are the same on every run."""
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"noderedirect-lab/{self.name}"))

    @property
    def veth(self) -> str:
        """The node-side device, named like kind's ptp plugin does (``veth`` + 8 hex)."""
        if self.ztunnel:
            return ZTUNNEL_VETH
        return "veth" + hashlib.sha1(self.name.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class Endpoint:
    """Something a request can start from or go to: a pod, a node, a ztunnel or the external host."""

    name: str
    kind: str                  # "pod" | "ztunnel" | "node" | "external"
    netns: str                 # netns name
    ip: str
    node: Optional[int]        # the node it is on (a node: itself); None for the external host
    veth: Optional[str] = None  # node-side device of a pod or ztunnel
    mesh: bool = False


@dataclass(frozen=True)
class Lab:
    """The lab's parameters; everything else follows from them."""

    prefix: str = DEFAULT_PREFIX
    nodes: int = 1
    extra_pods: int = 0
    backend: str = "iptables"
    tunnel: str = "auto"
    spoof: bool = True         # the stand-in ztunnel keeps the original source
    mode: str = "legacy"       # "inpod": the in-pod design (see the module docstring)

    def __post_init__(self) -> None:
        if not isinstance(self.prefix, str) or not _PREFIX.match(self.prefix):
            raise LabError(f"prefix {self.prefix!r}: lower-case letters, digits, '.', '-', ending "
                           "in '-'; at most 32 characters, e.g. nrlab-")
        if self.nodes not in range(1, MAX_NODES + 1):
            raise LabError(f"--nodes {self.nodes}: the lab has 1 or 2 nodes")
        if not 0 <= self.extra_pods <= MAX_EXTRA_PODS:
            raise LabError(f"--extra-pods {self.extra_pods}: 0 to {MAX_EXTRA_PODS}")
        if self.backend not in BACKENDS:
            raise LabError(f"--backend {self.backend}: one of {', '.join(BACKENDS)}")
        if self.tunnel not in TUNNELS:
            raise LabError(f"--tunnel {self.tunnel}: one of {', '.join(TUNNELS)}")
        if self.mode not in MODES:
            raise LabError(f"--mode {self.mode}: one of {', '.join(MODES)}")
        if self.mode == "inpod" and self.backend not in INPOD_BACKENDS:
            raise LabError(f"--mode inpod --backend {self.backend}: in-pod mode is applied with "
                           f"{' or '.join(INPOD_BACKENDS)} (its native nft backend is not implemented)")
        if self.mode == "inpod" and self.tunnel != "auto":
            raise LabError(f"--mode inpod --tunnel {self.tunnel}: in-pod mode has no tunnels")

    @property
    def inpod(self) -> bool:
        return self.mode == "inpod"

    # ------------------------------------------------------------ names

    @property
    def key(self) -> str:
        """The lab's name in file names: the prefix without its trailing dash."""
        return self.prefix[:-1]

    def ns(self, what: str) -> str:
        return f"{self.prefix}{what}"

    @property
    def underlay_ns(self) -> str:
        return self.ns("underlay")

    @property
    def external_ns(self) -> str:
        return self.ns("external")

    def node_ns(self, k: int) -> str:
        return self.ns(f"node-{k}")

    def ztunnel_ns(self, k: int) -> str:
        return self.ns(f"ztunnel-{k}")

    # ------------------------------------------------------------ nodes and pods

    def node_list(self) -> tuple[LabNode, ...]:
        return tuple(LabNode(k, *NODE_PLAN[k]) for k in range(1, self.nodes + 1))

    def node(self, k: int) -> LabNode:
        return self.node_list()[k - 1]

    def pods(self, node: Optional[int] = None) -> tuple[LabPod, ...]:
        """Every workload pod (not the ztunnels), node 1 first."""
        n1 = self.node(1)
        out = [LabPod("sleep", 1, n1.pod_ip(5), True), LabPod("httpbin", 1, n1.pod_ip(6), True),
               LabPod("plain-a", 1, n1.pod_ip(7), False), LabPod("plain-b", 1, n1.pod_ip(8), False)]
        out += [LabPod(f"extra-{i}", 1, n1.pod_ip(9 + i), True) for i in range(1, self.extra_pods + 1)]
        if self.nodes >= 2:
            n2 = self.node(2)
            out += [LabPod("sleep-2", 2, n2.pod_ip(5), True), LabPod("httpbin-2", 2, n2.pod_ip(6), True),
                    LabPod("plain-2", 2, n2.pod_ip(7), False)]
        return tuple(p for p in out if node is None or p.node == node)

    def ztunnel(self, k: int) -> LabPod:
        return LabPod(f"ztunnel-{k}", k, self.node(k).ztunnel_ip, False, ztunnel=True)

    def pod_ns(self, pod: LabPod) -> str:
        return self.ztunnel_ns(pod.node) if pod.ztunnel else self.ns(pod.name)

    def all_netns(self) -> tuple[str, ...]:
        """Every namespace of the lab, in creation order."""
        out = [self.underlay_ns, self.external_ns]
        for n in self.node_list():
            out += [self.node_ns(n.index), self.ztunnel_ns(n.index)]
            out += [self.pod_ns(p) for p in self.pods(n.index)]
        return tuple(out)

    def params(self) -> dict:
        out = {"nodes": self.nodes, "extra_pods": self.extra_pods, "backend": self.backend,
               "tunnel": self.tunnel, "spoof": self.spoof}
        if self.inpod:       # a legacy lab's record stays as it always was
            out["mode"] = self.mode
        return out

    @classmethod
    def from_params(cls, prefix: str, params: dict) -> "Lab":
        return cls(prefix=prefix, **params)

    # ------------------------------------------------------------ endpoints

    def endpoints(self) -> dict[str, Endpoint]:
        out: dict[str, Endpoint] = {}
        for n in self.node_list():
            node_ep = Endpoint(n.name, "node", self.node_ns(n.index), n.internal_ip, n.index)
            out[n.name] = node_ep
            zt = self.ztunnel(n.index)
            out[zt.name] = Endpoint(zt.name, "ztunnel", self.pod_ns(zt), zt.ip, n.index, zt.veth)
            for p in self.pods(n.index):
                out[p.name] = Endpoint(p.name, "pod", self.pod_ns(p), p.ip, n.index, p.veth, p.mesh)
        out["external"] = Endpoint("external", "external", self.external_ns, EXTERNAL_IP, None)
        return out

    def endpoint(self, name: str) -> Endpoint:
        """A name (``sleep``, ``node-1``, ``node``, ``ztunnel``, ``external``) or a known IP."""
        eps = self.endpoints()
        alias = {"node": "node-1", "ztunnel": "ztunnel-1", "ext": "external"}.get(name, name)
        if alias in eps:
            return eps[alias]
        by_ip = [e for e in eps.values() if e.ip == name]
        if by_ip:
            return by_ip[0]
        raise LabError(f"no pod, node or host {name!r} in the lab (known: {', '.join(eps)})")

    # ------------------------------------------------------------ what the engine gets

    def values_data(self, k: int) -> dict:
        """The values file of node ``k``: the same format ``noderedirect apply`` reads."""
        n = self.node(k)
        return {
            "node": {"name": n.name, "internalIP": n.internal_ip, "podCIDR": n.pod_cidr},
            "ztunnel": {"ip": n.ztunnel_ip, "veth": ZTUNNEL_VETH, "interface": POD_IF},
            "istioVersion": ISTIO_VERSION,
            "ipset": {"comments": True},
            "pods": [{"namespace": K8S_NAMESPACE, "name": p.name, "uid": p.uid, "ip": p.ip,
                      "veth": p.veth} for p in self.pods(k) if p.mesh],
        }

    # ------------------------------------------------------------ wiring, as `ip -batch` input

    def batches(self) -> list[tuple[str, list[str]]]:
        """(netns, ``ip -batch`` lines), in an order where every peer namespace and device
        already exists when a line needs it."""
        out: list[tuple[str, list[str]]] = []
        underlay = ["link set lo up", f"link add {BRIDGE} type bridge", f"link set {BRIDGE} up"]
        ports = [(self.node_ns(n.index), f"u-{n.name}") for n in self.node_list()]
        ports.append((self.external_ns, "u-external"))
        for netns, port in ports:
            underlay += [f"link add {port} type veth peer name {NODE_UPLINK} netns {netns}",
                         f"link set {port} master {BRIDGE}", f"link set {port} up"]
        out.append((self.underlay_ns, underlay))

        plen = UNDERLAY_NET.prefixlen
        ext = ["link set lo up", f"addr add {EXTERNAL_IP}/{plen} dev {NODE_UPLINK}",
               f"link set {NODE_UPLINK} up"]
        n1 = self.node(1)
        ext.append(f"route add {ALL_PODS} via {n1.internal_ip} dev {NODE_UPLINK}")
        for n in self.node_list()[1:]:
            ext.append(f"route add {n.pod_cidr} via {n.internal_ip} dev {NODE_UPLINK}")
        out.append((self.external_ns, ext))

        for n in self.node_list():
            node = ["link set lo up", f"addr add {n.internal_ip}/{plen} dev {NODE_UPLINK}",
                    f"link set {NODE_UPLINK} up"]
            for other in self.node_list():
                if other.index != n.index:
                    node.append(f"route add {other.pod_cidr} via {other.internal_ip} dev {NODE_UPLINK}")
            pods = (self.ztunnel(n.index),) + self.pods(n.index)
            for p in pods:
                node += [f"link add {p.veth} type veth peer name {POD_IF} netns {self.pod_ns(p)}",
                         f"addr add {n.host_ip}/32 dev {p.veth}", f"link set {p.veth} up",
                         f"route add {p.ip}/32 dev {p.veth} scope host"]
            out.append((self.node_ns(n.index), node))
            for p in pods:
                out.append((self.pod_ns(p), [
                    "link set lo up", f"addr add {p.ip}/32 dev {POD_IF}", f"link set {POD_IF} up",
                    f"route add {n.host_ip}/32 dev {POD_IF} scope link",
                    f"route add default via {n.host_ip} dev {POD_IF}"]))
        return out


# ---------------------------------------------------------------- files


def state_dir() -> Path:
    from ..apply import state_dir as engine_state_dir
    return engine_state_dir()


def record_path(prefix: str) -> Path:
    return state_dir() / f"lab-{Lab(prefix=prefix).key}.json"


def run_dir(prefix: str) -> Path:
    """Values files, logs, pidfiles and ready files of one lab."""
    return state_dir() / f"lab-{Lab(prefix=prefix).key}"


def _lock_path(prefix: str) -> Path:
    return state_dir() / f"lab-{Lab(prefix=prefix).key}.lock"


@contextlib.contextmanager
def _locked(prefix: str) -> Iterator[None]:
    """One up/down of a lab at a time (flock: released if the holder dies)."""
    path = _lock_path(prefix)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@dataclass
class Record:
    """What a lab made (or is about to make): the state file's contents."""

    prefix: str
    params: dict
    phase: str = "building"                 # "building" | "up"
    pid: int = 0                             # the process that built it
    created: float = 0.0
    netns: list[str] = field(default_factory=list)
    netns_ids: dict[str, list[int]] = field(default_factory=dict)   # name -> [dev, inode]
    processes: dict[str, str] = field(default_factory=dict)         # name -> pidfile
    tunnel: Optional[str] = None             # the driver the engine chose
    values: dict[str, str] = field(default_factory=dict)            # node name -> values file
    logs: dict[str, str] = field(default_factory=dict)              # process name -> log file
    up_seconds: Optional[float] = None

    @property
    def lab(self) -> Lab:
        return Lab.from_params(self.prefix, self.params)

    def save(self) -> None:
        path = record_path(self.prefix)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        data = {"version": STATE_VERSION, **dataclasses.asdict(self)}
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, prefix: str) -> Optional["Record"]:
        path = record_path(prefix)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise LabError(f"cannot read the lab state file {path}: {e}") from None
        data.pop("version", None)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def load_record(prefix: str) -> Record:
    """The record of a lab that exists, or a LabError saying how to make one."""
    rec = Record.load(prefix)
    if rec is None:
        raise LabError(f"there is no lab {prefix!r}: start one with `noderedirect lab up`"
                       + ("" if prefix == DEFAULT_PREFIX else f" --prefix {prefix}"))
    return rec


# ---------------------------------------------------------------- progress


class Progress:
    """How ``up``/``down`` report their steps; the default says nothing."""

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[Callable[[str], None]]:
        """A step; the yielded function adds a short detail shown when it completes."""
        yield lambda detail: None

    def note(self, text: str) -> None:
        log.info("%s", text)


QUIET = Progress()


# ---------------------------------------------------------------- netns (the files under /var/run/netns)


def netns_exists(name: str) -> bool:
    return os.path.exists(os.path.join(procs.NETNS_DIR, name))


def _ip(*args: str) -> None:
    """`ip netns add|del`: namespace files, not the network state of any namespace."""
    cp = subprocess.run(["ip", *args], capture_output=True, text=True)
    if cp.returncode != 0:
        raise LabError(f"`ip {' '.join(args)}` exited {cp.returncode}: {cp.stderr.strip()}")


def _batch(netns: str, lines: list[str]) -> None:
    """One ``ip -batch`` inside ``netns``; a failure names the line."""
    text = "".join(l + "\n" for l in lines)
    with Host(netns) as h:
        try:
            h.run(["ip", "-batch", "-"], input=text)
        except HostError as e:
            err = getattr(e, "stderr", "") or str(e)
            m = re.search(r"Command failed -:(\d+)", err)
            where = f" at `{lines[int(m.group(1)) - 1]}`" if m and int(m.group(1)) <= len(lines) else ""
            first = next((l.strip() for l in err.splitlines() if l.strip()), str(e))
            raise LabError(f"wiring netns {netns} failed{where}: {first}") from None


# ---------------------------------------------------------------- up


@dataclass
class UpResult:
    record: Record
    created: bool                 # False: the lab was already up and was re-applied
    changes: dict[str, int] = field(default_factory=dict)   # node -> objects the engine changed
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def up(lab: Lab, progress: Progress = QUIET) -> UpResult:
    """Build the lab, or converge one that is already up with the same parameters.

    Anything that interrupts the build (an error, Ctrl-C) removes what was made so far, then
    re-raises.
    """
    t0 = time.monotonic()
    state_dir()
    with _locked(lab.prefix):
        rec = Record.load(lab.prefix)
        notes: list[str] = []
        if rec is not None:
            if rec.params != lab.params():
                raise LabConflict(
                    f"lab {lab.prefix!r} is already up with {_describe(rec.params)}; "
                    f"asked for {_describe(lab.params())}. Run `noderedirect lab down"
                    f"{_prefix_arg(lab.prefix)}` first, or use another --prefix")
            if rec.phase == "up" and not _missing(rec):
                return _converge(lab, rec, progress, t0)
            why = ("did not finish" if rec.phase != "up"
                   else f"is damaged (missing: {', '.join(_missing(rec))})")
            notes.append(f"a previous lab {lab.prefix!r} {why}: removed its remains and rebuilt it")
            progress.note(notes[-1])
            _teardown(rec, progress)
        _refuse_foreign(lab)
        rec = Record(prefix=lab.prefix, params=lab.params(), pid=os.getpid(), created=time.time(),
                     netns=list(lab.all_netns()))
        run_dir(lab.prefix).mkdir(parents=True, exist_ok=True)
        rec.save()          # before anything exists: a crash from here on is recoverable
        try:
            changes = _build(lab, rec, progress)
        except BaseException:
            with _no_interrupts():
                try:
                    _teardown(rec, progress)
                    with contextlib.suppress(FileNotFoundError):
                        _lock_path(lab.prefix).unlink()
                except Exception as e:       # the original error matters more
                    log.error("cleanup after a failed lab up failed too: %s", e)
            raise
        rec.phase = "up"
        rec.up_seconds = round(time.monotonic() - t0, 3)
        rec.save()
    log.info("lab up prefix=%s params=%s tunnel=%s seconds=%.2f", lab.prefix, lab.params(),
             rec.tunnel, rec.up_seconds)
    return UpResult(rec, True, changes, notes, time.monotonic() - t0)


def _describe(params: dict) -> str:
    return (f"--nodes {params['nodes']} --extra-pods {params['extra_pods']} --backend "
            f"{params['backend']} --tunnel {params['tunnel']}"
            + ("" if params.get("spoof", True) else " --no-spoof")
            + (f" --mode {params['mode']}" if params.get("mode", "legacy") != "legacy" else ""))


def _prefix_arg(prefix: str) -> str:
    return "" if prefix == DEFAULT_PREFIX else f" --prefix {prefix}"


def _refuse_foreign(lab: Lab) -> None:
    """A namespace with one of our names that no record of ours mentions belongs to someone
    else: never adopt (and later delete) it."""
    taken = [n for n in lab.all_netns() if netns_exists(n)]
    if taken:
        raise LabConflict(f"network namespace(s) {', '.join(taken)} exist but are not part of a "
                          f"recorded lab {lab.prefix!r}; remove them (`ip netns del NAME`) or use "
                          "another --prefix")


@contextlib.contextmanager
def _no_interrupts() -> Iterator[None]:
    """Cleanup must run to the end: a second Ctrl-C would leave a half-removed lab."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _build(lab: Lab, rec: Record, progress: Progress) -> dict[str, int]:
    with progress.step(f"network namespaces ({len(rec.netns)})"):
        for name in rec.netns:
            _ip("netns", "add", name)
            st = os.stat(os.path.join(procs.NETNS_DIR, name))
            rec.netns_ids[name] = [st.st_dev, st.st_ino]
            rec.save()

    with progress.step("wiring: underlay bridge, veths, /32 routes (kind ptp style)") as detail:
        batches = lab.batches()
        for netns, lines in batches:
            _batch(netns, lines)
        for n in lab.node_list():
            with Host(lab.node_ns(n.index)) as h:
                h.sysctl_set({"net/ipv4/ip_forward": "1"})    # kernel-notes.md §4: required
        detail(f"{sum(len(l) for _, l in batches)} objects")

    with progress.step("packet counters (lab instrumentation)"):
        _install_counters(lab)

    changes: dict[str, int] = {}
    for n in lab.node_list():
        what = (f"in-pod rules in {sum(p.mesh for p in lab.pods(n.index))} pod netns, probe SNAT "
                f"(--backend {lab.backend})" if lab.inpod
                else f"noderedirect apply (--backend {lab.backend}, --tunnel {lab.tunnel})")
        with progress.step(f"redirection on {n.name}: {what}") as detail:
            values = _write_values(lab, rec, n.index)
            res, driver = _apply(lab, n.index, values, rec.tunnel or lab.tunnel)
            rec.tunnel = driver
            rec.save()
            changes[n.name] = len(res.applied)
            detail(f"{len(res.applied)} objects" + (f", tunnel {driver}" if driver else ""))

    with progress.step("stand-in ztunnel and test servers") as detail:
        started = _start_processes(lab, rec)
        detail(", ".join(started))
    return changes


def _write_values(lab: Lab, rec: Record, k: int) -> Path:
    path = run_dir(lab.prefix) / f"{lab.node(k).name}.yaml"
    head = (f"# lab {lab.prefix!r}, {lab.node(k).name}: written by `noderedirect lab up`.\n"
            f"# noderedirect status -f {path} --node-netns {lab.node_ns(k)} "
            f"--ztunnel-netns {lab.ztunnel_ns(k)} --backend {lab.backend}\n")
    path.write_text(head + yaml.safe_dump(lab.values_data(k), sort_keys=False))
    rec.values[lab.node(k).name] = str(path)
    return path


def engine_for(lab: Lab, k: int, values_path: "str | Path", tunnel: str):
    """The engine of node ``k``, exactly as ``noderedirect apply`` builds it (in-pod mode: the
    in-pod engine, with the netns of each mesh pod of that node)."""
    from .. import values as values_mod
    from ..apply import Engine

    vals = values_mod.load(str(values_path))
    if lab.inpod:
        from ..inpod_apply import InpodEngine
        pods = {p.uid: NetnsRef.resolve(lab.pod_ns(p)) for p in lab.pods(k) if p.mesh}
        return InpodEngine(vals, NetnsRef.resolve(lab.node_ns(k)), pods, backend=lab.backend)
    return Engine(vals, NetnsRef.resolve(lab.node_ns(k)), NetnsRef.resolve(lab.ztunnel_ns(k)),
                  backend=lab.backend, tunnel=tunnel)


def _apply(lab: Lab, k: int, values_path: Path, tunnel: str):
    """Apply on node ``k``; returns (result, tunnel driver name or None in in-pod mode)."""
    with engine_for(lab, k, values_path, tunnel) as eng:
        res = eng.apply()
        return res, (None if lab.inpod else eng.driver.name)


def _install_counters(lab: Lab) -> None:
    from . import paths

    for n in lab.node_list():
        paths.install_counters(lab.node_ns(n.index), paths.NODE_DEVICES)
        paths.install_counters(lab.ztunnel_ns(n.index), paths.ZTUNNEL_DEVICES)
        if lab.inpod:
            for p in lab.pods(n.index):
                if p.mesh:
                    paths.install_counters(lab.pod_ns(p), POD_DEVICES)


def _start_processes(lab: Lab, rec: Record) -> list[str]:
    rdir = run_dir(lab.prefix)
    waits: list[tuple[Path, Path]] = []
    started: list[str] = []
    for n in lab.node_list():
        name = f"ztunnel-{n.index}"
        logf, ready = rdir / f"{name}.log", rdir / f"{name}.ready"
        ready.unlink(missing_ok=True)
        argv = procs.module_argv("noderedirect.lab.ztunnel", "--netns",
                                 procs.netns_path(lab.ztunnel_ns(n.index)), "--log", str(logf),
                                 "--ready-file", str(ready)) + ([] if lab.spoof else ["--no-spoof"])
        if lab.inpod:
            argv += [a for p in lab.pods(n.index) if p.mesh
                     for a in ("--inpod", procs.netns_path(lab.pod_ns(p)))]
        rec.processes[name] = str(rdir / f"{name}.pid")
        rec.logs[name] = str(logf)
        rec.save()
        st = procs.start(argv, rdir, name)
        waits.append((ready, st.pidfile))
        started.append(f"{name} pid {st.pid}")
    serve = [f"{procs.netns_path(ep.netns)}={ep.ip}:{SERVER_PORT}"
             for ep in lab.endpoints().values() if ep.kind in ("pod", "external")]
    logf, ready = rdir / "servers.log", rdir / "servers.ready"
    ready.unlink(missing_ok=True)
    argv = procs.module_argv("noderedirect.lab.server", *[a for s in serve for a in ("--serve", s)],
                             "--log", str(logf), "--ready-file", str(ready))
    rec.processes["servers"] = str(rdir / "servers.pid")
    rec.logs["servers"] = str(logf)
    rec.save()
    st = procs.start(argv, rdir, "servers")
    waits.append((ready, st.pidfile))
    started.append(f"servers pid {st.pid} ({len(serve)} listeners on :{SERVER_PORT})")
    for ready, pidfile in waits:
        try:
            procs.wait_ready(ready, READY_TIMEOUT, pidfile)
        except procs.ProcError as e:
            raise LabError(f"a lab process did not start: {e}") from None
    return started


def _missing(rec: Record) -> list[str]:
    """What of a finished lab is gone (namespaces, processes)."""
    gone = [n for n in rec.netns if not procs.same_netns(procs.netns_path(n), tuple(rec.netns_ids.get(n, ())))]
    gone += [name for name, pf in rec.processes.items() if not procs.alive(pf)]
    return gone


def _converge(lab: Lab, rec: Record, progress: Progress, t0: float) -> UpResult:
    """``up`` on a lab that is up: re-apply through the engine (normally zero changes)."""
    changes: dict[str, int] = {}
    _install_counters(lab)
    for n in lab.node_list():
        with progress.step(f"redirection on {n.name}: re-apply") as detail:
            res, _ = _apply(lab, n.index, Path(rec.values[n.name]), rec.tunnel or lab.tunnel)
            changes[n.name] = len(res.applied)
            detail("no changes (already converged)" if not res.applied
                   else f"{len(res.applied)} objects repaired")
    return UpResult(rec, False, changes, [f"lab {lab.prefix!r} was already up: re-applied"],
                    time.monotonic() - t0)


# ---------------------------------------------------------------- down


@dataclass
class DownResult:
    found: bool
    removed_netns: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def down(prefix: str = DEFAULT_PREFIX, progress: Progress = QUIET) -> DownResult:
    """Remove everything the lab's record names. Safe to run twice, and after a crash."""
    t0 = time.monotonic()
    Lab(prefix=prefix)                      # validates the prefix
    state_dir()
    with _locked(prefix), _no_interrupts():
        rec = Record.load(prefix)
        if rec is None:
            return DownResult(False, seconds=time.monotonic() - t0)
        res = _teardown(rec, progress)
        with contextlib.suppress(FileNotFoundError):
            _lock_path(prefix).unlink()
    res.seconds = time.monotonic() - t0
    return res


def _ours(rec: Record, name: str) -> bool:
    """Whether ``name`` still is the namespace this lab created (not a later one of that name)."""
    ident = rec.netns_ids.get(name)
    if ident is None:
        # recorded as "about to be created" and did not exist then (_refuse_foreign): a crash
        # between `ip netns add` and writing its identity leaves exactly this
        return netns_exists(name)
    return procs.same_netns(procs.netns_path(name), tuple(ident))


def _teardown(rec: Record, progress: Progress) -> DownResult:
    res = DownResult(True)
    lab = rec.lab
    with progress.step("processes: stand-in ztunnels, test servers") as detail:
        for name, pidfile in rec.processes.items():
            if procs.stop(pidfile):
                res.stopped.append(name)
        detail(", ".join(res.stopped) or "none running")

    with progress.step("tunnels") as detail:
        removed = _remove_tunnels(lab, rec, res)
        bridges = sum("bridge" in r for r in removed)
        detail(f"{len(removed) - bridges} links deleted"
               + (f", {bridges} user-space GENEVE bridges stopped" if bridges else ""))

    with progress.step("network namespaces") as detail:
        for name in reversed(rec.netns):
            if not _ours(rec, name):
                continue
            procs.kill_netns_pids(name)
            _ip("netns", "del", name)
            res.removed_netns.append(name)
        left = [n for n in rec.netns if _ours(rec, n)]
        if left:
            raise LabError(f"could not remove network namespace(s) {', '.join(left)}")
        detail(f"{len(res.removed_netns)} removed")

    _remove_files(rec)
    log.info("lab down prefix=%s netns=%d processes=%s notes=%s", rec.prefix,
             len(res.removed_netns), ",".join(res.stopped), res.notes)
    return res


def _remove_tunnels(lab: Lab, rec: Record, res: DownResult) -> list[str]:
    """Stop the tunnel driver's processes and delete its links before the namespaces go: a
    user-space GENEVE bridge would otherwise run on (and keep its state files) after them."""
    from .. import tunnels

    removed: list[str] = []
    if lab.inpod:
        return removed          # in-pod mode makes no tunnel
    kind = rec.tunnel if rec.tunnel in tunnels.KINDS else None
    for n in lab.node_list():
        for netns in (lab.node_ns(n.index), lab.ztunnel_ns(n.index)):
            if not _ours(rec, netns):
                continue
            kinds = [kind] if kind else ["usergeneve"]   # unknown: the one that runs processes
            for k in kinds:
                try:
                    done = tunnels.driver(k).remove(procs.netns_path(netns), sorted(names.OWNED_LINKS))
                except Exception as e:        # the namespace goes anyway; say why it was not clean
                    res.notes.append(f"tunnel cleanup in {netns}: {e}")
                    continue
                removed += [f"{netns}: {d}" for d in done]
    return removed


def _remove_files(rec: Record) -> None:
    """The lab's own files, and the engine's and tunnel driver's files keyed by our namespaces."""
    sdir = state_dir()
    for name, (dev, ino) in ((n, i) for n, i in rec.netns_ids.items() if i):
        for f in (f"netns-{dev}-{ino}.json", f"lock-{dev}-{ino}", f"usergeneve-{ino}.log",
                  f"usergeneve-{ino}.lock", f"usergeneve-{ino}.pid", f"usergeneve-{ino}.status.json"):
            with contextlib.suppress(FileNotFoundError):
                (sdir / f).unlink()
    shutil.rmtree(run_dir(rec.prefix), ignore_errors=True)
    for tmp in sdir.glob(f".{record_path(rec.prefix).name}.*.tmp"):     # a save cut short
        tmp.unlink(missing_ok=True)
    with contextlib.suppress(FileNotFoundError):
        record_path(rec.prefix).unlink()


# ---------------------------------------------------------------- more namespaces for a lab


_NETNS_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{0,63}$")


def add_netns(prefix: str, extra: list[str]) -> None:
    """Create more namespaces that belong to a lab that is up (e.g. pods a measurement enrolls
    without wiring them): recorded before they are created, so ``lab down`` removes them too,
    even after a crash. One ``ip -batch`` for all of them."""
    with _locked(prefix):
        rec = load_record(prefix)
        for name in extra:
            if not name.startswith(prefix) or not _NETNS_NAME.match(name):
                raise LabError(f"netns name {name!r} does not start with the lab prefix {prefix!r}")
            if name in rec.netns or netns_exists(name):
                raise LabConflict(f"network namespace {name} exists already")
        rec.netns += list(extra)
        rec.save()
        _ip_batch([f"netns add {name}" for name in extra])
        for name in extra:
            st = os.stat(os.path.join(procs.NETNS_DIR, name))
            rec.netns_ids[name] = [st.st_dev, st.st_ino]
        rec.save()


def remove_netns(prefix: str, extra: list[str]) -> None:
    """Remove namespaces made by :func:`add_netns` (one ``ip -batch``) and forget them. Nothing
    may run inside them (they are not wired, nothing is started there)."""
    with _locked(prefix):
        rec = load_record(prefix)
        mine = [n for n in extra if n in rec.netns and _ours(rec, n)]
        if mine:
            _ip_batch([f"netns del {name}" for name in mine])
        rec.netns = [n for n in rec.netns if n not in set(extra)]
        for n in extra:
            rec.netns_ids.pop(n, None)
        rec.save()


def _ip_batch(lines: list[str]) -> None:
    """``ip -batch`` in this process's netns for namespace files only (``netns add|del``)."""
    cp = subprocess.run(["ip", "-batch", "-"], input="".join(l + "\n" for l in lines),
                        capture_output=True, text=True)
    if cp.returncode != 0:
        raise LabError(f"`ip -batch` ({lines[0]} …) exited {cp.returncode}: {cp.stderr.strip()}")


# ---------------------------------------------------------------- status


def status(prefix: str = DEFAULT_PREFIX, *, check_engine: bool = True) -> dict:
    """What the record says and what is really there; with ``check_engine`` also whether each
    node's redirection still matches its values file (a plan per node, no changes)."""
    rec = load_record(prefix)
    lab = rec.lab
    out: dict = {"prefix": prefix, "phase": rec.phase, "params": rec.params, "tunnel": rec.tunnel,
                 "pid": rec.pid, "up_seconds": rec.up_seconds, "state_file": str(record_path(prefix)),
                 "run_dir": str(run_dir(prefix)), "netns": {}, "processes": {}, "nodes": {},
                 "endpoints": {}}
    for name in rec.netns:
        out["netns"][name] = "ok" if _ours(rec, name) else "missing"
    for name, pf in rec.processes.items():
        r = procs.read_pidfile(pf)
        out["processes"][name] = {"alive": procs.alive(pf), "pid": r["pid"] if r else None,
                                  "log": rec.logs.get(name)}
    for ep in lab.endpoints().values():
        out["endpoints"][ep.name] = {"kind": ep.kind, "ip": ep.ip, "netns": ep.netns,
                                     "node": ep.node, "mesh": ep.mesh, "veth": ep.veth}
    for n in lab.node_list():
        info: dict = {"values": rec.values.get(n.name), "node_netns": lab.node_ns(n.index),
                      "ztunnel_netns": lab.ztunnel_ns(n.index)}
        if check_engine and rec.phase == "up" and n.name in rec.values and \
                out["netns"].get(lab.node_ns(n.index)) == "ok" and \
                out["netns"].get(lab.ztunnel_ns(n.index)) == "ok":
            try:
                with engine_for(lab, n.index, rec.values[n.name], rec.tunnel or lab.tunnel) as eng:
                    p = eng.plan()
                info["pending_changes"] = len(p.changes)
                info["conflicts"] = list(p.conflicts)
                info["plan"] = p.text() if not p.empty else ""
            except Exception as e:     # status reports, it does not fail
                info["error"] = str(e)
        out["nodes"][n.name] = info
    return out
