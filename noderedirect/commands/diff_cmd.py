"""``noderedirect diff``: compare the two designs, two values files, or two Istio eras."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from .. import desired, diff, diff_format
from .. import values as values_mod
from ..cli import UsageError
from ..model import Rendered

EPILOG = """\
what is compared:
  per network namespace and per object kind: ipsets and their entries, owned iptables chains,
  hooks (jumps from built-in chains), iptables rules, ip rules, routes, links, sysctls.

  legacy vs in-pod: the node netns with the node netns, and the legacy ztunnel netns with one
  representative pod netns of in-pod mode (there is one per ambient pod: "x N pods"); then the
  table of where each legacy piece went in in-pod mode.
  one design, two inputs: netns paired by role; rules compared in order, per chain, as
  unified-diff hunks.

examples:
  noderedirect diff legacy inpod --values examples/values.yaml
  noderedirect diff legacy inpod --values examples/values.yaml --format markdown > compare.md
  noderedirect diff legacy --values node-a.yaml --values node-b.yaml
  noderedirect diff legacy --values examples/values.yaml --istio-version 1.18 --istio-version 1.20
  noderedirect diff inpod --values examples/values.yaml --inpod-version 1.23 --inpod-version 1.29
  noderedirect diff legacy inpod --values examples/values.yaml --format json | jq .unmapped

exit status: 0 compared (differences or not), 2 bad arguments or values.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "diff", help="compare legacy with in-pod, two values files, or two Istio eras",
        description="Render two designs (or one design twice) and say, per network namespace\n"
                    "and per object kind, what each side has that the other lacks.\n"
                    "Pure: reads files, changes nothing.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("modes", nargs="+", metavar="MODE", choices=("legacy", "inpod"),
                   help="'legacy inpod' to compare the designs, or one MODE to compare two inputs")
    p.add_argument("--values", "-f", metavar="FILE", action="append", required=True,
                   help="values file (YAML); give it twice to compare two files")
    p.add_argument("--istio-version", metavar="V", action="append",
                   choices=values_mod.LEGACY_VERSIONS,
                   help="legacy era (1.18, 1.19, 1.20); give it twice to compare two eras")
    p.add_argument("--inpod-version", metavar="V", action="append",
                   choices=values_mod.INPOD_VERSIONS,
                   help="in-pod era (1.21 … 1.30); give it twice to compare two eras")
    p.add_argument("--format", choices=("text", "markdown", "json"), default="text",
                   help="text: two columns for the terminal (default); markdown: tables; "
                        "json: stable keys for scripts")
    p.add_argument("--rules", metavar="DIR", type=Path,
                   help="rule-file folder (default: the bundled rules/)")
    p.set_defaults(func=run_diff)

    def one_line_error(message: str) -> None:
        # argparse would print the whole usage block; a bad argument is one line here, like a
        # bad combination of good ones
        print(f"noderedirect diff: {message} (see noderedirect diff --help)", file=sys.stderr)
        sys.exit(2)

    p.error = one_line_error  # type: ignore[method-assign]


def _one(opt: str, given: Optional[list[str]]) -> Optional[str]:
    if given and len(given) > 1:
        raise UsageError(f"{opt} given {len(given)} times; a second one only compares two eras "
                         "of one design")
    return given[0] if given else None


def _two_or_one(opt: str, given: Optional[list[str]]) -> list[Optional[str]]:
    if given and len(given) > 2:
        raise UsageError(f"{opt} given {len(given)} times; at most two can be compared")
    return list(given) if given else [None]


def _render(path: str, mode: str, rules: Optional[Path], istio: Optional[str],
            inpod: Optional[str]) -> Rendered:
    vals = values_mod.load(path, istio_version=istio, inpod_version=inpod)
    return desired.render(vals, mode, rules=rules)


def _label(path: str, other: str) -> str:
    """A values file's column name: its file name, or the whole path if the names clash."""
    name = Path(path).name
    return path if name == Path(other).name else name


def build(args: argparse.Namespace) -> diff.Diff:
    """Validate the argument combination and compute the diff (UsageError on a bad one)."""
    modes = args.modes
    vals, istio, inpod = args.values, args.istio_version, args.inpod_version
    if len(modes) > 2:
        raise UsageError("diff takes one MODE (two inputs) or two: legacy inpod")
    if len(modes) == 2:
        if modes[0] == modes[1]:
            raise UsageError(f"'diff {modes[0]} {modes[1]}' compares nothing; give one MODE and "
                             "two --values or two versions")
        if len(vals) > 1:
            raise UsageError("comparing legacy with in-pod takes one --values")
        path = vals[0]
        iv, pv = _one("--istio-version", istio), _one("--inpod-version", inpod)
        rs = [_render(path, m, args.rules, iv, pv) for m in modes]
        return diff.diff_modes(rs[0], rs[1], diff.side(rs[0], path), diff.side(rs[1], path))

    mode = modes[0]
    own, other_opt = ("--istio-version", "--inpod-version") if mode == "legacy" else \
        ("--inpod-version", "--istio-version")
    own_vals, other_vals = (istio, inpod) if mode == "legacy" else (inpod, istio)
    if other_vals:
        raise UsageError(f"{other_opt} has no effect on a {mode}-only diff (use {own})")
    versions = _two_or_one(own, own_vals)
    if len(vals) > 2:
        raise UsageError(f"--values given {len(vals)} times; at most two can be compared")
    if len(vals) == 2 and len(versions) == 2:
        raise UsageError("compare one thing at a time: two --values files or two versions, not both")
    if len(vals) == 1 and len(versions) == 1:
        raise UsageError(f"nothing to compare: give a second --values FILE or a second {own}")

    def render(path: str, version: Optional[str]) -> Rendered:
        return _render(path, mode, args.rules, version if mode == "legacy" else None,
                       version if mode == "inpod" else None)

    if len(vals) == 2:
        a, b = (render(p, versions[0]) for p in vals)
        sa = diff.side(a, vals[0], f"{_label(vals[0], vals[1])} ({diff.MODE_LABELS[mode]} {a.version})")
        sb = diff.side(b, vals[1], f"{_label(vals[1], vals[0])} ({diff.MODE_LABELS[mode]} {b.version})")
    else:
        a, b = (render(vals[0], v) for v in versions)
        sa, sb = diff.side(a, vals[0]), diff.side(b, vals[0])
    if sa.name == sb.name:   # the same file or version twice: the columns still need names
        sa = diff.side(a, sa.source, "A: " + sa.name)
        sb = diff.side(b, sb.source, "B: " + sb.name)
    return diff.diff_same(a, b, sa, sb)


def run_diff(args: argparse.Namespace) -> int:
    result = build(args)
    if args.format == "json":
        json.dump(diff_format.to_json(result), sys.stdout, indent=2)
        print()
    elif args.format == "markdown":
        sys.stdout.write(diff_format.to_markdown(result))
    else:
        sys.stdout.write(diff_format.to_text(result))
    return 0
