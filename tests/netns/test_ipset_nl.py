"""ipset over bare netlink (``noderedirect._ipset_nl`` through ``Host.ipsets`` and
``Host.ipset_apply_script``) against the ``ipset`` tool in real network namespaces.

Reads must equal ``parse_ipset_save`` of ``ipset save`` (values and member order); scripts must
leave the same sets as ``ipset restore`` of the same text in a second netns, and a failing one
must fail at the line the tool names and leave exactly the lines before it applied: the same
sets as the tool makes of those lines alone. (The tool itself can lose a few lines before a
line it rejects while parsing: adds it has buffered and not sent yet.) ``initval`` (random
per set) and the member order (it follows from initval) are the only differences allowed
between two netns.
"""

from __future__ import annotations

import ipaddress
import re
import statistics
import subprocess
import time

import pytest

from noderedirect import _ipset_nl, names
from noderedirect.host import Host, IpsetScriptError, RestoreError, parse_ipset_save
from noderedirect.model import IpsetEntry, IpsetSet

pytestmark = pytest.mark.netns

OWNED = names.IPSET
UID = "6b1f2c3e-0a4d-4c55-9e1a-{:012d}"


def sh(ns, *argv: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns.spec, *argv], input=input, capture_output=True,
                          text=True, check=check)


def saved(ns) -> dict:
    return parse_ipset_save(sh(ns, "ipset", "save").stdout)


def ips(n: int, base: str = "10.245.0.1") -> list[str]:
    first = ipaddress.ip_address(base)
    return [str(first + i) for i in range(n)]


def fill_script(name: str, n: int, comment: bool = True, family: str = "inet", hashsize: int = 1024) -> str:
    head = f"create {name} hash:ip family {family} hashsize {hashsize} maxelem 65536" + (" comment" if comment else "")
    addrs = ips(n, "2001:db8::1" if family == "inet6" else "10.245.0.1")
    adds = [f'add {name} {ip} comment "{UID.format(i)}"' if comment else f"add {name} {ip}"
            for i, ip in enumerate(addrs)]
    return "".join(line + "\n" for line in [head, *adds])


def canonical_save(ns) -> list[str]:
    """``ipset save`` without what differs between two netns holding the same sets: the
    random initval, and so the member order."""
    text = sh(ns, "ipset", "save").stdout
    return sorted(re.sub(r" initval 0x[0-9a-f]+", "", line) for line in text.splitlines())


def headers(ns) -> list[str]:
    """``ipset list -t`` minus initval and memory size (which follow from the hash layout)."""
    out = []
    for line in sh(ns, "ipset", "list", "-t").stdout.splitlines():
        if line.startswith("Size in memory"):
            continue
        out.append(re.sub(r" initval 0x[0-9a-f]+", "", line))
    return out


@pytest.fixture
def twin(netns_factory):
    """A second netns where the same script runs through the tool."""
    return netns_factory("ipsettool")


# ---------------------------------------------------------------- reading


@pytest.mark.parametrize("n,comment,family", [(0, True, "inet"), (1, True, "inet"), (1, False, "inet"),
                                              (1000, True, "inet"), (1000, False, "inet"),
                                              (5000, True, "inet"), (300, True, "inet6"),
                                              (3, False, "inet6")])
def test_read_equals_ipset_save(host, n, comment, family):
    sh(host.ns, "ipset", "restore", input=fill_script(OWNED, n, comment, family))
    sh(host.ns, "ipset", "restore", input="create other hash:ip family inet hashsize 64 maxelem 100\n"
                                          "add other 192.0.2.1\nadd other 192.0.2.2\n")
    want = saved(host.ns)
    got = host.ipsets()
    assert list(got) == list(want) == [OWNED, "other"]        # the order of ipset save
    assert got == want                                         # headers and members, in order
    assert len(got[OWNED][1]) == n
    assert got[OWNED][0] == IpsetSet(OWNED, family=family, comment=comment,
                                     hashsize=got[OWNED][0].hashsize)
    assert got["other"][0] == IpsetSet("other", hashsize=64, maxelem=100, comment=False)
    assert host.ipsets() == want                               # again, now from the memo


def test_read_a_grown_hash(host):
    sh(host.ns, "ipset", "restore", input=fill_script(OWNED, 5000, hashsize=64))
    got = host.ipsets()[OWNED][0]
    assert got.hashsize > 64                                   # the kernel grew it
    assert host.ipsets() == saved(host.ns)


def test_foreign_sets_are_read_with_the_tool_or_not_at_all(host, monkeypatch):
    sh(host.ns, "ipset", "restore", input=(
        "create kube-net hash:net family inet hashsize 1024 maxelem 65536\n"
        "add kube-net 10.0.0.0/8\nadd kube-net 192.168.0.0/16\n"
        + fill_script(OWNED, 10)
        + "create kube-list list:set size 8\nadd kube-list kube-net\n"
        + "create kube-big hash:ip family inet hashsize 1024 maxelem 65536\n"
        + "".join(f"add kube-big {ip}\n" for ip in ips(2000, "10.99.0.1"))))
    want = saved(host.ns)
    assert host.ipsets() == want                               # every set, foreign types via the tool
    assert list(host.ipsets()) == sh(host.ns, "ipset", "list", "-n").stdout.split()

    dumped = []
    real = _ipset_nl.list_request
    monkeypatch.setattr(_ipset_nl, "list_request", lambda proto, name: dumped.append(name) or real(proto, name))
    ran = []
    real_run = Host.run
    monkeypatch.setattr(Host, "run", lambda self, argv, **kw: ran.append(list(argv)) or real_run(self, argv, **kw))
    got = host.ipsets(only=names.is_owned_ipset)
    assert got == {OWNED: want[OWNED]}
    assert dumped == [OWNED] and ran == []                     # foreign sets: their names only


def test_read_follows_changes(host):
    sh(host.ns, "ipset", "restore", input=fill_script(OWNED, 50))
    first = host.ipsets()[OWNED][1]
    sh(host.ns, "ipset", "-exist", "add", OWNED, first[7].ip, "comment", "changed")
    sh(host.ns, "ipset", "del", OWNED, first[8].ip)
    sh(host.ns, "ipset", "add", OWNED, "10.246.0.1")
    again = host.ipsets()[OWNED][1]
    assert again == saved(host.ns)[OWNED][1]
    assert IpsetEntry(OWNED, first[7].ip, "changed") in again and first[7] not in again
    assert first[8].ip not in {e.ip for e in again}
    assert IpsetEntry(OWNED, "10.246.0.1", None) in again
    sh(host.ns, "ipset", "destroy", OWNED)
    assert host.ipsets() == {}


# ---------------------------------------------------------------- writing: same result as the tool


def run_both(host, twin, text: str, exist: bool = True):
    """The script through netlink here and through the tool in ``twin``: (our error, the tool's)."""
    mine = theirs = None
    try:
        host.ipset_apply_script(text, exist=exist)
    except IpsetScriptError as e:
        mine = e
    try:
        with Host(twin) as tool:
            tool.ipset_restore(text, exist=exist)
    except RestoreError as e:
        theirs = e
    return mine, theirs


def assert_same_sets(host, twin):
    assert canonical_save(host.ns) == canonical_save(twin)
    assert headers(host.ns) == headers(twin)                  # revision, references, entries too


@pytest.mark.parametrize("family,comment", [("inet", True), ("inet", False), ("inet6", True)])
def test_script_makes_the_sets_the_tool_makes(host, twin, family, comment):
    text = fill_script(OWNED, 1000, comment, family) + "create small hash:ip hashsize 64 maxelem 10\n" \
        "add small 192.0.2.1\n\n# a comment line\nadd small 192.0.2.2\n"
    mine, theirs = run_both(host, twin, text)
    assert mine is None and theirs is None
    assert_same_sets(host, twin)
    assert "Revision: 6" in headers(host.ns)
    assert len(host.ipsets()[OWNED][1]) == 1000


def test_exist_semantics_match_the_tool(host, twin):
    base = fill_script(OWNED, 20) + "create plain hash:ip\nadd plain 192.0.2.1\n"
    assert run_both(host, twin, base) == (None, None)
    again = (base                                              # re-create identical, re-add identical
             + f'add {OWNED} 10.245.0.1 comment "recommented"\n'   # re-add: the comment is replaced
             + f"del {OWNED} 10.245.0.2\ndel {OWNED} 10.245.0.2\n"  # del twice, then of an absent one
             + f"del {OWNED} 10.9.9.9\n"
             + "destroy never-existed\n")
    assert run_both(host, twin, again) == (None, None)
    assert_same_sets(host, twin)
    assert host.ipsets()[OWNED][1].count(IpsetEntry(OWNED, "10.245.0.1", "recommented")) == 1
    assert "10.245.0.2" not in {e.ip for e in host.ipsets()[OWNED][1]}


def test_rebuild_in_a_twin_then_swap(host, twin):
    """The planner's rebuild: a stale twin left by an interrupted apply is flushed, filled,
    swapped in and destroyed, while a rule references the set."""
    tmp = OWNED + "-tmp"
    old = fill_script(OWNED, 300) + f"create {tmp} hash:ip family inet hashsize 1024 maxelem 65536 comment\n" \
        f'add {tmp} 10.200.0.1 comment "junk"\n'
    for ns in (host.ns, twin):
        sh(ns, "ipset", "restore", input=old)
        sh(ns, "iptables-legacy", "-A", "INPUT", "-m", "set", "--match-set", OWNED, "src", "-j", "ACCEPT")
    want = [IpsetEntry(OWNED, ip, f"new-{i}") for i, ip in enumerate(ips(500, "10.246.0.1"))]
    script = "".join(line + "\n" for line in [
        f"create {tmp} hash:ip family inet hashsize 1024 maxelem 65536 comment", f"flush {tmp}",
        *(f'add {tmp} {e.ip} comment "{e.comment}"' for e in want), f"swap {tmp} {OWNED}", f"destroy {tmp}"])
    assert run_both(host, twin, script) == (None, None)
    assert_same_sets(host, twin)
    got = host.ipsets()
    assert list(got) == [OWNED] and sorted(got[OWNED][1]) == sorted(want)
    assert "References: 1" in headers(host.ns)


# ---------------------------------------------------------------- writing: errors


FAILING = {
    "add to a missing set": ("create a hash:ip comment\nadd a 10.0.0.1\nadd a 10.0.0.2\n"
                             "add nosuch 10.0.0.3\nadd a 10.0.0.4\n", 4, "The set with the given name does not exist"),
    "bad address": ("create a hash:ip\nadd a 10.0.0.1\nadd a 10.0.0.256\nadd a 10.0.0.4\n", 3,
                    "cannot parse 10.0.0.256"),
    "comment on a plain set, mid-message": ("create a hash:ip\nadd a 10.0.0.1\nadd a 10.0.0.2 comment \"x\"\n"
                                            "add a 10.0.0.3\n", 3, "created without comment support"),
    "address of the other family": ("create a hash:ip family inet6\nadd a 2001:db8::1\nadd a 10.0.0.1\n"
                                    "add a 2001:db8::2\n", 3, "IPv6 address is expected"),
    "create over a different set": ("create a hash:ip maxelem 10\nadd a 10.0.0.1\ncreate a hash:ip maxelem 20\n"
                                    "add a 10.0.0.2\n", 3, "set with the same name already exists"),
    "swap with a missing set": ("create a hash:ip\nadd a 10.0.0.1\nswap a nosuch\nflush a\n", 3,
                                "the second set does not exist"),
    "flush of a missing set": ("create a hash:ip\nadd a 10.0.0.1\nflush nosuch\ndestroy a\n", 3,
                               "The set with the given name does not exist"),
}


def assert_applied_exactly_before(host, netns_factory, text: str, lineno: int) -> None:
    before = netns_factory("ipsetpre")
    sh(before, "ipset", "restore", input="".join(ln + "\n" for ln in text.splitlines()[:lineno - 1]))
    assert_same_sets(host, before)


@pytest.mark.parametrize("case", sorted(FAILING))
def test_error_names_the_line_and_keeps_the_lines_before(host, twin, netns, netns_factory, case):
    text, lineno, why = FAILING[case]
    mine, theirs = run_both(host, twin, text)
    assert isinstance(mine, IpsetScriptError) and isinstance(theirs, RestoreError)
    assert mine.lineno == theirs.lineno == lineno
    assert mine.line == text.splitlines()[lineno - 1]
    assert why in mine.reason
    assert mine.netns == netns.spec and netns.spec in str(mine)
    assert f"line {lineno} ({mine.line!r})" in str(mine)
    assert any(c.startswith(f">{lineno}: ") for c in mine.context)
    assert (mine.code is None) == (case == "bad address")
    assert_applied_exactly_before(host, netns_factory, text, lineno)


def test_error_inside_a_long_run_of_adds(host, twin, netns_factory):
    """Without -exist, an address already there stops the script in the second message of a
    run of 1500 adds: the 1199 lines before it are applied, none after."""
    head = "create a hash:ip comment\nadd a 10.245.4.175\n"
    adds = [f'add a {ip} comment "{UID.format(i)}"' for i, ip in enumerate(ips(1500))]
    assert adds[1198].split()[2] == "10.245.4.175"
    text = head + "".join(line + "\n" for line in adds)
    mine, theirs = run_both(host, twin, text, exist=False)
    assert mine.lineno == theirs.lineno == 2 + 1199
    assert mine.reason == "Element cannot be added to the set: it's already added"
    members = host.ipsets()["a"][1]
    assert len(members) == 1 + 1198
    assert {e.ip for e in members} == {"10.245.4.175"} | {ln.split()[2] for ln in adds[:1198]}
    assert_applied_exactly_before(host, netns_factory, text, mine.lineno)


def test_destroy_of_a_referenced_set(host):
    host.ipset_apply_script("create a hash:ip\n")
    sh(host.ns, "iptables-legacy", "-A", "INPUT", "-m", "set", "--match-set", "a", "src", "-j", "ACCEPT")
    with pytest.raises(IpsetScriptError) as e:
        host.ipset_apply_script("add a 10.0.0.1\ndestroy a\nadd a 10.0.0.2\n")
    assert (e.value.lineno, e.value.code) == (2, _ipset_nl.IPSET_ERR_BUSY)
    assert "in use by a kernel component" in str(e.value)
    assert [m.ip for m in host.ipsets()["a"][1]] == ["10.0.0.1"]


def test_unsupported_lines_are_refused_at_their_line(host):
    with pytest.raises(IpsetScriptError) as e:
        host.ipset_apply_script("create a hash:ip\ncreate n hash:net\nadd a 10.0.0.1\n")
    assert (e.value.lineno, e.value.code) == (2, None)
    assert "only hash:ip" in e.value.reason
    assert host.ipsets() == {"a": (IpsetSet("a", comment=False), [])}


# ---------------------------------------------------------------- speed


def test_1000_members_read_and_written_faster_than_the_tool(host, twin):
    """Medians of 7, netlink against the tool (printed with -s); the bound is loose on purpose:
    it catches a per-member round trip, not noise."""
    text = fill_script(OWNED, 1000)
    host.ipset_apply_script(text)                              # negotiation out of the way
    sh(host.ns, "ipset", "destroy", OWNED)
    with Host(twin) as tool:
        tool.ipset_restore("create warm hash:ip\n")
        write_new, write_old, read_new, read_cold, read_old = [], [], [], [], []
        for _ in range(7):
            t0 = time.perf_counter()
            host.ipset_apply_script(text)
            write_new.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            tool.run(["ipset", "-exist", "restore"], input=text)
            write_old.append(time.perf_counter() - t0)
            host._ipset_nl.memo.clear()                        # nothing decoded before
            t0 = time.perf_counter()
            got = host.ipsets(only=names.is_owned_ipset)
            read_cold.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            host.ipsets(only=names.is_owned_ipset)
            read_new.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            theirs = parse_ipset_save(tool.run(["ipset", "save"]).stdout, names.is_owned_ipset)
            read_old.append(time.perf_counter() - t0)
            assert sorted(got[OWNED][1]) == sorted(theirs[OWNED][1]) and len(got[OWNED][1]) == 1000
            for ns in (host.ns, twin):
                sh(ns, "ipset", "destroy", OWNED)
    ms = {k: statistics.median(v) * 1000 for k, v in [("write", write_new), ("write_tool", write_old),
                                                      ("read_cold", read_cold), ("read", read_new),
                                                      ("read_tool", read_old)]}
    print("\nipset 1000 members, medians: " + " ".join(f"{k}={v:.2f}ms" for k, v in ms.items()))
    assert ms["write"] < 1000 and ms["read_cold"] < 1000
