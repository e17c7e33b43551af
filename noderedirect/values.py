"""Load and validate a values file (YAML): the only way values reach templates.

Validation is strict and happens before anything is rendered. Every value that can end up in
rule text is checked against a narrow shape (address, interface name, port, UID …), so no value
can inject extra rule text. The first problem found is raised as :class:`ValuesError`, which
names the key and the offending value in one line.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Optional

import yaml

from . import names
from .model import NodeParams, Pod, Values, Version

LEGACY_VERSIONS = ("1.18", "1.19", "1.20")
INPOD_VERSIONS = ("1.21", "1.22", "1.23", "1.24", "1.25", "1.26", "1.27", "1.28", "1.29", "1.30")

_IFNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")
_UID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")


class ValuesError(ValueError):
    """A bad value: ``key`` is the dotted path in the values file."""

    def __init__(self, key: str, value: Any, reason: str):
        self.key, self.value, self.reason = key, value, reason
        super().__init__(f"{key}: {value!r} {reason}")


def ipv4(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValuesError(key, value, "is not an IPv4 address (expected a string such as 10.244.1.5)")
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        raise ValuesError(key, value, "is not an IPv4 address") from None
    if addr.version != 4:
        raise ValuesError(key, value, "is IPv6; this field needs IPv4 (the legacy design is IPv4 only)")
    if str(addr) != value:
        raise ValuesError(key, value, f"is not in canonical form (write {addr})")
    return value


def ipv6(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValuesError(key, value, "is not an IPv6 address")
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        raise ValuesError(key, value, "is not an IPv6 address") from None
    if addr.version != 6:
        raise ValuesError(key, value, "is IPv4; this field needs IPv6")
    return str(addr)


def cidr4(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValuesError(key, value, "is not an IPv4 CIDR (expected e.g. 10.244.1.0/24)")
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError as e:
        raise ValuesError(key, value, f"is not an IPv4 CIDR ({e})") from None
    if net.version != 4:
        raise ValuesError(key, value, "is IPv6; this field needs an IPv4 CIDR")
    return str(net)


def ifname(key: str, value: Any) -> str:
    if not isinstance(value, str) or not _IFNAME.match(value):
        if isinstance(value, str) and len(value) > 15:
            raise ValuesError(key, value, "is longer than 15 characters (the kernel's limit for interface names)")
        raise ValuesError(key, value, "is not an interface name (letters, digits, '_', '.', '-'; at most 15)")
    return value


def port(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValuesError(key, value, "is not a port number (1-65535)")
    return value


def boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValuesError(key, value, "is not true or false")
    return value


def uid(key: str, value: Any) -> str:
    if not isinstance(value, str) or not _UID.match(value):
        raise ValuesError(key, value, "is not a pod UID (letters, digits, '-', '_', '.'; no spaces or quotes)")
    return value


def dns_name(key: str, value: Any, label: bool = False) -> str:
    pat = _DNS_LABEL if label else _DNS_SUBDOMAIN
    if not isinstance(value, str) or not pat.match(value):
        kind = "DNS label" if label else "DNS subdomain"
        raise ValuesError(key, value, f"is not a Kubernetes name ({kind}: lower-case letters, digits, '-')")
    return value


def version(key: str, value: Any, allowed: tuple[str, ...]) -> Version:
    text = str(value) if isinstance(value, (str, float, int)) and not isinstance(value, bool) else None
    # YAML reads 1.20 as the float 1.2: insist on a string so the era is never misread
    if isinstance(value, float):
        raise ValuesError(key, value, 'must be quoted (YAML reads 1.20 as 1.2): write "1.20"')
    if text is None or text not in allowed:
        raise ValuesError(key, value, f"is not a supported Istio version ({', '.join(allowed)})")
    return Version(text)


class _Section:
    """A mapping whose unknown keys are an error (typos must not pass silently)."""

    def __init__(self, key: str, data: Any, allowed: set[str]):
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ValuesError(key or "<top>", data, "must be a mapping")
        for k in data:
            if k not in allowed:
                where = f"{key}.{k}" if key else str(k)
                raise ValuesError(where, data[k], f"is not a known key (known: {', '.join(sorted(allowed))})")
        self.key, self.data = key, data

    def path(self, k: str) -> str:
        return f"{self.key}.{k}" if self.key else k

    def get(self, k: str, default: Any = None) -> Any:
        return self.data.get(k, default)

    def need(self, k: str) -> Any:
        if k not in self.data or self.data[k] is None:
            raise ValuesError(self.path(k), None, "is required")
        return self.data[k]


def parse(data: Any, source: str = "<values>", *, istio_version: Optional[str] = None,
          inpod_version: Optional[str] = None) -> Values:
    """Validate a loaded YAML document; ``istio_version`` overrides ``istioVersion``."""
    top = _Section("", data, {"node", "ztunnel", "geneve", "dnsCapture", "istioVersion",
                              "ipset", "inpod", "pods"})
    node = _Section("node", top.need("node"), {"name", "internalIP", "podCIDR", "hostIP"})
    zt = _Section("ztunnel", top.need("ztunnel"), {"ip", "veth", "interface", "tunnelHostIP"})
    gen = _Section("geneve", top.get("geneve"), {"dstPort"})
    ips = _Section("ipset", top.get("ipset"), {"comments"})
    inp = _Section("inpod", top.get("inpod"), {"istioVersion", "ipv6", "probeSNATv4", "probeSNATv6"})

    node_name = dns_name("node.name", node.need("name"))
    pod_cidr = cidr4("node.podCIDR", node.need("podCIDR"))
    internal_ip = ipv4("node.internalIP", node.need("internalIP"))
    net = ipaddress.ip_network(pod_cidr)
    if node.get("hostIP") is not None:
        host_ip = ipv4("node.hostIP", node.get("hostIP"))
        host_src = "values"
    else:
        # legacy GetHostIP: first local address inside podCIDR (kind's gateway .1). Pure code
        # cannot look at interfaces, so assume the first host address; apply re-derives it.
        host_ip = str(net.network_address + 1)
        host_src = "derived: first address of node.podCIDR"
    zt_ip = ipv4("ztunnel.ip", zt.need("ip"))
    zt_veth = ifname("ztunnel.veth", zt.need("veth"))
    zt_if = ifname("ztunnel.interface", zt.get("interface", "eth0"))
    tun_host = ipv4("ztunnel.tunnelHostIP", zt.get("tunnelHostIP", host_ip))
    gport = port("geneve.dstPort", gen.get("dstPort", names.GENEVE_DEFAULT_PORT))
    dns = boolean("dnsCapture", top.get("dnsCapture", False))
    ver = version("istioVersion", istio_version if istio_version is not None
                  else top.get("istioVersion", "1.20"), LEGACY_VERSIONS)
    if istio_version is not None and ver < "1.19" and gport != names.GENEVE_DEFAULT_PORT:
        raise ValuesError("geneve.dstPort", gport, "cannot be changed before Istio 1.19 (1.18 always used 6081)")
    comments = boolean("ipset.comments", ips.get("comments", True))
    iver = version("inpod.istioVersion", inpod_version if inpod_version is not None
                   else inp.get("istioVersion", "1.29"), INPOD_VERSIONS)
    ipv6_on = boolean("inpod.ipv6", inp.get("ipv6", False))
    probe4 = ipv4("inpod.probeSNATv4", inp.get("probeSNATv4", names.INPOD_PROBE_SNAT_V4))
    probe6 = ipv6("inpod.probeSNATv6", inp.get("probeSNATv6", names.INPOD_PROBE_SNAT_V6))

    if zt_ip == host_ip:
        raise ValuesError("ztunnel.ip", zt_ip, "equals the node's HostIP")
    for key, addr in (("ztunnel.ip", zt_ip),):
        for tnet in (names.TUN_IN_NET, names.TUN_OUT_NET):
            if ipaddress.ip_address(addr) in tnet:
                raise ValuesError(key, addr, f"collides with the tunnel subnet {tnet}")

    pods = _pods(top.get("pods", []), zt_ip, host_ip)
    params = NodeParams(
        node_name=node_name, pod_cidr=pod_cidr, internal_ip=internal_ip, host_ip=host_ip,
        host_ip_source=host_src, ztunnel_ip=zt_ip, ztunnel_veth=zt_veth, ztunnel_if=zt_if,
        tun_host_ip=tun_host, geneve_port=gport, dns_capture=dns, istio_version=ver,
        ipset_comments=comments, inpod_version=iver, inpod_ipv6=ipv6_on, probe_snat_v4=probe4,
        probe_snat_v6=probe6, tun_host_ip_explicit=zt.get("tunnelHostIP") is not None,
        geneve_port_explicit=gen.get("dstPort") is not None,
    )
    return Values(node=params, pods=pods, source=source)


def _pods(data: Any, zt_ip: str, host_ip: str) -> tuple[Pod, ...]:
    if data is None:
        return ()
    if not isinstance(data, list):
        raise ValuesError("pods", data, "must be a list")
    out: list[Pod] = []
    seen_ip: dict[str, str] = {}
    seen_uid: dict[str, str] = {}
    seen_name: set[tuple[str, str]] = set()
    for i, raw in enumerate(data):
        k = f"pods[{i}]"
        p = _Section(k, raw, {"namespace", "name", "uid", "ip", "ip6", "veth", "dnsCapture",
                              "ingress", "virtualInterfaces"})
        ns = dns_name(f"{k}.namespace", p.need("namespace"), label=True)
        name = dns_name(f"{k}.name", p.need("name"))
        u = uid(f"{k}.uid", p.need("uid"))
        ip = ipv4(f"{k}.ip", p.need("ip"))
        ip6 = ipv6(f"{k}.ip6", p.get("ip6")) if p.get("ip6") is not None else None
        veth = ifname(f"{k}.veth", p.get("veth")) if p.get("veth") is not None else None
        dns = boolean(f"{k}.dnsCapture", p.get("dnsCapture")) if p.get("dnsCapture") is not None else None
        ingress = boolean(f"{k}.ingress", p.get("ingress", False))
        vis = p.get("virtualInterfaces", []) or []
        if not isinstance(vis, list):
            raise ValuesError(f"{k}.virtualInterfaces", vis, "must be a list of interface names")
        vis_t = tuple(ifname(f"{k}.virtualInterfaces[{j}]", v) for j, v in enumerate(vis))
        if ip in (zt_ip, host_ip):
            raise ValuesError(f"{k}.ip", ip, "is the ztunnel or host address, not a pod address")
        if ip in seen_ip:
            raise ValuesError(f"{k}.ip", ip, f"is also the IP of {seen_ip[ip]} (duplicate pod IP)")
        if u in seen_uid:
            raise ValuesError(f"{k}.uid", u, f"is also the UID of {seen_uid[u]} (duplicate pod UID)")
        if (ns, name) in seen_name:
            raise ValuesError(f"{k}.name", name, f"is listed twice in namespace {ns}")
        seen_ip[ip] = seen_uid[u] = f"{ns}/{name}"
        seen_name.add((ns, name))
        out.append(Pod(namespace=ns, name=name, uid=u, ip=ip, dns_capture=dns, ingress=ingress,
                       virtual_interfaces=vis_t, ip6=ip6, veth=veth))
    return tuple(out)


def load(path: str, **overrides: Optional[str]) -> Values:
    """Read and validate a values file. Raises ValuesError (bad value) or OSError (unreadable)."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "?"
        raise ValuesError(f"<yaml {where}>", path, f"is not valid YAML ({getattr(e, 'problem', e)})") from None
    return parse(data, source=path, **overrides)
