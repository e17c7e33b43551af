"""ipset over a bare netlink socket: reading sets as ``ipset save`` shows them, and running the
planner's ``ipset -exist restore`` script, without starting the ``ipset`` tool.

Why: on a full apply the node's sets are read (``ipset save`` + parsing, ~11 ms at 1000 members)
and the planner's script is written (``ipset -exist restore``, ~8 ms at 1000 adds). Both are a
process start and text formatting around a few kernel requests. Here the same requests go over
a netlink socket the Host already has open inside the netns.

Reading: the set names are listed first (the kernel's names-only listing, as ``ipset list -n``),
then only the sets the caller wants are dumped, so a large foreign set costs one name. A
``hash:ip`` set (inet or inet6) is decoded into the same :class:`IpsetSet` / :class:`IpsetEntry`
values that ``parse_ipset_save`` makes of ``ipset save`` (same member order: both are the
kernel's dump order). Any other type (hash:net, list:set, bitmap …) is reported as not
decodable and the caller reads it with the tool: correct, and never on the engine's hot path.

Writing covers the lines the planner emits, nothing more::

    create NAME hash:ip [family inet|inet6] [hashsize N] [maxelem N] [comment]
    add NAME IP [comment "TEXT"]
    del NAME IP
    flush NAME / destroy NAME / swap NAME1 NAME2

(blank lines and ``#`` lines are skipped). Every other line is an error at that line. Messages
are what the tool sends (strace of ipset 7.17): the protocol and each type's revision are
negotiated with the kernel (``IPSET_CMD_PROTOCOL`` / ``IPSET_CMD_TYPE``), consecutive add (or
del) lines of one set travel as one message holding many elements, each tagged with its line
number, and ``-exist`` is the absence of ``NLM_F_EXCL``.

What is applied when line k fails: exactly lines 1..k-1. Netlink processes every message of a
buffer even after one fails, so messages are sent one at a time and the script stops at the
first refusal; inside one message the kernel stops at the first element it refuses and reports
that element's line number. A typical script (a create and 1000 commented adds) is three
messages: one ``sendmsg`` and one ACK each (plus, once per Host, the two negotiations). A line
the parser rejects (a bad address, an unknown option) fails the same way. The tool also stops
at the first error, but a line it rejects while parsing drops the adds it has buffered and not
sent yet (ipset 7.17: ``create a``, two adds, then an add to a missing set leaves ``a`` empty).

Pure protocol code plus one small class that holds what was negotiated; the socket belongs to
the caller (a Host's netns thread).
"""

from __future__ import annotations

import errno
import logging
import os
import shlex
import socket
import struct
from typing import Callable, NamedTuple, Optional, Union

from . import _netlink
from ._netlink import (IPSET_ATTR_ADT, IPSET_ATTR_COMMENT, IPSET_ATTR_DATA, IPSET_ATTR_IP,
                       IPSET_ATTR_IPADDR_IPV4, IPSET_ATTR_IPADDR_IPV6, IPSET_ATTR_PROTOCOL,
                       IPSET_ATTR_SETNAME, NFNL_SUBSYS_IPSET, NLA_F_NESTED, NLA_F_NET_BYTEORDER,
                       NLA_TYPE_MASK, Message, nla)
from .model import IpsetEntry, IpsetSet

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- linux/netfilter/ipset/ip_set.h
IPSET_PROTOCOL = 7              # what this module speaks ...
IPSET_PROTOCOL_MIN = 6          # ... and the oldest it accepts
IPSET_CMD_PROTOCOL = 1
IPSET_CMD_CREATE = 2
IPSET_CMD_DESTROY = 3
IPSET_CMD_FLUSH = 4
IPSET_CMD_SWAP = 6
IPSET_CMD_LIST = 7
IPSET_CMD_ADD = 9
IPSET_CMD_DEL = 10
IPSET_CMD_HEADER = 12
IPSET_CMD_TYPE = 13
IPSET_ATTR_TYPENAME = 3
IPSET_ATTR_SETNAME2 = 3         # swap: the second set (same number as TYPENAME)
IPSET_ATTR_REVISION = 4
IPSET_ATTR_FAMILY = 5
IPSET_ATTR_FLAGS = 6
IPSET_ATTR_LINENO = 9
IPSET_ATTR_PROTOCOL_MIN = 10
IPSET_ATTR_REVISION_MIN = 10
IPSET_ATTR_CADT_FLAGS = 8       # inside DATA
IPSET_ATTR_HASHSIZE = 18
IPSET_ATTR_MAXELEM = 19
IPSET_FLAG_LIST_SETNAME = 1 << 1
IPSET_FLAG_WITH_COMMENT = 1 << 4
IPSET_MAXNAMELEN = 32           # with the NUL
IPSET_MAX_COMMENT_SIZE = 255

IPSET_ERR_PROTOCOL = 4097
IPSET_ERR_FIND_TYPE = 4098
IPSET_ERR_MAX_SETS = 4099
IPSET_ERR_BUSY = 4100
IPSET_ERR_EXIST_SETNAME2 = 4101
IPSET_ERR_TYPE_MISMATCH = 4102
IPSET_ERR_EXIST = 4103
IPSET_ERR_INVALID_FAMILY = 4106
IPSET_ERR_REFERENCED = 4108
IPSET_ERR_IPADDR_IPV4 = 4109
IPSET_ERR_IPADDR_IPV6 = 4110
IPSET_ERR_COMMENT = 4112
IPSET_ERR_HASH_FULL = 4352

NFPROTO_IPV4 = 2
NFPROTO_IPV6 = 10
FAMILIES = {"inet": NFPROTO_IPV4, "inet6": NFPROTO_IPV6}
FAMILY_NAMES = {v: k for k, v in FAMILIES.items()}

NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400

# The revisions of hash:ip this module knows how to create (0 … 6, kernel 6.1+). The kernel's
# newest that is also known here is used, as the tool does; comments need revision 2.
HASH_IP_REVISION_MAX = 6
HASH_IP_REVISION_COMMENT = 2

LIST_TYPE = (NFNL_SUBSYS_IPSET << 8) | IPSET_CMD_LIST
# Elements per message: the ADT container's length is a u16, so it must stay below 64 KiB.
ADT_CHUNK_BYTES = 60_000
# Script requests use sequence numbers far from those of _netlink.Socket.request on the same
# socket, so a late reply to one can never be taken for the other's.
SEQ_BASE = 1 << 30

_NLMSGHDR = struct.Struct("=IHHII")
_NLA = struct.Struct("=HH")
_NFGENMSG = struct.pack("=BBH", socket.AF_INET, 0, 0)
_BE32 = struct.Struct(">I")
_I32 = struct.Struct("=i")
_U32 = struct.Struct("=I")
_IP4_HEAD = struct.pack("=HHHH", 12, NLA_F_NESTED | IPSET_ATTR_IP, 8, NLA_F_NET_BYTEORDER | IPSET_ATTR_IPADDR_IPV4)
_IP6_HEAD = struct.pack("=HHHH", 24, NLA_F_NESTED | IPSET_ATTR_IP, 20, NLA_F_NET_BYTEORDER | IPSET_ATTR_IPADDR_IPV6)
_LINENO_HEAD = _NLA.pack(8, IPSET_ATTR_LINENO)
# a member's IP{address} headers as kernels send them (with or without the byte-order flag)
_IP4_HEADS = frozenset(struct.pack("=HHHH", 12, NLA_F_NESTED | IPSET_ATTR_IP, 8, flag | IPSET_ATTR_IPADDR_IPV4)
                       for flag in (0, NLA_F_NET_BYTEORDER))
_IP6_HEADS = frozenset(struct.pack("=HHHH", 24, NLA_F_NESTED | IPSET_ATTR_IP, 20, flag | IPSET_ATTR_IPADDR_IPV6)
                       for flag in (0, NLA_F_NET_BYTEORDER))
_COMMENT_KIND = struct.pack("=H", IPSET_ATTR_COMMENT)
_DATA = NLA_F_NESTED | IPSET_ATTR_DATA

# the tool's wording (libipset errcode.c), so an error reads the same whichever path ran;
# keyed by (code, command) with command 0 for "any command"
_REASONS = {
    (errno.ENOENT, 0): "The set with the given name does not exist",
    (IPSET_ERR_PROTOCOL, 0): "Kernel error received: ipset protocol error",
    (errno.EEXIST, IPSET_CMD_CREATE): "Set cannot be created: set with the same name already exists",
    (IPSET_ERR_FIND_TYPE, 0): "Kernel error received: set type not supported",
    (IPSET_ERR_MAX_SETS, 0): "Kernel error received: maximal number of sets reached, cannot create more.",
    (IPSET_ERR_INVALID_FAMILY, 0): "Protocol family not supported by the set type",
    (IPSET_ERR_BUSY, IPSET_CMD_DESTROY): "Set cannot be destroyed: it is in use by a kernel component",
    (IPSET_ERR_EXIST_SETNAME2, IPSET_CMD_SWAP): "Sets cannot be swapped: the second set does not exist",
    (IPSET_ERR_TYPE_MISMATCH, IPSET_CMD_SWAP): "The sets cannot be swapped: their type does not match",
    (IPSET_ERR_REFERENCED, IPSET_CMD_SWAP): "Sets cannot be swapped: it is in use by another system",
    (IPSET_ERR_IPADDR_IPV4, 0): "An IPv4 address is expected, but not received",
    (IPSET_ERR_IPADDR_IPV6, 0): "An IPv6 address is expected, but not received",
    (IPSET_ERR_COMMENT, 0): "Comment cannot be used: set was created without comment support",
    (IPSET_ERR_EXIST, IPSET_CMD_ADD): "Element cannot be added to the set: it's already added",
    (IPSET_ERR_EXIST, IPSET_CMD_DEL): "Element cannot be deleted from the set: it's not added",
    (IPSET_ERR_HASH_FULL, 0): "Hash is full, cannot add more elements",
}


def reason(code: int, cmd: int = 0) -> str:
    """The kernel's refusal ``code`` for ``cmd`` in words."""
    text = _REASONS.get((code, cmd)) or _REASONS.get((code, 0))
    if text:
        return text
    if code < 4096:
        return os.strerror(code)
    return f"ipset error {code}"


class ScriptError(Exception):
    """One line of a script was rejected (by the parser: ``code`` is None; or by the kernel).
    Lines before ``lineno`` are applied; this one and those after are not."""

    def __init__(self, lineno: int, line: str, reason: str, code: Optional[int] = None):
        self.lineno, self.line, self.reason, self.code = lineno, line, reason, code
        super().__init__(f"line {lineno} ({line!r}): {reason}")


# ---------------------------------------------------------------- messages


def _cstr(text: str) -> bytes:
    return text.encode() + b"\0"


def _text(data: bytes, start: int, end: int) -> str:
    return data[start:end].split(b"\0", 1)[0].decode("utf-8", "replace")


def _head(protocol: int) -> bytes:
    return _NFGENMSG + nla(IPSET_ATTR_PROTOCOL, bytes([protocol]))


def protocol_request() -> bytes:
    return _head(IPSET_PROTOCOL)


def type_request(protocol: int, type_name: str, family: int) -> bytes:
    return (_head(protocol) + nla(IPSET_ATTR_TYPENAME, _cstr(type_name))
            + nla(IPSET_ATTR_FAMILY, bytes([family])))


def names_request(protocol: int) -> bytes:
    """A dump of every set's name, nothing else (``ipset list -n``)."""
    return _head(protocol) + nla(NLA_F_NET_BYTEORDER | IPSET_ATTR_FLAGS, _BE32.pack(IPSET_FLAG_LIST_SETNAME))


def list_request(protocol: int, name: str) -> bytes:
    """A dump of one set: header, then members."""
    return _head(protocol) + nla(IPSET_ATTR_SETNAME, _cstr(name))


def _top_attr(msg: Message, kind: int) -> Optional[tuple[int, int]]:
    return _netlink.spans(msg.data, msg.start + len(_NFGENMSG), msg.end).get(kind)


def decode_protocol(msgs: list[Message]) -> tuple[int, int]:
    """(kernel protocol, oldest it accepts) from the reply to :func:`protocol_request`."""
    for m in msgs:
        found = _netlink.spans(m.data, m.start + len(_NFGENMSG), m.end)
        if IPSET_ATTR_PROTOCOL in found:
            low = found.get(IPSET_ATTR_PROTOCOL_MIN)
            proto = m.data[found[IPSET_ATTR_PROTOCOL][0]]
            return proto, (m.data[low[0]] if low else proto)
    raise ValueError("the kernel's ipset protocol reply carries no protocol")


def decode_type(msgs: list[Message]) -> tuple[int, int]:
    """(newest, oldest) revision of a set type from the reply to :func:`type_request`."""
    for m in msgs:
        found = _netlink.spans(m.data, m.start + len(_NFGENMSG), m.end)
        if IPSET_ATTR_REVISION in found:
            low = found.get(IPSET_ATTR_REVISION_MIN)
            top = m.data[found[IPSET_ATTR_REVISION][0]]
            return top, (m.data[low[0]] if low else 0)
    raise ValueError("the kernel's ipset type reply carries no revision")


def decode_names(msgs: list[Message]) -> list[str]:
    """Set names of a names-only dump, in the kernel's order (the order of ``ipset save``)."""
    out = []
    for m in msgs:
        if m.type == LIST_TYPE:
            found = _top_attr(m, IPSET_ATTR_SETNAME)
            if found:
                out.append(_text(m.data, *found))
    return out


# ---------------------------------------------------------------- reading one set

Decoded = tuple[IpsetSet, list[IpsetEntry]]


def decode_set(name: str, msgs: list[Message], known: Optional[dict[bytes, IpsetEntry]] = None
               ) -> Optional[tuple[IpsetSet, list[IpsetEntry], dict[bytes, IpsetEntry]]]:
    """The dump of one set as (set, members, memo), or None when it is not a hash:ip set of
    family inet/inet6 (the caller reads those with the tool).

    Maps the header as ``parse_ipset_save`` maps the save line: type, family, hashsize (the
    current one: the kernel grows it), maxelem and the comment flag; bucketsize, initval,
    timeout, counters … are dropped. A member keeps its address and comment only.

    ``known`` maps a member's raw bytes, as the last read saw them, to its entry: the same
    bytes are the same member and are not decoded again. The memo returned holds exactly this
    read's members, so it never outgrows the set.
    """
    known = known or {}
    memo: dict[bytes, IpsetEntry] = {}
    header: Optional[IpsetSet] = None
    members: list[IpsetEntry] = []
    for m in msgs:
        if m.type != LIST_TYPE:
            continue
        top = _netlink.spans(m.data, m.start + len(_NFGENMSG), m.end)
        if IPSET_ATTR_TYPENAME in top:
            header = _decode_header(name, m.data, top)
            if header is None:
                return None
        adt = top.get(IPSET_ATTR_ADT)
        if adt is None:
            continue
        if header is None:
            raise ValueError(f"ipset dump of {name}: members before the set's header")
        if not _decode_members(name, header.family == "inet6", m.data, adt, known, memo, members):
            return None
    if header is None:
        raise ValueError(f"ipset dump of {name}: no header")
    return header, members, memo


def _decode_header(name: str, data: bytes, top: dict[int, tuple[int, int]]) -> Optional[IpsetSet]:
    type_name = _text(data, *top[IPSET_ATTR_TYPENAME])
    fam = top.get(IPSET_ATTR_FAMILY)
    family = FAMILY_NAMES.get(data[fam[0]]) if fam else None
    if type_name != "hash:ip" or family is None or IPSET_ATTR_DATA not in top:
        return None
    opts = _netlink.spans(data, *top[IPSET_ATTR_DATA])

    def be32(kind: int, default: int) -> int:
        found = opts.get(kind)
        return _BE32.unpack_from(data, found[0])[0] if found else default

    defaults = IpsetSet(name)
    return IpsetSet(name=name, type=type_name, family=family,
                    hashsize=be32(IPSET_ATTR_HASHSIZE, defaults.hashsize),
                    maxelem=be32(IPSET_ATTR_MAXELEM, defaults.maxelem),
                    comment=bool(be32(IPSET_ATTR_CADT_FLAGS, 0) & IPSET_FLAG_WITH_COMMENT))


def _decode_members(name: str, v6: bool, data: bytes, span: tuple[int, int],
                    known: dict[bytes, IpsetEntry], memo: dict[bytes, IpsetEntry],
                    out: list[IpsetEntry]) -> bool:
    """Append the members of one ADT container; False if one is not a hash:ip member.
    One flat loop: it runs once per member of every read (~1.5 µs a new one, 0.4 µs a known)."""
    pos, end = span
    unpack = _NLA.unpack_from
    get = known.get
    heads, n = (_IP6_HEADS, 16) if v6 else (_IP4_HEADS, 4)
    while pos + 4 <= end:
        length, kind = unpack(data, pos)
        if length < 4:
            break
        if kind & NLA_TYPE_MASK == IPSET_ATTR_DATA:
            raw = data[pos:pos + length]
            entry = get(raw)
            if entry is None:
                # the usual layout, read at fixed offsets: IP{address}, then nothing or a comment
                # that ends the member; anything else is walked attribute by attribute
                comment: Optional[str] = None
                tail = 12 + n
                if raw[4:12] in heads and (length == tail or (
                        raw[tail + 2:tail + 4] == _COMMENT_KIND
                        and tail + ((raw[tail] | raw[tail + 1] << 8) + 3 & ~3) == length)):
                    if length != tail:
                        comment = raw[tail + 4:].split(b"\0", 1)[0].decode("utf-8", "replace")
                    addr = raw[12:tail]
                    entry = IpsetEntry(name, socket.inet_ntop(socket.AF_INET6, addr) if v6
                                       else socket.inet_ntoa(addr), comment)
                else:
                    entry = _decode_member_walk(name, v6, data, pos + 4, pos + length)
                    if entry is None:
                        return False
            memo[raw] = entry
            out.append(entry)
        pos += (length + 3) & ~3
    return True


def _decode_member_walk(name: str, v6: bool, data: bytes, pos: int, end: int) -> Optional[IpsetEntry]:
    ip: Optional[str] = None
    comment: Optional[str] = None
    addr_kind = IPSET_ATTR_IPADDR_IPV6 if v6 else IPSET_ATTR_IPADDR_IPV4
    for kind, s, e in _netlink.attrs(data, pos, end):
        if kind == IPSET_ATTR_IP:
            inner = _netlink.spans(data, s, e).get(addr_kind)
            if inner:
                ip = socket.inet_ntop(socket.AF_INET6 if v6 else socket.AF_INET, data[inner[0]:inner[1]])
        elif kind == IPSET_ATTR_COMMENT:
            comment = _text(data, s, e)
    return IpsetEntry(set=name, ip=ip, comment=comment) if ip else None


# ---------------------------------------------------------------- parsing a script


class Create(NamedTuple):
    lineno: int
    name: str
    type: str
    family: int
    hashsize: Optional[int]
    maxelem: Optional[int]
    comment: bool


class Elements(NamedTuple):
    """A run of consecutive add (or del) lines of one set: they travel together."""

    cmd: int                # IPSET_CMD_ADD / IPSET_CMD_DEL
    name: str
    linenos: list[int]
    data: list[bytes]       # per line, the encoded DATA attribute (address, comment, line number)


class SetCommand(NamedTuple):
    lineno: int
    cmd: int                # IPSET_CMD_FLUSH / _DESTROY / _SWAP
    name: str
    name2: Optional[str] = None


Op = Union[Create, Elements, SetCommand]


class Script(NamedTuple):
    lines: list[str]                # the text's lines; line n is lines[n - 1]
    ops: list[Op]                   # one per line up to the first bad one
    error: Optional[ScriptError]    # the first bad line, if any


_SIMPLE = {"flush": IPSET_CMD_FLUSH, "destroy": IPSET_CMD_DESTROY, "swap": IPSET_CMD_SWAP}


def parse_script(text: str) -> Script:
    """The operations of a script up to its first bad line, and that line's error (or None).
    Line numbers are 1-based over every line of ``text``, as the tool counts them.

    Written for 1000s of add lines (~1.3 µs each): the plain ``add NAME IP [comment "X"]`` is
    split and encoded at once; anything else goes through the tokenizer."""
    lines = text.split("\n")
    ops: list[Op] = []
    names_ok: set[str] = set()
    run: Optional[Elements] = None          # the run the next add line may join
    for lineno, line in enumerate(lines, 1):
        words = line.split(" ", 4)
        if words[0] == "add":
            data = _plain_add(words, names_ok, lineno)
            if data is not None:
                name = words[1]
                if run is None or run.name != name or run.cmd != IPSET_CMD_ADD:
                    run = Elements(IPSET_CMD_ADD, name, [], [])
                    ops.append(run)
                run.linenos.append(lineno)
                run.data.append(data)
                continue
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            op = _parse_line(lineno, line)
        except ScriptError as e:
            return Script(lines, ops, e)
        if isinstance(op, Elements) and run is not None and (run.cmd, run.name) == (op.cmd, op.name):
            run.linenos.extend(op.linenos)
            run.data.extend(op.data)
            continue
        run = op if isinstance(op, Elements) else None
        ops.append(op)
    return Script(lines, ops, None)


def _plain_add(words: list[str], names_ok: set[str], lineno: int) -> Optional[bytes]:
    """The encoded element of ``add NAME IP`` or ``add NAME IP comment "TEXT"`` written plainly
    (single spaces, no quote or backslash inside the comment, valid name and address), else
    None: the line then goes through the tokenizer, which also says what is wrong with it."""
    if len(words) == 3:
        raw = None
    elif len(words) == 5 and words[3] == "comment":
        quoted = words[4]
        inner = quoted[1:-1]
        if len(quoted) < 2 or quoted[0] != '"' or quoted[-1] != '"' or '"' in inner or "\\" in inner:
            return None
        raw = inner.encode() + b"\0"
        if len(raw) > IPSET_MAX_COMMENT_SIZE + 1:
            return None
    else:
        return None
    if words[1] not in names_ok and not _name_fits(words[1], names_ok):
        return None
    ip = words[2]
    try:
        addr = socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)
    except (OSError, ValueError):
        return None
    return encode_element(addr, raw, lineno)


_NOT_IN_NAMES = frozenset(" \t\n\r\"'\\")


def _name_fits(name: str, seen: set[str]) -> bool:
    """A set name the tool would take as one word and the kernel would accept (remembered)."""
    if 0 < len(name.encode()) < IPSET_MAXNAMELEN and _NOT_IN_NAMES.isdisjoint(name) and name.isprintable():
        seen.add(name)
        return True
    return False


def _parse_line(lineno: int, line: str) -> Op:
    def bad(why: str) -> ScriptError:
        return ScriptError(lineno, line, why)

    try:
        toks = shlex.split(line)
    except ValueError as e:
        raise bad(f"cannot split the line: {e}") from None
    cmd, args = toks[0], toks[1:]
    if cmd in ("add", "del"):
        if len(args) < 2:
            raise bad(f"expected '{cmd} NAME IP'")
        name, ip, rest = _set_name(bad, args[0]), args[1], args[2:]
        addr = _pack_ip(ip)
        if addr is None:
            raise bad(f"cannot parse {ip}: not an IPv4 or IPv6 address")
        comment = None
        if cmd == "add" and len(rest) == 2 and rest[0] == "comment":
            if '"' in rest[1]:
                raise bad('the " character is not permitted in comments')
            comment = rest[1].encode() + b"\0"
            if len(comment) > IPSET_MAX_COMMENT_SIZE + 1:
                raise bad(f"comment is longer than the maximum allowed {IPSET_MAX_COMMENT_SIZE} characters")
        elif rest:
            raise bad(f"unsupported {cmd} option(s) {' '.join(rest)!r}")
        return Elements(IPSET_CMD_ADD if cmd == "add" else IPSET_CMD_DEL, name, [lineno],
                        [encode_element(addr, comment, lineno)])
    if cmd == "create":
        return _parse_create(bad, lineno, args)
    if cmd in _SIMPLE:
        want = 2 if cmd == "swap" else 1
        if len(args) != want:
            raise bad(f"expected '{cmd} NAME{' NAME2' if want == 2 else ''}'")
        names = [_set_name(bad, a) for a in args]
        return SetCommand(lineno, _SIMPLE[cmd], names[0], names[1] if want == 2 else None)
    raise bad(f"unsupported command {cmd!r} (create, add, del, flush, swap, destroy)")


def _parse_create(bad: Callable[[str], ScriptError], lineno: int, args: list[str]) -> Create:
    if len(args) < 2:
        raise bad("expected 'create NAME TYPE [options]'")
    name, type_name = _set_name(bad, args[0]), args[1]
    if type_name != "hash:ip":
        raise bad(f"set type {type_name!r}: only hash:ip sets are created here (use ipset restore)")
    family, sizes, comment = NFPROTO_IPV4, {"hashsize": None, "maxelem": None}, False
    i = 2
    while i < len(args):
        opt = args[i]
        if opt == "comment":
            comment, i = True, i + 1
            continue
        if opt not in ("family", "hashsize", "maxelem") or i + 1 >= len(args):
            raise bad(f"unsupported create option {opt!r} (family, hashsize, maxelem, comment)")
        val = args[i + 1]
        if opt == "family":
            if val not in FAMILIES:
                raise bad(f"family {val!r} (inet or inet6)")
            family = FAMILIES[val]
        else:
            try:
                sizes[opt] = int(val, 0)
            except ValueError:
                raise bad(f"{opt} {val!r} is not a number") from None
            if not 0 < sizes[opt] < 1 << 32:
                raise bad(f"{opt} {val} is out of range")
        i += 2
    return Create(lineno, name, type_name, family, sizes["hashsize"], sizes["maxelem"], comment)


def _set_name(bad: Callable[[str], ScriptError], name: str) -> str:
    if not _name_fits(name, set()):
        raise bad(f"setname {name!r}: a set name has 1-{IPSET_MAXNAMELEN - 1} characters, no spaces or quotes")
    return name


def _pack_ip(text: str) -> Optional[bytes]:
    try:
        return socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text)
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- building requests

# per (address length, comment length or -1): the struct and the constant parts of an element,
# so that encoding one is a single pack call
_ELEMENT_LAYOUTS: dict[tuple[int, int], tuple[struct.Struct, bytes, bytes]] = {}


def _element_layout(n: int, c: int) -> tuple[struct.Struct, bytes, bytes]:
    comment = f"4s{c}s{-c % 4}x" if c >= 0 else ""
    st = struct.Struct(f"=12s{n}s{comment}4sI")
    prefix = _NLA.pack(st.size, _DATA) + (_IP4_HEAD if n == 4 else _IP6_HEAD)
    return st, prefix, _NLA.pack(4 + c, IPSET_ATTR_COMMENT) if c >= 0 else b""


def encode_element(addr: bytes, comment: Optional[bytes], lineno: int) -> bytes:
    """DATA{IP{address}, [COMMENT], LINENO} as the tool encodes it; ``comment`` ends in NUL.
    ``lineno`` is what the kernel reports back if it refuses this element (it only copies the
    value, so it is in host order, unlike the tool's)."""
    key = (len(addr), -1 if comment is None else len(comment))
    layout = _ELEMENT_LAYOUTS.get(key)
    if layout is None:
        layout = _ELEMENT_LAYOUTS[key] = _element_layout(*key)
    st, prefix, comment_head = layout
    if comment is None:
        return st.pack(prefix, addr, _LINENO_HEAD, lineno)
    return st.pack(prefix, addr, comment_head, comment, _LINENO_HEAD, lineno)


class Request(NamedTuple):
    """One netlink message and the script lines it carries."""

    mtype: int
    flags: int
    payload: bytes
    cmd: int
    linenos: tuple[int, ...]
    name: str = ""          # the set an add/del message is for


def _flags(cmd: int, exist: bool) -> int:
    flags = _netlink.NLM_F_REQUEST | _netlink.NLM_F_ACK
    if cmd == IPSET_CMD_CREATE:
        flags |= NLM_F_CREATE
    # like the tool: -exist is the absence of NLM_F_EXCL, which flush and swap never carry
    if not exist and cmd in (IPSET_CMD_CREATE, IPSET_CMD_ADD, IPSET_CMD_DEL, IPSET_CMD_DESTROY):
        flags |= NLM_F_EXCL
    return flags


def _mtype(cmd: int) -> int:
    return (NFNL_SUBSYS_IPSET << 8) | cmd


def create_request(op: Create, protocol: int, revision: int, exist: bool) -> Request:
    data = b""
    if op.comment:
        data += nla(NLA_F_NET_BYTEORDER | IPSET_ATTR_CADT_FLAGS, _BE32.pack(IPSET_FLAG_WITH_COMMENT))
    if op.hashsize is not None:
        data += nla(NLA_F_NET_BYTEORDER | IPSET_ATTR_HASHSIZE, _BE32.pack(op.hashsize))
    if op.maxelem is not None:
        data += nla(NLA_F_NET_BYTEORDER | IPSET_ATTR_MAXELEM, _BE32.pack(op.maxelem))
    payload = (_head(protocol) + nla(IPSET_ATTR_SETNAME, _cstr(op.name))
               + nla(IPSET_ATTR_TYPENAME, _cstr(op.type)) + nla(IPSET_ATTR_REVISION, bytes([revision]))
               + nla(IPSET_ATTR_FAMILY, bytes([op.family])) + nla(_DATA, data))
    return Request(_mtype(IPSET_CMD_CREATE), _flags(IPSET_CMD_CREATE, exist), payload,
                   IPSET_CMD_CREATE, (op.lineno,))


def set_command_request(op: SetCommand, protocol: int, exist: bool) -> Request:
    payload = _head(protocol) + nla(IPSET_ATTR_SETNAME, _cstr(op.name))
    if op.name2 is not None:
        payload += nla(IPSET_ATTR_SETNAME2, _cstr(op.name2))
    return Request(_mtype(op.cmd), _flags(op.cmd, exist), payload, op.cmd, (op.lineno,))


def element_requests(run: Elements, protocol: int, exist: bool) -> list[Request]:
    """A run of add (or del) lines of one set as few messages as fit: each holds an ADT
    container of elements (the container's length is 16 bits, so at most ~60 KB each)."""
    head = _head(protocol) + nla(IPSET_ATTR_SETNAME, _cstr(run.name))
    flags, mtype = _flags(run.cmd, exist), _mtype(run.cmd)
    out: list[Request] = []
    i, count = 0, len(run.data)
    while i < count:
        j, size = i, 0
        while j < count and (j == i or size + len(run.data[j]) <= ADT_CHUNK_BYTES):
            size += len(run.data[j])
            j += 1
        adt = _NLA.pack(4 + size, NLA_F_NESTED | IPSET_ATTR_ADT) + b"".join(run.data[i:j])
        # a top-level LINENO asks the kernel to report the refused element's line number
        payload = head + _LINENO_HEAD + _U32.pack(run.linenos[i]) + adt
        out.append(Request(mtype, flags, payload, run.cmd, tuple(run.linenos[i:j]), run.name))
        i = j
    return out


# ---------------------------------------------------------------- replies


class Reply(NamedTuple):
    code: int                   # 0: accepted
    lineno: Optional[int]       # the element the kernel refused, when it said
    message: str                # the kernel's extended-ack text, if any


def parse_ack(data: bytes, off: int, end: int) -> Reply:
    """One NLMSG_ERROR message. When the kernel refuses an element of an ADT container it
    answers with the whole request echoed and its top-level LINENO overwritten with the
    refused element's line number (ip_set_core.c, call_ad)."""
    flags = struct.unpack_from("=H", data, off + 6)[0]
    code = -_I32.unpack_from(data, off + 16)[0]
    if code <= 0:
        return Reply(0, None, "")
    echoed_len = _U32.unpack_from(data, off + 20)[0]
    lineno = None
    tlv_start = off + 36
    if not flags & _netlink.NLM_F_CAPPED and echoed_len >= 16 + len(_NFGENMSG):
        req_end = min(off + 20 + echoed_len, end)
        found = _netlink.spans(data, off + 36 + len(_NFGENMSG), req_end).get(IPSET_ATTR_LINENO)
        if found and found[1] - found[0] == 4:
            lineno = _U32.unpack_from(data, found[0])[0]
        tlv_start = off + 20 + ((echoed_len + 3) & ~3)
    message = ""
    if flags & _netlink.NLM_F_ACK_TLVS:
        found = _netlink.spans(data, tlv_start, end).get(_netlink.NLMSGERR_ATTR_MSG)
        if found:
            message = _text(data, *found)
    return Reply(code, lineno, message)


# ---------------------------------------------------------------- the client


class Client:
    """What was negotiated with this kernel (protocol, type revisions: kernel-wide, so kept for
    the Host's lifetime), the member memo of the last reads, and the script's sequence numbers.
    Used on one thread (the Host's netns thread) with a socket that thread made."""

    def __init__(self) -> None:
        self.protocol: Optional[int] = None
        self.revisions: dict[tuple[str, int], int] = {}
        self.memo: dict[str, dict[bytes, IpsetEntry]] = {}
        self._seq = SEQ_BASE
        self._buf = bytearray(1 << 17)     # an echoed refusal is as large as its request

    # -------------------------------------------------------- negotiation

    def negotiated_protocol(self, sock: _netlink.Socket) -> int:
        if self.protocol is None:
            msgs = sock.request(_mtype(IPSET_CMD_PROTOCOL), _netlink.NLM_F_REQUEST | _netlink.NLM_F_ACK,
                                protocol_request())
            kernel, oldest = decode_protocol(msgs)
            use = min(kernel, IPSET_PROTOCOL)
            if use < max(oldest, IPSET_PROTOCOL_MIN):
                raise _netlink.NetlinkReplyError(errno.EPROTONOSUPPORT,
                                                 f"kernel ipset protocol {kernel} (accepts {oldest}+); "
                                                 f"this program speaks {IPSET_PROTOCOL_MIN}-{IPSET_PROTOCOL}")
            self.protocol = use
            log.debug("ipset protocol kernel=%d oldest=%d using=%d", kernel, oldest, use)
        return self.protocol

    def revision(self, sock: _netlink.Socket, op: Create, line: str) -> int:
        """The revision to create ``op`` with: the kernel's newest that is known here."""
        key = (op.type, op.family)
        if key not in self.revisions:
            try:
                msgs = sock.request(_mtype(IPSET_CMD_TYPE), _netlink.NLM_F_REQUEST | _netlink.NLM_F_ACK,
                                    type_request(self.negotiated_protocol(sock), op.type, op.family))
            except _netlink.NetlinkReplyError as e:
                raise ScriptError(op.lineno, line, reason(e.code, IPSET_CMD_TYPE), e.code) from None
            newest, oldest = decode_type(msgs)
            use = min(newest, HASH_IP_REVISION_MAX)
            if use < oldest:
                raise ScriptError(op.lineno, line, f"the kernel's {op.type} revisions {oldest}-{newest} "
                                  f"are all newer than this program knows ({HASH_IP_REVISION_MAX})")
            self.revisions[key] = use
            log.debug("ipset type=%s family=%d revisions=%d-%d using=%d", op.type, op.family, oldest, newest, use)
        use = self.revisions[key]
        if op.comment and use < HASH_IP_REVISION_COMMENT:
            raise ScriptError(op.lineno, line, f"the kernel's {op.type} (revision {use}) has no comment support")
        return use

    # -------------------------------------------------------- reading

    def read_sets(self, sock: _netlink.Socket, only: Optional[Callable[[str], bool]] = None
                  ) -> dict[str, Optional[Decoded]]:
        """Every set ``only(name)`` accepts, in the kernel's order: (set, members), or None for a
        set this module does not decode. A set that vanishes between the two steps is left out.
        Raises NetlinkReplyError for other refusals."""
        protocol = self.negotiated_protocol(sock)
        dump = _netlink.NLM_F_REQUEST | _netlink.NLM_F_DUMP
        names = decode_names(sock.request(LIST_TYPE, dump, names_request(protocol)))
        out: dict[str, Optional[Decoded]] = {}
        memo: dict[str, dict[bytes, IpsetEntry]] = {}
        for name in names:
            if only is not None and not only(name):
                continue
            try:
                msgs = sock.request(LIST_TYPE, dump, list_request(protocol, name))
            except _netlink.NetlinkReplyError as e:
                if e.code == errno.ENOENT:
                    continue
                raise
            got = decode_set(name, msgs, self.memo.get(name))
            if got is None:
                out[name] = None
                continue
            out[name] = (got[0], got[1])
            memo[name] = got[2]
        # only the sets read now stay memoised: a set no longer asked for does not linger
        self.memo = memo
        return out

    # -------------------------------------------------------- writing

    def run_script(self, sock: _netlink.Socket, text: str, exist: bool = True) -> int:
        """Apply ``text`` (see the module docstring); returns the number of messages sent.
        Raises :class:`ScriptError` at the first refused line, after applying those before."""
        script = parse_script(text)
        sent = 0
        if script.ops:
            protocol = self.negotiated_protocol(sock)
            for op in script.ops:
                if isinstance(op, Elements):
                    requests = element_requests(op, protocol, exist)
                elif isinstance(op, Create):
                    revision = self.revision(sock, op, script.lines[op.lineno - 1])
                    requests = [create_request(op, protocol, revision, exist)]
                else:
                    requests = [set_command_request(op, protocol, exist)]
                for req in requests:
                    self._send(sock, req, script.lines)
                    sent += 1
        if script.error is not None:
            raise script.error
        return sent

    def _send(self, sock: _netlink.Socket, req: Request, lines: list[str]) -> None:
        self._seq = SEQ_BASE if self._seq >= 0xFFFFFFFF else self._seq + 1
        seq = self._seq
        sock.sock.send(_NLMSGHDR.pack(16 + len(req.payload), req.mtype, req.flags, seq, 0) + req.payload)
        reply = self._wait(sock.sock, seq)
        if reply.code == 0:
            return
        # refused before any element (no set, wrong type …): the message's first line; else
        # the element the kernel named. Elements before it in this message are applied.
        lineno = reply.lineno if reply.lineno in req.linenos else req.linenos[0]
        why = reason(reply.code, req.cmd)
        if reply.code == IPSET_ERR_PROTOCOL and req.name:
            why = self._family_mismatch(sock, req.name, lines[lineno - 1]) or why
        if reply.message:
            why += f" ({reply.message})"
        raise ScriptError(lineno, lines[lineno - 1], why, reply.code)

    def _family_mismatch(self, sock: _netlink.Socket, name: str, line: str) -> Optional[str]:
        """Why the kernel called an element a protocol error, when it is an address of the
        other family (the kernel cannot tell; the tool checks before sending)."""
        try:
            msgs = sock.request(_mtype(IPSET_CMD_HEADER), _netlink.NLM_F_REQUEST | _netlink.NLM_F_ACK,
                                list_request(self.negotiated_protocol(sock), name))
        except _netlink.NetlinkReplyError:
            return None
        family = None
        for m in msgs:
            found = _top_attr(m, IPSET_ATTR_FAMILY)
            if found:
                family = m.data[found[0]]
        v6 = ":" in shlex.split(line)[2]
        if family == NFPROTO_IPV6 and not v6:
            return reason(IPSET_ERR_IPADDR_IPV6)
        if family == NFPROTO_IPV4 and v6:
            return reason(IPSET_ERR_IPADDR_IPV4)
        return None

    def _wait(self, raw: socket.socket, seq: int) -> Reply:
        while True:
            for rtype, _flags, rseq, data, off, end in _netlink.read_datagram(raw, self._buf):
                if rseq == seq and rtype == _netlink.NLMSG_ERROR:
                    return parse_ack(data, off, end)
