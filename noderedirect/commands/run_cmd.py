"""``run``: the node controller (a DaemonSet in a cluster, or driven by a ``--source`` file)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time

from .. import values as values_mod

NETNS_HELP = "a name under /var/run/netns, or a path such as /proc/PID/ns/net"
# what the engine can program (apply.BACKENDS less the "iptables-nft" alias of "iptables")
RUN_BACKENDS = ("iptables", "iptables-legacy", "nft")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="the node controller: watch pods and keep the node's redirection in step",
        description="Watch the pods of one node, all namespaces and the node itself (Kubernetes "
                    "API, or a --source file), decide which pods are in the ambient mesh, and keep "
                    "the node and ztunnel netns programmed with coalesced, verified applies and a "
                    "periodic resync. Stopping the controller never removes anything; use "
                    "`noderedirect cleanup` to uninstall.")
    src = p.add_argument_group("where pods come from")
    src.add_argument("--node", default=os.environ.get("NODE_NAME"),
                     help="this node's name (default: $NODE_NAME; with --source: the file's node)")
    src.add_argument("--kubeconfig", metavar="FILE",
                     help="kubeconfig to use (default: the in-cluster service account)")
    src.add_argument("--context", help="kubeconfig context")
    src.add_argument("--source", metavar="FILE",
                     help="a YAML cluster-state file (node, namespaces, pods, ztunnel netns) polled "
                          "for changes instead of the API; see docs/controller.md")
    src.add_argument("--poll-interval", type=float, default=0.2, metavar="S",
                     help="--source: seconds between reads (default 0.2)")
    src.add_argument("--watch-timeout", type=int, default=300, metavar="S",
                     help="server-side timeout of each watch request (default 300)")

    k = p.add_argument_group("the kernel side")
    k.add_argument("--node-netns", metavar="NS", help=f"the node's netns (default: this process's): {NETNS_HELP}")
    k.add_argument("--ztunnel-netns", metavar="NS",
                   help="the ztunnel pod's netns (default: found from the pod's processes under --proc-root)")
    k.add_argument("--ztunnel-veth", metavar="IF",
                   help="the ztunnel's host-side interface (default: the main-table /32 route's device)")
    k.add_argument("--proc-root", default="/proc", metavar="DIR",
                   help="where the host's /proc is mounted (default /proc; the DaemonSet uses /host/proc)")
    k.add_argument("--backend", choices=RUN_BACKENDS, default="iptables",
                   help="iptables (nft-based, default) or iptables-legacy: match what kube-proxy "
                        "uses; or nft: the design as one native nftables table per netns, no ipset "
                        "and no iptables (docs/nft.md)")
    k.add_argument("--tunnel", choices=("auto", "geneve", "usergeneve", "vxlan"), default="auto",
                   help="tunnel driver (auto = kernel geneve when available, else usergeneve)")

    d = p.add_argument_group("the design")
    d.add_argument("--istio-version", choices=values_mod.LEGACY_VERSIONS, default="1.20",
                   help="legacy era to reproduce (default 1.20)")
    d.add_argument("--no-ipset-comments", dest="ipset_comments", action="store_false",
                   help="ipset members without UID comments, as real 1.18-1.20 nodes had them")
    d.add_argument("--dns-capture", action="store_true", help="capture DNS (ISTIO_META_DNS_CAPTURE)")
    d.add_argument("--geneve-port", type=int, metavar="PORT",
                   help="fixed GENEVE port (default: 6081, moved up when taken, 1.19+)")
    d.add_argument("--exclude-namespace", action="append", metavar="NS",
                   help="never enroll pods of this namespace (repeatable; default: kube-system)")

    o = p.add_argument_group("operation")
    o.add_argument("--resync", type=float, default=60.0, metavar="S",
                   help="seconds between full resyncs that repair drift (default 60)")
    o.add_argument("--metrics-address", default="0.0.0.0", metavar="ADDR")
    o.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="port for /metrics, /healthz, /readyz (default 15111; 0 = any free port, "
                        "-1 = off)")
    o.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="text (key=value) or json lines")
    o.add_argument("--once", action="store_true",
                   help="sync once and exit: 0 when the node converged, 1 otherwise")
    o.add_argument("--once-timeout", type=float, default=60.0, metavar="S", help=argparse.SUPPRESS)
    p.set_defaults(func=run)


# ---------------------------------------------------------------- logging


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
               + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, sort_keys=False)


def setup_logging(fmt: str, verbose: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose >= 1 else logging.INFO)
    for noisy in ("urllib3", "kubernetes", "pyroute2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# ---------------------------------------------------------------- run


def _settings(args: argparse.Namespace, node: str):
    from ..cluster import Settings

    if args.geneve_port is not None:
        values_mod.port("--geneve-port", args.geneve_port)
    exclude = tuple(args.exclude_namespace) if args.exclude_namespace else ("kube-system",)
    return Settings(node_name=values_mod.dns_name("--node", node), istio_version=args.istio_version,
                    ipset_comments=args.ipset_comments, dns_capture=args.dns_capture,
                    geneve_port=args.geneve_port, exclude_namespaces=exclude)


def _node_from_file(path: str) -> str:
    from ..cli import UsageError
    from ..source_file import SourceError, parse

    with open(path, encoding="utf-8") as f:
        try:
            events = parse(f.read())
        except SourceError as e:
            raise UsageError(f"{path}: {e}") from None
    return events[1].objects[0].name


def run(args: argparse.Namespace) -> int:
    from ..cli import UsageError
    from ..host import NetnsRef
    from ..metrics import DEFAULT_PORT, Metrics, MetricsServer
    from ..reconcile import Locator, Reconciler, engine_factory

    setup_logging(args.log_format, args.verbose)
    if args.source and args.kubeconfig:
        raise UsageError("--source and --kubeconfig exclude each other")
    node = args.node
    if args.source:
        file_node = _node_from_file(args.source)
        if node and node != file_node:
            raise UsageError(f"--node {node} but {args.source} describes node {file_node}")
        node = file_node
    if not node:
        raise UsageError("--node (or $NODE_NAME) is required")
    settings = _settings(args, node)
    node_ns = NetnsRef.resolve(args.node_netns) if args.node_netns else NetnsRef.current()
    metrics = Metrics()
    locator = Locator(node_ns, proc_root=args.proc_root, ztunnel_netns=args.ztunnel_netns,
                      ztunnel_veth=args.ztunnel_veth)
    rec = Reconciler(settings, locator, metrics, make_engine=engine_factory(args.backend, args.tunnel),
                     resync=args.resync)
    if args.source:
        from ..source_file import FileSource
        source = FileSource(args.source, rec.handle, metrics, interval=args.poll_interval)
    else:
        from .. import kube
        source = kube.KubeSource(kube.api_client(args.kubeconfig, args.context), node, rec.handle,
                                 metrics, watch_timeout=args.watch_timeout)
    rec.annotate = source.annotate

    port = DEFAULT_PORT if args.metrics_port is None else args.metrics_port
    server = MetricsServer(metrics.registry, rec.health, rec.ready, args.metrics_address, port).start() \
        if port >= 0 else None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    logging.getLogger(__name__).info(
        "starting node=%s source=%s node_netns=%s backend=%s tunnel=%s istio=%s resync=%.0fs",
        node, args.source or ("kubeconfig" if args.kubeconfig else "in-cluster"), node_ns.spec,
        args.backend, args.tunnel, args.istio_version, args.resync)
    rec.start()
    source.start()
    code = 0
    try:
        if args.once:
            code = _wait_once(rec, args.once_timeout)
        else:
            while not stop.wait(1.0):
                pass
    finally:
        source.stop()
        rec.stop()
        if server is not None:
            server.stop()
    return code


def _wait_once(rec, timeout: float) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if rec.passes and rec.wait_idle(max(0.1, end - time.monotonic())):
            ok, why = rec.ready()
            if ok or rec.state.in_sync:
                print(why)
                return 0 if ok else 1
        time.sleep(0.05)
    print(f"not converged after {timeout:.0f}s: {rec.ready()[1]}")
    return 1
