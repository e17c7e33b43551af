"""``lab up|down|status|exec|curl``: a Kubernetes-like node on this machine, and requests through it.

The lab itself is :mod:`noderedirect.lab.topology`; the observation behind ``lab curl``'s
numbered path is :mod:`noderedirect.lab.paths`. This module parses arguments and prints.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from typing import Callable, Iterator, Optional, TextIO

PREFIX_ENV = "NODEREDIRECT_LAB_PREFIX"
EXIT_INTERRUPTED = 130


def _common() -> argparse.ArgumentParser:
    from ..lab.topology import DEFAULT_PREFIX

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--prefix", default=os.environ.get(PREFIX_ENV, DEFAULT_PREFIX),
                   help=f"name prefix of the lab's network namespaces (default ${PREFIX_ENV} or "
                        f"{DEFAULT_PREFIX}); several labs with different prefixes can coexist")
    return p


def register(sub: argparse._SubParsersAction) -> None:
    from ..lab import topology

    common = _common()
    lab = sub.add_parser(
        "lab", help="a Kubernetes-like node built from network namespaces, with the redirection applied",
        description="Build a one-machine stand-in for a kind node: pods (sleep and httpbin in the "
                    "mesh, plain-a and plain-b outside it, optional extra mesh pods), the ztunnel "
                    "pod with a stand-in ztunnel, an off-node host, all wired like kind's ptp CNI, "
                    "with the legacy redirection applied by the same engine as `apply`.")
    lsub = lab.add_subparsers(dest="lab_command", metavar="up|down|status|exec|curl", required=True)

    u = lsub.add_parser("up", parents=[common], help="build the lab (idempotent)",
                        description="Create the namespaces and wiring, apply the redirection on "
                                    "each node, start the stand-in ztunnel(s) and the test servers. "
                                    "Running it again on a lab that is up re-applies (no changes "
                                    "when converged); other parameters are an error. Ctrl-C removes "
                                    "whatever was built so far.")
    u.add_argument("--nodes", type=int, choices=(1, 2), default=1,
                   help="2: a second node (pod CIDR 10.244.2.0/24, InternalIP 172.18.0.4) with its "
                        "own ztunnel, on the same underlay")
    u.add_argument("--extra-pods", type=int, default=0, metavar="N",
                   help=f"N more mesh pods on node 1 (10.244.1.10 …; at most {topology.MAX_EXTRA_PODS})")
    u.add_argument("--backend", choices=topology.BACKENDS, default="iptables",
                   help="iptables (nft-based, default), iptables-legacy or native nft")
    u.add_argument("--tunnel", choices=topology.TUNNELS, default="auto",
                   help="auto (kernel GENEVE if present, else usergeneve), geneve, usergeneve, vxlan")
    u.add_argument("--no-spoof", action="store_true",
                   help="the stand-in ztunnel connects from its own address, not the client's")
    u.add_argument("--mode", choices=topology.MODES, default="legacy",
                   help="legacy (node-level capture, tunnels to the ztunnel pod; default) or inpod "
                        "(the in-pod rules inside each mesh pod's netns, the stand-in ztunnel's "
                        "listeners inside those netns, only the probe SNAT on the node)")
    u.set_defaults(func=run_up)

    d = lsub.add_parser("down", parents=[common], help="remove everything the lab made",
                        description="Stop the lab's processes, remove its tunnels, the namespaces "
                                    "and its files, as recorded by `lab up` (also after a crash).")
    d.set_defaults(func=run_down)

    s = lsub.add_parser("status", parents=[common], help="what the lab has and whether it is intact")
    s.add_argument("--output", "-o", choices=("text", "json"), default="text")
    s.set_defaults(func=run_status)

    e = lsub.add_parser("exec", parents=[common], help="run a command inside a pod's (or node's) netns",
                        description="Run CMD in the network namespace of POD: a pod name, node-1, "
                                    "node-2, ztunnel-1, ztunnel-2 or external (like `ip netns exec`).")
    e.add_argument("rest", nargs=argparse.REMAINDER, metavar="POD [--prefix P] -- CMD …",
                   help="the pod, then the command after `--` (its options are never read as ours)")
    e.set_defaults(func=run_exec)

    c = lsub.add_parser("curl", parents=[common], help="send one request and print the path it took",
                        description="GET http://TO:PORT/PATH from inside FROM's netns, then print the "
                                    "path as numbered hops, each backed by an observation: rule "
                                    "counters, TCP packets per tunnel device, the stand-in ztunnel's "
                                    "log, conntrack marks and the server's view of the client.")
    c.add_argument("src", metavar="FROM", help="pod, node-1, node-2 or external")
    c.add_argument("dst", metavar="TO[:PORT]", help="a lab name or an IPv4 address (port 8000 if omitted)")
    c.add_argument("--path", default="/", help="request path (/bytes/N for N bytes)")
    c.add_argument("--bind", metavar="IP", help="source address to send from (like curl --interface)")
    c.add_argument("--timeout", type=float, default=5.0)
    c.add_argument("--output", "-o", choices=("text", "json"), default="text")
    c.set_defaults(func=run_curl)


# ---------------------------------------------------------------- progress display


class Display:
    """Steps with ✓ and timings on a terminal; one plain line per finished step otherwise."""

    def __init__(self, stream: TextIO = sys.stderr, tty: Optional[bool] = None):
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[Callable[[str], None]]:
        details: list[str] = []
        t0 = time.monotonic()
        if self.tty:
            self._write(f"  … {title}")
        try:
            yield details.append
        except BaseException:
            dt = time.monotonic() - t0
            self._write(f"\r\033[K  ✗ {title}  ({dt:.2f} s)\n" if self.tty
                        else f"lab: {title}: failed after {dt:.2f} s\n")
            raise
        dt = time.monotonic() - t0
        text = title + (f": {details[-1]}" if details else "")
        self._write(f"\r\033[K  ✓ {text}  ({dt:.2f} s)\n" if self.tty else f"lab: {text} ({dt:.2f} s)\n")

    def note(self, text: str) -> None:
        self._write(f"  ! {text}\n" if self.tty else f"lab: {text}\n")


def _display():
    from ..lab.topology import Progress

    class _P(Display, Progress):
        pass
    return _P()


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP during `up` clean up like Ctrl-C does."""
    def raise_interrupt(signum, frame):
        raise KeyboardInterrupt
    old = {s: signal.signal(s, raise_interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ---------------------------------------------------------------- commands


def _err(text: str) -> None:
    print(f"noderedirect: {text}", file=sys.stderr)


def run_up(args: argparse.Namespace) -> int:
    from ..host import HostError
    from ..lab import topology

    try:
        lab = topology.Lab(prefix=args.prefix, nodes=args.nodes, extra_pods=args.extra_pods,
                           backend=args.backend, tunnel=args.tunnel, spoof=not args.no_spoof,
                           mode=args.mode)
    except topology.LabError as e:
        _err(str(e))
        return 2
    display = _display()
    print(f"lab {lab.prefix}: {lab.nodes} node{'s' if lab.nodes > 1 else ''}, backend "
          f"{lab.backend}, " + ("in-pod mode" if lab.inpod else f"tunnel {lab.tunnel}"),
          file=sys.stderr)
    try:
        with _terminate_as_interrupt():
            res = topology.up(lab, display)
    except KeyboardInterrupt:
        left = topology.Record.load(lab.prefix)
        if left is not None and left.phase == "up":
            # the interrupt came after the lab was complete: it stays, as built
            _err(f"interrupted after the lab was up; it stays up (`noderedirect lab down"
                 f"{_pfx(lab.prefix)}` removes it)")
        elif left is not None:
            _err(f"interrupted, and not everything could be removed: run `noderedirect lab down"
                 f"{_pfx(lab.prefix)}`")
        else:
            _err("interrupted: everything `lab up` had built was removed")
        return EXIT_INTERRUPTED
    except topology.LabConflict as e:
        _err(str(e))
        return 2
    except (topology.LabError, HostError) as e:
        _err(f"lab up failed (everything it built was removed): {e}")
        return 1
    for n in res.notes:
        print(f"note: {n}", file=sys.stderr)
    rec = res.record
    if res.created:
        done = f"is up in {res.seconds:.1f} s"
    else:
        fixed = sum(res.changes.values())
        done = (f"was already up; re-applied in {res.seconds:.1f} s, "
                + ("no changes" if not fixed else f"{fixed} objects repaired"))
    how = "in-pod mode" if lab.inpod else f"tunnel {rec.tunnel}"
    print(f"lab {lab.prefix} {done} ({how}); "
          f"try: noderedirect lab curl sleep httpbin:8000{_pfx(lab.prefix)}")
    return 0


def _pfx(prefix: str) -> str:
    from ..lab.topology import DEFAULT_PREFIX
    return "" if prefix == DEFAULT_PREFIX else f" --prefix {prefix}"


def run_down(args: argparse.Namespace) -> int:
    from ..lab import topology

    try:
        res = topology.down(args.prefix, _display())
    except topology.LabError as e:
        _err(str(e))
        return 1
    if not res.found:
        print(f"lab {args.prefix}: nothing to remove (no lab recorded)")
        return 0
    for n in res.notes:
        print(f"note: {n}", file=sys.stderr)
    print(f"lab {args.prefix} removed: {len(res.removed_netns)} namespaces, "
          f"{len(res.stopped)} processes, in {res.seconds:.1f} s")
    return 0


def run_status(args: argparse.Namespace) -> int:
    from ..lab import topology

    try:
        st = topology.status(args.prefix)
    except topology.LabError as e:
        _err(str(e))
        return 1
    healthy = (st["phase"] == "up" and all(v == "ok" for v in st["netns"].values())
               and all(p["alive"] for p in st["processes"].values())
               and all(not n.get("pending_changes") and not n.get("error") for n in st["nodes"].values()))
    if args.output == "json":
        json.dump({**st, "healthy": healthy}, sys.stdout, indent=2)
        print()
        return 0 if healthy else 1
    p = st["params"]
    took = f"; built in {st['up_seconds']:.1f} s" if st.get("up_seconds") else ""
    how = ("in-pod mode" if p.get("mode") == "inpod" else f"tunnel {st['tunnel'] or p['tunnel']}")
    print(f"lab {st['prefix']}: {st['phase']} ({p['nodes']} node{'s' if p['nodes'] > 1 else ''}, "
          f"backend {p['backend']}, {how}{took})")
    missing = [n for n, s in st["netns"].items() if s != "ok"]
    print(f"  namespaces: {len(st['netns']) - len(missing)} ok"
          + (f", missing: {', '.join(missing)}" if missing else ""))
    print("  processes:  " + ", ".join(
        f"{n} pid {i['pid']} {'alive' if i['alive'] else 'DEAD'}" for n, i in st["processes"].items()))
    for name, n in st["nodes"].items():
        if "error" in n:
            state = f"could not check: {n['error']}"
        elif "pending_changes" in n:
            state = ("converged" if not n["pending_changes"] and not n["conflicts"]
                     else f"{n['pending_changes']} pending changes (run `noderedirect lab up` to repair)")
        else:
            state = "not checked"
        print(f"  {name}: redirection {state}; values {n['values']}")
    eps = st["endpoints"]
    pods = [f"{k} {v['ip']}" + (" (mesh)" if v["mesh"] else "")
            for k, v in eps.items() if v["kind"] == "pod" and not k.startswith("extra-")]
    extra = [v["ip"] for k, v in eps.items() if k.startswith("extra-")]
    if extra:
        pods.append(f"extra-1 … extra-{len(extra)} {extra[0]} … {extra[-1]} (mesh)")
    print("  pods:       " + ", ".join(pods))
    print("  others:     " + ", ".join(f"{k} {v['ip']}" for k, v in eps.items() if v["kind"] != "pod"))
    return 0 if healthy else 1


def run_exec(args: argparse.Namespace) -> int:
    from ..lab import topology

    try:
        pod, prefix, cmd = _exec_args(list(args.rest), args.prefix)
    except ValueError as e:
        _err(f"lab exec: {e}; usage: lab exec POD -- CMD …")
        return 2
    args.prefix = prefix
    try:
        rec = topology.load_record(prefix)
        ep = rec.lab.endpoint(pod)
    except topology.LabError as e:
        _err(str(e))
        return 2
    if not topology.netns_exists(ep.netns):
        _err(f"netns {ep.netns} of {ep.name} is gone; run `noderedirect lab up`{_pfx(args.prefix)}")
        return 1
    sys.stdout.flush()
    os.execvp("ip", ["ip", "netns", "exec", ep.netns, *cmd])
    return 1     # not reached


def _exec_args(rest: list[str], prefix: str) -> tuple[str, str, list[str]]:
    """POD, then our own options up to ``--``, then the command (argparse cannot keep a
    command's options apart from ours once a positional came first)."""
    if not rest or rest[0].startswith("-"):
        raise ValueError("no POD given")
    pod, rest = rest[0], rest[1:]
    if "--" not in rest:
        if not rest:
            raise ValueError("no command given")
        return pod, prefix, rest
    cut = rest.index("--")
    opts, cmd = rest[:cut], rest[cut + 1:]
    while opts:
        opt = opts.pop(0)
        if opt == "--prefix" and opts:
            prefix = opts.pop(0)
        elif opt.startswith("--prefix="):
            prefix = opt.partition("=")[2]
        else:
            raise ValueError(f"unknown option {opt!r} before `--`")
    if not cmd:
        raise ValueError("no command given after `--`")
    return pod, prefix, cmd


def _split_target(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        from ..lab.topology import SERVER_PORT
        return text, SERVER_PORT
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: the port must be a number 1-65535")
    return host, int(port)


def run_curl(args: argparse.Namespace) -> int:
    from ..lab import paths, topology

    try:
        dst, port = _split_target(args.dst)
        rec = topology.load_record(args.prefix)
        if rec.phase != "up":
            raise topology.LabError(f"lab {args.prefix} is not up (phase {rec.phase}); run "
                                    f"`noderedirect lab up`{_pfx(args.prefix)}")
        trace = paths.trace_request(rec, args.src, dst, port, args.path, bind=args.bind,
                                    timeout=args.timeout)
    except (ValueError, topology.LabError) as e:
        _err(str(e))
        return 2
    if args.output == "json":
        json.dump(trace.summary(), sys.stdout, indent=2, ensure_ascii=False)
        print()
    else:
        _print_trace(trace)
    return 0 if trace.response.ok else 1


def _print_trace(t) -> None:
    r = t.response
    dst = f"{t.dst.name} " if t.dst else ""
    head = f"GET http://{t.dst_ip}:{t.port}{t.path} ({dst.strip() or 'unknown host'}) from {t.src.name}"
    if r.local:
        head += f" ({r.local})"
    if r.error:
        print(f"{head}: failed after {r.seconds * 1000:.0f} ms: {r.error}")
    else:
        print(f"{head}: HTTP {r.status} in {r.seconds * 1000:.0f} ms, {len(r.body)} bytes")
        if r.client_seen:
            print(f"client={r.client_seen}")
    captured = "captured" if t.legs else "not captured"
    counts = "TCP packet counts" if t.lab.inpod else "tunnel packet counts"
    print(f"\npath ({captured}; from counters, {counts}, the ztunnel and server logs):")
    for h in t.hops():
        print(f"  {h}")
