"""``noderedirect diagram``: draw a packet walk (SVG, PNG or Mermaid markdown) from the tracer."""

from __future__ import annotations

import argparse

from ..cli import UsageError
from ..diagram import DiagramError, write
from .trace_cmd import add_walk_args, selected, walk

DEFAULT_SCENARIO = "sleep-httpbin"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "diagram", help="draw a packet walk as SVG, PNG or Mermaid, from the trace",
        description="Trace a connection (a named scenario, or --src/--dst) and draw it: one column "
                    "per network namespace (pods, node, ztunnel pod …) with its ipset, ip rules, "
                    "tables and tunnels, and the numbered path through them. The picture is made "
                    "from the trace, never by hand. --mode both puts legacy and in-pod side by side "
                    f"(Mermaid: one section each). Default scenario: {DEFAULT_SCENARIO}.")
    add_walk_args(p)
    p.add_argument("--mode", choices=("legacy", "inpod", "both"), default="legacy",
                   help="legacy (default), inpod, or both side by side")
    p.add_argument("--out", "-o", required=True, metavar="FILE",
                   help="FILE.svg, FILE.png (rendered with librsvg) or FILE.md (Mermaid)")
    p.add_argument("--title", help="heading of the picture (default: the scenario, or the request)")
    p.add_argument("--zoom", type=float, default=1.0, help="PNG scale factor (default 1.0)")
    p.set_defaults(func=run_diagram)


def run_diagram(args: argparse.Namespace) -> int:
    if not (args.scenario or args.src or args.dst):
        args.scenario = DEFAULT_SCENARIO
    if not 0.1 <= args.zoom <= 4:
        raise UsageError(f"--zoom {args.zoom}: choose between 0.1 and 4")
    modes = ("legacy", "inpod") if args.mode == "both" else (args.mode,)
    panels = []
    for mode in modes:
        t = selected(walk(args, mode), args.packet)
        panels.append((args.title or (f"scenario {t.scenario}" if t.scenario else t.request), t))
    try:
        kind = write(args.out, panels, zoom=args.zoom)
    except DiagramError as e:
        raise UsageError(str(e)) from None
    hops = sum(len(t.hops()) for _, t in panels)
    print(f"{args.out}: {kind}, {len(panels)} walk(s), {hops} hops")
    return 0
