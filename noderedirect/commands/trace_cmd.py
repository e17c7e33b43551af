"""``noderedirect trace``: walk a packet through the rendered rules, or a live node's (``--from netns``)."""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from typing import Optional

from .. import desired
from ..cli import UsageError
from ..model import NetnsState, Values
from ..topology_model import (SCENARIOS, Live, TopologyError, apply_live, build, lab_values,
                              second_node_values)
from ..trace import PACKET_KINDS, Trace, TraceError, ZtunnelModel, trace, trace_scenario
from .common import add_values_args, load_values

LIVE_BACKENDS = ("iptables", "iptables-legacy", "nft")


def add_walk_args(p: argparse.ArgumentParser) -> None:
    """What to walk: a named scenario, or --src/--dst; shared by ``trace`` and ``diagram``."""
    add_values_args(p, required=False)
    p.add_argument("--scenario", metavar="NAME",
                   help="a named lab scenario (name or number; --list-scenarios shows them)")
    p.add_argument("--src", metavar="IP[:PORT]",
                   help="client address: a pod, the external host, or the node (HostIP, InternalIP "
                        "or one of its addresses); default port 40000")
    p.add_argument("--dst", metavar="IP:PORT", help="destination address and port")
    p.add_argument("--proto", choices=("tcp", "udp"), default="tcp")
    p.add_argument("--two-node", action="store_true",
                   help="add node 2 of the address plan (10.244.2.0/24 via 172.18.0.4) for --src/--dst")
    p.add_argument("--no-original-source", action="store_true",
                   help="model a legacy ztunnel that connects upstream from its own address")
    p.add_argument("--packet", choices=PACKET_KINDS + ("all",), default="all",
                   help="which packets to show: the first, the reply, a later one, or all (default)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "trace", help="walk a packet through the rendered (or live) rules, hop by hop",
        description="Simulate a connection through the rendered rules of a node (and its ztunnel "
                    "pod, or the pods in in-pod mode): every matching rule in order, mark and "
                    "connmark changes, ip rules and route tables, the output device, the GENEVE "
                    "crossing and the socket that receives it — for the first packet, the reply "
                    "and a later packet. By default nothing is read from or written to a kernel. "
                    "With --from netns NS the node's iptables rules (all of them, other programs' "
                    "too), ip rules, routes (tables 100-102, main, local and any table a rule looks "
                    "up), ipset members, links and ip_forward are read live from that netns, and "
                    "the ztunnel pod's from --ztunnel-netns (read-only): the walk then shows what "
                    "the kernel holds now, drift included. With --backend nft our nft tables are read "
                    "instead of our iptables rules: a rule counts only when its id and expression "
                    "are the translation of a rendered rule. Pods, the external host and ztunnel's "
                    "listeners stay the model's; the values file names them. "
                    "Without --values the project's address plan is used.")
    add_walk_args(p)
    p.add_argument("--mode", choices=("legacy", "inpod"), default="legacy")
    p.add_argument("--from", dest="source", nargs="+", metavar="SOURCE", default=["rendered"],
                   help="where the node's state comes from: 'rendered' (default: the values file "
                        "rendered) or 'netns NS' (the live netns NS, a name under /var/run/netns or "
                        "a path such as /proc/PID/ns/net)")
    live = p.add_argument_group("--from netns")
    live.add_argument("--ztunnel-netns", metavar="NS",
                      help="the ztunnel pod's netns, read live too (required in legacy mode)")
    live.add_argument("--backend", choices=LIVE_BACKENDS, default=None,
                      help="which backend programmed the node: iptables (nft-based, default), "
                           "iptables-legacy, or nft (our nft tables, each rule read back as the "
                           "rendered rule it translates; legacy mode)")
    live.add_argument("--lenient", action="store_true",
                      help="a live rule, ip rule or route the tracer cannot interpret (another "
                           "program's, or with --backend nft one of our nft rules changed by "
                           "hand) is treated as non-matching, with a warning hop or note, instead "
                           "of stopping the trace")
    p.add_argument("--output", "-o", choices=("text", "json"), default="text")
    p.add_argument("--list-scenarios", action="store_true", help="list the named scenarios and exit")
    p.set_defaults(func=run_trace)


def parse_endpoint(text: str, what: str, default_port: Optional[int]) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, ""
    if not port:
        if default_port is None:
            raise UsageError(f"{what} {text!r} needs a port (IP:PORT)")
        return host, default_port
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UsageError(f"{what} {text!r}: {port!r} is not a port")
    return host, int(port)


def values_for(args: argparse.Namespace) -> Values:
    if args.values:
        return load_values(args)
    return lab_values(istio_version=getattr(args, "istio_version", None),
                      inpod_version=getattr(args, "inpod_version", None))


def read_live(args: argparse.Namespace, mode: str) -> Optional[Live]:
    """The live state ``--from netns NS`` asks for (None for ``--from rendered``)."""
    source = args.source
    if source == ["rendered"]:
        given = [o for o, v in (("--ztunnel-netns", args.ztunnel_netns), ("--backend", args.backend),
                                ("--lenient", args.lenient)) if v]
        if given:
            raise UsageError(f"{', '.join(given)}: only with --from netns NS")
        return None
    if source[0] != "netns":
        raise UsageError(f"--from {' '.join(source)}: expected 'rendered' or 'netns NS'")
    if len(source) != 2:
        raise UsageError("--from netns needs the netns name: --from netns NS")
    backend = args.backend or "iptables"
    if backend == "nft" and mode != "legacy":
        raise UsageError(f"--backend nft programs the legacy design only; --mode {mode} has no nft "
                         "table to read")
    if mode == "legacy" and not args.ztunnel_netns:
        raise UsageError("--from netns in legacy mode needs --ztunnel-netns NS (the ztunnel pod's "
                         "netns holds the receiving half of the design)")
    from ..trace_live import read
    rendered: dict[str, Optional[NetnsState]] = {"node": None, "ztunnel": None}
    if backend == "nft":
        # the nft rules are read back as the rendered rules they translate: rendered from the
        # values, with what apply derives from the kernel (HostIP, tunnel remote, GENEVE port)
        # derived the same way from these netns (read-only)
        from ..apply import Engine
        from ..host import NetnsRef
        with Engine(values_for(args), NetnsRef.resolve(source[1]),
                    NetnsRef.resolve(args.ztunnel_netns), backend="nft") as eng:
            derived = eng.node_params()
        out = desired.render(derived, "legacy", rules=args.rules)
        rendered = {ns.role: ns for ns in out.netns}
    node = read(source[1], "node", backend, rendered["node"])
    zt = read(args.ztunnel_netns, "ztunnel", backend, rendered["ztunnel"]) if args.ztunnel_netns else None
    return Live(node=node, ztunnel=zt, lenient=args.lenient)


def walk(args: argparse.Namespace, mode: str, live: Optional[Live] = None) -> Trace:
    """The trace the arguments ask for (all packets; ``--packet`` is applied by the caller)."""
    vals = values_for(args)
    zt = ZtunnelModel(original_source=not args.no_original_source)
    try:
        if args.scenario:
            if args.src or args.dst:
                raise UsageError("--scenario cannot be combined with --src/--dst")
            return trace_scenario(vals, mode, args.scenario, rules=args.rules, zt=zt, live=live)
        if not (args.src and args.dst):
            raise UsageError("give --scenario NAME, or both --src and --dst")
        src, sport = parse_endpoint(args.src, "--src", 40000)
        dst, dport = parse_endpoint(args.dst, "--dst", None)
        try:
            ipaddress.IPv4Address(dst)
        except ValueError:
            raise UsageError(f"--dst {args.dst!r}: {dst!r} is not an IPv4 address") from None
        peers = (second_node_values(vals),) if args.two_node else ()
        topo = build(vals, mode, peers=peers, rules=args.rules)
        if live is not None:
            topo = apply_live(topo, live)
        return trace(topo, src, dst, dport, proto=args.proto, sport=sport, zt=zt)
    except (TraceError, TopologyError, KeyError) as e:
        hint = ""
        if live is not None and not live.lenient and getattr(e, "reason", None):
            hint = " (--lenient treats it as non-matching)"
        raise UsageError(str(e).strip('"') + hint) from None


def selected(t: Trace, packet: str) -> Trace:
    return t.select(PACKET_KINDS if packet == "all" else (packet,))


def run_trace(args: argparse.Namespace) -> int:
    if args.list_scenarios:
        for s in SCENARIOS:
            src = f" (source {s.src})" if s.src else ""
            print(f"{s.number:>2}  {s.name:<26} {s.client} → {s.server}:{s.port}{src} — {s.summary}")
        return 0
    live = read_live(args, args.mode)
    t = selected(walk(args, args.mode, live), args.packet)
    if args.output == "json":
        json.dump(t.to_json(), sys.stdout, indent=2, ensure_ascii=False)
        print()
    else:
        sys.stdout.write(t.to_text())
    return 0
