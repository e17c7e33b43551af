"""``noderedirect bench enroll``: the engine's speed targets, measured in throwaway netns."""

from __future__ import annotations

import argparse
import json
import signal
import sys

from .. import bench


def _pod_counts(text: str) -> tuple[int, ...]:
    try:
        return bench.parse_pod_counts(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return int(text)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (0 skips the measurement)")
    return int(text)


def register(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench", help="measure the engine against its speed targets (needs root)")
    bsub = b.add_subparsers(dest="bench_command", metavar="enroll", required=True)
    e = bsub.add_parser(
        "enroll", help="full apply, resync and per-pod latency, vs one process per command",
        description="Create a throwaway node + ztunnel netns pair (VXLAN tunnels, iptables-nft), "
                    "and measure: full apply from empty for each pod count (render + observe + "
                    "plan + write + verify), re-apply with no changes, pod add/remove latency "
                    "p50/p99 on top of 1000 pods, the same 1000-pod state programmed the way "
                    "the original did (one process per ipset add, route, rule and iptables rule), "
                    "and the peak RSS. Prints the table with the targets. The netns it creates "
                    "are removed at the end, also when interrupted; the machine's own netns is "
                    "never touched.")
    e.add_argument("--pods", type=_pod_counts, default=bench.DEFAULT_PODS, metavar="N,N,…",
                   help="pod counts for the full apply (default: 100,1000,5000)")
    e.add_argument("--repeat", type=_positive, default=bench.DEFAULT_REPEAT, metavar="N",
                   help=f"repeats per measurement; medians are reported (default {bench.DEFAULT_REPEAT})")
    e.add_argument("--incremental", type=_count, default=bench.DEFAULT_INCREMENTAL, metavar="K",
                   help=f"pods added then removed one by one on the 1000-pod state "
                        f"(default {bench.DEFAULT_INCREMENTAL}; 0 skips it)")
    e.add_argument("--output", "-o", choices=("text", "json"), default="text")
    e.add_argument("--no-baseline", action="store_true",
                   help="skip the original's way (one process per command), which takes seconds")
    e.set_defaults(func=run_enroll)


def _progress(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def _interrupt(signum, frame) -> None:
    # SIGTERM unwinds like Ctrl-C, so every netns made so far is removed on the way out
    raise KeyboardInterrupt


def run_enroll(args: argparse.Namespace) -> int:
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        report = bench.run(args.pods, repeat=args.repeat, incremental=args.incremental,
                           baseline=not args.no_baseline,
                           progress=_progress if sys.stderr.isatty() else (lambda _msg: None))
    finally:
        signal.signal(signal.SIGTERM, previous)
    if args.output == "json":
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        sys.stdout.write(bench.format_text(report))
    return 0
