"""`lab up` / `lab down` through the command line: idempotence, refusal, crash and Ctrl-C.

Each test gets its own state directory and lab prefix, runs ``python -m noderedirect lab …``
as a user would, and ends by proving that nothing is left: no namespace of the prefix, none of
the lab's processes (stand-in ztunnel, servers, user-space GENEVE bridges), no tunnel device
or underlay veth in the machine's own namespace, and no file in the state directory.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labtools import lab_netns, new_prefix
from noderedirect.tunnels.usergeneve import find_bridges

pytestmark = pytest.mark.netns

TAP_OR_LINK = re.compile(r"^\d+: (istioin|istioout|pistioin|pistioout|veth-zt|u-node-\d|u-external)[:@]")


@pytest.fixture
def env(lab_env, tmp_path):
    """A CLI environment with a state directory of its own and a fresh prefix."""
    prefix = new_prefix()
    e = dict(os.environ, NODEREDIRECT_STATE_DIR=str(tmp_path / "state"), NODEREDIRECT_LAB_PREFIX=prefix)
    try:
        yield e
    finally:
        # whatever a failed test left: down is safe to run on anything
        subprocess.run([sys.executable, "-m", "noderedirect", "lab", "down"], env=e,
                       capture_output=True, timeout=60)


def lab(env: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "noderedirect", "lab", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def record(env: dict) -> dict:
    prefix = env["NODEREDIRECT_LAB_PREFIX"].rstrip("-")
    path = Path(env["NODEREDIRECT_STATE_DIR"]) / f"lab-{prefix}.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def lab_pids(rec: dict) -> set[int]:
    """The lab's own processes and the tunnel bridges running in its namespaces."""
    pids = set()
    for pidfile in rec.get("processes", {}).values():
        try:
            pids.add(json.loads(Path(pidfile).read_text())["pid"])
        except (OSError, ValueError, KeyError):
            pass
    for _dev, ino in rec.get("netns_ids", {}).values():
        pids |= set(find_bridges(ino))
    return pids


def running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def snapshot(ns: str) -> dict:
    """Our objects in a netns as text (counters left out)."""
    def out(*argv):
        return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True).stdout
    save = [re.sub(r" \[\d+:\d+\]$", "", l) for l in out("iptables-nft-save").splitlines()
            if not l.startswith("#")]
    return {"iptables": save, "rules": out("ip", "rule"), "routes": out("ip", "-4", "route", "show", "table", "all"),
            "ipset": out("ipset", "save"), "links": out("ip", "-o", "link")}


def assert_gone(env: dict, prefix: str, pids: set[int]) -> None:
    assert lab_netns(prefix) == []
    assert not [p for p in pids if running(p)], f"lab processes still running: {pids}"
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    stray = [l for l in ps.splitlines() if prefix in l or env["NODEREDIRECT_STATE_DIR"] in l]
    assert stray == []
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    assert [l for l in links.splitlines() if TAP_OR_LINK.match(l)] == []
    state = Path(env["NODEREDIRECT_STATE_DIR"])
    assert sorted(p.name for p in state.iterdir()) == [], "files left in the state directory"


def mid_up(rec: dict) -> bool:
    """Every namespace exists and the engine is applying (the tunnel is not recorded yet): the
    widest window of `lab up`, so an interrupt sent now lands before it finishes."""
    return (rec.get("phase") == "building" and not rec.get("tunnel")
            and len(rec.get("netns_ids", {})) == len(rec.get("netns", [None])))


def wait_for(env: dict, pred, proc: subprocess.Popen, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = record(env)
        if rec and pred(rec):
            return rec
        assert proc.poll() is None, f"lab up ended early: {proc.communicate()}"
        time.sleep(0.002)
    raise AssertionError("lab up never reached the point to interrupt it at")


def start_up(env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "noderedirect", "lab", "up", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_up_twice_is_idempotent_other_params_refused_down_removes_all(env):
    prefix = env["NODEREDIRECT_LAB_PREFIX"]
    first = lab(env, "up", "--tunnel", "usergeneve")
    assert first.returncode == 0, first.stderr
    assert f"lab {prefix} is up" in first.stdout
    rec = record(env)
    node, zt = f"{prefix}node-1", f"{prefix}ztunnel-1"
    before = {ns: snapshot(ns) for ns in (node, zt)}
    pids = lab_pids(rec)
    assert len(pids) == 4          # ztunnel-1, servers, two usergeneve bridges

    again = lab(env, "up", "--tunnel", "usergeneve")
    assert again.returncode == 0, again.stderr
    assert "was already up" in again.stdout and "no changes" in again.stdout
    after = {ns: snapshot(ns) for ns in (node, zt)}
    assert after == before, [(ns, k) for ns in after for k in after[ns] if after[ns][k] != before[ns][k]]
    assert lab_pids(record(env)) == pids          # nothing was restarted

    other = lab(env, "up", "--tunnel", "vxlan")
    assert other.returncode == 2
    assert "already up with" in other.stderr and "--tunnel usergeneve" in other.stderr
    assert "lab down" in other.stderr
    st = lab(env, "status", "-o", "json")
    assert st.returncode == 0 and json.loads(st.stdout)["healthy"] is True

    curl = lab(env, "curl", "sleep", "httpbin:8000")
    assert curl.returncode == 0, curl.stderr
    assert "listener 15001" in curl.stdout and "httpbin saw client=10.244.1.5:" in curl.stdout

    down = lab(env, "down")
    assert down.returncode == 0, down.stderr
    assert "8 namespaces" in down.stdout
    assert_gone(env, prefix, pids)
    again = lab(env, "down")
    assert again.returncode == 0 and "nothing to remove" in again.stdout


def test_down_after_the_cli_was_killed_mid_up(env):
    prefix = env["NODEREDIRECT_LAB_PREFIX"]
    proc = start_up(env, "--tunnel", "usergeneve", "--extra-pods", "5")
    wait_for(env, mid_up, proc)
    time.sleep(0.3)                  # into the engine's apply: bridges starting or running
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)
    rec = record(env)
    assert rec["phase"] == "building"
    pids = lab_pids(rec)
    assert len(lab_netns(prefix)) == 13                  # there is a mess to clean

    down = lab(env, "down")
    assert down.returncode == 0, down.stderr
    assert_gone(env, prefix, pids)


def test_up_after_a_crash_rebuilds(env):
    prefix = env["NODEREDIRECT_LAB_PREFIX"]
    proc = start_up(env, "--tunnel", "vxlan")
    wait_for(env, mid_up, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)
    assert record(env)["phase"] == "building"

    up = lab(env, "up", "--tunnel", "vxlan")
    assert up.returncode == 0, up.stderr
    assert "did not finish" in up.stderr
    curl = lab(env, "curl", "external", "httpbin")
    assert curl.returncode == 0 and "listener 15006" in curl.stdout, curl.stdout
    pids = lab_pids(record(env))
    assert lab(env, "down").returncode == 0
    assert_gone(env, prefix, pids)


def test_ctrl_c_during_up_leaves_nothing(env):
    prefix = env["NODEREDIRECT_LAB_PREFIX"]
    proc = start_up(env, "--tunnel", "usergeneve")
    rec = wait_for(env, mid_up, proc)
    time.sleep(0.3)
    pids = lab_pids(rec)             # bridges running by now; any other shows up in `ps`
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert lab_netns(prefix) == [], err
    assert_gone(env, prefix, pids)


def test_bad_parameters_are_refused_before_anything_exists(env):
    prefix = env["NODEREDIRECT_LAB_PREFIX"]
    bad = lab(env, "up", "--extra-pods", "999")
    assert bad.returncode == 2 and "--extra-pods 999" in bad.stderr
    assert lab_netns(prefix) == [] and record(env) == {}
    missing = lab(env, "curl", "sleep", "httpbin")
    assert missing.returncode == 2 and "there is no lab" in missing.stderr
