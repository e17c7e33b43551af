"""The ipset netlink codec without a kernel: script parsing, message splitting, refusals."""

from __future__ import annotations

import struct

from noderedirect import _ipset_nl as nl
from noderedirect import _netlink


def test_script_lines_become_runs_with_their_line_numbers():
    text = ("create a hash:ip family inet hashsize 1024 maxelem 65536 comment\n"
            'add a 10.0.0.1 comment "u-1"\n'
            "\n# note\n"
            "add a 10.0.0.2\n"
            "add  a  10.0.0.3\n"                    # not plain: tokenized, still the same run
            "del a 10.0.0.1\n"
            "add b ::1\n"
            "swap a b\n")
    script = nl.parse_script(text)
    assert script.error is None
    kinds = [(type(op).__name__, getattr(op, "name", None), getattr(op, "linenos", None)) for op in script.ops]
    assert kinds == [("Create", "a", None), ("Elements", "a", [2, 5, 6]), ("Elements", "a", [7]),
                     ("Elements", "b", [8]), ("SetCommand", "a", None)]
    create = script.ops[0]
    assert (create.family, create.hashsize, create.maxelem, create.comment) == (nl.NFPROTO_IPV4, 1024, 65536, True)
    assert script.ops[2].cmd == nl.IPSET_CMD_DEL and script.ops[4].name2 == "b"


def test_the_first_bad_line_ends_the_script():
    script = nl.parse_script("create a hash:ip\nadd a 10.0.0.1\nadd a 10.0.0.300\nadd a 10.0.0.4\n")
    assert [getattr(op, "linenos", None) for op in script.ops] == [None, [2]]
    assert (script.error.lineno, script.error.line, script.error.code) == (3, "add a 10.0.0.300", None)
    for line, why in [("add a 10.0.0.1 comment \"" + "x" * 256 + "\"", "longer than the maximum"),
                      ("create a hash:ip timeout 5", "unsupported create option 'timeout'"),
                      ("add " + "n" * 32 + " 10.0.0.1", "a set name has 1-31 characters"),
                      ("flush", "expected 'flush NAME'"), ("rename a b", "unsupported command")]:
        assert why in nl.parse_script(line).error.reason, line


def test_long_runs_are_split_below_the_16_bit_container_length():
    lines = [f'add a 10.{i // 65536}.{i // 256 % 256}.{i % 256} comment "{"u" * 200}-{i}"' for i in range(3000)]
    run = nl.parse_script("\n".join(lines)).ops[0]
    requests = nl.element_requests(run, nl.IPSET_PROTOCOL, exist=True)
    assert len(requests) > 10
    assert [n for r in requests for n in r.linenos] == list(range(1, 3001))
    for r in requests:
        adt = _netlink.spans(r.payload, 4, len(r.payload))[nl.IPSET_ATTR_ADT]
        assert adt[1] - adt[0] + 4 < 1 << 16
        elements = list(_netlink.attrs(r.payload, *adt))
        assert len(elements) == len(r.linenos)
        assert not r.flags & nl.NLM_F_EXCL                 # -exist
    assert nl.element_requests(run, nl.IPSET_PROTOCOL, exist=False)[0].flags & nl.NLM_F_EXCL


def _error(code: int, echoed: bytes, capped: bool) -> bytes:
    flags = _netlink.NLM_F_CAPPED if capped else 0
    body = struct.pack("=i", -code) + (echoed[:16] if capped else echoed)
    return struct.pack("=IHHII", 16 + len(body), _netlink.NLMSG_ERROR, flags, 7, 0) + body


def test_a_refusal_names_the_element_the_kernel_echoed():
    run = nl.parse_script("add a 10.0.0.1\nadd a 10.0.0.2\nadd a 10.0.0.3\n").ops[0]
    req = nl.element_requests(run, nl.IPSET_PROTOCOL, exist=True)[0]
    request = struct.pack("=IHHII", 16 + len(req.payload), req.mtype, req.flags, 7, 0) + req.payload
    # the kernel overwrites the top-level LINENO with the refused element's
    at = request.find(nl._LINENO_HEAD) + 4
    echoed = request[:at] + struct.pack("=I", 2) + request[at + 4:]
    msg = _error(nl.IPSET_ERR_COMMENT, echoed, capped=False)
    assert nl.parse_ack(msg, 0, len(msg)) == nl.Reply(nl.IPSET_ERR_COMMENT, 2, "")
    msg = _error(2, request, capped=True)                  # refused before any element
    assert nl.parse_ack(msg, 0, len(msg)) == nl.Reply(2, None, "")
    assert nl.reason(nl.IPSET_ERR_EXIST, nl.IPSET_CMD_DEL) == "Element cannot be deleted from the set: it's not added"
