"""``noderedirect render`` and ``noderedirect validate``."""

from __future__ import annotations

import argparse
import json
import sys

from .. import desired, nft, render
from ..cli import UsageError
from ..model import KINDS, Rendered
from .common import add_values_args, load_values

# with --backend nft, the one nft script per netns replaces these kinds
NFT_REPLACES = ("ipsets", "iptables")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "render", help="print the kernel objects a design creates, from the rule files",
        description="Render the rule files for a values file and print every kernel object per "
                    "network namespace: ipsets, iptables (iptables-save form), ip rules, routes, "
                    "links, sysctls. Pure: reads files, changes nothing.")
    add_values_args(p)
    p.add_argument("--mode", choices=("legacy", "inpod"), default="legacy",
                   help="legacy node-level design (default) or in-pod design")
    p.add_argument("--netns", metavar="ROLE", action="append",
                   help="only this netns: node, ztunnel, pod, or pod:NS/NAME (repeatable)")
    p.add_argument("--kind", metavar="KIND", action="append", choices=KINDS,
                   help=f"only these object kinds ({', '.join(KINDS)}; repeatable)")
    p.add_argument("--iptables-form", choices=("save", "restore"), default=None,
                   help="iptables text as iptables-save shows it (legacy default) or as the "
                        "restore input upstream writes (in-pod default)")
    p.add_argument("--backend", choices=("iptables", "nft"), default="iptables",
                   help="iptables + ipset (default), or one native nft script per netns "
                        "(legacy mode only; see docs/nft.md for what differs)")
    p.add_argument("--output", "-o", choices=("text", "json"), default="text")
    p.add_argument("--vars", action="store_true",
                   help="list every name a legacy template may use, with its value, and exit")
    p.add_argument("--summary", action="store_true",
                   help="instead of the objects, count them: per netns and kind, for legacy and "
                        "in-pod side by side, with the cost of one more pod")
    p.add_argument("--pods", metavar="N", type=int,
                   help="with --summary: count for N synthetic pods in the node's podCIDR "
                        "instead of the values file's pods")
    p.set_defaults(func=run_render)

    v = sub.add_parser("validate", help="check a values file; exit 2 naming the first bad key",
                       description="Validate a values file strictly. Prints a one-line summary "
                                   "when it is good; exits 2 with the key and value when not.")
    add_values_args(v)
    v.set_defaults(func=run_validate)


def run_summary(args: argparse.Namespace) -> int:
    """``render --summary``: counts per netns and kind for both designs (noderedirect.summary)."""
    from ..summary import SummaryError, summarize
    from ..summary import to_json as summary_json
    from ..summary import to_text as summary_text

    for flag, given in (("--vars", args.vars), ("--netns", args.netns), ("--kind", args.kind),
                        ("--iptables-form", args.iptables_form),
                        ("--backend nft", getattr(args, "backend", None) == "nft")):
        if given:
            raise UsageError(f"{flag} cannot be combined with --summary (it counts every netns and kind)")
    try:
        result = summarize(load_values(args), pods=args.pods, rules=args.rules)
    except SummaryError as e:
        raise UsageError(str(e)) from None
    if args.output == "json":
        json.dump(summary_json(result), sys.stdout, indent=2)
        print()
    else:
        sys.stdout.write(summary_text(result))
    return 0


def run_render(args: argparse.Namespace) -> int:
    if getattr(args, "summary", False):
        return run_summary(args)
    if getattr(args, "pods", None) is not None:
        raise UsageError("--pods only applies to --summary")
    vals = load_values(args)
    if args.vars:
        ctx = desired.context(vals)
        for k in sorted(ctx):
            if k.isupper():
                print(f"{k} = {ctx[k]}")
        return 0
    if args.backend == "nft" and args.mode != "legacy":
        raise UsageError(f"--backend nft renders the legacy design only; --mode {args.mode} "
                         "is not supported with it yet")
    rendered = desired.render(vals, args.mode, rules=args.rules)
    if args.backend == "nft":
        rendered = nft.rendered_nft(rendered)
    if args.output == "json":
        json.dump(render.to_json(rendered), sys.stdout, indent=2)
        print()
        return 0
    form = args.iptables_form or ("save" if args.mode == "legacy" else "restore")
    if args.backend == "nft":
        sys.stdout.write(show_nft(rendered, roles=args.netns, kinds=args.kind))
        return 0
    sys.stdout.write(render.show(rendered, roles=args.netns, kinds=args.kind, iptables_form=form))
    return 0


def show_nft(rendered: Rendered, roles=None, kinds=None) -> str:
    """Like :func:`render.show`, with each netns's nft script in place of its ipsets and iptables."""
    kinds = tuple(kinds or KINDS)
    scripts = dict(rendered.nft)
    rest = tuple(k for k in kinds if k not in NFT_REPLACES)
    parts = []
    for ns in rendered.netns:
        if roles and ns.role not in roles and ns.role.split(":")[0] not in roles:
            continue
        text = f"# netns {ns.role} ({rendered.mode} mode, Istio {rendered.version})\n"
        if any(k in NFT_REPLACES for k in kinds):
            text += "## nftables (nft -f input)\n" + scripts[ns.role] + "\n"
        if rest:
            text += render.show_netns(ns, rest)
        parts.append(text.rstrip("\n") + "\n")
    return "\n".join(parts)


def run_validate(args: argparse.Namespace) -> int:
    vals = load_values(args)
    n = vals.node
    print(f"{vals.source}: ok: node {n.node_name}, Istio {n.istio_version}, {len(vals.pods)} pods, "
          f"HostIP {n.host_ip} ({n.host_ip_source}), ztunnel {n.ztunnel_ip} on {n.ztunnel_veth}")
    return 0
