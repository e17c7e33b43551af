"""User-space GENEVE over TAP (kernel-notes.md §9): GENEVE for kernels built without it.

Owns the persistent TAP devices that carry the original's link names (``istioin`` …, so
routes, rules and captures name the same devices as with kernel GENEVE) and the supervision
of the one bridge process per netns (``usergeneve_main``) that moves their frames over UDP:

- state lives in ``$NODEREDIRECT_STATE_DIR`` (default ``/run/noderedirect``), keyed by the
  netns inode: ``usergeneve-<inode>.pid`` (pid + config hash, written by the process once it
  is ready), ``.status.json`` (counters), ``.log`` (JSON lines), ``.lock``;
- ``ensure`` leaves a running bridge with the same configuration alone (re-apply never flaps)
  and restarts it when the configuration changed, a TAP was recreated, or it died;
- ``remove`` stops it (SIGTERM, then SIGKILL) and deletes the TAPs; the process also exits by
  itself when a TAP or the netns disappears.

Differences from kernel GENEVE that stay visible: the inner packet mark is not copied to the
outer packet (plain local UDP), and there is no GSO.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

from .. import model
from ..host import Host, HostError, LinkInfo, MissingFeature, NetnsRef, borrowed
from . import TunnelDriver, _links
from ._kernel import log_changes
from .usergeneve_main import (PROGRAM, TUN_DEVICE, LinkSpec, StatePaths, config_hash,
                              state_dir, validate)

log = logging.getLogger(__name__)

START_TIMEOUT = 10.0      # seconds for the bridge to attach, bind and say "ready"
STOP_GRACE = 2.0          # seconds between SIGTERM and SIGKILL
STATUS_WAIT = 2.0         # seconds to wait for a fresh status after SIGUSR1


class BridgeError(HostError):
    """The user-space GENEVE process could not be started or stopped."""


# ---------------------------------------------------------------- the process


def paths_for(netns_path: str) -> StatePaths:
    """State files of the bridge serving ``netns_path`` (NetnsNotFound if there is no netns)."""
    return StatePaths(state_dir(), NetnsRef.resolve(netns_path).identity[1])


def _proc_is_bridge(pid: int, inode: Optional[int] = None) -> bool:
    """A live (not zombie) bridge process, inside the netns ``inode`` when given: guards
    against a pid reused by something else."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        netns = os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return False
    state = stat.rpartition(")")[2].split()[0]
    if state in ("Z", "X") or PROGRAM.encode() not in cmdline:
        return False
    return inode is None or netns == f"net:[{inode}]"


def find_bridges(inode: int) -> list[int]:
    """Every bridge process inside the netns ``inode``, pidfile or not (adoption after the
    state directory was lost or changed)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid() and _proc_is_bridge(int(entry), inode):
            found.append(int(entry))
    return sorted(found)


def read_record(paths: StatePaths) -> Optional[dict]:
    """The pidfile of a running bridge, or None (missing, unreadable, or its process is gone)."""
    try:
        rec = json.loads(paths.pidfile.read_text())
    except (OSError, ValueError):
        return None
    pid = rec.get("pid")
    if not isinstance(pid, int) or not _proc_is_bridge(pid, paths.inode):
        return None
    return rec


def read_status(paths: StatePaths) -> dict:
    try:
        return json.loads(paths.status.read_text())
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def locked(paths: StatePaths) -> Iterator[None]:
    """One ensure/remove per netns at a time (flock: released if the holder dies)."""
    paths.base.mkdir(parents=True, exist_ok=True)
    with open(paths.lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _wait_gone(pids: Sequence[int], inode: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    left = [p for p in pids if _proc_is_bridge(p, inode)]
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = [p for p in left if _proc_is_bridge(p, inode)]
    return left


def _stop(paths: StatePaths) -> list[str]:
    """Stop every bridge of this netns; remove its pidfile and status file."""
    pids = find_bridges(paths.inode)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    stuck = _wait_gone(pids, paths.inode, STOP_GRACE)
    for pid in stuck:
        log.warning("usergeneve bridge pid=%d ignored SIGTERM for %.0fs: SIGKILL", pid, STOP_GRACE)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if _wait_gone(stuck, paths.inode, STOP_GRACE):
        raise BridgeError(f"usergeneve bridge pid(s) {stuck} did not exit after SIGKILL")
    for f in (paths.pidfile, paths.status):
        with contextlib.suppress(FileNotFoundError):
            f.unlink()
    return [f"stopped usergeneve bridge pid {pid}" for pid in pids]


def stop_bridge(netns_path: str) -> list[str]:
    """Stop the bridge serving ``netns_path``, if any (kernel drivers call this before they
    replace its TAPs: it holds the UDP port they need)."""
    paths = paths_for(netns_path)
    with locked(paths):
        return _stop(paths)


def _package_root() -> str:
    return str(Path(__file__).resolve().parents[2])


def _start(netns_path: str, specs: Sequence[LinkSpec], paths: StatePaths) -> int:
    """Start the bridge detached and wait for its one-line answer; returns its pid."""
    cmd = [sys.executable, "-m", PROGRAM, "--daemon", "--netns", netns_path,
           "--state-dir", str(paths.base)] + [f"--link={s.arg()}" for s in specs]
    env = dict(os.environ)
    # the bridge imports this package; make that work from a source checkout too
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_package_root(), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd="/", env=env, close_fds=True,
                            start_new_session=True, text=True)
    try:
        out, err = proc.communicate(timeout=START_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        _stop(paths)
        raise BridgeError(f"usergeneve bridge for {netns_path} did not report ready within "
                          f"{START_TIMEOUT:.0f}s (log: {paths.log})") from None
    line = (out.strip().splitlines() or [""])[0]
    word, _, rest = line.partition(" ")
    if word == "ready" and rest.isdigit():
        return int(rest)
    detail = rest if word == "error" else (err.strip().splitlines() or [line or "no answer"])[-1]
    raise BridgeError(f"usergeneve bridge for {netns_path} failed to start: {detail}")


# ---------------------------------------------------------------- the driver


def spec_of(link: model.Link) -> LinkSpec:
    return LinkSpec(name=link.name, vni=link.vni, remote=link.remote, port=link.dstport)


class UserGeneveDriver(TunnelDriver):
    name = "usergeneve"

    def check(self, node_netns_path: str, zt_netns_path: Optional[str] = None) -> None:
        for path in filter(None, (node_netns_path, zt_netns_path)):
            NetnsRef.resolve(path)
        try:
            os.close(os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC))
        except OSError as e:
            raise MissingFeature("tuntap", node_netns_path, f"{TUN_DEVICE}: {e.strerror}") from None

    def _bridged(self, paths: StatePaths) -> dict[str, tuple[LinkSpec, int]]:
        """name -> (spec, ifindex attached) for every TAP the running bridge serves."""
        rec = read_record(paths)
        if rec is None:
            return {}
        status = read_status(paths)
        if status.get("pid") != rec["pid"]:
            return {}
        out = {}
        for arg in rec.get("links", []):
            spec = LinkSpec.parse(arg)
            ifindex = status.get("links", {}).get(spec.name, {}).get("ifindex")
            if ifindex:
                out[spec.name] = (spec, ifindex)
        return out

    def _as_model(self, info: LinkInfo, is_tap: bool, bridged: dict) -> model.Link:
        """A TAP counts as a GENEVE tunnel only while the bridge is attached to that very
        device; otherwise it shows as a bare ``tap`` and compares unequal."""
        if is_tap and info.name in bridged and bridged[info.name][1] == info.index:
            spec = bridged[info.name][0]
            return model.Link(name=info.name, kind=self.name, vni=spec.vni, remote=spec.remote,
                              dstport=spec.port, address=_links.address(info), up=info.up)
        return _links.to_model(info, is_tap)

    def observe(self, netns_path: str, names_: Iterable[str]) -> list[model.Link]:
        with borrowed(netns_path) as host:
            have = _links.read(host, names_)
            taps = _links.tap_indexes(host) if have else set()
        bridged = self._bridged(paths_for(netns_path)) if taps else {}
        return [self._as_model(have[n], have[n].index in taps, bridged) for n in sorted(have)]

    def ensure(self, netns_path: str, links: Sequence[model.Link]) -> list[str]:
        wants = [self.desired(link) for link in links]
        specs = [spec_of(w) for w in wants]
        try:
            validate(specs)
        except ValueError as e:
            raise BridgeError(f"usergeneve links for {netns_path}: {e}") from None
        ref = NetnsRef.resolve(netns_path)
        paths = StatePaths(state_dir(), ref.identity[1])
        changes: list[str] = []
        with locked(paths), borrowed(ref) as host:
            bridged = self._bridged(paths)
            changes += self._ensure_taps(host, wants)
            have = _links.read(host, [w.name for w in wants])
            rec = read_record(paths)
            intact = all(w.name in bridged and bridged[w.name][1] == have[w.name].index
                         for w in wants)
            if rec is not None and rec.get("config") == config_hash(specs) and intact:
                return log_changes(self.name, netns_path, changes)
            why = ("configuration changed" if rec is not None and rec.get("config") != config_hash(specs)
                   else "TAP recreated" if rec is not None else "not running")
            stopped = _stop(paths)
            pid = _start(ref.path, specs, paths)
            verb = "restarted" if stopped else "started"
            changes.append(f"{verb} usergeneve bridge pid {pid} ({why}): "
                           + ", ".join(f"{s.name} id {s.vni} remote {s.remote} dstport {s.port}"
                                       for s in sorted(specs)))
        return log_changes(self.name, netns_path, changes)

    def _ensure_taps(self, host: Host, wants: Sequence[model.Link]) -> list[str]:
        changes: list[str] = []
        have = _links.read(host, [w.name for w in wants])
        taps = _links.tap_indexes(host) if have else set()
        for want in wants:
            info = have.get(want.name)
            if info is not None and info.index not in taps:
                # a kernel tunnel (another driver) or a foreign device under our name
                changes.append(_links.delete(host, info, f"was {_links.to_model(info).show()}"))
                info = None
            if info is None:
                host.link_add(want.name, "tuntap", mode="tap", ifr={"no_pi": 1})
                changes.append(f"created tap {want.name}")
                info = _links.read(host, [want.name])[want.name]
                changes += _links.set_mtu(host, info, _links.underlay_mtu(host, want.remote))
            changes += _links.sync_address(host, info, want.address)
            changes += _links.sync_up(host, info, want.up)
        return changes

    def remove(self, netns_path: str, names_: Iterable[str]) -> list[str]:
        paths = paths_for(netns_path)
        with locked(paths), borrowed(netns_path) as host:
            changes = _stop(paths)
            have = _links.read(host, names_)
            for name in sorted(have):
                changes.append(_links.delete(host, have[name]))
        return log_changes(self.name, netns_path, changes)

    def status(self, netns_path: str, fresh: bool = True) -> dict:
        """The bridge's pidfile record and counters (``{}`` when it is not running). With
        ``fresh``, the process is asked (SIGUSR1) to write its counters now."""
        paths = paths_for(netns_path)
        rec = read_record(paths)
        if rec is None:
            return {}
        before = read_status(paths).get("seq", 0)
        if fresh:
            with contextlib.suppress(ProcessLookupError):
                os.kill(rec["pid"], signal.SIGUSR1)
            deadline = time.monotonic() + STATUS_WAIT
            while read_status(paths).get("seq", 0) <= before and time.monotonic() < deadline:
                time.sleep(0.01)
        return {**read_status(paths), "pidfile": str(paths.pidfile), "log": str(paths.log)}
