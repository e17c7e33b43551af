"""Arguments and helpers shared by several commands."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from .. import values as values_mod
from ..model import Values


def add_values_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("--values", "-f", metavar="FILE", required=required,
                   help="values file (YAML): node, ztunnel and pods; see examples/values.yaml")
    p.add_argument("--istio-version", metavar="V", choices=values_mod.LEGACY_VERSIONS,
                   help="legacy era to render: 1.18, 1.19 or 1.20 (default: the values file's, else 1.20)")
    p.add_argument("--inpod-version", metavar="V", choices=values_mod.INPOD_VERSIONS,
                   help="in-pod era: 1.21 … 1.30 (default: the values file's inpod.istioVersion, else 1.29)")
    p.add_argument("--rules", metavar="DIR", type=Path,
                   help="rule-file folder (default: the bundled rules/)")


def load_values(args: argparse.Namespace, path: Optional[str] = None) -> Values:
    return values_mod.load(path or args.values, istio_version=getattr(args, "istio_version", None),
                           inpod_version=getattr(args, "inpod_version", None))
