"""Golden-file comparison shared by the tests.

Two kinds of golden files live under tests/golden/:
- ``reference/``: transcribed by hand from the reference documents (upstream goldens, rule
  tables). They are the spec and are NEVER regenerated from our output.
- ``render/``: snapshots of our own output, reviewed when they change. Regenerate them only
  explicitly: ``NODEREDIRECT_UPDATE_GOLDENS=1 scripts/test.sh tests/...``.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

GOLDEN = Path(__file__).resolve().parent / "golden"


def assert_golden(path, text: str) -> None:
    """Compare ``text`` with the snapshot at ``path`` (relative to tests/golden/ or absolute)."""
    p = Path(path)
    if not p.is_absolute():
        p = GOLDEN / p
    if "reference" in p.relative_to(GOLDEN).parts if p.is_relative_to(GOLDEN) else False:
        raise AssertionError(f"{p} is a hand-transcribed reference file; compare with assert_equal_text")
    if os.environ.get("NODEREDIRECT_UPDATE_GOLDENS") == "1":
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
        return
    if not p.exists():
        raise AssertionError(f"missing golden {p}; create it with NODEREDIRECT_UPDATE_GOLDENS=1 and review it")
    assert_equal_text(p.read_text(encoding="utf-8"), text, str(p))


def assert_equal_text(expected: str, actual: str, name: str = "expected") -> None:
    if expected != actual:
        diff = "".join(difflib.unified_diff(
            expected.splitlines(keepends=True), actual.splitlines(keepends=True),
            fromfile=name, tofile="actual"))
        raise AssertionError(f"output differs from {name}:\n{diff}")
