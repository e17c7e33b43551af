"""cluster.py: the enrollment decision (table-driven), ztunnel selection, values building with
bad data, annotation patches, and the --source file format that feeds the same pipeline."""

from __future__ import annotations

import pytest

from noderedirect import cluster
from noderedirect.cluster import (ClusterError, ClusterState, Event, NamespaceInfo, NodeInfo, PodInfo,
                                  Settings, apply_event, annotation_patches, build_values, decide,
                                  select_ztunnel)
from noderedirect.source_file import SourceError, parse

S = Settings(node_name="node-1")
AMBIENT = NamespaceInfo("default", (("istio.io/dataplane-mode", "ambient"),))
PLAIN = NamespaceInfo("default", ())
NODE = NodeInfo("node-1", ("10.244.1.0/24",), "172.18.0.2")


def pod(name="sleep", ip="10.244.1.5", uid=None, ns="default", **kw) -> PodInfo:
    return PodInfo(namespace=ns, name=name, uid=uid or f"uid-{name}", node_name=kw.pop("node_name", "node-1"),
                   ips=(ip,) if ip else (), ready=kw.pop("ready", True), **kw)


ZT = pod("ztunnel-a", "10.244.1.2", ns="istio-system", labels=(("app", "ztunnel"),),
         created="2024-05-01T10:00:00Z")


# ---------------------------------------------------------------- the decision table

CASES = [
    # (pod, namespace, enrolled, reason)
    (pod(), AMBIENT, True, "ambient"),
    (pod(), PLAIN, False, "namespace not ambient"),
    (pod(), NamespaceInfo("default", (("istio.io/dataplane-mode", "Ambient"),)), False, "namespace not ambient"),
    (pod(), None, False, "namespace not known"),
    (pod(annotations=(("ambient.istio.io/redirection", "disabled"),)), AMBIENT, False, "opted out"),
    (pod(annotations=(("ambient.istio.io/redirection", "enabled"),)), AMBIENT, True, "ambient"),
    (pod(annotations=(("sidecar.istio.io/status", "{}"),)), AMBIENT, False, "sidecar-injected"),
    (pod(labels=(("app", "ztunnel"),)), AMBIENT, False, "ztunnel pod"),
    (pod(host_network=True), AMBIENT, False, "hostNetwork pod"),
    (pod(phase="Succeeded"), AMBIENT, False, "pod Succeeded"),
    (pod(phase="Failed"), AMBIENT, False, "pod Failed"),
    (pod(node_name="node-2"), AMBIENT, False, "scheduled on node-2"),
    (pod(ns="kube-system"), NamespaceInfo("kube-system", AMBIENT.labels), False, "namespace excluded"),
    (pod(ip=None, phase="Pending", ready=False), AMBIENT, False, "waiting for an IP"),
    (pod(ready=False), AMBIENT, True, "ambient"),            # readiness does not matter for pods
    (pod(deleting=True), AMBIENT, True, "ambient"),          # terminating: keep until deleted
]


@pytest.mark.parametrize("p,ns,enroll,reason", CASES, ids=[c[3] + f"-{i}" for i, c in enumerate(CASES)])
def test_decision_table(p, ns, enroll, reason):
    d = decide(p, ns, S)
    assert (d.enroll, d.reason) == (enroll, reason)
    assert d.waiting == (reason == "waiting for an IP")


def test_exclude_namespaces_is_a_setting():
    p = pod(ns="kube-system")
    ns = NamespaceInfo("kube-system", AMBIENT.labels)
    assert decide(p, ns, Settings(node_name="node-1", exclude_namespaces=())).enroll


# ---------------------------------------------------------------- state and events


def state(*pods, ns=AMBIENT, node=NODE) -> ClusterState:
    st = ClusterState()
    for ev in (Event("node", "RELISTED", objects=(node,) if node else ()),
               Event("namespace", "RELISTED", objects=(ns, NamespaceInfo("istio-system"))),
               Event("pod", "RELISTED", objects=tuple(pods))):
        st = apply_event(st, ev)
    return st


def test_events_replace_update_and_delete_and_the_gate():
    st = ClusterState()
    assert not st.in_sync
    st = apply_event(st, Event("pod", "RELISTED", objects=(pod(),)))
    st = apply_event(st, Event("namespace", "RELISTED", objects=(AMBIENT,)))
    assert not st.in_sync and st.synced == {"pod", "namespace"}
    st = apply_event(st, Event("node", "RELISTED", objects=(NODE,)))
    assert st.in_sync and st.node == NODE
    before = st
    st = apply_event(st, Event("pod", "ADDED", obj=pod("httpbin", "10.244.1.6")))
    st = apply_event(st, Event("pod", "MODIFIED", obj=pod("sleep", "10.244.1.9")))
    assert sorted((p.name, p.ips) for p in st.pods.values()) == [("httpbin", ("10.244.1.6",)),
                                                                  ("sleep", ("10.244.1.9",))]
    assert list(before.pods) == ["uid-sleep"]          # copy-on-write: the old state is unchanged
    st = apply_event(st, Event("pod", "DELETED", obj=pod("sleep")))
    st = apply_event(st, Event("namespace", "DELETED", obj=AMBIENT))
    assert list(st.pods) == ["uid-httpbin"] and st.namespaces == {}
    st = apply_event(st, Event("pod", "RELISTED", objects=()))
    assert st.pods == {} and st.in_sync
    with pytest.raises(ValueError):
        apply_event(st, Event("service", "ADDED", obj=None))


# ---------------------------------------------------------------- ztunnel selection


def test_select_ztunnel_newest_ready_and_sticky_while_unready():
    newer = pod("ztunnel-b", "10.244.1.3", ns="istio-system", labels=ZT.labels, created="2024-05-01T11:00:00Z")
    st = state(ZT, newer)
    assert select_ztunnel(st, S).uid == "uid-ztunnel-b"
    unready_b = pod("ztunnel-b", "10.244.1.3", ns="istio-system", labels=ZT.labels,
                    created="2024-05-01T11:00:00Z", ready=False)
    assert select_ztunnel(state(ZT, unready_b), S, current_uid="uid-ztunnel-a").uid == "uid-ztunnel-a"
    # the only ztunnel flaps to unready: kept while it is the current one, never picked otherwise
    assert select_ztunnel(state(unready_b), S, current_uid="uid-ztunnel-b").uid == "uid-ztunnel-b"
    assert select_ztunnel(state(unready_b), S, current_uid=None) is None
    other_node = pod("ztunnel-c", "10.244.2.2", ns="istio-system", labels=ZT.labels, node_name="node-2")
    assert select_ztunnel(state(other_node), S) is None
    no_ip = pod("ztunnel-d", None, ns="istio-system", labels=ZT.labels)
    assert select_ztunnel(state(no_ip), S) is None
    terminating = pod("ztunnel-e", "10.244.1.4", ns="istio-system", labels=ZT.labels, deleting=True,
                      created="2024-05-01T12:00:00Z")
    assert select_ztunnel(state(ZT, terminating), S).uid == "uid-ztunnel-a"


# ---------------------------------------------------------------- values


def test_build_values_goes_through_values_parse():
    b = build_values(state(ZT, pod(), pod("httpbin", "10.244.1.6"), pod("plain", "10.244.1.7",
                     annotations=(("ambient.istio.io/redirection", "disabled"),))), ZT, "veth-zt", S)
    v = b.values
    assert [(p.namespace, p.name, p.uid, p.ip) for p in v.pods] == [
        ("default", "httpbin", "uid-httpbin", "10.244.1.6"), ("default", "sleep", "uid-sleep", "10.244.1.5")]
    n = v.node
    assert (n.node_name, n.pod_cidr, n.internal_ip, n.host_ip, n.ztunnel_ip, n.ztunnel_veth, n.ztunnel_if) == (
        "node-1", "10.244.1.0/24", "172.18.0.2", "10.244.1.1", "10.244.1.2", "veth-zt", "eth0")
    assert n.host_ip_source.startswith("derived") and str(n.istio_version) == "1.20" and n.ipset_comments
    assert b.skipped == () and v.source == "cluster:node-1"


def test_build_values_settings_reach_the_values():
    s = Settings(node_name="node-1", istio_version="1.19", ipset_comments=False, dns_capture=True,
                 geneve_port=7000)
    n = build_values(state(ZT), ZT, "veth-zt", s).values.node
    assert (str(n.istio_version), n.ipset_comments, n.dns_capture, n.geneve_port, n.geneve_port_explicit) == (
        "1.19", False, True, 7000, True)


@pytest.mark.parametrize("bad,detail", [
    (pod("v6", "fd00::9"), "default/v6.ip: 'fd00::9' is IPv6"),
    (pod("garbage", "10.244.1.300"), "default/garbage.ip: '10.244.1.300' is not an IPv4 address"),
    (pod("padded", "10.244.001.5"), "not an IPv4 address"),
    (pod("inject", "10.244.1.8 -j ACCEPT"), "not an IPv4 address"),
    (pod("baduid", "10.244.1.8", uid='u" -j DROP'), "is not a pod UID"),
    (pod("Upper", "10.244.1.8"), "is not a Kubernetes name"),
    (pod("hostip", "10.244.1.1"), "is the ztunnel or host address"),
])
def test_bad_pod_data_is_skipped_and_the_rest_applies(bad, detail):
    b = build_values(state(ZT, pod(), bad, pod("httpbin", "10.244.1.6")), ZT, "veth-zt", S)
    assert [p.name for p in b.values.pods] == ["httpbin", "sleep"]
    assert len(b.skipped) == 1
    skip = b.skipped[0]
    assert skip.pod == bad and skip.reason == "bad-value" and detail in skip.detail
    assert "pods[" not in skip.detail                 # named by pod, not by a list index


def test_dual_stack_pod_uses_its_ipv4_address():
    dual = PodInfo("default", "dual", "uid-dual", "node-1", ips=("fd00::10", "10.244.1.10"), ready=True)
    assert [p.ip for p in build_values(state(ZT, dual), ZT, "veth-zt", S).values.pods] == ["10.244.1.10"]


def test_ip_reuse_goes_to_the_newest_pod_not_terminating():
    old = pod("old", "10.244.1.5", created="2024-05-01T10:00:00Z")
    new = pod("new", "10.244.1.5", created="2024-05-01T11:00:00Z")
    b = build_values(state(ZT, old, new), ZT, "veth-zt", S)
    assert [(p.name, p.uid) for p in b.values.pods] == [("new", "uid-new")]
    assert [(s.pod.name, s.reason) for s in b.skipped] == [("old", "duplicate-ip")]
    assert "10.244.1.5 is also used by default/new" in b.skipped[0].detail
    # the newer one is already terminating: the live one keeps the IP
    dying = pod("new", "10.244.1.5", created="2024-05-01T11:00:00Z", deleting=True)
    assert [p.name for p in build_values(state(ZT, old, dying), ZT, "veth-zt", S).values.pods] == ["old"]


def test_same_name_recreated_goes_to_the_newest():
    a = pod("web-0", "10.244.1.5", uid="uid-a", created="2024-05-01T10:00:00Z", deleting=True)
    b = pod("web-0", "10.244.1.6", uid="uid-b", created="2024-05-01T11:00:00Z")
    got = build_values(state(ZT, a, b), ZT, "veth-zt", S)
    assert [(p.uid, p.ip) for p in got.values.pods] == [("uid-b", "10.244.1.6")]
    assert [s.reason for s in got.skipped] == ["duplicate-name"]


def test_node_problems_are_cluster_errors():
    with pytest.raises(ClusterError, match="Node object of this node is not known"):
        build_values(state(ZT, node=None), ZT, "veth-zt", S)
    with pytest.raises(ClusterError, match="has no InternalIP"):
        build_values(state(ZT, node=NodeInfo("node-1", ("10.244.1.0/24",), None)), ZT, "veth-zt", S)
    with pytest.raises(ClusterError, match="ztunnel.veth"):
        build_values(state(ZT), ZT, "veth zt", S)
    zt_v6 = pod("ztunnel-a", "fd00::2", ns="istio-system", labels=ZT.labels)
    with pytest.raises(ClusterError, match="ztunnel.ip: 'fd00::2' is IPv6"):
        build_values(state(zt_v6), zt_v6, "veth-zt", S)


def test_node_without_pod_cidr_uses_the_internal_ip_as_host_ip():
    n = build_values(state(ZT, node=NodeInfo("node-1", (), "172.18.0.2")), ZT, "veth-zt", S).values.node
    assert (n.host_ip, n.host_ip_source, n.pod_cidr) == ("172.18.0.2", "values", "172.18.0.2/32")
    dual = NodeInfo("node-1", ("fd00:1::/64", "10.244.1.0/24"), "172.18.0.2")
    assert build_values(state(ZT, node=dual), ZT, "veth-zt", S).values.node.pod_cidr == "10.244.1.0/24"


# ---------------------------------------------------------------- annotations


def test_annotation_patches():
    enabled = (("ambient.istio.io/redirection", "enabled"),)
    disabled = (("ambient.istio.io/redirection", "disabled"),)
    st = state(ZT, pod("a", "10.244.1.5"), pod("b", "10.244.1.6", annotations=enabled),
               pod("c", "10.244.1.7", annotations=enabled), pod("d", "10.244.1.8", annotations=disabled),
               pod("e", "10.244.1.9", deleting=True), pod("f", "10.244.1.10", host_network=True, annotations=enabled))
    got = annotation_patches(st, frozenset({"uid-a", "uid-b", "uid-e"}))
    assert [(p.name, p.value) for p in got] == [("a", "enabled"), ("c", None)]
    assert got[1].show() == "default/c: remove ambient.istio.io/redirection"


# ---------------------------------------------------------------- the --source file


SOURCE = """
node: {name: node-1, podCIDR: 10.244.1.0/24, internalIP: 172.18.0.2}
ztunnel: {netns: lab-zt, veth: veth-zt}
namespaces:
  - {name: default, labels: {istio.io/dataplane-mode: ambient}}
pods:
  - {namespace: istio-system, name: ztunnel-a, uid: zt-a, ip: 10.244.1.2, labels: {app: ztunnel}}
  - {namespace: default, name: sleep, uid: s-1, ip: 10.244.1.5}
  - {namespace: default, name: web, uid: w-1, ips: [fd00::7, 10.244.1.7], ready: false, phase: Pending}
  - {namespace: default, name: broken, ip: 10.244.1.8}
  - {namespace: default, name: typo, uid: t-1, ip: 10.244.1.9, hostnetwork: true}
"""


def test_source_file_parses_into_the_same_events():
    bad = []
    events = parse(SOURCE, lambda k, why: bad.append((k, why)))
    st = ClusterState()
    for ev in events:
        st = apply_event(st, ev)
    assert st.in_sync
    assert st.hints == cluster.Hints("lab-zt", "veth-zt")
    assert st.node == NODE
    assert st.namespaces["default"].label("istio.io/dataplane-mode") == "ambient"
    assert sorted(st.pods) == ["s-1", "w-1", "zt-a"]
    web = st.pods["w-1"]
    assert (web.ips, web.ready, web.phase, web.node_name) == (("fd00::7", "10.244.1.7"), False, "Pending", "node-1")
    assert bad == [("pods[3]", "pods[3].uid: must be a non-empty string (got None)"),
                   ("pods[4]", "pods[4].hostnetwork: is not a known key (known: annotations, created, "
                               "deleting, hostNetwork, ip, ips, labels, name, namespace, nodeName, "
                               "phase, ready, uid)")]


@pytest.mark.parametrize("text,key", [
    ("node: [1]", "node"),
    ("pods: []", "node"),
    ("node: {name: n}\n", "node.internalIP"),
    ("node: {name: n, internalIP: 1.2.3.4}\nnamespaces: {}", "namespaces"),
    ("node: {name: n, internalIP: 1.2.3.4}\nnamespaces: [{name: x, labels: {a: 1}}]", "namespaces[0].labels.a"),
    ("node: {name: n, internalIP: 1.2.3.4}\nservices: []", "services"),
    ("node: {name: n\n", "<yaml>"),
])
def test_source_file_errors_name_the_key(text, key):
    with pytest.raises(SourceError) as e:
        parse(text)
    assert e.value.key == key
