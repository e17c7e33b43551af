"""Processes and network namespaces for the lab: entering a netns, and the lab's daemons.

Owns two things:

- **netns entry per thread** (:func:`enter_netns`, :func:`run_in_netns`,
  :func:`socket_in_netns`). A network namespace is a property of a thread, and a socket stays
  in the namespace it was created in for its whole life. So one process can serve many pod
  namespaces: a short-lived thread enters the netns, creates the socket and ends; any thread can
  use the socket afterwards. Nothing forks, so this is safe in a threaded process.
- **detached, supervised processes** (:func:`start`, :func:`stop`, :func:`alive`,
  :func:`wait_ready`, :func:`kill_netns_pids`). A process is started in its own session with
  stdin on ``/dev/null`` and stdout/stderr in ``<state_dir>/<name>.out``; its pidfile
  ``<state_dir>/<name>.pid`` records the pid *and* the kernel start time, so a recycled pid is
  never mistaken for (or killed as) the lab's process.

A process inside a netns keeps that netns alive even after ``ip netns del``, so the lab stops
its processes through their pidfiles and then kills whatever is still inside a namespace
(:func:`kill_netns_pids`) before deleting it.

Standard library only: the daemons import this module inside the target netns.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/var/run/netns"
STOP_GRACE = 2.0          # seconds between SIGTERM and SIGKILL
POLL = 0.02               # seconds between checks while waiting for a process or file


class ProcError(Exception):
    """A lab process could not be started, did not become ready, or would not die."""


class NetnsError(ProcError):
    """A network namespace could not be entered (missing, not a netns, or setns refused)."""


# ---------------------------------------------------------------- network namespaces


def netns_path(name_or_path: str) -> str:
    """``/var/run/netns/NAME`` for a bare name; a path is returned as given."""
    return name_or_path if "/" in name_or_path else os.path.join(NETNS_DIR, name_or_path)


def netns_identity(path: str) -> tuple[int, int]:
    """(st_dev, st_ino) of a netns file: equal identities are the same namespace."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def same_netns(path: str, identity: tuple[int, int]) -> bool:
    """Whether ``path`` still names the namespace ``identity`` (False once it was deleted)."""
    try:
        return netns_identity(path) == identity
    except OSError:
        return False


_libc: Optional[ctypes.CDLL] = None


def _setns(fd: int) -> None:
    global _libc
    if hasattr(os, "setns"):          # Python >= 3.12
        os.setns(fd, CLONE_NEWNET)
        return
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def enter_netns(path: str) -> tuple[int, int]:
    """Move the calling thread (only) into the netns at ``path``; returns its identity.

    Verifies afterwards that the thread really is there: a silent failure would make the
    caller bind sockets in the wrong namespace, which looks like a routing bug much later.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise NetnsError(f"cannot open netns {path}: {e.strerror}") from None
    try:
        target = os.fstat(fd)
        _setns(fd)
    except OSError as e:
        raise NetnsError(f"setns into {path} failed: {e.strerror}") from None
    finally:
        os.close(fd)
    identity = (target.st_dev, target.st_ino)
    if netns_identity("/proc/thread-self/ns/net") != identity:
        raise NetnsError(f"setns into {path} did not take effect")
    return identity


def run_in_netns(path: str, fn: Callable[..., T], *args, **kwargs) -> T:
    """Run ``fn`` on a fresh thread that entered the netns at ``path``; return its result or
    re-raise its exception. The thread ends afterwards, the caller's netns is unchanged."""
    result: dict[str, object] = {}

    def body() -> None:
        try:
            enter_netns(path)
            result["value"] = fn(*args, **kwargs)
        except BaseException as e:       # handed to the caller below
            result["error"] = e

    t = threading.Thread(target=body, name=f"setns:{path}", daemon=True)
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]            # type: ignore[misc]
    return result["value"]               # type: ignore[return-value]


def socket_in_netns(path: str, family: int = socket.AF_INET,
                    type: int = socket.SOCK_STREAM) -> socket.socket:
    """A new socket that lives in the netns at ``path`` (usable from any thread)."""
    return run_in_netns(path, socket.socket, family, type)


# ---------------------------------------------------------------- supervised processes


@dataclass(frozen=True)
class Started:
    """A process started by :func:`start`."""

    name: str
    pid: int
    pidfile: Path
    output: Path            # its stdout + stderr


def package_root() -> str:
    """The directory that holds the ``noderedirect`` package (for a source checkout)."""
    return str(Path(__file__).resolve().parents[2])


def module_argv(module: str, *args: str) -> list[str]:
    """``python -m MODULE ARGS…`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def _start_time(pid: int) -> Optional[int]:
    """Kernel start time of ``pid`` in clock ticks, None if there is no such live process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may contain spaces and parentheses: split after the last ')'
    fields = stat.rpartition(")")[2].split()
    if fields[0] in ("Z", "X"):          # exited, waiting to be reaped: not alive
        _reap(pid)
        return None
    return int(fields[19])               # field 22 overall


def _reap(pid: int) -> None:
    """Collect ``pid`` if it is our own exited child (so it does not linger as a zombie)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def start(argv: Sequence[str], state_dir: "str | Path", name: str,
          env: Optional[dict[str, str]] = None, cwd: str = "/") -> Started:
    """Start ``argv`` detached (own session, stdin ``/dev/null``, output to
    ``<state_dir>/<name>.out``) and write ``<state_dir>/<name>.pid``.

    Refuses to start a second process under a name whose pidfile names a live process.
    """
    base = Path(state_dir)
    base.mkdir(parents=True, exist_ok=True)
    pidfile, output = base / f"{name}.pid", base / f"{name}.out"
    if alive(pidfile):
        raise ProcError(f"{name} is already running (pidfile {pidfile})")
    full_env = dict(os.environ if env is None else env)
    # the daemons import this package; make that work from a source checkout too
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root(),
                                                           full_env.get("PYTHONPATH")]))
    with open(output, "ab") as out:
        try:
            proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, cwd=cwd, env=full_env,
                                    close_fds=True, start_new_session=True)
        except OSError as e:
            raise ProcError(f"cannot start {name} ({argv[0]}): {e.strerror}") from None
    started = _start_time(proc.pid)
    record = {"name": name, "pid": proc.pid, "start_time": started, "argv": list(argv)}
    tmp = pidfile.with_suffix(".pid.tmp")
    tmp.write_text(json.dumps(record) + "\n")
    tmp.replace(pidfile)
    log.info("started name=%s pid=%d pidfile=%s", name, proc.pid, pidfile)
    return Started(name=name, pid=proc.pid, pidfile=pidfile, output=output)


def read_pidfile(pidfile: "str | Path") -> Optional[dict]:
    """The pidfile's record, None if it is missing or unreadable."""
    try:
        rec = json.loads(Path(pidfile).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("pid"), int) else None


def _live_pid(pidfile: "str | Path") -> Optional[int]:
    """The pid recorded in ``pidfile`` if that very process (same start time) still runs."""
    rec = read_pidfile(pidfile)
    if rec is None:
        return None
    now = _start_time(rec["pid"])
    if now is None or (rec.get("start_time") is not None and now != rec["start_time"]):
        return None
    return rec["pid"]


def alive(pidfile: "str | Path") -> bool:
    """Whether the process recorded in ``pidfile`` is still running."""
    return _live_pid(pidfile) is not None


def _wait_dead(pid: int, start_time: Optional[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        now = _start_time(pid)
        if now is None or (start_time is not None and now != start_time):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL)


def _terminate(pid: int, start_time: Optional[int], grace: float, what: str) -> None:
    """SIGTERM, wait ``grace`` seconds, SIGKILL, wait again; ProcError if it survives."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if _wait_dead(pid, start_time, grace):
        return
    log.warning("%s pid=%d ignored SIGTERM for %.1fs: SIGKILL", what, pid, grace)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if not _wait_dead(pid, start_time, grace):
        raise ProcError(f"{what} pid {pid} did not exit after SIGKILL")


def stop(pidfile: "str | Path", grace: float = STOP_GRACE) -> bool:
    """Stop the process of ``pidfile`` (SIGTERM, then SIGKILL after ``grace`` seconds) and
    remove the pidfile. Returns whether a live process was stopped."""
    pidfile = Path(pidfile)
    rec = read_pidfile(pidfile)
    pid = _live_pid(pidfile)
    if pid is not None:
        _terminate(pid, rec.get("start_time") if rec else None, grace, rec.get("name", "process"))
        log.info("stopped name=%s pid=%d", rec.get("name"), pid)
    with contextlib.suppress(FileNotFoundError):
        pidfile.unlink()
    return pid is not None


def wait_ready(file: "str | Path", timeout: float,
               pidfile: "str | Path | None" = None) -> None:
    """Wait until ``file`` exists. With ``pidfile``, fail at once if that process died
    (its output file, next to the pidfile, is quoted in the error)."""
    file = Path(file)
    deadline = time.monotonic() + timeout
    while not file.exists():
        if pidfile is not None and not alive(pidfile):
            out = Path(pidfile).with_suffix(".out")
            tail = ""
            with contextlib.suppress(OSError):
                tail = out.read_text(errors="replace").strip().splitlines()[-1]
            raise ProcError(f"process of {pidfile} exited before it was ready"
                            + (f": {tail}" if tail else ""))
        if time.monotonic() >= deadline:
            raise ProcError(f"{file} did not appear within {timeout:.1f}s")
        time.sleep(POLL)


def netns_pids(name_or_path: str) -> list[int]:
    """Every process whose (main thread's) network namespace is the one named, like
    ``ip netns pids NAME``. This process is never listed."""
    try:
        target = netns_identity(netns_path(name_or_path))
    except OSError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if netns_identity(f"/proc/{entry}/ns/net") == target:
                pids.append(int(entry))
        except OSError:          # gone meanwhile, or a kernel thread
            continue
    return sorted(pids)


def kill_netns_pids(name_or_path: str, grace: float = 1.0) -> list[int]:
    """Terminate every process inside a netns (SIGTERM, SIGKILL after ``grace``) so that the
    netns can really go away when it is deleted. Returns the pids found.

    A process that only holds *sockets* in the netns (the test server, whose threads all
    left it) is not found here, yet also keeps the netns alive: stop it by its pidfile.
    """
    pids = netns_pids(name_or_path)
    starts = {pid: _start_time(pid) for pid in pids}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    stuck = pids
    while stuck and time.monotonic() < deadline:
        time.sleep(POLL)
        stuck = [p for p in stuck if not _wait_dead(p, starts[p], 0)]
    for pid in stuck:
        log.warning("pid=%d in netns %s ignored SIGTERM: SIGKILL", pid, name_or_path)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    stuck = [p for p in stuck if not _wait_dead(p, starts[p], grace)]
    if stuck:
        raise ProcError(f"pids {stuck} in netns {name_or_path} did not exit after SIGKILL")
    return pids


# ---------------------------------------------------------------- helpers for the daemons


def write_ready(path: "str | Path", info: dict) -> None:
    """Write a ready file atomically: a reader never sees it half written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(info) + "\n")
    tmp.replace(path)


def errno_text(e: BaseException) -> str:
    """``'ECONNREFUSED Connection refused'`` for an OSError, ``'timeout'`` for a timeout."""
    if isinstance(e, (socket.timeout, TimeoutError)) and not getattr(e, "errno", None):
        return "timeout"
    if isinstance(e, OSError) and e.errno:
        return f"{errno.errorcode.get(e.errno, str(e.errno))} {e.strerror or os.strerror(e.errno)}"
    return f"{type(e).__name__} {e}".strip()


def addr_text(addr: tuple) -> str:
    """``'ip:port'`` of a socket address."""
    return f"{addr[0]}:{addr[1]}"
