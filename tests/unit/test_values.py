"""Strict validation: hostile or malformed values are rejected with the key named; nothing renders."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from helpers import DELETE, EXAMPLE, ROOT, apply_change, example_data, values_with

from noderedirect.values import ValuesError

HOSTILE = [
    # (dotted key, value, words the message must contain)
    ("pods[0].uid", "abc\n-A INPUT -j ACCEPT", "not a pod UID"),
    ("pods[0].uid", 'u" -j DROP', "not a pod UID"),
    ("pods[0].uid", "has space", "not a pod UID"),
    ("pods[0].uid", "-j", "not a pod UID"),
    ("pods[0].name", "sleep\nx", "Kubernetes name"),
    ("pods[0].namespace", "Default", "Kubernetes name"),
    ("ztunnel.veth", "veth zt", "interface name"),
    ("ztunnel.veth", "veth'zt", "interface name"),
    ("ztunnel.veth", "-j", "interface name"),
    ("ztunnel.veth", "a-very-long-interface", "longer than 15"),
    ("ztunnel.interface", "eth0;reboot", "interface name"),
    ("pods[1].veth", "x" * 16, "longer than 15"),
    ("ztunnel.ip", "fd00::2", "IPv6"),
    ("pods[0].ip", "fd00::5", "IPv6"),
    ("node.hostIP", "2001:db8::1", "IPv6"),
    ("pods[0].ip", "10.244.1.5 -j ACCEPT", "not an IPv4 address"),
    ("pods[0].ip", "10.244.001.5", "not an IPv4 address"),
    ("node.podCIDR", "10.244.1.1/24", "not an IPv4 CIDR"),
    ("node.podCIDR", "fd00::/64", "IPv6"),
    ("geneve.dstPort", 0, "port"),
    ("geneve.dstPort", 65536, "port"),
    ("geneve.dstPort", "6081", "port"),
    ("geneve.dstPort", True, "port"),
    ("dnsCapture", "yes", "true or false"),
    ("istioVersion", "1.21", "supported Istio version"),
    ("istioVersion", 1.2, "must be quoted"),
    ("pods[1].ip", "10.244.1.5", "duplicate pod IP"),
    ("pods[1].uid", "6b1f2c3e-0a4d-4c55-9e1a-1b2c3d4e5f05", "duplicate pod UID"),
    ("pods[0].ip", "10.244.1.2", "ztunnel or host address"),
    ("ztunnel.ip", "192.168.126.2", "tunnel subnet"),
    ("node.unknownKey", 1, "not a known key"),
    ("pods[0].colour", "red", "not a known key"),
    ("inpod.probeSNATv6", "169.254.7.127", "IPv4"),
]


@pytest.mark.parametrize("key,value,words", HOSTILE, ids=[f"{k}={v!r}"[:60] for k, v, _ in HOSTILE])
def test_hostile_value_is_rejected_naming_the_key(key, value, words):
    with pytest.raises(ValuesError) as ei:
        values_with(**{key: value})
    msg = str(ei.value)
    assert msg.startswith(key + ":"), msg
    assert words in msg, msg
    assert "\n" not in msg.replace(repr(value), "")  # one line (the value itself is repr'd)


@pytest.mark.parametrize("key", ["node", "node.name", "node.podCIDR", "ztunnel.ip", "ztunnel.veth",
                                 "pods[0].uid", "pods[0].ip"])
def test_missing_required_key(key):
    with pytest.raises(ValuesError, match="^" + key.replace("[", r"\[").replace("]", r"\]") + ": .*is required"):
        values_with(**{key: DELETE if "[" not in key else None})


def test_defaults_and_derivations():
    v = values_with(**{"node.hostIP": DELETE, "ztunnel.interface": DELETE, "geneve": DELETE})
    assert v.node.host_ip == "10.244.1.1"
    assert v.node.host_ip_source.startswith("derived")
    assert v.node.tun_host_ip == "10.244.1.1"
    assert v.node.ztunnel_if == "eth0"
    assert v.node.geneve_port == 6081


def run_cli(*args, input_file=None):
    return subprocess.run([sys.executable, "-m", "noderedirect", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("key,value,words", [HOSTILE[0], HOSTILE[9], HOSTILE[12], HOSTILE[26]])
def test_cli_exits_2_with_one_line_and_renders_nothing(tmp_path, key, value, words):
    data = example_data()
    apply_change(data, key, value)
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(data))
    for cmd in (["render", "--values", str(f)], ["validate", "--values", str(f)]):
        res = run_cli(*cmd)
        assert res.returncode == 2, res
        assert res.stdout == ""                       # nothing rendered
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and key in lines[0] and words in lines[0], res.stderr
        assert "Traceback" not in res.stderr


def test_cli_bad_yaml_and_missing_file(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("node: [unclosed\n")
    res = run_cli("render", "--values", str(f))
    assert res.returncode == 2 and "not valid YAML" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("render", "--values", str(tmp_path / "nope.yaml"))
    assert res.returncode == 2 and "No such file" in res.stderr and "Traceback" not in res.stderr


def test_cli_validate_ok():
    res = run_cli("validate", "--values", str(EXAMPLE))
    assert res.returncode == 0
    assert "ok: node node-1, Istio 1.20, 2 pods, HostIP 10.244.1.1 (values)" in res.stdout
