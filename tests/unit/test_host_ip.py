"""HostIP derivation (legacy-mode.md §4.12): first local address inside podCIDR, else InternalIP."""

from __future__ import annotations

from noderedirect.apply import derive_host_ip
from noderedirect.host import LinkInfo


def link(name, *addrs, index=[0]):
    index[0] += 1
    return LinkInfo(name=name, index=index[0], kind="veth", up=True, addresses=tuple(addrs))


def test_first_address_of_pod_cidr_in_interface_order():
    links = [link("eth0", "172.18.0.2/24"), link("veth1", "10.244.1.1/32"), link("veth9", "10.244.1.9/32")]
    assert derive_host_ip(links, "10.244.1.0/24", "172.18.0.2") == (
        "10.244.1.1", "derived: first address of podCIDR on the node (veth1)")
    # kernel order decides, not the numeric value (as the original's interface loop)
    assert derive_host_ip(list(reversed(links)), "10.244.1.0/24", "172.18.0.2")[0] == "10.244.1.1"
    later = [link("veth9", "10.244.1.9/32"), link("veth1", "10.244.1.1/32")]
    assert derive_host_ip(later, "10.244.1.0/24", "172.18.0.2")[0] == "10.244.1.9"


def test_falls_back_to_internal_ip_when_no_pod_cidr_address():
    links = [link("eth0", "172.18.0.2/24"), link("cni9", "10.99.0.1/24")]
    assert derive_host_ip(links, "10.244.1.0/24", "172.18.0.2") == (
        "172.18.0.2", "derived: node InternalIP (no address of podCIDR on the node)")


def test_addresses_of_other_cidrs_are_ignored():
    links = [link("veth1", "10.244.2.1/32"), link("veth2", "10.244.1.200/32")]
    assert derive_host_ip(links, "10.244.1.0/24", "172.18.0.2")[0] == "10.244.1.200"
