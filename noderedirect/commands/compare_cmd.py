"""``compare``: both designs in the lab, on the same pods, measured (:mod:`noderedirect.compare`).

This module parses arguments and prints; the measuring is in :mod:`noderedirect.compare`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from typing import Callable, Iterator


def register(sub: argparse._SubParsersAction) -> None:
    from .. import compare

    p = sub.add_parser(
        "compare", help="measure legacy vs in-pod in the lab: objects, rule paths, enrollment, latency, CNIs",
        description="Build the lab once per design (legacy, then in-pod; a fresh name prefix, always "
                    "torn down) and measure on the same pods: kernel objects per netns and per pod, "
                    "the rules a packet matches on the node, enrollment time per pod for each N, the "
                    "first-packet and steady-state paths, connect latency and throughput through the "
                    "stand-in ztunnel, and which scenarios still hold with another CNI's rules (a "
                    "masquerade rule, a mark in Cilium's 0x0F00 range) in the node netns. Needs root.")
    p.add_argument("--pods", default=",".join(map(str, compare.DEFAULT_PODS)), metavar="N[,N…]",
                   help="pod counts to enroll for the enrollment timings (default %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help=f"small and fast, for CI: --pods {','.join(map(str, compare.QUICK_PODS))}, "
                        f"{compare.QUICK_CONNECTS} connects, one transfer (unless given explicitly)")
    p.add_argument("--connects", type=int, metavar="N",
                   help=f"samples per latency figure (default {compare.DEFAULT_CONNECTS})")
    p.add_argument("--backend", choices=tuple(compare.VARIANT), default="iptables",
                   help="iptables backend for both designs (default iptables, the nft-based one)")
    p.add_argument("--prefix", help="lab name prefix base (default: nrcmp<random hex>); the labs "
                                    "are <base>l- and <base>i-")
    p.add_argument("--format", choices=("text", "markdown", "json"), default="text")
    p.add_argument("--chart", metavar="FILE.png|FILE.svg",
                   help="also draw the chart (PNG through librsvg/cairo, or SVG)")
    p.add_argument("--json", dest="json_file", metavar="FILE", help="also write the JSON report to FILE")
    p.add_argument("--from-json", metavar="FILE",
                   help="measure nothing: print (and --chart) a report saved with --json")
    p.set_defaults(func=run)


class _Steps:
    """One line per finished step on stderr."""

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[Callable[[str], None]]:
        details: list[str] = []
        t0 = time.monotonic()
        try:
            yield details.append
        except BaseException:
            print(f"compare: {title}: failed after {time.monotonic() - t0:.1f} s", file=sys.stderr)
            raise
        tail = f": {details[-1]}" if details else ""
        print(f"compare: {title}{tail} ({time.monotonic() - t0:.1f} s)", file=sys.stderr, flush=True)


def _pods(text: str) -> tuple[int, ...]:
    try:
        out = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise ValueError(f"--pods {text!r}: a comma-separated list of numbers, e.g. 10,100,1000") from None
    if not out:
        raise ValueError("--pods: at least one N")
    return out


def run(args: argparse.Namespace) -> int:
    from .. import compare
    from ..host import HostError
    from ..lab.topology import LabError

    try:
        extra = {"backend": args.backend, "prefix": args.prefix}
        if args.connects is not None:
            extra["connects"] = args.connects
        if args.quick:
            if args.pods != ",".join(map(str, compare.DEFAULT_PODS)):
                extra["pods"] = _pods(args.pods)
            opts = compare.Options.quick_options(**extra)
        else:
            opts = compare.Options(pods=_pods(args.pods), **extra)
        if args.prefix:
            compare.check_prefix(args.prefix)
    except (ValueError, compare.CompareError, LabError) as e:
        print(f"noderedirect: {e}", file=sys.stderr)
        return 2
    if args.from_json:
        try:
            with open(args.from_json, encoding="utf-8") as fh:
                report = compare.from_json(json.load(fh))
        except (ValueError, compare.CompareError) as e:     # not JSON, or not a report
            print(f"noderedirect: {args.from_json}: {e}", file=sys.stderr)
            return 2
    else:
        try:
            report = compare.run(opts, _Steps())
        except (compare.CompareError, LabError, HostError) as e:
            print(f"noderedirect: compare failed (the labs it built were removed): {e}", file=sys.stderr)
            return 1
    if args.chart:
        compare.write_chart(report, args.chart)
    if args.json_file:
        with open(args.json_file, "w", encoding="utf-8") as fh:
            json.dump(compare.to_json(report), fh, indent=1, ensure_ascii=False)
            fh.write("\n")
    if args.format == "json":
        json.dump(compare.to_json(report), sys.stdout, indent=1, ensure_ascii=False)
        print()
    elif args.format == "markdown":
        sys.stdout.write(compare.to_markdown(report, args.chart))
    else:
        sys.stdout.write(compare.to_text(report))
    return 0
