"""``noderedirect render`` and ``noderedirect validate``."""

from __future__ import annotations

import argparse
import json
import sys

from .. import desired, render
from ..model import KINDS
from .common import add_values_args, load_values


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
    p.add_argument("--output", "-o", choices=("text", "json"), default="text")
    p.add_argument("--vars", action="store_true",
                   help="list every name a legacy template may use, with its value, and exit")
    p.set_defaults(func=run_render)

    v = sub.add_parser("validate", help="check a values file; exit 2 naming the first bad key",
                       description="Validate a values file strictly. Prints a one-line summary "
                                   "when it is good; exits 2 with the key and value when not.")
    add_values_args(v)
    v.set_defaults(func=run_validate)


def run_render(args: argparse.Namespace) -> int:
    vals = load_values(args)
    if args.vars:
        ctx = desired.context(vals)
        for k in sorted(ctx):
            if k.isupper():
                print(f"{k} = {ctx[k]}")
        return 0
    rendered = desired.render(vals, args.mode, rules=args.rules)
    if args.output == "json":
        json.dump(render.to_json(rendered), sys.stdout, indent=2)
        print()
        return 0
    form = args.iptables_form or ("save" if args.mode == "legacy" else "restore")
    sys.stdout.write(render.show(rendered, roles=args.netns, kinds=args.kind, iptables_form=form))
    return 0


def run_validate(args: argparse.Namespace) -> int:
    vals = load_values(args)
    n = vals.node
    print(f"{vals.source}: ok: node {n.node_name}, Istio {n.istio_version}, {len(vals.pods)} pods, "
          f"HostIP {n.host_ip} ({n.host_ip_source}), ztunnel {n.ztunnel_ip} on {n.ztunnel_veth}")
    return 0
