"""The edges of the controller that need no API server: API JSON -> cluster values, finding the
ztunnel netns from /proc, the --source poller, and the metrics exposition format."""

from __future__ import annotations

import os
import time

import pytest

import fake_apiserver as fa

from noderedirect.cluster import PodInfo
from noderedirect.kube import BadObject, error_class, namespace_info, node_info, pod_info
from noderedirect.metrics import Counter, Gauge, Histogram, Metrics, Registry, parse_text
from noderedirect.reconcile import LocateError, cgroup_mentions_pod, find_pod_netns
from noderedirect.source_file import FileSource


# ---------------------------------------------------------------- API objects


def test_pod_info_reads_what_the_decision_needs():
    raw = fa.pod("sleep", ip="10.244.1.5", ips=["10.244.1.5", "fd00::5"], uid="u-1",
                 labels={"app": "sleep"}, annotations={"ambient.istio.io/redirection": "enabled"},
                 created="2024-05-01T10:00:00Z")
    raw["metadata"]["deletionTimestamp"] = "2024-05-01T11:00:00Z"
    p = pod_info(raw)
    assert p == PodInfo(namespace="default", name="sleep", uid="u-1", node_name="node-1",
                        ips=("10.244.1.5", "fd00::5"), host_network=False, labels=(("app", "sleep"),),
                        annotations=(("ambient.istio.io/redirection", "enabled"),), phase="Running",
                        ready=True, created="2024-05-01T10:00:00Z", deleting=True)


@pytest.mark.parametrize("change,ready", [
    (lambda o: o, True),
    (lambda o: o["status"].update(phase="Pending"), False),
    (lambda o: o["status"]["conditions"][0].update(status="False"), False),
    (lambda o: o["status"]["containerStatuses"].append({"name": "b", "ready": False}), False),
    (lambda o: o["status"].update(containerStatuses=[]), False),
    (lambda o: o["status"].pop("conditions"), False),
])
def test_pod_readiness_is_phase_condition_and_every_container(change, ready):
    raw = fa.pod("zt", ip="10.244.1.2")
    change(raw)
    assert pod_info(raw).ready is ready


@pytest.mark.parametrize("mutate,problem", [
    (lambda o: o["metadata"].pop("uid"), "metadata.uid is missing"),
    (lambda o: o["metadata"].update(labels=["a"]), "metadata.labels is not a mapping"),
    (lambda o: o["metadata"].update(annotations={"a": 1}), "metadata.annotations holds a non-string"),
    (lambda o: o.update(status="Running"), "status is not a mapping"),
    (lambda o: o["status"].update(podIPs=["10.0.0.1"]), "status.podIPs[] is not a mapping"),
])
def test_invalid_pod_objects_raise_bad_object(mutate, problem):
    raw = fa.pod("sleep", ip="10.244.1.5")
    mutate(raw)
    with pytest.raises(BadObject, match=problem.replace("[", r"\[").replace("]", r"\]")):
        pod_info(raw)


def test_node_and_namespace_info():
    n = node_info(fa.node("node-1", "10.244.1.0/24", "172.18.0.2"))
    assert (n.name, n.pod_cidrs, n.internal_ip) == ("node-1", ("10.244.1.0/24",), "172.18.0.2")
    dual = fa.node("node-1", None, "fd00::2")
    dual["spec"] = {"podCIDRs": ["fd00:1::/64", "10.244.1.0/24"]}
    dual["status"]["addresses"].append({"type": "InternalIP", "address": "172.18.0.9"})
    n = node_info(dual)
    assert (n.pod_cidrs, n.internal_ip) == (("fd00:1::/64", "10.244.1.0/24"), "172.18.0.9")
    ns = namespace_info(fa.namespace("default", {"istio.io/dataplane-mode": "ambient"}))
    assert ns.label("istio.io/dataplane-mode") == "ambient"


def test_error_classes():
    import urllib3
    from kubernetes.client.exceptions import ApiException

    assert error_class(ApiException(status=410)) == "gone"
    assert error_class(ApiException(status=500)) == "api"
    assert error_class(ApiException(status=403)) == "api"
    assert error_class(ApiException(status=0)) == "network"
    assert error_class(urllib3.exceptions.ProtocolError("ended")) == "network"
    assert error_class(ConnectionRefusedError()) == "network"
    assert error_class(KeyError("reason")) == "other"


# ---------------------------------------------------------------- the ztunnel netns from /proc


UID = "5f3c2a1e-7b4d-4e8f-9a0b-1c2d3e4f5a6b"


@pytest.mark.parametrize("text,found", [
    (f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID.replace('-', '_')}.slice/"
     "cri-containerd-abc.scope\n", True),
    (f"12:memory:/kubepods/besteffort/pod{UID}/0123abcd\n", True),
    (f"0::/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/crio-0123.scope\n", True),
    (f"0::/kubepods/burstable/pod{UID}0/abc\n", False),            # a longer UID is another pod
    ("0::/system.slice/containerd.service\n", False),
    (f"0::/kubepods/burstable/pod{UID[:-1]}/abc\n", False),
])
def test_cgroup_mentions_pod(text, found):
    assert cgroup_mentions_pod(text, UID) is found


def _fake_proc(root, pid: int, cgroup: str, start: int, netns_target: str = "/proc/self/ns/net"):
    d = root / str(pid)
    (d / "ns").mkdir(parents=True)
    (d / "cgroup").write_text(cgroup)
    # field 22 (starttime) counted from the command name, which may hold spaces and ')'
    (d / "stat").write_text(f"{pid} (zt (x) y) S " + " ".join(["0"] * 18) + f" {start} 0 0\n")
    os.symlink(netns_target, d / "ns" / "net")


def test_find_pod_netns_takes_the_oldest_process_of_the_pod(tmp_path):
    _fake_proc(tmp_path, 300, f"0::/kubepods/pod{UID}/app\n", start=900)
    _fake_proc(tmp_path, 200, f"0::/kubepods/pod{UID}/pause\n", start=500)
    _fake_proc(tmp_path, 100, "0::/kubepods/podother/x\n", start=1)
    (tmp_path / "self").mkdir()
    ref = find_pod_netns(UID, str(tmp_path))
    assert ref.path == str(tmp_path / "200" / "ns" / "net")
    with pytest.raises(LocateError, match="no process of pod uid nope"):
        find_pod_netns("nope", str(tmp_path))
    # the node's own netns is never taken (a hostNetwork process of the same pod)
    st = os.stat("/proc/self/ns/net")
    with pytest.raises(LocateError):
        find_pod_netns(UID, str(tmp_path), exclude=(st.st_dev, st.st_ino))


# ---------------------------------------------------------------- the --source poller


def test_file_source_keeps_the_last_good_state(tmp_path):
    f = tmp_path / "c.yaml"
    got = []
    m = Metrics()
    src = FileSource(str(f), got.append, m, interval=0.05)
    assert src.poll() is False and m.source_errors.value() == 1       # missing file
    f.write_text("node: {name: node-1, internalIP: 172.18.0.2}\npods: []\n")
    assert src.poll() is True and len(got) == 1
    assert src.poll() is False                                         # unchanged bytes
    f.write_text("node: {name: node-1\n")
    assert src.poll() is False and len(got) == 1 and m.source_errors.value() == 2
    assert src.poll() is False and m.source_errors.value() == 2        # complained once
    f.write_text("node: {name: node-1, internalIP: 172.18.0.2}\n"
                 "pods: [{namespace: default, name: a, uid: u-a, ip: 10.244.1.5}]\n")
    src.start()
    try:
        deadline = time.monotonic() + 5
        while len(got) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        src.stop()
    assert [p.name for p in got[1][-1].objects] == ["a"]


# ---------------------------------------------------------------- metrics text


def test_exposition_format():
    r = Registry()
    c = r.add(Counter("x_total", "A counter.", ["kind"]))
    g = r.add(Gauge("y", "A gauge."))
    h = r.add(Histogram("z_seconds", "A histogram.", buckets=(0.1, 1.0)))
    c.inc(kind='a"b\\c')
    c.inc(2, kind="p")
    g.set(1.5)
    for v in (0.05, 0.5, 5):
        h.observe(v)
    assert r.render() == (
        "# HELP x_total A counter.\n# TYPE x_total counter\n"
        'x_total{kind="a\\"b\\\\c"} 1\nx_total{kind="p"} 2\n'
        "# HELP y A gauge.\n# TYPE y gauge\ny 1.5\n"
        "# HELP z_seconds A histogram.\n# TYPE z_seconds histogram\n"
        'z_seconds_bucket{le="0.1"} 1\nz_seconds_bucket{le="1"} 2\nz_seconds_bucket{le="+Inf"} 3\n'
        "z_seconds_sum 5.55\nz_seconds_count 3\n")
    with pytest.raises(ValueError):
        c.inc(kind="a", extra="b")
    with pytest.raises(ValueError):
        c.inc(-1, kind="a")
    with pytest.raises(ValueError):
        r.add(Gauge("y", "again"))
    assert parse_text(r.render())['x_total{kind="p"}'] == 2
