"""Fixtures for the lab's end-to-end tests: whole labs, each with its own name prefix.

- Every lab gets a prefix unique to this test session (``nrt<hex>-``), so it never collides
  with a lab someone is using on this machine, or with another test run.
- The state directory (values files, logs, pidfiles, the lab record) is a temporary one for
  the whole session (``NODEREDIRECT_STATE_DIR``); the CLI processes the tests start inherit it.
- ``make_lab`` builds a lab through :func:`noderedirect.lab.topology.up` and always removes
  it (``down``) in teardown, then asserts that none of its namespaces is left.
- A session guard fails the run if the machine's own network namespace gained an owned chain,
  ipset, ``istio*`` link, rule at an owned priority or nft table, or if a namespace of one of
  our prefixes is left behind.

Everything here is skipped (not failed) without root or ``ip netns``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import Callable, Iterator

import pytest

from labtools import GUARDED_PRIOS, PREFIXES, SKIP, lab_netns, new_prefix, nft_refused
from noderedirect import names

@pytest.fixture(scope="session")
def lab_env(tmp_path_factory) -> Iterator[str]:
    """The session's state directory, exported for the library and any CLI we start."""
    if SKIP:
        pytest.skip(SKIP)
    path = str(tmp_path_factory.mktemp("labstate"))
    old = os.environ.get("NODEREDIRECT_STATE_DIR")
    os.environ["NODEREDIRECT_STATE_DIR"] = path
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop("NODEREDIRECT_STATE_DIR", None)
        else:
            os.environ["NODEREDIRECT_STATE_DIR"] = old


@pytest.fixture(scope="session")
def make_lab(lab_env) -> Iterator[Callable]:
    """``make(**params) -> Record``: a lab that is up; every lab made is removed at the end of
    the session at the latest (``drop(record)`` removes one earlier)."""
    from noderedirect.lab import topology

    made: list[str] = []

    def make(**params):
        prefix = new_prefix()
        lab = topology.Lab(prefix=prefix, **params)
        made.append(prefix)
        try:
            res = topology.up(lab)
        except Exception as e:
            if params.get("backend") == "nft" and nft_refused(e):
                pytest.skip(f"the engine refuses --backend nft: {e}")
            raise
        return res.record

    yield make
    errors = []
    for prefix in made:
        try:
            topology.down(prefix)
        except Exception as e:      # report every lab that would not go, not just the first
            errors.append(f"{prefix}: {e}")
        left = lab_netns(prefix)
        if left:
            errors.append(f"{prefix}: namespaces left after down: {left}")
    assert not errors, "\n".join(errors)


# ---------------------------------------------------------------- the session guard


def _sh(*argv: str) -> str:
    return subprocess.run(list(argv), capture_output=True, text=True).stdout


def _root_snapshot() -> set[str]:
    """Owned-looking objects in the namespace the tests run in (read-only commands only)."""
    found: set[str] = set()
    for tool in ("iptables-nft-save", "iptables-legacy-save"):
        if shutil.which(tool):
            for line in _sh(tool).splitlines():        # no -t: that would create a legacy table
                if line.startswith(":") and names.is_owned_chain(line[1:].split()[0]):
                    found.add(f"{tool} chain {line[1:].split()[0]}")
    if shutil.which("ipset"):
        found |= {f"ipset {n}" for n in _sh("ipset", "list", "-n").split() if names.is_owned_ipset(n)}
    if shutil.which("nft"):
        found |= {f"nft {l.strip()}" for l in _sh("nft", "list", "tables").splitlines()
                  if "ztunnel-" in l or "noderedirect" in l}
    for line in _sh("ip", "-o", "link", "show").splitlines():
        m = re.match(r"\d+: ([^:@]+)", line)
        if m and (m.group(1).startswith(("istio", "pistio", "veth-zt", "u-node", "u-external"))):
            found.add(f"link {m.group(1)}")
    for line in _sh("ip", "rule", "show").splitlines():
        prio = line.split(":", 1)[0]
        if prio.isdigit() and int(prio) in GUARDED_PRIOS:
            found.add(f"ip rule {line.strip()}")
    return found


@pytest.fixture(scope="session", autouse=True)
def root_netns_untouched():
    if SKIP:
        yield
        return
    before = _root_snapshot()
    yield
    gained = sorted(_root_snapshot() - before)
    gained += [f"netns {n} was not removed" for p in sorted(PREFIXES) for n in lab_netns(p)]
    assert not gained, "the lab tests changed the machine's own network namespace:\n  " + "\n  ".join(gained)
