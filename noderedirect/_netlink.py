"""A bare netlink socket and the few message codecs :mod:`noderedirect.host` needs on hot paths.

pyroute2 builds a Python object per message and per attribute. For a dump of 1000 routes that is
~150 ms of Python for ~2 ms of kernel work, and pyroute2 also filters by table in Python after
dumping every table. The engine reads table 100 (one route per enrolled pod) on every plan and
verify, so those reads use this module instead: the kernel filters the dump by table
(``NETLINK_GET_STRICT_CHK``) and only the attributes the model needs are decoded.

Covered, nothing more: route dumps of one table, adding and deleting many routes in a few
datagrams (:meth:`Socket.batch`), deleting every route of one prefix (the kernel
echoes what it deleted), ``ip route get``, creating VXLAN/GENEVE links, setting a link up,
down or its MTU, adding and removing an address, link and IPv4 address dumps (the fields :class:`~noderedirect.host.LinkInfo`
carries), and finding one member (with its comment) of one ipset.

A socket belongs to the network namespace of the thread that creates it; :class:`Socket` is
created and used on a Host's netns worker thread only. Pure stdlib, no I/O besides the socket.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from typing import Iterator, NamedTuple, Optional

# ---------------------------------------------------------------- netlink (linux/netlink.h)
NETLINK_ROUTE = 0
NETLINK_NETFILTER = 12      # not in Python's socket module
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_ECHO = 0x8
NLM_F_DUMP = 0x300
NLM_F_REPLACE = 0x100       # new requests: replace what matches (`ip route replace`)
NLM_F_EXCL = 0x200          # new requests: fail if it exists (`ip route add`)
NLM_F_CREATE = 0x400
NLM_F_CAPPED = 0x100        # on an error message: the request payload is not echoed back
NLM_F_ACK_TLVS = 0x200      # on an error message: extended-ack attributes follow
NLMSGERR_ATTR_MSG = 1
NLA_F_NESTED = 0x8000
NLA_F_NET_BYTEORDER = 0x4000
NLA_TYPE_MASK = ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER) & 0xFFFF
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
NETLINK_GET_STRICT_CHK = 12

# ---------------------------------------------------------------- rtnetlink (linux/rtnetlink.h)
RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_GETLINK = 18
RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_GETADDR = 22
RTM_NEWROUTE = 24
RTM_NEWRULE = 32
FRA_GOTO = 4
FRA_PRIORITY = 6
FRA_FWMARK = 10
FRA_TABLE = 15
FRA_FWMASK = 16
RTM_DELROUTE = 25
RTM_GETROUTE = 26
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_PRIORITY = 6
RTA_PREFSRC = 7
RTA_MULTIPATH = 9
RTA_TABLE = 15
RT_TABLE_COMPAT = 252       # rtm_table when the real id (> 255) is only in RTA_TABLE
RT_SCOPE_NOWHERE = 255      # in a delete request: any scope
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_BROADCAST = 4
IFF_UP = 0x1
IFLA_IFNAME = 3
IFLA_MTU = 4
IFLA_LINK = 5
IFLA_LINKINFO = 18
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
IFLA_VXLAN_ID = 1
IFLA_VXLAN_GROUP = 2
IFLA_VXLAN_LEARNING = 7
IFLA_VXLAN_PORT = 15        # big-endian
IFLA_VXLAN_COLLECT_METADATA = 25
IFLA_GENEVE_ID = 1
IFLA_GENEVE_REMOTE = 2
IFLA_GENEVE_PORT = 5        # big-endian
IFLA_GENEVE_COLLECT_METADATA = 6   # a flag: present or not
IFLA_TUN_TYPE = 3

# ---------------------------------------------------------------- ipset (linux/netfilter/ipset/ip_set.h)
NFNL_SUBSYS_IPSET = 6
IPSET_CMD_LIST = 7
IPSET_PROTOCOL = 7
IPSET_ATTR_PROTOCOL = 1
IPSET_ATTR_SETNAME = 2
IPSET_ATTR_DATA = 7
IPSET_ATTR_ADT = 8
IPSET_ATTR_IP = 1
IPSET_ATTR_IPADDR_IPV4 = 1
IPSET_ATTR_IPADDR_IPV6 = 2
IPSET_ATTR_COMMENT = 26

_NLMSGHDR = struct.Struct("=IHHII")
_NLA = struct.Struct("=HH")
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTNEXTHOP = struct.Struct("=HBBi")
_NFGENMSG = struct.Struct("=BBH")
_IFINFOMSG = struct.Struct("=BxHiII")
_IFADDRMSG = struct.Struct("=BBBBI")
_BE16 = struct.Struct(">H")
_U32 = struct.Struct("=I")
_I32 = struct.Struct("=i")

# Dump replies are at most ~32 KiB per datagram (the kernel caps its dump buffers there);
# anything larger than this buffer is reported, never silently truncated.
RECV_BUFFER = 1 << 18
# requests per datagram in Socket.batch: 256 routes are ~20 KiB, and even if every one of them
# is refused the answers (error code, header, the kernel's message) fit a receive buffer
BATCH_CHUNK = 256


class NetlinkReplyError(OSError):
    """The kernel answered a request with an error (``errno``) and, if it said why, a message."""

    def __init__(self, code: int, message: str = ""):
        super().__init__(code, message or os.strerror(code))
        self.code = code


# ---------------------------------------------------------------- attributes


def attrs(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """``(type, payload start, payload end)`` for each attribute in ``data[start:end]``."""
    while start + 4 <= end:
        length, kind = _NLA.unpack_from(data, start)
        if length < 4:
            return
        yield kind & NLA_TYPE_MASK, start + 4, start + length
        start += (length + 3) & ~3


def spans(data: bytes, start: int, end: int) -> dict[int, tuple[int, int]]:
    """Attribute type -> (payload start, end); for messages whose attributes do not repeat."""
    return {kind: (s, e) for kind, s, e in attrs(data, start, end)}


def nla(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return _NLA.pack(length, kind) + payload + b"\0" * (-length % 4)


def _cstring(data: bytes, start: int, end: int) -> str:
    return data[start:end].split(b"\0", 1)[0].decode("utf-8", "replace")


# ---------------------------------------------------------------- the socket


class Message(NamedTuple):
    type: int
    data: bytes
    start: int      # first byte after the netlink header
    end: int


class Socket:
    """One netlink socket, in the netns of the thread that made it. Not thread-safe."""

    def __init__(self, protocol: int, strict: bool = False):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
        self.strict = False
        try:
            for opt in (NETLINK_CAP_ACK, NETLINK_EXT_ACK):
                self.sock.setsockopt(SOL_NETLINK, opt, 1)
            if strict:
                # kernel-side filtering of dumps (4.20+); without it the kernel dumps every table
                # and the callers' own table filter does the work
                self.sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
                self.strict = True
        except OSError:
            pass
        self.sock.bind((0, 0))
        self._seq = 0
        self._buf = bytearray(RECV_BUFFER)

    def close(self) -> None:
        self.sock.close()

    def request(self, mtype: int, flags: int, payload: bytes) -> list[Message]:
        """Send one request; return its replies up to the ACK (requests) or DONE (dumps).

        Raises :class:`NetlinkReplyError` when the kernel refuses it.
        """
        self._seq += 1
        seq = self._seq
        self.sock.send(_NLMSGHDR.pack(16 + len(payload), mtype, flags, seq, 0) + payload)
        out: list[Message] = []
        while True:
            for rtype, rflags, rseq, data, off, end in read_datagram(self.sock, self._buf):
                if rseq != seq:          # a late reply to an abandoned request
                    continue
                if rtype == NLMSG_ERROR:
                    _raise_error(data, off, end, rflags, done=False)
                    return out           # error 0: the ACK
                if rtype == NLMSG_DONE:
                    if end - off >= 20:
                        _raise_error(data, off, end, rflags, done=True)
                    return out
                out.append(Message(rtype, data, off + 16, end))

    def batch(self, requests: "list[tuple[int, int, bytes]]", chunk: int = BATCH_CHUNK
              ) -> list[tuple[int, "NetlinkReplyError"]]:
        """Send many ``(type, flags, payload)`` requests, ``chunk`` to a datagram, and return
        ``(index, error)`` for each one the kernel refused (empty: all done).

        The kernel handles the messages of a datagram one after the other and answers each
        failure whatever the request's flags, so only the last message of a datagram asks
        for an ACK: once that one is answered, every message before it has been handled and
        its errors, if any, have arrived. A refused request does not stop the ones after it.
        """
        refused: list[tuple[int, NetlinkReplyError]] = []
        for first in range(0, len(requests), chunk):
            part = requests[first:first + chunk]
            seq0 = self._seq + 1
            self._seq += len(part)
            last = self._seq
            buf = bytearray()
            for i, (mtype, flags, payload) in enumerate(part):
                if i == len(part) - 1:
                    flags |= NLM_F_ACK
                buf += _NLMSGHDR.pack(16 + len(payload), mtype, flags | NLM_F_REQUEST, seq0 + i, 0)
                buf += payload
            self.sock.send(buf)
            refused += [(first + seq - seq0, err) for seq, err in self._answers(seq0, last)]
        return refused

    def _answers(self, seq0: int, last: int) -> list[tuple[int, "NetlinkReplyError"]]:
        """The errors for sequence numbers ``seq0..last``, read until ``last`` is answered."""
        out: list[tuple[int, NetlinkReplyError]] = []
        while True:
            for rtype, rflags, rseq, data, off, end in read_datagram(self.sock, self._buf):
                if rtype == NLMSG_ERROR and seq0 <= rseq <= last:
                    try:
                        _raise_error(data, off, end, rflags, done=False)
                    except NetlinkReplyError as e:
                        out.append((rseq, e))
                    if rseq == last:
                        return out


def read_datagram(sock: socket.socket, buf: bytearray) -> Iterator[tuple[int, int, int, bytes, int, int]]:
    """Receive one datagram into ``buf``; yield ``(type, flags, seq, data, start, end)`` per
    message in it (``start``: its header). A datagram larger than ``buf`` is an error, never
    silently truncated."""
    n = sock.recv_into(buf, 0, socket.MSG_TRUNC)
    if n > len(buf):
        raise NetlinkReplyError(errno.EMSGSIZE, f"netlink reply of {n} bytes exceeds the {len(buf)} byte buffer")
    data = bytes(buf[:n])
    off = 0
    while off + 16 <= n:
        length, rtype, rflags, rseq, _ = _NLMSGHDR.unpack_from(data, off)
        if length < 16:
            return
        yield rtype, rflags, rseq, data, off, min(off + length, n)
        off += (length + 3) & ~3


def _raise_error(data: bytes, off: int, end: int, flags: int, done: bool) -> None:
    code = -_I32.unpack_from(data, off + 16)[0]
    if code <= 0:
        return
    message = ""
    if flags & NLM_F_ACK_TLVS:
        # DONE: the error code, then TLVs. ERROR: the error code, the request's header (its
        # payload too unless NETLINK_CAP_ACK took effect), then TLVs
        first = off + 20
        if not done:
            first += 16 if flags & NLM_F_CAPPED else _U32.unpack_from(data, off + 20)[0]
        found = spans(data, first, end).get(NLMSGERR_ATTR_MSG)
        if found:
            message = _cstring(data, *found)
    raise NetlinkReplyError(code, message)


# ---------------------------------------------------------------- routes


class RawRoute(NamedTuple):
    """One route message, decoded as far as :class:`noderedirect.model.Route` needs."""

    family: int             # AF_INET / AF_INET6
    table: int
    dst: str                # address only; the prefix length is dst_len
    dst_len: int
    type: int
    scope: int
    protocol: int
    flags: int              # rtm_flags, or-ed with the first next hop's flags for multipath
    gateway: Optional[str]
    oif: Optional[int]
    prefsrc: Optional[str]
    priority: Optional[int]
    multipath: bool


def _table_fields(table: int) -> tuple[int, bytes]:
    return (table if table < 256 else RT_TABLE_COMPAT), nla(RTA_TABLE, _U32.pack(table))


def route_dump_request(af: int, table: int) -> bytes:
    """RTM_GETROUTE payload for a dump of one table (only table/oif may be set in strict mode)."""
    rtm_table, table_attr = _table_fields(table)
    return _RTMSG.pack(af, 0, 0, 0, rtm_table, 0, 0, 0, 0) + table_attr


def route_delete_request(af: int, dst: bytes, dst_len: int, table: int) -> bytes:
    """RTM_DELROUTE payload matching any route of exactly this prefix in this table: type,
    protocol and scope left open, no next hop given (the kernel treats those as wildcards)."""
    rtm_table, table_attr = _table_fields(table)
    return (_RTMSG.pack(af, dst_len, 0, 0, rtm_table, 0, RT_SCOPE_NOWHERE, 0, 0)
            + nla(RTA_DST, dst) + table_attr)


def route_request(af: int, dst: bytes, dst_len: int, table: int, rtype: int, scope: int,
                  protocol: int, flags: int, gateway: Optional[bytes], oif: Optional[int],
                  prefsrc: Optional[bytes]) -> bytes:
    """RTM_NEWROUTE / RTM_DELROUTE payload for one route, every field given (a delete with the
    same fields removes exactly that route: scope, type and next hop must match)."""
    rtm_table, table_attr = _table_fields(table)
    out = _RTMSG.pack(af, dst_len, 0, 0, rtm_table, protocol, scope, rtype, flags) + table_attr
    if dst_len:
        out += nla(RTA_DST, dst)
    if prefsrc:
        out += nla(RTA_PREFSRC, prefsrc)
    if gateway:
        out += nla(RTA_GATEWAY, gateway)
    if oif is not None:
        out += nla(RTA_OIF, _U32.pack(oif))
    return out


def route_request_around_dst(af: int, dst_len: int, table: int, rtype: int, scope: int,
                             protocol: int, flags: int, gateway: Optional[bytes],
                             oif: Optional[int], prefsrc: Optional[bytes]) -> tuple[bytes, bytes]:
    """``(head, tail)`` with ``head + dst + tail == route_request(…, dst, …)`` for any ``dst``
    of the family's length: routes that differ only in their destination (one per pod) share
    one head and tail, and each request is then two concatenations."""
    if not dst_len:
        return route_request(af, b"", 0, table, rtype, scope, protocol, flags, gateway, oif, prefsrc), b""
    size = 4 if af == socket.AF_INET else 16
    whole = route_request(af, bytes(size), dst_len, table, rtype, scope, protocol, flags, gateway,
                          oif, prefsrc)
    at = _RTMSG.size + 8 + 4          # rtmsg, RTA_TABLE, then RTA_DST's own header
    return whole[:at], whole[at + size:]


def rule_request(af: int, priority: int, action: int, table: Optional[int], goto: Optional[int],
                 fwmark: Optional[int], fwmask: Optional[int]) -> bytes:
    """RTM_NEWRULE payload (fib_rule_hdr has rtmsg's layout): a priority, an action (lookup a
    table or goto a priority) and optionally a mark/mask selector; nothing else."""
    rtm_table = 0
    out = b""
    if table is not None:
        rtm_table = table if table < 256 else RT_TABLE_COMPAT
        out += nla(FRA_TABLE, _U32.pack(table))
    out += nla(FRA_PRIORITY, _U32.pack(priority))
    if goto is not None:
        out += nla(FRA_GOTO, _U32.pack(goto))
    if fwmark is not None:
        out += nla(FRA_FWMARK, _U32.pack(fwmark))
    if fwmask is not None:
        out += nla(FRA_FWMASK, _U32.pack(fwmask))
    return _RTMSG.pack(af, 0, 0, 0, rtm_table, 0, 0, action, 0) + out


def decode_route(msg: Message) -> RawRoute:
    """One RTM_NEWROUTE/RTM_DELROUTE message. Written as one flat loop: it runs once per route
    of a dump (1000 routes: ~3 ms; a generic attribute dict per route doubled that)."""
    data, start, end = msg.data, msg.start, msg.end
    af, dst_len, _src_len, _tos, table, proto, scope, rtype, flags = _RTMSG.unpack_from(data, start)
    dst = gateway = prefsrc = b""
    oif = priority = None
    hops: Optional[tuple[int, int]] = None
    pos = start + _RTMSG.size
    while pos + 4 <= end:
        length, kind = _NLA.unpack_from(data, pos)
        if length < 4:
            break
        kind &= NLA_TYPE_MASK
        if kind == RTA_DST:
            dst = data[pos + 4:pos + length]
        elif kind == RTA_GATEWAY:
            gateway = data[pos + 4:pos + length]
        elif kind == RTA_OIF:
            oif = _I32.unpack_from(data, pos + 4)[0]
        elif kind == RTA_PREFSRC:
            prefsrc = data[pos + 4:pos + length]
        elif kind == RTA_TABLE:
            table = _U32.unpack_from(data, pos + 4)[0]
        elif kind == RTA_PRIORITY:
            priority = _U32.unpack_from(data, pos + 4)[0]
        elif kind == RTA_MULTIPATH:
            hops = (pos + 4, pos + length)
        pos += (length + 3) & ~3
    if hops and hops[1] - hops[0] >= _RTNEXTHOP.size:
        # the model has no multipath routes: the first hop stands for the route
        hop_len, hop_flags, _, oif = _RTNEXTHOP.unpack_from(data, hops[0])
        found = spans(data, hops[0] + _RTNEXTHOP.size, hops[0] + hop_len).get(RTA_GATEWAY)
        gateway = data[found[0]:found[1]] if found else b""
        flags |= hop_flags
    ntop = socket.inet_ntop
    return RawRoute(af, table, ntop(af, dst) if dst else ("0.0.0.0" if af == socket.AF_INET else "::"),
                    dst_len, rtype, scope, proto, flags, ntop(af, gateway) if gateway else None, oif,
                    ntop(af, prefsrc) if prefsrc else None, priority, hops is not None)


# ---------------------------------------------------------------- links and addresses


class RawLink(NamedTuple):
    index: int
    name: str
    flags: int              # ifi_flags (IFF_UP, IFF_LOOPBACK …)
    kind: Optional[str]     # IFLA_INFO_KIND
    mtu: Optional[int]
    link: Optional[int]     # IFLA_LINK (a veth's peer ifindex)
    vni: Optional[int] = None
    remote: Optional[str] = None
    dstport: Optional[int] = None
    external: bool = False
    tun_type: Optional[int] = None


def link_dump_request() -> bytes:
    return _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)


def addr_dump_request(af: int) -> bytes:
    return _IFADDRMSG.pack(af, 0, 0, 0, 0)


def link_create_request(name: str, kind: str, data: bytes) -> bytes:
    """RTM_NEWLINK payload creating ``name`` of ``kind`` with IFLA_INFO_DATA ``data``."""
    info = nla(IFLA_INFO_KIND, kind.encode()) + nla(IFLA_INFO_DATA | NLA_F_NESTED, data)
    return (_IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + nla(IFLA_IFNAME, name.encode() + b"\0")
            + nla(IFLA_LINKINFO | NLA_F_NESTED, info))


def link_change_request(index: int, kind: str, data: bytes) -> bytes:
    """RTM_NEWLINK payload changing the type-specific ``data`` of the existing link ``index``
    (the driver's changelink: only what it allows to change, e.g. a tunnel's remote)."""
    info = nla(IFLA_INFO_KIND, kind.encode()) + nla(IFLA_INFO_DATA | NLA_F_NESTED, data)
    return _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0) + nla(IFLA_LINKINFO | NLA_F_NESTED, info)


def tunnel_remote_data(kind: str, remote: bytes) -> bytes:
    """IFLA_INFO_DATA that sets only the remote of a VXLAN or GENEVE device."""
    return nla(IFLA_VXLAN_GROUP if kind == "vxlan" else IFLA_GENEVE_REMOTE, remote)


def vxlan_data(vni: int, remote: Optional[bytes], port: Optional[int], learning: Optional[int]) -> bytes:
    out = nla(IFLA_VXLAN_ID, _U32.pack(vni))
    if remote is not None:
        out += nla(IFLA_VXLAN_GROUP, remote)
    if learning is not None:
        out += nla(IFLA_VXLAN_LEARNING, bytes([learning]))
    if port is not None:
        out += nla(IFLA_VXLAN_PORT, _BE16.pack(port))
    return out


def geneve_data(vni: int, remote: Optional[bytes], port: Optional[int]) -> bytes:
    out = nla(IFLA_GENEVE_ID, _U32.pack(vni))
    if remote is not None:
        out += nla(IFLA_GENEVE_REMOTE, remote)
    if port is not None:
        out += nla(IFLA_GENEVE_PORT, _BE16.pack(port))
    return out


def link_set_request(index: int, flags: int = 0, change: int = 0, mtu: Optional[int] = None) -> bytes:
    """RTM_NEWLINK payload changing link ``index``: the ``change`` bits of its flags, its MTU."""
    out = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, flags, change)
    if mtu is not None:
        out += nla(IFLA_MTU, _U32.pack(mtu))
    return out


def addr_request(af: int, index: int, local: bytes, prefixlen: int, broadcast: Optional[bytes]) -> bytes:
    """RTM_NEWADDR / RTM_DELADDR payload: ``local`` as both local and peer address (what
    ``ip addr add`` sends for a non-point-to-point address)."""
    out = _IFADDRMSG.pack(af, prefixlen, 0, 0, index) + nla(IFA_LOCAL, local) + nla(IFA_ADDRESS, local)
    if broadcast is not None:
        out += nla(IFA_BROADCAST, broadcast)
    return out


def route_get_request(af: int, dst: bytes) -> bytes:
    """RTM_GETROUTE payload asking how the kernel would route to ``dst`` (``ip route get``)."""
    return _RTMSG.pack(af, len(dst) * 8, 0, 0, 0, 0, 0, 0, 0) + nla(RTA_DST, dst)


def decode_link(msg: Message) -> RawLink:
    data = msg.data
    _, _, index, flags, _ = _IFINFOMSG.unpack_from(data, msg.start)
    a = spans(data, msg.start + _IFINFOMSG.size, msg.end)

    def u32(where: dict[int, tuple[int, int]], kind: int) -> Optional[int]:
        found = where.get(kind)
        return _U32.unpack_from(data, found[0])[0] if found else None

    name = _cstring(data, *a[IFLA_IFNAME]) if IFLA_IFNAME in a else ""
    kind, tunnel = None, {}
    info = a.get(IFLA_LINKINFO)
    if info:
        parts = spans(data, *info)
        kind = _cstring(data, *parts[IFLA_INFO_KIND]) if IFLA_INFO_KIND in parts else None
        d = spans(data, *parts[IFLA_INFO_DATA]) if IFLA_INFO_DATA in parts else None
        if d is not None:
            tunnel = _tunnel_fields(data, kind, d, u32)
    return RawLink(index=index, name=name, flags=flags, kind=kind, mtu=u32(a, IFLA_MTU),
                   link=u32(a, IFLA_LINK), **tunnel)


def _tunnel_fields(data: bytes, kind: Optional[str], d: dict[int, tuple[int, int]], u32) -> dict:
    def addr4(kind_: int) -> Optional[str]:
        found = d.get(kind_)
        return socket.inet_ntop(socket.AF_INET, data[found[0]:found[1]]) if found else None

    def port(kind_: int) -> Optional[int]:
        found = d.get(kind_)
        return _BE16.unpack_from(data, found[0])[0] if found else None

    if kind == "vxlan":
        meta = d.get(IFLA_VXLAN_COLLECT_METADATA)
        return {"vni": u32(d, IFLA_VXLAN_ID), "remote": addr4(IFLA_VXLAN_GROUP),
                "dstport": port(IFLA_VXLAN_PORT), "external": bool(meta and data[meta[0]])}
    if kind == "geneve":
        return {"vni": u32(d, IFLA_GENEVE_ID), "remote": addr4(IFLA_GENEVE_REMOTE),
                "dstport": port(IFLA_GENEVE_PORT), "external": IFLA_GENEVE_COLLECT_METADATA in d}
    if kind == "tun":
        found = d.get(IFLA_TUN_TYPE)
        return {"tun_type": data[found[0]] if found else None}
    return {}


def decode_addr(msg: Message) -> tuple[int, str]:
    """(ifindex, 'address/prefixlen') of one RTM_NEWADDR message (local address first)."""
    data = msg.data
    af, prefixlen, _, _, index = _IFADDRMSG.unpack_from(data, msg.start)
    a = spans(data, msg.start + _IFADDRMSG.size, msg.end)
    found = a.get(IFA_LOCAL) or a.get(IFA_ADDRESS)
    ip = socket.inet_ntop(af, data[found[0]:found[1]]) if found else None
    return index, f"{ip}/{prefixlen}"


# ---------------------------------------------------------------- ipset


def ipset_list_request(name: str) -> tuple[int, bytes]:
    """(message type, payload) listing one set: header and members."""
    payload = (_NFGENMSG.pack(socket.AF_INET, 0, 0)
               + nla(IPSET_ATTR_PROTOCOL, bytes([IPSET_PROTOCOL]))
               + nla(IPSET_ATTR_SETNAME, name.encode() + b"\0"))
    return (NFNL_SUBSYS_IPSET << 8) | IPSET_CMD_LIST, payload


def ipset_find(messages: list[Message], packed_ip: bytes) -> Optional[tuple[bool, Optional[str]]]:
    """Look for one address among the members of a listed set: None if it is not there, else
    (True, its comment or None).

    Walking every member costs ~2.5 ms per 1000; instead the address bytes are searched for
    (C speed) and only where they occur is the enclosing member checked and decoded. Bytes that
    occur nowhere mean "not a member" (a member holds its address verbatim). If they occur only
    in places that are not a member's address, the members are walked after all.
    """
    odd = False
    for msg in messages:
        at = msg.data.find(packed_ip, msg.start, msg.end)
        while at >= 0:
            found = _member_around(msg, at, packed_ip)
            if found is not None:
                return found
            odd = True
            at = msg.data.find(packed_ip, at + 1, msg.end)
    return _walk_members(messages, packed_ip) if odd else None


def _member_around(msg: Message, at: int, packed_ip: bytes) -> Optional[tuple[bool, Optional[str]]]:
    """The member whose address payload starts at ``at``, if that is what is there: DATA, then
    IP as its first attribute, then the address attribute (flags ignored: kernels differ)."""
    data, n = msg.data, len(packed_ip)
    start = at - 12
    if start < msg.start:
        return None
    addr_kind = IPSET_ATTR_IPADDR_IPV4 if n == 4 else IPSET_ATTR_IPADDR_IPV6
    length, kind = _NLA.unpack_from(data, start)
    ip_len, ip_kind = _NLA.unpack_from(data, start + 4)
    addr_len, addr = _NLA.unpack_from(data, start + 8)
    if (kind & NLA_TYPE_MASK != IPSET_ATTR_DATA or start + length > msg.end
            or (ip_len, ip_kind & NLA_TYPE_MASK) != (8 + n, IPSET_ATTR_IP)
            or (addr_len, addr & NLA_TYPE_MASK) != (4 + n, addr_kind)):
        return None
    comment = spans(data, start + 4, start + length).get(IPSET_ATTR_COMMENT)
    return True, (_cstring(data, *comment) if comment else None)


def _walk_members(messages: list[Message], packed_ip: bytes) -> Optional[tuple[bool, Optional[str]]]:
    addr_kind = IPSET_ATTR_IPADDR_IPV4 if len(packed_ip) == 4 else IPSET_ATTR_IPADDR_IPV6
    for msg in messages:
        data = msg.data
        for kind, s, e in attrs(data, msg.start + _NFGENMSG.size, msg.end):
            if kind != IPSET_ATTR_ADT:
                continue
            for member_kind, ms, me in attrs(data, s, e):
                if member_kind != IPSET_ATTR_DATA:
                    continue
                fields = spans(data, ms, me)
                ip = fields.get(IPSET_ATTR_IP)
                if ip is None:
                    continue
                found = spans(data, *ip).get(addr_kind)
                if found is None or data[found[0]:found[1]] != packed_ip:
                    continue
                comment = fields.get(IPSET_ATTR_COMMENT)
                return True, (_cstring(data, *comment) if comment else None)
    return None
