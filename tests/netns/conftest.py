"""Fixtures for tests against the real kernel, inside throwaway network namespaces.

- ``netns`` / ``netns_factory``: fresh, uniquely named namespaces (``nr-<purpose>-<hex>``) with
  ``lo`` up, removed in teardown even when the test fails; processes still inside are killed.
- ``host``: a :class:`~noderedirect.host.Host` on ``netns``, closed in teardown.
- A session guard that fails the run if the namespace the tests run in (the machine's own)
  gained any ``ztunnel-*``/``ISTIO_*`` chain, owned ipset, ``istio*`` link or rule at an owned
  priority. It compares against a snapshot taken at session start, so state that was already
  there does not fail it.

Everything here is skipped (not failed) without root or without ``ip netns``.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import time

import pytest

from helpers import netns_unavailable
from noderedirect import names
from noderedirect.host import Host, NetnsRef

GUARDED_PRIOS = set(names.LEGACY_NODE_RULE_PRIOS) | set(names.LEGACY_ZTUNNEL_RULE_PRIOS)


_why_no_netns = netns_unavailable


_SKIP = _why_no_netns()
_CREATED: set[str] = set()      # every namespace this session made, to prove none is left


def _sh(*argv: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), input=input, capture_output=True, text=True, check=check)


def _remove_netns(name: str) -> None:
    """Kill whatever still runs inside, then delete the namespace."""
    for _ in range(20):
        cp = _sh("ip", "netns", "pids", name, check=False)
        pids = [int(p) for p in cp.stdout.split() if p.isdigit()]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    _sh("ip", "netns", "del", name, check=False)


@pytest.fixture
def netns_factory(request):
    """``make(purpose='t') -> NetnsRef``: a fresh netns with lo up, removed after the test."""
    if _SKIP:
        pytest.skip(_SKIP)
    created: list[str] = []

    def make(purpose: str = "t") -> NetnsRef:
        name = f"nr-{purpose}-{secrets.token_hex(4)}"
        _sh("ip", "netns", "add", name)
        created.append(name)
        _CREATED.add(name)
        _sh("ip", "-n", name, "link", "set", "lo", "up")
        return NetnsRef.resolve(name)

    try:
        yield make
    finally:
        for name in reversed(created):
            _remove_netns(name)


@pytest.fixture
def netns(netns_factory) -> NetnsRef:
    return netns_factory("t")


@pytest.fixture
def host(netns):
    h = Host(netns)
    try:
        yield h
    finally:
        h.close()


# ---------------------------------------------------------------- the session guard


def _root_snapshot() -> set[str]:
    """Owned-looking objects in the namespace the tests run in; read-only commands only."""
    found: set[str] = set()
    for tool in ("iptables-nft-save", "iptables-legacy-save", "ip6tables-nft-save",
                 "ip6tables-legacy-save"):
        if shutil.which(tool) is None:
            continue
        table = "?"
        # no -t: saving a named legacy table would create it
        for line in _sh(tool, check=False).stdout.splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith(":") and names.is_owned_chain(line[1:].split()[0]):
                found.add(f"{tool} {table} chain {line[1:].split()[0]}")
    if shutil.which("ipset"):
        for name in _sh("ipset", "list", "-n", check=False).stdout.split():
            if names.is_owned_ipset(name):
                found.add(f"ipset {name}")
    for line in _sh("ip", "-o", "link", "show").stdout.splitlines():
        m = re.match(r"\d+: ([^:@]+)", line)
        if m and (m.group(1).startswith("istio") or m.group(1).startswith("pistio")):
            found.add(f"link {m.group(1)}")
    for fam in ("-4", "-6"):
        for line in _sh("ip", fam, "rule", "show").stdout.splitlines():
            prio = line.split(":", 1)[0]
            if prio.isdigit() and int(prio) in GUARDED_PRIOS:
                found.add(f"ip {fam} rule {line.strip()}")
    return found


@pytest.fixture(scope="session", autouse=True)
def root_netns_untouched():
    if _SKIP:
        yield
        return
    before = _root_snapshot()
    yield
    gained = sorted(_root_snapshot() - before)
    left = set(_sh("ip", "netns", "list").stdout.split()) & _CREATED
    gained += [f"netns {n} was not removed" for n in sorted(left)]
    assert not gained, "the tests changed the machine's own network namespace:\n  " + "\n  ".join(gained)
