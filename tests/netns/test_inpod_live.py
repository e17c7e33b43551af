"""In-pod rule files loaded into a real kernel (inpod-mode.md §2.4), both iptables backends.

Each test restores our rendered restore text into a fresh network namespace with
``iptables-restore --noflush`` (the node's ipset first) and compares what ``iptables-save``
shows with the reference: the §2.4 nat listing verbatim, and for every table and era our rules
rewritten by the §2.4 normalisation rules (which this also checks against the kernel).
Needs root; touches nothing outside the namespaces it creates.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess

import pytest

from goldens import GOLDEN, assert_equal_text
from helpers import values_with

from noderedirect import desired, names, render
from noderedirect.model import IptRule

REF = GOLDEN / "reference" / "inpod"
BACKENDS = ("nft", "legacy")
POD = {"namespace": "default", "name": "sleep", "uid": "6b1f2c3e-0a4d-4c55-9e1a-1b2c3d4e5f05",
       "ip": "10.244.1.5", "ip6": "fd00:10:244:1::5"}

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                reason="needs root and iproute2")


def tool(kind: str, family: int, backend: str) -> str:
    """``iptables-nft-restore``, ``ip6tables-legacy-save`` …; skips when not installed."""
    name = f"{'iptables' if family == 4 else 'ip6tables'}-{backend}-{kind}"
    if shutil.which(name) is None:
        pytest.skip(f"{name} is not installed")
    return name


@pytest.fixture
def netns():
    name = f"nr-inpod-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        run(name, "ip", "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def run(ns: str, *argv: str, stdin: str | None = None) -> str:
    p = subprocess.run(["ip", "netns", "exec", ns, *argv], input=stdin, text=True, capture_output=True)
    if p.returncode:
        raise AssertionError(f"{' '.join(argv)} in {ns} exited {p.returncode}: {p.stderr.strip()}\n"
                             f"input:\n{stdin or ''}")
    return p.stdout


def load(ns: str, backend: str, family: int, rules) -> None:
    run(ns, tool("restore", family, backend), "--noflush", stdin=render.restore_text(rules))


def saved(ns: str, backend: str, family: int, table: str) -> tuple[str, list[str]]:
    """(the ``-A`` lines, the declared user chains) of one table as iptables-save prints it."""
    out = run(ns, tool("save", family, backend), "-t", table).splitlines()
    rules = "".join(line + "\n" for line in out if line.startswith("-A "))
    chains = [line[1:].split()[0] for line in out if line.startswith(":") and " - " in line]
    return rules, chains


# ---------------------------------------------------------------- §2.4 normalisation


_ADDR = re.compile(r"(?<!\S)(-[sd]) ([0-9A-Fa-f.:]+)(?=\s|$)")


def normalize(rule: IptRule) -> IptRule:
    """Upstream's spelling -> iptables-save's, rule by rule, as §2.4 lists the differences."""
    a = rule.args
    a = _ADDR.sub(lambda m: f"{m[1]} {m[2]}/{32 if '.' in m[2] else 128}", a)   # bare address
    a = re.sub(r"--to-port (?=\d)", "--to-ports ", a)
    a = re.sub(r"-p tcp (! )?--dport", lambda m: f"-p tcp -m tcp {m[1] or ''}--dport", a)
    a = a.replace("-m owner --socket-exists -p tcp", "-p tcp -m owner --socket-exists")
    on_ip = "0.0.0.0" if rule.family == 4 else "::"          # v6 value observed, not in §2.4
    a = re.sub(r"(--on-port \d+) (--tproxy-mark)", rf"\1 --on-ip {on_ip} \2", a)
    a = a.replace("-p tcp -i lo", "-i lo -p tcp")
    return IptRule(table=rule.table, chain=rule.chain, args=a, op=rule.op, family=rule.family)


def expected_saved(rules, table: str) -> tuple[str, list[str]]:
    text = render.save_text([normalize(r) for r in rules if r.table == table], tables=[table])
    lines = text.splitlines()
    return ("".join(l + "\n" for l in lines if l.startswith("-A ")),
            [l[1:].split()[0] for l in lines if l.startswith(":")])


def rendered(version="1.29", *, dns=True, ipv6=False, **knobs):
    vals = values_with(**{"dnsCapture": dns, "pods": [dict(POD, **knobs)],
                          "inpod.istioVersion": version, "inpod.ipv6": ipv6})
    return desired.render(vals, "inpod")


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_nat_table_as_reference(netns, backend):
    """§2.4's live v4 nat listing for the default config (DNS on), verbatim."""
    load(netns, backend, 4, rendered().get("pod:default/sleep").rules_for(4))
    rules, chains = saved(netns, backend, 4, "nat")
    assert_equal_text((REF / "live-nat-default.v4").read_text(), rules, "inpod-mode.md §2.4")
    assert chains == ["ISTIO_OUTPUT", "ISTIO_PRERT"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_node_ipset_and_probe_snat(netns, backend):
    """§3.1: sets first (rules reference them), then the host SNAT rule; §2.4's owner/-p reorder."""
    node = rendered(ipv6=True).get("node")
    run(netns, "ipset", "restore",
        stdin="".join(x.show() + "\n" for x in node.ipsets + node.ipset_entries))
    saved_sets = run(netns, "ipset", "save")
    for entry in node.ipset_entries:
        assert f"{entry.show()}\n" in saved_sets
    load(netns, backend, 4, node.rules_for(4))
    rules, chains = saved(netns, backend, 4, "nat")
    assert rules == ("-A POSTROUTING -j ISTIO_POSTRT\n"
                     "-A ISTIO_POSTRT -p tcp -m owner --socket-exists -m set --match-set "
                     "istio-inpod-probes-v4 dst -j SNAT --to-source 169.254.7.127\n")
    assert chains == ["ISTIO_POSTRT"]
    load(netns, backend, 6, node.rules_for(6))
    rules6, _ = saved(netns, backend, 6, "nat")
    assert rules6 == ("-A POSTROUTING -j ISTIO_POSTRT\n"
                      "-A ISTIO_POSTRT -p tcp -m owner --socket-exists -m set --match-set "
                      f"istio-inpod-probes-v6 dst -j SNAT --to-source {names.INPOD_PROBE_SNAT_V6}\n")


CASES = {
    "default": ("1.29", True, {}),
    "dns-off": ("1.29", False, {}),
    "ingress-vi": ("1.29", False, {"ingress": True, "virtualInterfaces": ["fake1s0f0", "fake1s0f1"]}),
    "ingress-1.28": ("1.28", True, {"ingress": True}),
    "tproxy-1.23": ("1.23", True, {}),
}


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_table_loads_and_saves_as_normalized(netns, backend, case, family):
    version, dns, knobs = CASES[case]
    ns = rendered(version, dns=dns, ipv6=True, **knobs).get("pod:default/sleep")
    rules = ns.rules_for(family)
    load(netns, backend, family, rules)
    for table in ("mangle", "nat", "raw"):
        want_rules, want_chains = expected_saved(rules, table)
        got_rules, got_chains = saved(netns, backend, family, table)
        assert_equal_text(want_rules, got_rules, f"{case} v{family} {table} (normalized)")
        assert got_chains == want_chains


def test_pod_route_and_rule_as_the_kernel_shows_them(netns):
    """§2.4: ``32764: from all fwmark 0x111/0xfff lookup 100`` and ``local default dev lo scope host``."""
    ns = rendered(ipv6=True).get("pod:default/sleep")
    for route in ns.routes:
        run(netns, "ip", f"-{route.family}", "route", "add", *route.show_with_table().split())
    for rule in ns.ip_rules:
        run(netns, "ip", f"-{rule.family}", "rule", "add", "priority", str(rule.priority),
            "fwmark", f"{rule.fwmark:#x}/{rule.fwmask:#x}", "lookup", str(rule.table))
    v4_route = next(r for r in ns.routes if r.family == 4)
    assert [l.strip() for l in run(netns, "ip", "route", "show", "table", "100").splitlines()] \
        == [v4_route.show()] == ["local default dev lo scope host"]
    assert run(netns, "ip", "-6", "route", "show", "table", "100").startswith("local default dev lo ")
    for fam in (4, 6):
        lines = run(netns, "ip", f"-{fam}", "rule", "show").splitlines()
        want = next(r for r in ns.ip_rules if r.family == fam).show()
        assert want == "32764:\tfrom all fwmark 0x111/0xfff lookup 100"
        assert want in lines
