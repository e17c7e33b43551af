"""The pure parts of ``compare``: statistics, expectations and judging, object totals, the packet
walk's counts, and the report's round trip and rendering (no kernel)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from noderedirect import compare, summary, values as values_mod
from noderedirect.lab import topology


def lab_values():
    return values_mod.parse(topology.Lab().values_data(1))


def test_stats_are_nearest_rank_in_milliseconds():
    s = compare.Stats.of([i / 1000 for i in range(1, 101)])       # 1 … 100 ms
    assert (s.n, s.p50, s.p99, s.mean, s.total) == (100, 50.0, 99.0, 50.5, 5050.0)
    s = compare.Stats.of([0.003, 0.001, 0.002])
    assert (s.p50, s.p99) == (2.0, 3.0)
    with pytest.raises(compare.CompareError):
        compare.Stats.of([])


def test_enrollment_stats_for_n_are_the_first_n_pods():
    samples = [0.001] * 10 + [0.1] * 90
    by = compare._percentiles_by_n(samples, (10, 100))
    assert by[10].p99 == 1.0 and by[100].p50 == 100.0


def test_options_are_checked():
    with pytest.raises(compare.CompareError, match="1..4000"):
        compare.Options(pods=(0,))
    with pytest.raises(compare.CompareError, match="backend"):
        compare.Options(backend="nft")
    q = compare.Options.quick_options()
    assert (q.pods, q.connects, q.transfer_runs, q.quick) == (compare.QUICK_PODS, compare.QUICK_CONNECTS, 1, True)


def test_delete_form_of_the_cni_rules():
    rules = {v: r for v, _, r in compare.CNI_VARIANTS}
    assert compare._delete_form(rules["mark-first"][0]) == \
        ["-t", "mangle", "-D", "PREROUTING", "-j", "MARK", "--set-xmark", "0x200/0xf00"]
    assert compare._delete_form(rules["masquerade"][0])[:4] == ["-t", "nat", "-D", "POSTROUTING"]


def _trace(legs, status=200, error=None, body=b"client=x", client="10.244.1.5:1234"):
    """A stand-in for lab.paths.Trace with just what judge() reads."""
    resp = SimpleNamespace(status=status, error=error, body=body)
    return SimpleNamespace(legs=[SimpleNamespace(listener=p, pod=pod) for pod, p in legs],
                           response=resp, server_client=client, pod_of=lambda l: l.pod)


def test_judge_against_each_designs_promise():
    sc1, sc12 = compare.SCENARIOS[0], compare.SCENARIOS[11]
    ok_inpod = _trace([("sleep", 15001), ("httpbin", 15006)])
    assert compare.judge("inpod", sc1, "plain", ok_inpod).holds
    # the same observation is not legacy's promise (one capture on the ztunnel)
    assert not compare.judge("legacy", sc1, "plain", ok_inpod).holds
    assert compare.judge("legacy", sc1, "plain", _trace([(None, 15001)])).holds
    bypass = compare.judge("legacy", sc1, "mark-after", _trace([]))
    assert not bypass.holds and bypass.seen == "not captured; HTTP 200, client 10.244.1.5"
    assert compare._why(bypass).startswith("not captured, yet HTTP 200")
    # a wrong client address breaks it too
    assert not compare.judge("inpod", sc1, "plain", _trace([("sleep", 15001), ("httpbin", 15006)],
                                                             client="169.254.7.127:9")).holds
    # scenario 12: legacy fails by design (a reset counts), in-pod is SNATed and succeeds
    assert compare.judge("legacy", sc12, "plain", _trace([(None, 15006)], status=None,
                                                          error="ECONNRESET", client=None)).holds
    assert compare.judge("inpod", sc12, "plain", _trace([], client="169.254.7.127:40000")).holds
    # masquerade: traffic leaving the pod network carries the node's address, in both designs
    sc3 = compare.SCENARIOS[2]
    assert compare.expect("legacy", sc3, "masquerade").client == compare.expect("inpod", sc3, "masquerade").client \
        == "172.18.0.2"


def test_objects_at_n_is_summary_per_pod_times_n():
    v = lab_values()
    at = compare.objects_at(v, "inpod", (10, 100))
    s = summary.summarize(v, pods=10)
    d = next(x for x in s.designs if x.mode == "inpod")
    assert at[10]["objects"] == sum(d.column("total").get(k) for k in compare.KINDS)
    assert at[10]["netns"] == d.column("total").get("netns") == 11
    assert at[100]["objects"] - at[10]["objects"] == 90 * 19
    legacy = compare.objects_at(v, "legacy", (10,))
    assert legacy[10]["netns"] == 2


def test_packet_walk_counts_rules_per_netns():
    w = compare.packet_walk(lab_values(), "inpod")
    assert w["per_packet"]["first"] == {"node": 0, "other": 4, "legs": 3}
    assert w["paths"]["first"].startswith("sleep[NOUT4, lo, → ztunnel outbound :15001] | sleep → node → httpbin[NPR2")
    w = compare.packet_walk(lab_values(), "legacy")
    assert w["per_packet"]["first"]["node"] == 8
    assert "tunnel istioout" in w["paths"]["first"]


def _report() -> compare.Report:
    v = lab_values()
    designs = {}
    for mode in compare.MODES:
        d = compare.DesignResult(mode=mode, version="1.20" if mode == "legacy" else "1.29",
                                 backend="iptables", tunnel="usergeneve" if mode == "legacy" else None)
        d.objects, d.object_labels, d.object_notes = compare.rendered_objects(v, mode)
        d.objects_at = compare.objects_at(v, mode, (3, 10))
        d.walk = compare.packet_walk(v, mode)
        d.measured_path = {"ok": True, "rule_hits": {"node-1": 5, "sleep": 3, "httpbin": 4, "ztunnel-1": 1},
                           "tcp": {"istioout (into the tunnel)": 1, "istioin (into the tunnel)": 0,
                                   "veth-zt (ztunnel pod)": 9, "sleep lo": 2, "httpbin lo": 2}, "legs": []}
        d.enroll = {3: compare.Stats.of([0.002] * 3), 10: compare.Stats.of([0.002] * 10)}
        if mode == "inpod":
            d.enroll_listeners = {n: compare.Stats.of([0.0003] * n) for n in (3, 10)}
            d.enroll_total = {n: compare.Stats.of([0.0023] * n) for n in (3, 10)}
        d.latency = {"connect sleep → httpbin": compare.Stats.of([0.0001, 0.0002]),
                     "GET / sleep → httpbin": compare.Stats.of([0.001, 0.002])}
        d.throughput = {"sleep → httpbin": 300.0}
        d.cni = {"plain": {"1": compare.Outcome(True, "x", "x")},
                 "mark-after": {"1": compare.Outcome(mode == "inpod", "not captured; HTTP 200, client 10.244.1.5",
                                                     "15001; HTTP 200, client 10.244.1.5")}}
        designs[mode] = d
    return compare.Report(options=compare.Options.quick_options(), designs=designs, seconds=1.0)


def test_report_round_trip_and_formats(tmp_path):
    r = _report()
    data = compare.to_json(r)
    assert compare.to_json(compare.from_json(data)) == data
    text = compare.to_text(r)
    assert "legacy with mark-after: not captured, yet HTTP 200 straight from the server (the ztunnel is bypassed): 1" in text
    md = compare.to_markdown(r, "img/compare.png")
    assert "![legacy vs in-pod](img/compare.png)" in md
    assert "| iptables rules incl. hooks | 31 | 4 | 0 | 2 | 12 | 12 |" in md
    svg = compare.chart_svg(r)
    assert svg.startswith("<svg") and svg.count("<rect") > 10 and "Enrollment per pod" in svg
    assert compare.write_chart(r, str(tmp_path / "c.svg")) == "svg"
    with pytest.raises(compare.CompareError, match="png or .svg"):
        compare.write_chart(r, str(tmp_path / "c.gif"))
    with pytest.raises(compare.CompareError, match="not a compare report"):
        compare.from_json({"designs": {}})
