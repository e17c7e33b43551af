"""Small helpers shared by the tests (no kernel access)."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "values.yaml"


def example_data() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def values_with(**changes):
    """The example values with dotted-path changes applied: values_with(**{"node.hostIP": "x"})."""
    from noderedirect import values

    data = copy.deepcopy(example_data())
    for dotted, val in changes.items():
        apply_change(data, dotted, val)
    return values.parse(data)


def apply_change(data: dict, dotted: str, val) -> None:
    cur = data
    parts = dotted.replace("]", "").replace("[", ".").split(".")
    for p in parts[:-1]:
        cur = cur[int(p)] if isinstance(cur, list) else cur.setdefault(p, {})
    last = parts[-1]
    if isinstance(cur, list):
        cur[int(last)] = val
    elif val is _DELETE:
        cur.pop(last, None)
    else:
        cur[last] = val


_DELETE = object()
DELETE = _DELETE


def strip_comments(text: str) -> str:
    return "".join(l + "\n" for l in text.splitlines() if l.strip() and not l.startswith("#"))


def netns_unavailable() -> str:
    """Why kernel tests cannot run here ('' when they can): they need root, iproute2 and nsenter."""
    import os
    import shutil
    import subprocess

    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None or shutil.which("nsenter") is None:
        return "needs iproute2 (ip netns) and nsenter"
    cp = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if cp.returncode != 0:
        return f"`ip netns` is unavailable: {cp.stderr.strip()}"
    return ""
