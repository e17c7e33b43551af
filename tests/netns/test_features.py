"""Feature probes: what the kernel can do, found from inside the netns, leaving nothing behind."""

from __future__ import annotations

import subprocess

import pytest

from noderedirect.host import MissingFeature

pytestmark = pytest.mark.netns


def _iproute2_has(netns_factory, kind: str, *args: str) -> bool:
    """Independent answer from iproute2, in a scratch netns of its own."""
    ns = netns_factory("probe")
    cp = subprocess.run(["ip", "-n", ns.spec, "link", "add", "x", "type", kind, *args],
                        capture_output=True, text=True)
    return cp.returncode == 0


def test_features_match_the_kernel_and_leave_nothing(host, netns, netns_factory):
    f = host.features()
    assert f.geneve is _iproute2_has(netns_factory, "geneve", "id", "1", "remote", "127.0.0.1")
    assert f.vxlan is _iproute2_has(netns_factory, "vxlan", "id", "1", "dstport", "4789")
    # the tools and modules this project's environment provides (kernel-notes §1)
    assert (f.tuntap, f.ipset, f.iptables_nft, f.iptables_legacy, f.nft_bindings, f.tproxy) == \
        (True, True, True, True, True, True)
    assert host.features() is f          # probed once per Host
    # no probe object survives: links, sets, nft tables, iptables tables
    assert [l.name for l in host.links()] == ["lo"]
    assert host.run(["ipset", "list", "-n"]).stdout == ""
    assert host.nft("list tables") == ""
    assert host.run(["iptables-legacy-save"]).stdout == ""


def test_missing_geneve_is_one_line_naming_the_alternatives(host, netns):
    f = host.features()
    if f.geneve:
        pytest.skip("this kernel has GENEVE; the missing-feature path cannot be exercised")
    assert "Unknown device type" in f.reason("geneve") or "not supported" in f.reason("geneve")

    with pytest.raises(MissingFeature) as by_require:
        host.require("geneve")
    with pytest.raises(MissingFeature) as by_kernel:
        # the kernel's EOPNOTSUPP for a real link request becomes the same kind of error
        host.link_add("istioin", "geneve", geneve_id=1000, geneve_remote="10.244.1.2", geneve_port=6081)
    for e in (by_require.value, by_kernel.value):
        msg = str(e)
        assert "\n" not in msg
        assert msg.startswith(f"kernel GENEVE links are not available in netns {netns.spec}")
        assert msg.endswith("use --tunnel usergeneve (GENEVE over TAP in user space) or --tunnel vxlan")
        assert e.feature == "geneve"
    assert "Operation not supported" in str(by_kernel.value)
    assert host.link("istioin") is None

    host.require("vxlan")               # present: no error
    with pytest.raises(ValueError):
        host.require("warp-drive")

