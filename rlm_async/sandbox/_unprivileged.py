"""The unprivileged tier ("landlock"), engine side: whether it can run here, and the
lock-down each worker applies to itself (`_confine.lock_down`).

Needs neither namespaces nor a daemon, so it runs in a container whose seccomp profile
forbids user namespaces (Docker's default, most Kubernetes pods):

- Landlock: read-only access to what Python needs (`/usr`, the interpreter's install,
  `/etc/ld.so.cache`, three character devices), full access to a private temp directory,
  nothing else: no `/proc` (no other process's `environ` or `cmdline`), no home, no
  working directory of the engine. TCP bind/connect denied (ABI >= 4); signals and
  abstract UNIX sockets scoped to the worker (ABI >= 6).
- seccomp (`_seccomp`, network=False): only AF_UNIX stream sockets, no `connect`, no
  ptrace / process_vm_* / namespaces / mount / bpf / io_uring / keyring ..., after
  `no_new_privs`.
- The engine makes itself non-dumpable, so nothing running as its uid can read its
  `/proc/<pid>/environ`, `mem` or `fd`; as root, each worker switches to a private uid.
- A supervisor process, outside the worker's reach, collects every orphan the code makes.

Requirements, checked here and then proven by a probe that locks a real interpreter down:
Landlock (ABI >= 1 as root, which drops the worker to its own uid; ABI >= 6 otherwise, or
the worker could signal the engine it shares a uid with) and a seccomp filter for this
CPU (x86-64, aarch64).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import anyio

from . import _landlock as landlock
from . import _seccomp as seccomp
from ._launch import NETWORK_ETC, PYTHON_FLAGS, SYSTEM_LINKS, Interpreter, can_drop_uid_unsandboxed, run_probe

__all__ = ["CONFINE_PATH", "harden_engine", "lockdown_spec", "unavailable"]

CONFINE_PATH = str(Path(__file__).with_name("_confine.py"))
_PR_SET_DUMPABLE = 4
_DEVICES_READ = ("/dev/zero", "/dev/urandom", "/dev/random")
_probes: dict[tuple[str, bool, bool], str | None] = {}


def lockdown_spec(
    interp: Interpreter, tmpdir: str, *, uid: int | None, allow_network: bool
) -> dict[str, Any]:
    """What one worker's `_confine.lock_down` applies (sent in its `init` frame)."""
    rules: list[tuple[str, int]] = [("/usr", landlock.FS_READ)]
    rules += [(p, landlock.FS_READ) for p in SYSTEM_LINKS if os.path.isdir(p) and not os.path.islink(p)]
    rules += [(root, landlock.FS_READ) for root in interp.roots]
    rules.append((interp.executable, landlock.FS_READ))
    rules.append(("/etc/ld.so.cache", landlock.FS_READ))
    if allow_network:
        rules += [(p, landlock.FS_READ) for p in NETWORK_ETC]
    rules.append(("/dev/null", landlock.FS_READ_WRITE_FILE))
    rules += [(p, landlock.FS_READ) for p in _DEVICES_READ]
    rules.append((tmpdir, landlock.FS_ALL))
    program = seccomp.build(network=allow_network)
    return {
        "uid": uid,
        "keep_read_search": uid is not None and not can_drop_uid_unsandboxed(interp),
        "rules": rules,
        "deny_tcp": not allow_network,
        "seccomp": None if program is None else program.hex(),
    }


def _static_reason(root: bool) -> str | None:
    """Why the tier cannot run, from what the kernel and machine report (no process started)."""
    abi = landlock.abi()
    if abi < 1:
        return "the kernel has no Landlock (it needs Linux >= 5.13 with landlock in the `lsm=` boot list)"
    if seccomp.arch() is None:
        return "no seccomp filter is built for this CPU architecture (x86-64 and aarch64 only)"
    if not root and abi < 6:
        return (
            f"Landlock ABI {abi} cannot stop a worker that shares the engine's uid from "
            "signalling the engine (that needs ABI >= 6, Linux >= 6.12), and only an engine "
            "running as root can give the worker a uid of its own"
        )
    return None


async def unavailable(interp: Interpreter, *, allow_network: bool) -> str | None:
    """None when the unprivileged tier works here, else why not. The probe's answer is
    cached per process; the kernel checks are not (tests simulate their absence)."""
    root = os.geteuid() == 0
    why = _static_reason(root)
    if why is not None:
        return why
    key = (interp.executable, allow_network, root)
    if key not in _probes:
        _probes[key] = await _probe(interp, allow_network=allow_network, root=root)
    return _probes[key]


async def _probe(interp: Interpreter, *, allow_network: bool, root: bool) -> str | None:
    from . import _procs as procs  # the uid scan is blocking: only here, in a thread

    tmpdir = await anyio.to_thread.run_sync(lambda: tempfile.mkdtemp(prefix="rlm-probe-"))
    try:
        uid = await anyio.to_thread.run_sync(procs.pick_free_uid) if root else None
        if uid is not None:
            os.chown(tmpdir, uid, uid)
        spec = lockdown_spec(interp, tmpdir, uid=uid, allow_network=allow_network)
        argv = [interp.executable, *PYTHON_FLAGS, CONFINE_PATH, json.dumps(spec)]
        try:
            result = await run_probe(argv, env={}, cwd=tmpdir)
        except OSError as exc:
            return f"{interp.executable} could not be executed ({exc})"
        if result.returncode != 0:
            err = result.stderr.decode("utf-8", "replace").strip()
            return f"a probe worker could not lock itself down (exit {result.returncode}): {err[-300:]}"
        return None
    finally:
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(tmpdir, ignore_errors=True))


def harden_engine() -> None:
    """PR_SET_DUMPABLE 0 for the engine: no process of its uid (a worker of this tier
    included) may read its `/proc/<pid>/environ`, `mem` or `fd`, or attach a debugger. Side effect: no core dumps, and profilers that attach (py-spy) need root."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_DUMPABLE, 0): {os.strerror(err)}")
