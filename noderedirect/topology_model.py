"""The explicit model of the machines a packet walk runs on: netns, interfaces, addresses, main
routes, wiring, listening sockets — and the named scenarios of the lab.

The tracer (:mod:`noderedirect.trace`) needs more than the rendered rules: it needs the node the
rules sit on. That node is built here, from a validated values file plus the project's address
plan (DESIGN.md, kernel-notes.md §2), and nothing is guessed silently:

- **node netns** (``node``): ``lo``; ``eth0`` with the InternalIP/24 on the "kind" segment; one
  veth per pod and one for the ztunnel pod, each holding HostIP/32 (kind/ptp wiring), with
  ``<podIP> dev <veth> scope host`` in the main table; the connected /24 of ``eth0``; a route
  to every other node's podCIDR via that node's InternalIP; ``ip_forward=1``. The rendered
  legacy objects (iptables, ipset members, ip rules, tables 100-102, ``istioin``/``istioout``)
  are added as rendered; in in-pod mode the rendered in-pod node objects instead.
- **ztunnel netns** (``ztunnel``): ``eth0`` with ZT_IP/32, ``HostIP dev eth0 scope link`` and
  ``default via HostIP``; legacy mode adds the rendered ``pistioin``/``pistioout``, tables,
  rules and TPROXY rules, and ztunnel's transparent listeners on 15001/15006/15008. The Rust
  ztunnel of 1.18-1.20 sets no socket mark (legacy-mode.md §3.2).
- **pod netns** (named after the pod): ``eth0`` with the pod IP/32, ``HostIP dev eth0 scope
  link`` and ``default via HostIP``; a test server on :8000 (kernel-notes.md §2). Ambient pods
  come from the values file; the non-mesh pods ``plain-a``/``plain-b`` (10.244.1.7/.8) from the
  address plan. In in-pod mode an ambient pod's netns also holds its rendered rules, ip rule
  32764, table 100, and ztunnel's listeners *inside the pod netns* with SO_MARK 0x539
  (inpod-mode.md §1-§2).
- **external** host 172.18.0.3/24 on the node's segment, routing the pod CIDRs via the nodes.

A second node (``--two-node``, legacy-mode.md §5.1) is the same build from values derived by
:func:`second_node_values` (podCIDR 10.244.2.0/24, InternalIP 172.18.0.4). In a multi-node
topology the node netns are named after the nodes (``node-1``, ``node-2``) and the ztunnels
``ztunnel-1``, ``ztunnel-2``.

A **live** node (``trace --from netns``, :func:`apply_live`) replaces the traced node's netns
and its ztunnel's with what :mod:`noderedirect.trace_live` read from the kernel: every iptables
rule (foreign ones too), ip rules, the routes of every table a rule looks up (the main and local
tables included), ipset members, links and ``ip_forward``. The wiring is derived from the live
main table: a pod's veth is the device of its ``<podIP>/32`` route, the ztunnel's veth the device
of the ``<ztunnelIP>/32`` route, the uplink the device holding the InternalIP. The pods, the
external host, ztunnel's listeners and the values (names, roles) stay the model's.

Not modelled (documented, because a reader may expect them): rp_filter (every design here sets
it to 0), ARP beyond "the next hop is an address of the peer", MTU, kube-proxy (no KUBE-*
chains: the nat/filter ACCEPT rules are inert, as in the lab), IPv6.

Pure: values in, frozen values out.
"""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
from dataclasses import dataclass, field
from typing import Optional

from . import desired, names
from .model import IpRule, IptRule, Link, NetnsState, Pod, Rendered, Route, Values
from . import values as values_mod
from .trace_rules import TraceError

TABLE_MAIN = 254
TABLE_LOCAL = 255
TABLE_DEFAULT = 253
TABLE_NAMES = {TABLE_MAIN: "main", TABLE_LOCAL: "local", TABLE_DEFAULT: "default"}

APP_PORT = 8000                  # every pod and the external host run a test server here
NODE_SEGMENT = "kind"            # the docker network of a kind cluster: node eth0s + external host
NODE_SEGMENT_PREFIX = 24
EXTERNAL_NAME = "external"
EXTERNAL_IP = "172.18.0.3"
PLAIN_PODS = (("plain-a", "10.244.1.7"), ("plain-b", "10.244.1.8"))
SECOND_NODE = {"name": "node-2", "podCIDR": "10.244.2.0/24", "internalIP": "172.18.0.4",
               "ztunnel": "10.244.2.2", "pods": (("httpbin-2", "10.244.2.6"),)}

# ztunnel's listeners (legacy-mode.md §2.5; inpod-mode.md §1): port -> name
ZTUNNEL_LISTENERS = {names.PORT_OUTBOUND: "ztunnel outbound", names.PORT_INBOUND: "ztunnel inbound",
                     names.PORT_HBONE: "ztunnel HBONE"}


class TopologyError(ValueError):
    """The values cannot be turned into a topology (a name or address used twice …)."""


# ---------------------------------------------------------------- value types


@dataclass(frozen=True)
class Iface:
    """One interface. ``kind``: ``lo``, ``veth`` (``peer`` = (netns, ifname)), ``segment``
    (an L2 network shared by several netns, ``segment`` = its name) or ``tunnel`` (``link`` =
    the rendered GENEVE link: VNI, remote, dstport)."""

    name: str
    addrs: tuple[str, ...]                   # "10.244.1.1/32"
    kind: str
    peer: Optional[tuple[str, str]] = None
    segment: Optional[str] = None
    link: Optional[Link] = None

    @property
    def ips(self) -> tuple[str, ...]:
        return tuple(a.split("/")[0] for a in self.addrs)


@dataclass(frozen=True)
class Listener:
    """A listening socket: ``addr`` 0.0.0.0 = any; ``transparent`` = IP_TRANSPARENT (TPROXY
    only assigns such sockets); ``mark`` = SO_MARK on it and the sockets it accepts."""

    port: int
    name: str
    owner: str                               # "ztunnel" | "app"
    addr: str = "0.0.0.0"
    proto: str = "tcp"
    transparent: bool = False
    mark: int = 0


@dataclass(frozen=True)
class NetnsModel:
    name: str
    kind: str                                # "node" | "ztunnel" | "pod" | "external"
    rule_role: str                           # rule-id convention: "node" | "ztunnel" | "pod" | ""
    node: str                                # the node this netns lives on ("" for external)
    ifaces: tuple[Iface, ...]
    routes: tuple[Route, ...] = ()           # main (254) and numbered tables; local is derived
    ip_rules: tuple[IpRule, ...] = ()        # rendered rules; 0/32766/32767 are added by the tracer
    iptables: tuple[IptRule, ...] = ()
    ipsets: tuple[str, ...] = ()             # rendered set names (a set may be empty)
    ipset_members: tuple[tuple[str, str], ...] = ()   # (set name, ip)
    listeners: tuple[Listener, ...] = ()
    forwarding: bool = False
    mesh: bool = False                       # an enrolled (ambient) pod
    ip: Optional[str] = None                 # the pod's / host's own address
    # a live netns (trace --from netns): ip rules and the local table are the kernel's, complete
    live: Optional[str] = None               # the netns it was read from
    chains: tuple[tuple[str, str], ...] = ()     # every declared (table, chain), empty ones too
    rule_reference: Optional[tuple[IptRule, ...]] = None   # the rendered rules, for rule ids

    def iface(self, name: str) -> Iface:
        for i in self.ifaces:
            if i.name == name:
                return i
        raise KeyError(f"netns {self.name} has no interface {name}")

    def has_iface(self, name: str) -> bool:
        return any(i.name == name for i in self.ifaces)

    @property
    def local_ips(self) -> tuple[str, ...]:
        return tuple(ip for i in self.ifaces for ip in i.ips)


@dataclass(frozen=True)
class Topology:
    mode: str                                # "legacy" | "inpod"
    version: str
    netns: tuple[NetnsModel, ...]
    nodes: tuple[str, ...]                   # node netns names, first = the traced node
    node_values: tuple[Values, ...] = field(default=(), compare=False, repr=False)
    notes: tuple[str, ...] = ()              # what the trace output should say about the machines
    lenient: bool = False                    # live rules outside the vocabulary: skip, do not fail

    def get(self, name: str) -> NetnsModel:
        for ns in self.netns:
            if ns.name == name:
                return ns
        raise KeyError(f"no netns {name!r} in the topology (have: {', '.join(n.name for n in self.netns)})")

    def owner_of(self, ip: str) -> NetnsModel:
        """The netns that holds ``ip`` as an address (a pod, a host, a node)."""
        for ns in self.netns:
            if ns.kind in ("pod", "external", "ztunnel") and ip in ns.local_ips:
                return ns
        for ns in self.netns:
            if ip in ns.local_ips:
                return ns
        raise KeyError(f"no netns owns {ip}")

    def segment_members(self, segment: str) -> list[tuple[NetnsModel, Iface]]:
        return [(ns, i) for ns in self.netns for i in ns.ifaces if i.kind == "segment" and i.segment == segment]

    def mesh_pod(self, ip: str) -> Optional[NetnsModel]:
        """The enrolled pod holding ``ip``, on any node (what ztunnel's workload store knows)."""
        for ns in self.netns:
            if ns.kind == "pod" and ns.mesh and ns.ip == ip:
                return ns
        return None

    def ztunnel_of(self, node: str) -> Optional[NetnsModel]:
        for ns in self.netns:
            if ns.kind == "ztunnel" and ns.node == node:
                return ns
        return None


# ---------------------------------------------------------------- building


def lab_values(istio_version: Optional[str] = None, inpod_version: Optional[str] = None) -> Values:
    """The address plan of DESIGN.md as values: node-1, ztunnel 10.244.1.2 on veth-zt, ambient
    pods sleep 10.244.1.5 and httpbin 10.244.1.6 (the same as examples/values.yaml)."""
    return values_mod.parse(copy.deepcopy(_LAB_VALUES), source="<address plan>",
                            istio_version=istio_version, inpod_version=inpod_version)


_LAB_VALUES = {
    "node": {"name": "node-1", "internalIP": "172.18.0.2", "podCIDR": "10.244.1.0/24",
             "hostIP": "10.244.1.1"},
    "ztunnel": {"ip": "10.244.1.2", "veth": "veth-zt", "interface": "eth0"},
    "geneve": {"dstPort": names.GENEVE_DEFAULT_PORT},
    "istioVersion": "1.20",
    "pods": [
        {"namespace": "default", "name": "sleep", "uid": "6b1f2c3e-0a4d-4c55-9e1a-1b2c3d4e5f05",
         "ip": "10.244.1.5"},
        {"namespace": "default", "name": "httpbin", "uid": "7c2e3d4f-1b5e-4d66-8f2b-2c3d4e5f6a06",
         "ip": "10.244.1.6"},
    ],
}


def second_node_values(first: Values) -> Values:
    """Node 2 of the multi-node plan, same era and knobs as ``first``: podCIDR 10.244.2.0/24,
    InternalIP 172.18.0.4, ztunnel 10.244.2.2, one ambient pod httpbin-2 10.244.2.6."""
    n = first.node
    data = {
        "node": {"name": SECOND_NODE["name"], "internalIP": SECOND_NODE["internalIP"],
                 "podCIDR": SECOND_NODE["podCIDR"]},
        "ztunnel": {"ip": SECOND_NODE["ztunnel"], "veth": n.ztunnel_veth, "interface": n.ztunnel_if},
        "geneve": {"dstPort": n.geneve_port},
        "dnsCapture": n.dns_capture,
        "istioVersion": str(n.istio_version),
        "ipset": {"comments": n.ipset_comments},
        "inpod": {"istioVersion": str(n.inpod_version)},
        "pods": [{"namespace": "default", "name": name, "uid": f"00000000-0000-4000-8000-{i:012d}",
                  "ip": ip} for i, (name, ip) in enumerate(SECOND_NODE["pods"], start=1)],
    }
    return values_mod.parse(data, source="<second node>")


def pod_veth(pod_name: str, explicit: Optional[str] = None) -> str:
    """The host-side veth of a pod: the values file's ``veth`` if given, else ``veth-<name>``
    cut to the kernel's 15 characters."""
    return explicit or f"veth-{pod_name}"[:15]


def build(values: Values, mode: str = "legacy", *, peers: tuple[Values, ...] = (),
          plain_pods: tuple[tuple[str, str], ...] = PLAIN_PODS,
          external: Optional[tuple[str, str]] = (EXTERNAL_NAME, EXTERNAL_IP),
          rules=None) -> Topology:
    """The topology for ``values`` (and ``peers``: more nodes on the same segment), with the
    rendered objects of ``mode`` in place. ``plain_pods`` (non-mesh) live on the first node."""
    if mode not in ("legacy", "inpod"):
        raise TopologyError(f"unknown mode {mode!r} (legacy or inpod)")
    all_values = (values,) + tuple(peers)
    multi = len(all_values) > 1
    out: list[NetnsModel] = []
    node_names: list[str] = []
    for idx, vals in enumerate(all_values, start=1):
        rendered = desired.render(vals, mode, rules=rules)
        node_ns = vals.node.node_name if multi else "node"
        zt_ns = f"ztunnel-{idx}" if multi else "ztunnel"
        node_names.append(node_ns)
        plain = plain_pods if idx == 1 else ()
        out += _one_node(vals, rendered, mode, node_ns, zt_ns, plain, all_values)
    if external is not None:
        out.append(_external(external, all_values))
    seen: set[str] = set()
    for ns in out:
        if ns.name in seen:
            raise TopologyError(f"netns name {ns.name!r} is used twice (pod names must be unique "
                                "across the nodes)")
        seen.add(ns.name)
    version = str(values.node.istio_version if mode == "legacy" else values.node.inpod_version)
    return Topology(mode=mode, version=version, netns=tuple(out), nodes=tuple(node_names),
                    node_values=all_values)


def _connected(addr: str, dev: str) -> Route:
    iface = ipaddress.ip_interface(addr)
    return Route(table=TABLE_MAIN, dst=str(iface.network), dev=dev, scope="link", src=str(iface.ip))


def _one_node(vals: Values, rendered: Rendered, mode: str, node_ns: str, zt_ns: str,
              plain: tuple[tuple[str, str], ...], all_values: tuple[Values, ...]) -> list[NetnsModel]:
    n = vals.node
    net = ipaddress.ip_network(n.pod_cidr)
    for name, ip in plain:
        if ipaddress.ip_address(ip) not in net:
            raise TopologyError(f"non-mesh pod {name} {ip} is outside podCIDR {n.pod_cidr}")
        if ip in (p.ip for p in vals.pods) or ip in (n.ztunnel_ip, n.host_ip):
            raise TopologyError(f"non-mesh pod {name} {ip} collides with an address of the values file")
    node_state = rendered.get("node")
    eth0 = f"{n.internal_ip}/{NODE_SEGMENT_PREFIX}"
    host32 = f"{n.host_ip}/32"
    ifaces = [Iface("lo", ("127.0.0.1/8",), "lo"),
              Iface("eth0", (eth0,), "segment", segment=NODE_SEGMENT),
              Iface(n.ztunnel_veth, (host32,), "veth", peer=(zt_ns, n.ztunnel_if))]
    routes = [_connected(eth0, "eth0"),
              Route(table=TABLE_MAIN, dst=f"{n.ztunnel_ip}/32", dev=n.ztunnel_veth, scope="link")]
    pods: list[tuple[str, str, Optional[Pod], Optional[str]]] = [
        (p.name, p.ip, p, p.veth) for p in vals.pods] + [(name, ip, None, None) for name, ip in plain]
    for name, ip, _p, veth in pods:
        dev = pod_veth(name, veth)
        ifaces.append(Iface(dev, (host32,), "veth", peer=(name, "eth0")))
        routes.append(Route(table=TABLE_MAIN, dst=f"{ip}/32", dev=dev, scope="host"))
    for link in node_state.links:   # legacy: istioin / istioout
        ifaces.append(Iface(link.name, (link.address,), "tunnel", link=link))
        routes.append(_connected(link.address, link.name))
    for other in all_values:
        if other is not vals:
            routes.append(Route(table=TABLE_MAIN, dst=other.node.pod_cidr, via=other.node.internal_ip,
                                dev="eth0"))
    routes += list(node_state.routes)
    out = [NetnsModel(
        name=node_ns, kind="node", rule_role="node", node=node_ns, ifaces=tuple(ifaces),
        routes=tuple(routes), ip_rules=node_state.ip_rules, iptables=node_state.rules_for(4),
        ipsets=tuple(s.name for s in node_state.ipsets),
        ipset_members=tuple((e.set, e.ip) for e in node_state.ipset_entries),
        forwarding=True, ip=n.internal_ip)]
    out.append(_ztunnel(vals, rendered, mode, node_ns, zt_ns))
    for name, ip, pod, _veth in pods:
        out.append(_pod(vals, rendered, mode, node_ns, name, ip, pod))
    return out


def _pod_base(n, name: str, ip: str, node_ns: str, node_veth: str) -> tuple[list[Iface], list[Route]]:
    ifaces = [Iface("lo", ("127.0.0.1/8",), "lo"),
              Iface("eth0", (f"{ip}/32",), "veth", peer=(node_ns, node_veth))]
    routes = [Route(table=TABLE_MAIN, dst=f"{n.host_ip}/32", dev="eth0", scope="link"),
              Route(table=TABLE_MAIN, dst="0.0.0.0/0", via=n.host_ip, dev="eth0")]
    return ifaces, routes


def _ztunnel(vals: Values, rendered: Rendered, mode: str, node_ns: str, zt_ns: str) -> NetnsModel:
    n = vals.node
    ifaces = [Iface("lo", ("127.0.0.1/8",), "lo"),
              Iface(n.ztunnel_if, (f"{n.ztunnel_ip}/32",), "veth", peer=(node_ns, n.ztunnel_veth))]
    routes = [Route(table=TABLE_MAIN, dst=f"{n.host_ip}/32", dev=n.ztunnel_if, scope="link"),
              Route(table=TABLE_MAIN, dst="0.0.0.0/0", via=n.host_ip, dev=n.ztunnel_if)]
    if mode == "legacy":
        zt: NetnsState = rendered.get("ztunnel")
        for link in zt.links:
            ifaces.append(Iface(link.name, (link.address,), "tunnel", link=link))
            routes.append(_connected(link.address, link.name))
        routes += list(zt.routes)
        listeners = tuple(Listener(port=p, name=nm, owner="ztunnel", transparent=True)
                          for p, nm in ZTUNNEL_LISTENERS.items())
        return NetnsModel(name=zt_ns, kind="ztunnel", rule_role="ztunnel", node=node_ns,
                          ifaces=tuple(ifaces), routes=tuple(routes), ip_rules=zt.ip_rules,
                          iptables=zt.rules_for(4), listeners=listeners, ip=n.ztunnel_ip)
    # in-pod: ztunnel's own netns carries nothing of the design; its sockets live in the pods
    return NetnsModel(name=zt_ns, kind="ztunnel", rule_role="", node=node_ns, ifaces=tuple(ifaces),
                      routes=tuple(routes), ip=n.ztunnel_ip)


def _pod(vals: Values, rendered: Rendered, mode: str, node_ns: str, name: str, ip: str,
         pod: Optional[Pod]) -> NetnsModel:
    n = vals.node
    node_veth = pod_veth(name, pod.veth if pod else None)
    ifaces, routes = _pod_base(n, name, ip, node_ns, node_veth)
    listeners = [Listener(port=APP_PORT, name="test server", owner="app")]
    kw: dict = {}
    if mode == "inpod" and pod is not None:
        st = rendered.get(f"pod:{pod.key}")
        routes += list(st.routes)
        kw = {"ip_rules": tuple(r for r in st.ip_rules if r.family == 4), "iptables": st.rules_for(4),
              "rule_role": "pod"}
        listeners += [Listener(port=p, name=nm, owner="ztunnel", transparent=True, mark=names.INPOD_MARK)
                      for p, nm in ZTUNNEL_LISTENERS.items()]
    return NetnsModel(name=name, kind="pod", rule_role=kw.pop("rule_role", ""), node=node_ns,
                      ifaces=tuple(ifaces), routes=tuple(routes), listeners=tuple(listeners),
                      mesh=pod is not None, ip=ip, **kw)


def _external(spec: tuple[str, str], all_values: tuple[Values, ...]) -> NetnsModel:
    name, ip = spec
    addr = f"{ip}/{NODE_SEGMENT_PREFIX}"
    routes = [_connected(addr, "eth0")]
    for v in all_values:
        routes.append(Route(table=TABLE_MAIN, dst=v.node.pod_cidr, via=v.node.internal_ip, dev="eth0"))
    return NetnsModel(name=name, kind="external", rule_role="", node="",
                      ifaces=(Iface("lo", ("127.0.0.1/8",), "lo"),
                              Iface("eth0", (addr,), "segment", segment=NODE_SEGMENT)),
                      routes=tuple(routes),
                      listeners=(Listener(port=APP_PORT, name="test server", owner="app"),), ip=ip)


# ---------------------------------------------------------------- a live node (trace --from netns)


@dataclass(frozen=True)
class LiveState:
    """One netns as the kernel holds it, in the rendered state's shape (read by
    :func:`noderedirect.trace_live.read`). ``state.links`` are model.Link values: a tunnel link
    with its VNI/remote/port, any other link with its kind and addresses (comma-joined).
    ``unsupported``: ip rules and routes the tracer cannot interpret, as the kernel shows them."""

    netns: str
    state: NetnsState
    chains: tuple[tuple[str, str], ...] = ()
    unsupported: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Live:
    """The live side of a trace: the traced node's netns, and its ztunnel's (legacy mode)."""

    node: LiveState
    ztunnel: Optional[LiveState] = None
    lenient: bool = False


def apply_live(topo: Topology, live: Live) -> Topology:
    """``topo`` with its first node (and that node's ztunnel) replaced by the live state.

    Objects the tracer cannot interpret raise :class:`TraceError` naming the first one, unless
    ``live.lenient``: then they are left out and the trace notes say so."""
    problems = list(live.node.unsupported) + list(live.ztunnel.unsupported if live.ztunnel else ())
    if problems and not live.lenient:
        raise TraceError(f"{problems[0]}: the tracer cannot interpret it (--lenient leaves it out "
                         "with a note)")
    node_name = topo.nodes[0]
    n = topo.node_values[0].node
    node_model = topo.get(node_name)
    zt_model = topo.ztunnel_of(node_name)
    pods = [ns for ns in topo.netns if ns.kind == "pod" and ns.node == node_name]
    node_main = _main_routes(live.node.state)
    notes = [f"{node_name}: live state of netns {live.node.netns}"]
    # the ztunnel's side of its veth: where it sends to HostIP (else its default route)
    zt_if = n.ztunnel_if
    if live.ztunnel is not None:
        zt_main = _main_routes(live.ztunnel.state)
        zt_if = _dev_to(zt_main, n.host_ip) or zt_if
        notes.append(f"{zt_model.name}: live state of netns {live.ztunnel.netns}")
    zt_veth = _dev_to(node_main, n.ztunnel_ip) or n.ztunnel_veth
    peers = {zt_veth: (zt_model.name, zt_if)}
    pod_dev: dict[str, str] = {}
    for pod in pods:
        dev = _dev_to(node_main, pod.ip)
        if dev is None:
            notes.append(f"pod {pod.name} {pod.ip}: no {pod.ip}/32 route in the main table of "
                         f"netns {live.node.netns}")
            continue
        pod_dev[pod.name] = dev
        peers.setdefault(dev, (pod.name, "eth0"))
    uplink = next((l.name for l in live.node.state.links
                   if n.internal_ip in _link_ips(l)), None)
    models = {node_name: _live_model(node_model, live.node, peers, uplink)}
    if live.ztunnel is not None:
        models[zt_model.name] = _live_model(zt_model, live.ztunnel, {zt_if: (node_name, zt_veth)}, None)
    for pod in pods:
        if pod.name in pod_dev:
            eth0 = dataclasses.replace(pod.iface("eth0"), peer=(node_name, pod_dev[pod.name]))
            models[pod.name] = dataclasses.replace(
                pod, ifaces=tuple(eth0 if i.name == "eth0" else i for i in pod.ifaces))
    notes += list(live.node.notes) + list(live.ztunnel.notes if live.ztunnel else ())
    notes += [f"{p}: not interpreted, left out (--lenient)" for p in problems]
    return dataclasses.replace(topo, netns=tuple(models.get(ns.name, ns) for ns in topo.netns),
                               notes=topo.notes + tuple(notes), lenient=live.lenient)


def _main_routes(state: NetnsState) -> list[Route]:
    return [r for r in state.routes if r.table == TABLE_MAIN and r.family == 4]


def _dev_to(routes: list[Route], ip: str) -> Optional[str]:
    """The device of the ``ip/32`` route (kind/ptp wiring: one per pod, and HostIP in a pod)."""
    return next((r.dev for r in routes if r.dst == f"{ip}/32" and r.dev and r.type == "unicast"), None)


def _link_ips(link: Link) -> tuple[str, ...]:
    return tuple(a.split("/")[0] for a in link.address.split(",") if a)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def _live_model(model: NetnsModel, live: LiveState, peers: dict[str, tuple[str, str]],
                uplink: Optional[str]) -> NetnsModel:
    """``model`` with the kernel's objects: the values-derived roles (kind, listeners, address)
    stay, the links become interfaces wired by ``peers`` (device -> (netns, device))."""
    st = live.state
    ifaces = []
    for link in st.links:
        addrs = tuple(a for a in link.address.split(",") if a)
        if link.kind == "loopback":
            ifaces.append(Iface(link.name, addrs, "lo"))
        elif names.is_owned_link(link.name) and _is_ip(link.remote):
            ifaces.append(Iface(link.name, addrs, "tunnel", link=link))
        elif link.name in peers:
            ifaces.append(Iface(link.name, addrs, "veth", peer=peers[link.name]))
        elif link.name == uplink:
            ifaces.append(Iface(link.name, addrs, "segment", segment=NODE_SEGMENT))
        else:   # not part of the model: a segment of its own, where nobody answers
            ifaces.append(Iface(link.name, addrs, "segment", segment=f"{link.name} of {live.netns}"))
    forwarding = any(s.key.replace("/", ".") == "net.ipv4.ip_forward" and s.value == "1" for s in st.sysctls)
    return dataclasses.replace(
        model, ifaces=tuple(ifaces), routes=tuple(r for r in st.routes if r.family == 4),
        ip_rules=tuple(r for r in st.ip_rules if r.family == 4), iptables=st.rules_for(4),
        ipsets=tuple(s.name for s in st.ipsets),
        ipset_members=tuple((e.set, e.ip) for e in st.ipset_entries), forwarding=forwarding,
        live=live.netns, chains=live.chains, rule_reference=model.iptables)


# ---------------------------------------------------------------- named scenarios (kernel-notes.md §11)


@dataclass(frozen=True)
class Scenario:
    """A lab scenario: who connects where. ``client`` is a netns name of the topology
    (``node`` = a process in the node netns); ``src`` pins the client's source address
    (``HostIP``/``InternalIP`` are resolved against the traced node)."""

    number: int
    name: str
    client: str
    server: str                 # netns name whose address is the destination
    port: int = APP_PORT
    src: Optional[str] = None   # "HostIP" | "InternalIP" | an address
    two_node: bool = False
    summary: str = ""


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(1, "sleep-httpbin", "sleep", "httpbin", summary="ambient pod to ambient pod, same node"),
    Scenario(2, "sleep-plain", "sleep", "plain-a", summary="ambient pod to a non-mesh pod"),
    Scenario(3, "sleep-external", "sleep", EXTERNAL_NAME, summary="ambient pod to an off-node host"),
    Scenario(4, "plain-httpbin", "plain-a", "httpbin", summary="non-mesh pod to an ambient pod"),
    Scenario(5, "external-httpbin", EXTERNAL_NAME, "httpbin", summary="off-node host to an ambient pod"),
    Scenario(6, "node-httpbin", "node", "httpbin", src="HostIP",
             summary="node process from HostIP (kubelet probe) to an ambient pod"),
    Scenario(7, "plain-plain", "plain-a", "plain-b", summary="non-mesh pod to non-mesh pod"),
    Scenario(8, "external-plain", EXTERNAL_NAME, "plain-a", summary="off-node host to a non-mesh pod"),
    Scenario(9, "sleep-httpbin-4mb", "sleep", "httpbin", summary="as 1, 4 MB transfer"),
    Scenario(10, "external-httpbin-4mb", EXTERNAL_NAME, "httpbin", summary="as 5, 4 MB transfer"),
    Scenario(11, "external-httpbin-hbone", EXTERNAL_NAME, "httpbin", port=names.PORT_HBONE,
             summary="off-node host to an ambient pod's port 15008"),
    Scenario(12, "node-internal-httpbin", "node", "httpbin", src="InternalIP",
             summary="node process bound to the InternalIP to an ambient pod"),
    Scenario(13, "sleep-httpbin-cross-node", "sleep", "httpbin-2", two_node=True,
             summary="ambient pod to an ambient pod on node 2 (legacy-mode.md §5.1)"),
)


def scenario(name_or_number: str) -> Scenario:
    for s in SCENARIOS:
        if name_or_number in (s.name, str(s.number)):
            return s
    raise KeyError(f"unknown scenario {name_or_number!r} (known: {', '.join(s.name for s in SCENARIOS)})")


def topology_for(values: Values, mode: str, sc: Optional[Scenario] = None, rules=None,
                 live: Optional[Live] = None) -> Topology:
    peers = (second_node_values(values),) if sc is not None and sc.two_node else ()
    topo = build(values, mode, peers=peers, rules=rules)
    return apply_live(topo, live) if live is not None else topo
