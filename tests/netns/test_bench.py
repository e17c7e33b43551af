"""``noderedirect bench enroll`` end to end: the report's shape, and that every netns it made is
gone afterwards, also when it is stopped half-way. No timing is asserted (speed targets are
measured by the benchmark itself, never by tests)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from helpers import ROOT

pytestmark = pytest.mark.netns

BENCH_NETNS = re.compile(r"^nr-bench-(node|zt)-[0-9a-f]{8}$")


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def bench(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "noderedirect", "bench", "enroll", *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def rooted(netns_factory):
    """Only for its skip (root, ip netns); the benchmark makes its own namespaces."""
    return True


def test_bench_enroll_json_report_and_nothing_left(rooted):
    before = netns_names()
    proc = bench("--pods", "50", "--incremental", "20", "--repeat", "1", "--output", "json")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    report = json.loads(out)

    assert report["pods"] == [50] and report["base_pods"] == 50 and report["repeat"] == 1
    assert report["tunnel"].startswith("vxlan") and report["design"] == "legacy"
    assert "render desired state + observe + plan + write + verify" in report["apply_includes"]
    [apply] = report["apply"]
    assert apply["pods"] == 50
    stats = [apply["full"], apply["reapply"]]
    phases = {"plan", "render", "write", "verify", "other"}
    assert set(apply["full_phases"]) == set(apply["reapply_phases"]) == phases
    stats += [apply["full_phases"][p] for p in ("plan", "render", "write", "verify")]
    stats += [apply["reapply_phases"][p] for p in ("plan", "render")]
    for s in stats:
        assert len(s["samples_ms"]) == 1 and s["median_ms"] == s["min_ms"] == s["max_ms"] > 0, s
    # rendering happens inside the first phase (side by side with reading the kernel)
    assert apply["full_phases"]["render"]["median_ms"] <= apply["full_phases"]["plan"]["median_ms"]
    # the phases add up to the whole apply (other = the rest, never negative; render is inside plan)
    assert sum(apply["full_phases"][p]["median_ms"] for p in ("plan", "write", "verify", "other")) == \
        pytest.approx(apply["full"]["median_ms"], abs=0.01)
    # nothing to write on a re-apply, hence nothing to verify
    assert {apply["reapply_phases"][p]["median_ms"] for p in ("write", "verify")} == {0}

    inc = report["incremental"]
    assert (inc["base_pods"], inc["k"], inc["pod_remove_checks_uid"]) == (50, 20, True)
    for op in ("pod_add", "pod_remove"):
        assert 0 < inc[op]["p50_ms"] <= inc[op]["p99_ms"] <= inc[op]["max_ms"], op
        assert inc[op]["p99_ms"] == inc[op]["max_ms"]        # nearest rank: p99 of 20 is the max

    orig = report["original"]
    assert orig["pods"] == 50 and orig["median_ms"] > 0
    assert orig["processes"] == 5 * 50 + fixed_commands(50)
    assert report["speedup"] == round(orig["median_ms"] / apply["full"]["median_ms"], 1)
    assert report["peak_rss_mb"] > 0 and report["peak_rss_pods"] == 50

    # none of the targets is defined at 50 pods: all reported, none judged
    names = [t["name"] for t in report["targets"]]
    assert names == ["full apply of 1000 pods", "incremental pod_add p99 (on 1000 pods)",
                     "incremental pod_remove p99 (on 1000 pods)",
                     "speed-up vs one process per command (1000 pods)", "peak RSS (5000 pods)"]
    assert {t["result"] for t in report["targets"]} == {"n/a"}
    assert report["targets"][4]["why"] == "largest run was 50 pods, not 5000"

    # one pair per full apply and one for the original's way; all removed
    made = report["netns"]
    assert len(made) == 4 and all(BENCH_NETNS.match(n) for n in made), made
    assert report["netns_left"] == []
    assert not (set(made) & netns_names())
    # (other namespaces may come and go meanwhile: only the benchmark's are its business)
    assert not {n for n in netns_names() - before if BENCH_NETNS.match(n)}


def fixed_commands(pods: int) -> int:
    """The original's one-process-per-object count for the node and ztunnel state that does not
    depend on the pods, counted from the rendered state (independently of bench.py)."""
    from noderedirect import bench as bench_mod, desired, names, render
    from noderedirect.tunnels.vxlan import VxlanDriver

    rendered = desired.render(bench_mod.bench_values(pods))
    count = 0
    for ns in rendered.netns:
        rules = list(ns.iptables) + VxlanDriver().extra_rules(ns.role, ns.links)
        chains = {(t, c) for t in names.TABLE_ORDER for c in render.declared_chains(rules, t)
                  if names.is_owned_chain(c)}
        pod_routes = pods if ns.role == "node" else 0
        count += len(ns.ipsets) + len(chains) + len(rules) + len(ns.routes) - pod_routes + len(ns.ip_rules)
    return count


def test_bench_enroll_interrupted_removes_its_netns(rooted):
    before = netns_names()
    # several seconds of work: the signal lands while the run is busy, not after it ended
    proc = bench("--pods", "1000,2000,3000", "--repeat", "3", "--incremental", "0", "--no-baseline")
    seen: set[str] = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        seen |= {n for n in netns_names() - before if BENCH_NETNS.match(n)}
        if len(seen) == 2:
            break
        time.sleep(0.02)
    assert len(seen) == 2, "the benchmark never created its netns pair"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (proc.returncode, err)
    assert "interrupted" in err and out == ""
    assert not (seen & netns_names())
