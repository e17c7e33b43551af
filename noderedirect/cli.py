"""The ``noderedirect`` command line.

Each command lives in a module with ``register(subparsers)``; this file only wires them up and
turns typed errors into one-line messages and exit codes:

  0  success (``plan``: no changes)
  1  a command failed at run time (kernel, I/O); ``plan``: changes pending is 3
  2  bad input: a values file, an argument, a template — nothing was rendered or changed
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Optional, Sequence

from . import __version__
from .render import RenderError
from .values import ValuesError

# command modules, in the order `--help` lists them
COMMANDS = ("noderedirect.commands.render_cmd",
            "noderedirect.commands.diff_cmd",
            "noderedirect.commands.engine_cmd",
            "noderedirect.commands.bench_cmd",
            "noderedirect.commands.trace_cmd",
            "noderedirect.commands.diagram_cmd",
            "noderedirect.commands.run_cmd",
            "noderedirect.commands.lab_cmd",
            "noderedirect.commands.compare_cmd")

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A bad argument combination detected after parsing (exit 2)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="noderedirect",
        description="Istio ambient mesh's original node-level traffic redirection (ipsets, marks, "
                    "policy routing, istioin/istioout tunnels), rendered from rule files and applied "
                    "to network namespaces; and the in-pod design beside it for comparison.",
    )
    parser.add_argument("--version", action="version", version=f"noderedirect {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (repeat for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for mod in COMMANDS:
        importlib.import_module(mod).register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2),
                        format="%(levelname)s %(name)s %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except ValuesError as e:
        print(f"noderedirect: bad value: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (RenderError, UsageError) as e:
        print(f"noderedirect: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(f"noderedirect: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_USAGE if args.command in ("render", "diff", "validate") else EXIT_FAIL
    except Exception as e:  # noqa: BLE001 - only host-layer errors are turned into one line
        host = sys.modules.get("noderedirect.host")
        if host is not None and isinstance(e, host.HostError):
            print(f"noderedirect: {e}", file=sys.stderr)
            return EXIT_FAIL
        raise
    except KeyboardInterrupt:
        print("noderedirect: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
