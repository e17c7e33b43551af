"""``noderedirect compare --quick`` end to end: two labs built, measured and removed, and the
report in every form (JSON, markdown with a PNG chart, text re-rendered from the JSON).

No timing is asserted, only that every number is there and sane. What is asserted exactly:
the object counts are summary.py's for the lab's values and the lab's kernel showed the same;
the packet walk's rule counts; where TCP packets went; and which scenarios hold with another
CNI's rules — measured by compare, deterministic in the kernel.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest

from labtools import PREFIXES, lab_netns, new_prefix
from noderedirect import compare, summary, values as values_mod
from noderedirect.lab import topology

pytestmark = pytest.mark.netns


@pytest.fixture(scope="module")
def report(lab_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    base = new_prefix().rstrip("-")          # the labs are <base>l- and <base>i-
    PREFIXES.update({f"{base}l-", f"{base}i-"})
    cp = subprocess.run([sys.executable, "-m", "noderedirect", "compare", "--quick", "--prefix", base,
                         "--format", "markdown", "--chart", str(out / "compare.png"),
                         "--json", str(out / "compare.json")],
                        capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert cp.returncode == 0, cp.stderr
    return {"base": base, "markdown": cp.stdout, "stderr": cp.stderr, "dir": out,
            "json": json.loads((out / "compare.json").read_text())}


def test_labs_are_gone(report):
    for mode in "li":
        prefix = f"{report['base']}{mode}-"
        assert lab_netns(prefix) == []
        assert topology.Record.load(prefix) is None
    assert "lab down" in report["stderr"]


def test_object_counts_are_summary_counts_and_the_kernel_agrees(report):
    values = values_mod.parse(topology.Lab().values_data(1))
    want = summary.to_json(summary.summarize(values))
    for d in want["designs"]:
        got = report["json"]["designs"][d["mode"]]["objects"]
        assert got["rendered"] == {k: c["counts"] for k, c in d["columns"].items()}
        assert got["observed_notes"] == []
    inpod = report["json"]["designs"]["inpod"]["objects"]
    assert set(inpod["observed"]) == {"node-1", "sleep", "httpbin"}
    assert inpod["observed"]["sleep"] == inpod["rendered"]["pod"]
    legacy = report["json"]["designs"]["legacy"]["objects"]
    assert legacy["observed"] == {"node-1": legacy["rendered"]["node"], "ztunnel-1": legacy["rendered"]["ztunnel"]}
    # N pods: the total without pods plus N times one more pod
    for mode, per_pod in (("legacy", 2), ("inpod", 19)):
        at = report["json"]["designs"][mode]["objects"]["at_n"]
        assert int(at["10"]["objects"]) - int(at["3"]["objects"]) == 7 * per_pod


def test_paths_and_rules_on_the_node(report):
    L, I = (report["json"]["designs"][m] for m in ("legacy", "inpod"))
    # the packet walk of sleep -> httpbin: the node matches nothing of in-pod's
    assert L["walk"]["per_packet"]["first"] == {"node": 8, "other": 1, "legs": 2}
    assert I["walk"]["per_packet"]["first"] == {"node": 0, "other": 4, "legs": 3}
    assert all(I["walk"]["per_packet"][k]["node"] == 0 for k in ("first", "reply", "next"))
    assert "tunnel istioout" in L["walk"]["paths"]["first"] and "table 102" in L["walk"]["paths"]["next"]
    assert I["walk"]["paths"]["first"].startswith("sleep[NOUT4, lo, → ztunnel outbound :15001]")
    # measured: only the SYN crosses the tunnel; in-pod touches neither tunnel nor veth-zt
    assert L["measured_path"]["tcp"]["istioout (into the tunnel)"] == 1
    assert L["measured_path"]["tcp"]["veth-zt (ztunnel pod)"] > 1
    assert I["measured_path"]["tcp"]["veth-zt (ztunnel pod)"] == 0
    assert I["measured_path"]["legs"] == ["15001@sleep", "15006@httpbin"]
    assert L["measured_path"]["rule_hits"]["node-1"] > I["measured_path"]["rule_hits"]["node-1"]


def test_timings_are_present(report):
    for mode in ("legacy", "inpod"):
        d = report["json"]["designs"][mode]
        assert set(d["enroll"]["rules"]) == {"3", "10"}
        for n, s in d["enroll"]["rules"].items():
            assert s["n"] == int(n) and 0 < s["p50"] <= s["p99"]
        assert len(d["latency_ms"]) == 6
        for s in d["latency_ms"].values():
            assert s["n"] == compare.QUICK_CONNECTS and 0 < s["p50"] <= s["p99"]
        assert set(d["throughput_mb_s"]) == {"sleep → httpbin", "sleep → plain-a", "plain-a → plain-b (no mesh)"}
        assert all(v > 0 for v in d["throughput_mb_s"].values())
    assert set(report["json"]["designs"]["inpod"]["enroll"]["listeners"]) == {"3", "10"}
    assert report["json"]["designs"]["legacy"]["enroll"]["listeners"] == {}


def test_another_cnis_rules(report):
    """Measured by compare: in-pod holds everywhere; legacy holds plain and with masquerade,
    and loses capture for every mesh scenario once a 0x0F00-range mark is written, before or
    after its own rules (the requests still succeed: the ztunnel is bypassed)."""
    holds = {m: {v: {n for n, o in sc.items() if o["holds"]}
                 for v, sc in report["json"]["designs"][m]["cni"].items()} for m in ("legacy", "inpod")}
    every = {str(n) for n in range(1, 13)}
    assert holds["inpod"] == {v: every for v in ("plain", "masquerade", "mark-after", "mark-first")}
    assert holds["legacy"]["plain"] == holds["legacy"]["masquerade"] == every
    for v in ("mark-after", "mark-first"):
        assert holds["legacy"][v] == {"6", "7", "8", "12"}
        seen = report["json"]["designs"]["legacy"]["cni"][v]["1"]["seen"]
        assert seen == "not captured; HTTP 200, client 10.244.1.5"
    masq = report["json"]["designs"]["inpod"]["cni"]["masquerade"]["3"]
    assert masq["seen"] == "15001@sleep; HTTP 200, client 172.18.0.2"


def test_markdown_and_chart(report):
    md = report["markdown"]
    for heading in ("### Kernel objects per netns and per pod", "### Enrollment time per pod",
                    "### Latency through the stand-in ztunnel", "### Throughput",
                    "### Scenarios with another CNI's rules in the node netns",
                    "### First-packet and steady-state paths"):
        assert heading in md, heading
    assert f"![legacy vs in-pod]({report['dir'] / 'compare.png'})" in md
    assert "| iptables rules incl. hooks | 31 | 4 | 0 | 2 | 12 | 12 |" in md
    png = (report["dir"] / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png[16:24]) == (compare.CHART_W, compare.CHART_H)


def test_text_from_the_saved_json(report):
    cp = subprocess.run([sys.executable, "-m", "noderedirect", "compare", "--from-json",
                         str(report["dir"] / "compare.json")], capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    text = cp.stdout
    assert text.startswith("noderedirect compare: legacy (Istio 1.20, iptables, tunnel ")
    assert "1. Kernel objects per netns and per pod" in text and "8. Scenarios with another CNI" in text
    assert "legacy with mark-after: not captured, yet HTTP 200 straight from the server" in text
    # the round trip is exact
    again = compare.to_json(compare.from_json(report["json"]))
    assert again == report["json"]


def test_refuses_a_prefix_in_use(lab_env):
    """compare removes the labs it builds, so it never builds over (and then removes) one that
    is already there."""
    base = new_prefix().rstrip("-")
    PREFIXES.add(f"{base}l-")
    topology.up(topology.Lab(prefix=f"{base}l-", mode="inpod"))
    try:
        cp = subprocess.run([sys.executable, "-m", "noderedirect", "compare", "--quick", "--prefix", base],
                            capture_output=True, text=True, timeout=120)
        assert cp.returncode == 1 and "exists already" in cp.stderr, cp.stderr
        assert len(lab_netns(f"{base}l-")) == 8          # untouched
        assert topology.Record.load(f"{base}l-").phase == "up"
    finally:
        topology.down(f"{base}l-")
