"""GENEVE destination-port selection (legacy-mode.md §4.11), pure."""

from __future__ import annotations

import pytest

from noderedirect import model
from noderedirect.host import LinkInfo
from noderedirect.tunnels import geneve_port

ZT = "10.244.1.2"


def gen(name, vni=0, remote=None, port=6081, kind="geneve", external=None):
    return LinkInfo(name=name, index=10, kind=kind, up=True, vni=vni, remote=remote, dstport=port,
                    external=external if external is not None else (vni == 0 and remote is None))


@pytest.mark.parametrize("links, expected", [
    ([], 6081),
    ([LinkInfo(name="eth0", index=2, kind="veth", up=True)], 6081),
    # OVN-Kubernetes' flow-based device holds 6081
    ([gen("genev_sys_6081")], 6082),
    ([gen("genev_sys_6081"), gen("genev_sys_6082", port=6082)], 6083),
    # an external device elsewhere does not move us off 6081
    ([gen("genev_sys_7000", port=7000)], 6081),
    # a leftover twin of ours under another name, pointing at this ztunnel, holds its port
    ([gen("old-in", vni=1000, remote=ZT)], 6082),
    ([gen("old-out", vni=1001, remote=ZT)], 6082),
    ([gen("old-in", vni=1000, remote=ZT), gen("ext", port=6082)], 6083),
    # not reserved: another remote, another VNI, a VNI 0 device with a remote, a VXLAN device
    ([gen("other", vni=1000, remote="10.244.9.9")], 6081),
    ([gen("other", vni=5, remote=ZT)], 6081),
    ([gen("p2p", vni=0, remote="10.0.0.9")], 6081),
    ([gen("vx", kind="vxlan")], 6081),
    # our own links are skipped (the original had deleted them before choosing)
    ([gen("istioin", vni=1000, remote=ZT), gen("istioout", vni=1001, remote=ZT)], 6081),
    ([gen("pistioin", vni=1000, remote=ZT)], 6081),
    # order does not matter; holes are used
    ([gen("b", port=6083), gen("a", port=6081)], 6082),
])
def test_port(links, expected):
    assert geneve_port(links, ZT) == expected
    assert geneve_port(list(reversed(links)), ZT) == expected


def test_own_names_can_be_overridden():
    ours = [gen("istioin", vni=1000, remote=ZT)]
    assert geneve_port(ours, ZT) == 6081
    assert geneve_port(ours, ZT, own_names=frozenset()) == 6082


def test_accepts_model_links_and_dicts():
    assert geneve_port([model.Link("x", "geneve", 1000, ZT, 6081, "1.2.3.4/30")], ZT) == 6082
    assert geneve_port([{"name": "ext", "kind": "geneve", "vni": 0, "remote": None,
                         "dstport": 6081}], ZT) == 6082
