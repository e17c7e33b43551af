"""Every kernel name and number noderedirect uses, in one place, plus the is-ours predicates.

Templates in rules/ refer to these by variable (``${MARK_OUTBOUND}``), never by value, so a
mark or table id lives here only. Ownership is readable from the kernel alone: a restarted
process recognises its objects by these names and numbers, nothing else.
"""

from __future__ import annotations

import ipaddress

# ---------------------------------------------------------------- legacy: node netns (legacy-mode.md §1, §3.1)
IPSET = "ztunnel-pods-ips"
CHAIN_PREFIX = "ztunnel-"

MARK_OUTBOUND = 0x100    # TCP from an enrolled pod -> table 101 -> istioout
MARK_SKIP = 0x200        # route by the main table, never capture
MARK_CONNSKIP = 0x220    # skip, and remember it for the connection (connmark)
MARK_PROXY = 0x210       # spoofed-source packet leaving ztunnel; remember the connection
MARK_PROXYRET = 0x040    # other side of a "proxy" connection -> table 102 -> ztunnel veth
MARK_WHOLE = 0xFFFFFFFF  # a MARK without mask replaces the whole 32-bit mark

TABLE_INBOUND = 100
TABLE_OUTBOUND = 101
TABLE_PROXY = 102

PRIO_SKIP = 100
PRIO_OUTBOUND = 101
PRIO_PROXYRET = 102
PRIO_INBOUND = 103
PRIO_MAIN = 32766        # the kernel's standard "lookup main" rule; rule 100 jumps (goto) to it

LINK_IN = "istioin"
LINK_OUT = "istioout"
VNI_IN = 1000
VNI_OUT = 1001
TUN_IN_NET = ipaddress.IPv4Network("192.168.126.0/30")
TUN_OUT_NET = ipaddress.IPv4Network("192.168.127.0/30")
TUN_PREFIXLEN = TUN_IN_NET.prefixlen
TUN_IN_NODE = TUN_IN_NET.network_address + 1      # 192.168.126.1 on istioin
TUN_IN_ZTUNNEL = TUN_IN_NET.network_address + 2   # 192.168.126.2 on pistioin
TUN_OUT_NODE = TUN_OUT_NET.network_address + 1    # 192.168.127.1 on istioout
TUN_OUT_ZTUNNEL = TUN_OUT_NET.network_address + 2  # 192.168.127.2 on pistioout
GENEVE_DEFAULT_PORT = 6081
# The VXLAN tunnel stand-in's outer-source check (kernel-notes.md §9): a chain of ours hooked
# into filter INPUT, because VXLAN, unlike GENEVE, accepts packets from any outer source.
CHAIN_TUNNEL = CHAIN_PREFIX + "TUNNEL"

# ---------------------------------------------------------------- legacy: ztunnel netns (legacy-mode.md §2, §3.2)
PLINK_IN = "pistioin"
PLINK_OUT = "pistioout"
ZT_MARK_MASK = 0xFFF
ZT_MARK_TPROXY = 0x400   # TPROXY'd packet: deliver locally
ZT_MARK_ORGSRC = 0x4D3   # reply to a spoofed-source socket: deliver locally
ZT_TABLE_LOCAL = 100
ZT_TABLE_OUT = 101       # populated but unused since 1.18 (W22), kept for fidelity
ZT_TABLE_IN = 102        # idem
ZT_PRIO_TPROXY = 20000
ZT_PRIO_ORGSRC = 20003

PORT_OUTBOUND = 15001
PORT_INBOUND = 15006
PORT_HBONE = 15008
PORT_DNS = 15053
LOOPBACK_V4 = "127.0.0.1"

# ---------------------------------------------------------------- in-pod mode (inpod-mode.md §1)
INPOD_MARK = 0x539           # ztunnel's SO_MARK 1337
INPOD_TPROXY_MARK = 0x111    # connmark / fwmark for return routing
INPOD_MASK = 0xFFF
INPOD_RESTORE_MASK = 0xFFFFFFFF
INPOD_TABLE = 100
INPOD_PRIO = 32764
INPOD_CHAIN_PRERT = "ISTIO_PRERT"
INPOD_CHAIN_OUTPUT = "ISTIO_OUTPUT"
INPOD_CHAIN_POSTRT = "ISTIO_POSTRT"
INPOD_CHAIN_PREFIX = "ISTIO_"
INPOD_PROBE_SNAT_V4 = "169.254.7.127"
INPOD_PROBE_SNAT_V6 = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"
INPOD_IPSET_V4 = "istio-inpod-probes-v4"
INPOD_IPSET_V6 = "istio-inpod-probes-v6"
INPOD_IPSET_OLD = "istio-inpod-probes"   # 1.21-1.22
INPOD_DNS_ZONE = 1

# ---------------------------------------------------------------- iptables
BUILTIN_CHAINS = {
    "raw": ("PREROUTING", "OUTPUT"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
}
BUILTIN_TARGETS = frozenset(
    {"INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING", "ACCEPT", "RETURN", "DROP"}
)
TABLE_ORDER = ("raw", "mangle", "nat", "filter")
# owned chains that exist on purpose with no rules: legacy mangle ztunnel-POSTROUTING (W22), and
# in-pod nat ISTIO_PRERT in ingress mode (declared by the jump alone), and in-pod mangle
# ISTIO_PRERT in ingress mode of 1.24-1.28 (its only rule was dropped there). Any other jump to
# an empty chain is a template mistake.
EMPTY_CHAINS_ALLOWED = frozenset({("mangle", CHAIN_PREFIX + "POSTROUTING"), ("nat", "ISTIO_PRERT"),
                                  ("mangle", "ISTIO_PRERT")})

# ---------------------------------------------------------------- native nftables rendering of the legacy design (docs/nft.md)
# One table per netns holds everything (set, base chains, regular chains); the table is the unit
# of ownership, replaced whole in one transaction.
NFT_FAMILY = "ip"
NFT_TABLE_NODE = "ztunnel-node"
NFT_TABLE_ZTUNNEL = "ztunnel-tproxy"   # the ztunnel pod's netns: its TPROXY rules (Z1-Z4)
NFT_TABLES = {"node": NFT_TABLE_NODE, "ztunnel": NFT_TABLE_ZTUNNEL}   # legacy role -> table
# iptables (table, built-in chain) -> nft base chain (type, hook, priority): the priorities of
# the iptables tables they replace (NF_IP_PRI_MANGLE -150, NF_IP_PRI_NAT_DST -100,
# NF_IP_PRI_FILTER 0, NF_IP_PRI_NAT_SRC 100). mangle OUTPUT re-routes on a mark change, which
# in nft only a "route" chain does.
NFT_BASE_CHAINS = {
    ("mangle", "PREROUTING"): ("filter", "prerouting", -150),
    ("mangle", "INPUT"): ("filter", "input", -150),
    ("mangle", "FORWARD"): ("filter", "forward", -150),
    ("mangle", "OUTPUT"): ("route", "output", -150),
    ("mangle", "POSTROUTING"): ("filter", "postrouting", -150),
    ("nat", "PREROUTING"): ("nat", "prerouting", -100),
    ("nat", "OUTPUT"): ("nat", "output", -100),
    ("nat", "INPUT"): ("nat", "input", 100),
    ("nat", "POSTROUTING"): ("nat", "postrouting", 100),
    ("filter", "INPUT"): ("filter", "input", 0),
    ("filter", "FORWARD"): ("filter", "forward", 0),
    ("filter", "OUTPUT"): ("filter", "output", 0),
}

# ---------------------------------------------------------------- rule ids
# The reference's numbering (legacy-mode.md §1.3, §2.5): letter per (netns role, table, chain),
# number = position in the chain (P1-P15, F1-F2, I1-I2, O1, N1-N2, NP1, FF1, Z1-Z4). nft comments,
# the tracer and the lab's observed paths all name rules with these.
RULE_ID_PREFIXES = {
    ("node", "mangle", f"{CHAIN_PREFIX}PREROUTING"): "P",
    ("node", "mangle", f"{CHAIN_PREFIX}FORWARD"): "F",
    ("node", "mangle", f"{CHAIN_PREFIX}INPUT"): "I",
    ("node", "mangle", f"{CHAIN_PREFIX}OUTPUT"): "O",
    ("node", "nat", f"{CHAIN_PREFIX}PREROUTING"): "N",
    ("node", "nat", f"{CHAIN_PREFIX}POSTROUTING"): "NP",
    ("node", "filter", f"{CHAIN_PREFIX}FORWARD"): "FF",
    ("ztunnel", "mangle", "PREROUTING"): "Z",
}
TUNNEL_RULE_PREFIX = "T"    # the VXLAN stand-in's outer-source check (not part of the original)

# ---------------------------------------------------------------- ownership
LEGACY_NODE_RULE_PRIOS = (PRIO_SKIP, PRIO_OUTBOUND, PRIO_PROXYRET, PRIO_INBOUND)
LEGACY_NODE_TABLES = (TABLE_INBOUND, TABLE_OUTBOUND, TABLE_PROXY)
LEGACY_ZTUNNEL_RULE_PRIOS = (ZT_PRIO_TPROXY, ZT_PRIO_ORGSRC)
LEGACY_ZTUNNEL_TABLES = (ZT_TABLE_LOCAL, ZT_TABLE_OUT, ZT_TABLE_IN)
OWNED_LINKS = frozenset({LINK_IN, LINK_OUT, PLINK_IN, PLINK_OUT})
OWNED_IPSETS = frozenset({IPSET, INPOD_IPSET_V4, INPOD_IPSET_V6, INPOD_IPSET_OLD})


def is_owned_chain(name: str) -> bool:
    """A chain is ours if it carries one of the original designs' prefixes."""
    return name.startswith(CHAIN_PREFIX) or name.startswith(INPOD_CHAIN_PREFIX)


def is_owned_nft_table(family: str, name: str) -> bool:
    """Exactly the tables the nft backend creates; any other ``ztunnel-*`` table is not ours."""
    return family == NFT_FAMILY and name in NFT_TABLES.values()


def is_owned_link(name: str) -> bool:
    return name in OWNED_LINKS


def is_owned_ipset(name: str) -> bool:
    """Ours, including the temporary twin used for an atomic swap (``<name>-tmp``)."""
    return name in OWNED_IPSETS or name.removesuffix("-tmp") in OWNED_IPSETS


def hexmark(value: int) -> str:
    """Marks the way iptables-save and ``ip rule`` print them: ``0x40``, not ``0x040``."""
    return f"{value:#x}"


def template_vars() -> dict[str, str]:
    """The constants templates may use, already formatted as rule text."""
    marks = {
        k: hexmark(v)
        for k, v in globals().items()
        if k.isupper() and isinstance(v, int) and ("MARK" in k or k.endswith("_MASK"))
    }
    plain = {
        k: str(v)
        for k, v in globals().items()
        if k.isupper() and k not in marks and isinstance(v, (int, str, ipaddress.IPv4Address,
                                                              ipaddress.IPv4Network))
    }
    return {**plain, **marks}
