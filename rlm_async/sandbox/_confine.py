"""How a worker of the unprivileged ("landlock") tier confines itself, before it reads the
context or runs any code: a supervisor process that outlives every orphan, then, in the
worker, `no_new_privs`, the switch to a private uid (when the engine runs as root), the
Landlock domain and the seccomp filter.

Standard library only, and loaded by path: the bootstrap runs outside any package
(`python -I -S -B _bootstrap.py`), and this file and `_landlock.py` sit beside it. Nothing
here is a boundary against the code that runs after it; it only builds the boundary.

The supervisor is the process the engine started. It forks the worker, makes itself the
child subreaper of everything the worker starts (so an orphan, even one that called
`setsid` and `prctl(PR_SET_CHILD_SUBREAPER, 0)`, is re-parented to it and not to init), and
stays out of the worker's reach: outside its Landlock domain (no signal, no ptrace, no
`/proc/<pid>/mem` across it) and, as root, under another uid. When the worker exits it
kills every descendant and exits as the worker did; when the engine dies it does the same.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import resource
import signal
import sys
import time
import types
from typing import Any

__all__ = ["fork_supervisor", "lock_down"]

_PR_SET_PDEATHSIG = 1
_PR_SET_KEEPCAPS = 8
_PR_SET_SECCOMP = 22
_PR_CAPBSET_DROP = 24
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_RAISE = 2
_SECCOMP_MODE_FILTER = 2
_CAP_DAC_READ_SEARCH = 2
_CAP_VERSION_3 = 0x20080522

_libc = ctypes.CDLL(None, use_errno=True)


def _sibling(name: str) -> types.ModuleType:
    """A module from this directory, loaded by path (there is no package in the worker)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name + ".py")
    spec = importlib.util.spec_from_file_location("rlm_sandbox_" + name.lstrip("_"), path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _prctl(option: int, arg2: int = 0, arg3: int = 0) -> None:
    if _libc.prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


# ---------------------------------------------------------------------------- supervisor
class _EngineGone(Exception):
    pass


def fork_supervisor(ctl_fd: int) -> None:
    """Fork: return in the child (the worker-to-be); the parent supervises and never returns."""
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    _prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
    worker = os.fork()
    if worker == 0:
        _prctl(_PR_SET_CHILD_SUBREAPER, 0)
        return
    _supervise(worker, ctl_fd)


def _on_term(signum: int, frame: object) -> None:
    raise _EngineGone


def _supervise(worker: int, ctl_fd: int) -> None:
    os.close(ctl_fd)  # the engine must see EOF when the worker goes
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(signal.SIGTERM, _on_term)
    status: int | None = None
    try:
        while True:
            pid, st = os.waitpid(-1, 0)
            if pid == worker:
                status = st
                break
    except (_EngineGone, ChildProcessError):
        pass
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _kill_descendants()
    if status is not None and os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    os._exit(os.WEXITSTATUS(status) if status is not None and os.WIFEXITED(status) else 1)


def _descendants(me: int) -> list[int]:
    parents: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read().decode("ascii", "replace")
        except OSError:
            continue
        parents[int(name)] = int(stat[stat.rfind(")") + 2 :].split()[1])
    found: list[int] = []
    todo = [me]
    while todo:
        pid = todo.pop()
        kids = [p for p, pp in parents.items() if pp == pid]
        found += kids
        todo += kids
    return found


def _kill_descendants(wait_s: float = 5.0) -> None:
    """SIGKILL every descendant and reap them; orphans come back here (the subreaper), so
    repeat until there is no child left."""
    me = os.getpid()
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        for pid in _descendants(me):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            return
        time.sleep(0.005)


# ---------------------------------------------------------------------------- the worker
def lock_down(spec: dict[str, Any]) -> dict[str, Any]:
    """Confine this process for good, as `spec` (built by the engine's `_tiers`) says.
    Raises OSError when any step fails: the worker must then not run code."""
    landlock = _sibling("_landlock")  # while this directory is still reachable (a 0700 clone)
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    uid = spec.get("uid")
    if isinstance(uid, int):
        _drop_root(uid, keep_read_search=bool(spec.get("keep_read_search")))
    rules = [(str(path), int(access)) for path, access in spec["rules"]]
    abi = landlock.restrict(rules, deny_tcp=bool(spec["deny_tcp"]), scope=True)
    program = spec.get("seccomp")
    if isinstance(program, str):
        _install_seccomp(bytes.fromhex(program))
    # Set last: a change of credentials clears it.
    _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
    return {"abi": abi, "uid": os.getuid()}


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _drop_root(uid: int, *, keep_read_search: bool) -> None:
    """Become `uid` with no capability, or with CAP_DAC_READ_SEARCH alone when the
    interpreter lies under a directory only root may search (pyenv in /root): the
    Landlock allowlist, not file modes, then decides what the worker may read."""
    keep = 1 << _CAP_DAC_READ_SEARCH if keep_read_search else 0
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
    except (OSError, ValueError):
        last = 40
    for cap in range(last + 1):
        if not keep >> cap & 1:
            try:  # the bounding set: no exec can ever grant these again
                _prctl(_PR_CAPBSET_DROP, cap)
            except OSError:
                pass  # no CAP_SETPCAP (a trimmed container): no_new_privs covers exec
    if keep:
        _prctl(_PR_SET_KEEPCAPS, 1)
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    if keep:
        header = _CapHeader(_CAP_VERSION_3, 0)
        data = (_CapData * 2)(_CapData(keep, keep, keep), _CapData(0, 0, 0))
        if _libc.capset(ctypes.byref(header), data) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"capset: {os.strerror(err)}")
        # Ambient, so a subprocess of the same interpreter can still load its stdlib.
        _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, _CAP_DAC_READ_SEARCH)
        _prctl(_PR_SET_KEEPCAPS, 0)
    if os.getuid() != uid or os.geteuid() != uid:
        raise OSError("the worker could not switch to its private uid")


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _install_seccomp(program: bytes) -> None:
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    _prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(prog))


# ---------------------------------------------------------------------------- probe
def _probe(spec: dict[str, Any]) -> None:
    """`python _confine.py SPEC`: lock down as a worker would, then check that the
    interpreter still works and the network does not. Prints one JSON line."""
    import socket

    lock_down(spec)
    import email.parser  # noqa: F401  (a stdlib import after the lock-down: the allowlist works)

    for family in (socket.AF_INET, socket.AF_INET6) if spec["deny_tcp"] else ():
        try:
            socket.socket(family, socket.SOCK_DGRAM).close()
            raise OSError(f"socket family {family} is still open")
        except PermissionError:
            pass
    try:
        open("/proc/1/cmdline", "rb").close()
        raise OSError("/proc is still readable")
    except PermissionError:
        pass


if __name__ == "__main__":
    _probe(json.loads(sys.argv[1]))
