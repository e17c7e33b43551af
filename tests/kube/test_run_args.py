"""``noderedirect run``'s arguments: every backend the engine can program is offered, and the
native nft one really drives the controller (``--once`` against a file source, real netns)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from netns.conftest import netns_factory, root_netns_untouched  # noqa: F401 - real-kernel fixtures
from netns.test_engine import sh, wire

from noderedirect import apply
from noderedirect.cli import build_parser
from noderedirect.commands.run_cmd import RUN_BACKENDS


def test_run_offers_every_engine_backend():
    assert set(RUN_BACKENDS) | {"iptables-nft"} == set(apply.BACKENDS)
    for backend in RUN_BACKENDS:
        assert build_parser().parse_args(["run", "--backend", backend]).backend == backend
    assert build_parser().parse_args(["run"]).backend == "iptables"
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["run", "--backend", "ebpf"])
    assert e.value.code == 2


def test_run_help_names_the_nft_backend():
    r = subprocess.run([sys.executable, "-m", "noderedirect", "run", "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "--backend {iptables,iptables-legacy,nft}" in text
    assert "or nft: the design as one native nftables table per netns, no ipset and no iptables" in text


@pytest.mark.netns
def test_run_once_with_the_nft_backend(netns_factory, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("NODEREDIRECT_STATE_DIR", str(tmp_path / "state"))
    node, zt = netns_factory("rnode").spec, netns_factory("rzt").spec
    wire(node, zt)
    f = tmp_path / "cluster.yaml"
    f.write_text(yaml.safe_dump({
        "node": {"name": "node-1", "podCIDR": "10.244.1.0/24", "internalIP": "172.18.0.2"},
        "ztunnel": {"netns": zt},
        "namespaces": [{"name": "default", "labels": {"istio.io/dataplane-mode": "ambient"}},
                       {"name": "istio-system"}],
        "pods": [{"namespace": "istio-system", "name": "ztunnel-a", "uid": "zt-a", "ip": "10.244.1.2",
                  "labels": {"app": "ztunnel"}},
                 {"namespace": "default", "name": "sleep", "uid": "uid-sleep", "ip": "10.244.1.5"}]}))
    r = subprocess.run([sys.executable, "-m", "noderedirect", "run", "--source", str(f), "--node-netns", node,
                        "--tunnel", "vxlan", "--backend", "nft", "--metrics-port", "-1", "--once"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ready: 1 pods enrolled, ztunnel 10.244.1.2"
    # the native backend's table holds the member; neither an ipset nor a ztunnel-* chain exists
    table = sh("nft", "list", "table", "ip", "ztunnel-node", ns=node)
    assert "10.244.1.5" in table
    assert sh("ipset", "list", "-n", ns=node).split() == []
    assert "ztunnel-" not in sh("iptables-nft-save", ns=node)
