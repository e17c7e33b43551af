"""Bulk paths: 1000 routes in one ``ip -batch``, 1000 set members in one ``ipset restore``.

Timings are printed (run with ``-s``); the bounds asserted are loose on purpose (kernel-notes
§10 measured ~22 ms and ~13 ms), to catch a per-entry process or netlink round trip, not noise.
"""

from __future__ import annotations

import ipaddress
import subprocess
import time

import pytest

from noderedirect.model import IpsetEntry, IpsetSet, Route

pytestmark = pytest.mark.netns

N = 1000
LOOSE_BOUND_S = 1.0


def pod_ips(n: int) -> list[str]:
    base = int(ipaddress.IPv4Address("10.245.0.1"))
    return [str(ipaddress.IPv4Address(base + i)) for i in range(n)]


def test_routes_batch_1000(host, netns):
    for args in (["link", "add", "veth-zt", "type", "veth", "peer", "name", "eth0"],
                 ["addr", "add", "10.244.1.1/32", "dev", "veth-zt"],
                 ["link", "add", "istioin", "type", "vxlan", "id", "1000", "remote", "10.244.1.2",
                  "dstport", "6081"],
                 ["addr", "add", "192.168.126.1/30", "dev", "istioin"],
                 ["link", "set", "istioin", "up"]):
        subprocess.run(["ip", "-n", netns.spec, *args], check=True)
    routes = [Route(table=100, dst=f"{ip}/32", via="192.168.126.2", dev="istioin", src="10.244.1.1")
              for ip in pod_ips(N)]

    t0 = time.monotonic()
    host.routes_batch(add=routes)
    add_s = time.monotonic() - t0
    t0 = time.monotonic()
    seen = host.routes(100)
    read_s = time.monotonic() - t0
    assert sorted(seen) == sorted(routes)

    t0 = time.monotonic()
    host.routes_batch(delete=routes[:500], add=[])
    del_s = time.monotonic() - t0
    assert sorted(host.routes(100)) == sorted(routes[500:])
    print(f"\nroutes_batch: add {N} in {add_s * 1000:.1f} ms, delete 500 in {del_s * 1000:.1f} ms; "
          f"routes(100) read {N} in {read_s * 1000:.1f} ms")
    assert add_s < LOOSE_BOUND_S and del_s < LOOSE_BOUND_S


def test_ipset_restore_1000(host):
    s = IpsetSet(name="ztunnel-pods-ips", hashsize=1024)
    entries = [IpsetEntry(set=s.name, ip=ip, comment=f"uid-{i:04d}") for i, ip in enumerate(pod_ips(N))]
    text = s.show() + "\n" + "".join(e.show() + "\n" for e in entries)

    t0 = time.monotonic()
    host.ipset_restore(text)
    restore_s = time.monotonic() - t0
    t0 = time.monotonic()
    got = host.ipsets()
    read_s = time.monotonic() - t0
    found_set, members = got[s.name]
    assert (found_set.name, found_set.type, found_set.family, found_set.comment) == \
        (s.name, s.type, s.family, True)
    assert sorted(members) == sorted(entries)
    print(f"\nipset_restore: {N} members in {restore_s * 1000:.1f} ms; ipsets() read in {read_s * 1000:.1f} ms")
    assert restore_s < LOOSE_BOUND_S
