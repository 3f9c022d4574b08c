"""How a worker process is launched: the bubblewrap command line, or a plain interpreter (the
landlock tier confines itself; the none tier does not).

Under bubblewrap the worker sees a root made of: `/usr` (and the `/bin`, `/lib*` links into
it), the interpreter's install prefix, `/etc/ld.so.cache`, this package's bootstrap file at
`/rlm/bootstrap.py`, a fresh `/proc` of its own pid namespace, a minimal read-only `/dev`,
and size-capped tmpfs mounts at `/tmp` and `/dev/shm`. Everything else is read-only. Not
`/` of the host: as (capability-less) root a `--ro-bind / /` would still expose
`/etc/shadow` and `/root`. `bwrap` itself is started with an empty environment, because
inside the sandbox `/proc/1/environ` is bwrap's own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from ..exceptions import SandboxError
from . import _seccomp as seccomp

__all__ = [
    "BOOTSTRAP_PATH",
    "GROUP_SIGNALS",
    "NETWORK_ETC",
    "PYTHON_FLAGS",
    "SANDBOX_BOOTSTRAP",
    "SYSTEM_LINKS",
    "Interpreter",
    "bwrap_argv",
    "can_drop_uid_unsandboxed",
    "find_bwrap",
    "find_interpreter",
    "plain_argv",
    "plain_env",
    "probe_bwrap",
    "run_probe",
]

BOOTSTRAP_PATH = str(Path(__file__).with_name("_bootstrap.py"))
SANDBOX_BOOTSTRAP = "/rlm/bootstrap.py"
PYTHON_FLAGS = ("-I", "-S", "-B")
"""Isolated mode (no PYTHON* variables, no user site, no script dir on sys.path), no
`site` import (the worker needs only the stdlib; it also starts faster), no .pyc writes."""
SYSTEM_LINKS = ("/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")
NETWORK_ETC = (
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/host.conf",
    "/etc/nsswitch.conf",
    "/etc/gai.conf",
    "/etc/services",
    "/etc/protocols",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/pki",
)
_SHM_BYTES = 64 << 20
_SANDBOX_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "TMPDIR": "/tmp"}


@dataclass(frozen=True, slots=True)
class Interpreter:
    executable: str
    """The interpreter binary, symlinks resolved (a venv's python is its base python)."""
    roots: tuple[str, ...]
    """Directories the interpreter needs besides `/usr`: its install prefix(es)."""


GROUP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT})
"""Signals a terminal or a process manager sends to a whole process group."""


async def run_probe(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    """Run a short probe process to its end, out of the engine's process group, as a
    worker is: a terminal's Ctrl-C (which a batch takes as "finish the running queries")
    must not end a probe, whose failure is remembered for the process's life (bubblewrap
    taken for broken, an isolation tier lost). One ended by such a signal all the same (it
    arrived between the fork and the `setsid`) is run once more."""
    result = await anyio.run_process(argv, check=False, start_new_session=True, **kwargs)
    if -result.returncode in GROUP_SIGNALS:
        result = await anyio.run_process(argv, check=False, start_new_session=True, **kwargs)
    return result


_interpreters: dict[str, Interpreter] = {}
_probes: dict[tuple[str, str, bool, bool], str | None] = {}

_PROBE_CODE = "import sys, json; print(json.dumps([sys.base_prefix, sys.base_exec_prefix]))"


async def find_interpreter(python: str | None) -> Interpreter:
    """Ask the interpreter where its stdlib lives (once per path per process)."""
    name = python or sys.executable
    cached = _interpreters.get(name)
    if cached is not None:
        return cached
    executable = await anyio.to_thread.run_sync(_resolve_executable, name)
    result = await run_probe([executable, *PYTHON_FLAGS, "-c", _PROBE_CODE], env={})
    if result.returncode != 0:
        raise SandboxError(
            f"{executable} -c ... failed (exit {result.returncode}): "
            f"{result.stderr.decode('utf-8', 'replace')[-500:]}"
        )
    interp = await anyio.to_thread.run_sync(_interpreter_from, executable, json.loads(result.stdout))
    _interpreters[name] = interp
    return interp


def _resolve_executable(name: str) -> str:
    found = shutil.which(name) if os.sep not in name else name
    if not found or not os.access(found, os.X_OK):
        raise SandboxError(f"SandboxConfig.python={name!r} is not an executable interpreter")
    return os.path.realpath(found)


def _interpreter_from(executable: str, reported: list[str]) -> Interpreter:
    prefixes = [os.path.realpath(p) for p in reported]
    if not any(_under(executable, p) for p in prefixes):
        prefixes.append(os.path.dirname(os.path.dirname(executable)))
    roots = tuple(sorted({p for p in prefixes if not _under(p, "/usr")}))
    return Interpreter(executable=executable, roots=_outermost(roots))


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _outermost(paths: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(p for p in paths if not any(q != p and _under(p, q) for q in paths))


def find_bwrap(configured: str | None) -> str | None:
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    return shutil.which("bwrap") or ("/usr/bin/bwrap" if os.access("/usr/bin/bwrap", os.X_OK) else None)


def bwrap_argv(
    bwrap: str,
    interp: Interpreter,
    *,
    allow_network: bool,
    tmp_size_bytes: int | None,
    ctl_fd: int,
    may_setuid: bool,
    seccomp_fd: int | None,
    command: list[str] | None = None,
    info_fd: int | None = None,
    nice: int = 0,
) -> list[str]:
    """The full bwrap command line for one worker (or for `command`, when probing).
    `seccomp_fd` holds the filter from `_seccomp` (passed to the child too); bwrap writes
    the host pid of its pid namespace's init (`"child-pid"`) to `info_fd`; the bootstrap
    lowers its own priority by `nice`."""
    argv = [
        bwrap,
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--die-with-parent",
        "--new-session",  # setsid: the code cannot push keystrokes into the engine's terminal
        "--hostname",
        "rlm-sandbox",
    ]
    if not allow_network:
        argv.append("--unshare-net")  # an empty network namespace: not even the host's loopback
    if may_setuid:
        # Root outside: every capability is dropped except the two the bootstrap needs to
        # switch to the worker's private uid; after the switch it holds none.
        argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    if seccomp_fd is not None:
        argv += ["--seccomp", str(seccomp_fd)]
    if info_fd is not None:
        argv += ["--info-fd", str(info_fd)]
    argv += _filesystem_args(interp, allow_network=allow_network, tmp_size_bytes=tmp_size_bytes)
    argv += ["--chdir", "/tmp", "--clearenv"]
    for key, value in _SANDBOX_ENV.items():
        argv += ["--setenv", key, value]
    argv.append("--")
    if command is not None:
        return argv + command
    return [*argv, interp.executable, *PYTHON_FLAGS, SANDBOX_BOOTSTRAP, str(ctl_fd), str(nice)]


def _filesystem_args(interp: Interpreter, *, allow_network: bool, tmp_size_bytes: int | None) -> list[str]:
    """The worker's root: read-only binds, the bootstrap, /proc, /dev and the tmpfs mounts."""
    argv = ["--ro-bind", "/usr", "/usr"]
    for link in SYSTEM_LINKS:
        if os.path.islink(link):
            argv += ["--symlink", os.readlink(link), link]
        elif os.path.isdir(link):
            argv += ["--ro-bind", link, link]
    argv += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    if allow_network:
        for path in NETWORK_ETC:
            argv += ["--ro-bind-try", path, path]
    made: set[str] = {"/", "/usr", "/tmp", "/etc"}
    for root in interp.roots:
        for parent in _parents(root):
            if parent not in made:  # bwrap would create these 0700: a dropped uid needs 0755
                argv += ["--perms", "0755", "--dir", parent]
                made.add(parent)
        argv += ["--ro-bind", root, root]
    if not any(_under(interp.executable, r) for r in (*interp.roots, "/usr")):
        argv += ["--ro-bind", interp.executable, interp.executable]
    argv += ["--perms", "0755", "--dir", "/rlm", "--ro-bind", BOOTSTRAP_PATH, SANDBOX_BOOTSTRAP]
    argv += ["--proc", "/proc", "--dev", "/dev"]
    shm_bytes = _SHM_BYTES if tmp_size_bytes is None else min(_SHM_BYTES, tmp_size_bytes)
    for mount, cap in (("/tmp", tmp_size_bytes), ("/dev/shm", shm_bytes)):
        argv += ["--perms", "1777"]
        if cap is not None:
            argv += ["--size", str(cap)]
        argv += ["--tmpfs", mount]
    # /proc read-only too: the code cannot write its own /proc files, such as its session's
    # `autogroup`, which would undo the CPU priority the engine gave it (`_priority`).
    argv += ["--remount-ro", "/dev", "--remount-ro", "/proc", "--remount-ro", "/"]
    return argv


def _parents(path: str) -> list[str]:
    parts = Path(path).parents
    return [str(p) for p in reversed(parts) if str(p) != "/"]


def plain_argv(interp: Interpreter, ctl_fd: int, *, nice: int = 0) -> list[str]:
    return [interp.executable, *PYTHON_FLAGS, BOOTSTRAP_PATH, str(ctl_fd), str(nice)]


def plain_env(tmpdir: str) -> dict[str, str]:
    return {**_SANDBOX_ENV, "TMPDIR": tmpdir}


async def probe_bwrap(
    bwrap: str, interp: Interpreter, *, allow_network: bool, may_setuid: bool
) -> str | None:
    """Run a trivial command in the exact sandbox a worker would get. Returns None when it
    works, else why not. Cached per process: the answer does not change while we run."""
    key = (bwrap, interp.executable, allow_network, may_setuid)
    if key in _probes:
        return _probes[key]
    program = seccomp.build()
    seccomp_fd = seccomp.memfd(program) if program is not None else None
    argv = bwrap_argv(
        bwrap,
        interp,
        allow_network=allow_network,
        tmp_size_bytes=1 << 20,
        ctl_fd=-1,
        may_setuid=may_setuid,
        seccomp_fd=seccomp_fd,
        command=[interp.executable, *PYTHON_FLAGS, "-c", "import os; os.listdir('/tmp')"],
    )
    try:
        result = await run_probe(argv, env={}, pass_fds=() if seccomp_fd is None else (seccomp_fd,))
    except OSError as exc:
        why: str | None = f"{bwrap} could not be executed ({exc})"
    else:
        err = result.stderr.decode("utf-8", "replace").strip()
        why = None if result.returncode == 0 else f"{bwrap} failed (exit {result.returncode}): {err[-300:]}"
    finally:
        if seccomp_fd is not None:
            os.close(seccomp_fd)
    _probes[key] = why
    return why


def can_drop_uid_unsandboxed(interp: Interpreter) -> bool:
    """Whether a worker switched to an unprivileged uid could still run this interpreter and
    the bootstrap without a sandbox: every directory on the way must be world-searchable.
    (A pyenv Python under /root, mode 0700, is not.)"""
    paths = [interp.executable, BOOTSTRAP_PATH, *interp.roots]
    for path in paths:
        p = Path(path)
        for parent in [*reversed(p.parents), p]:
            try:
                mode = parent.stat().st_mode
            except OSError:
                return False
            if stat.S_ISDIR(mode) and not mode & stat.S_IXOTH:
                return False
            if not stat.S_ISDIR(mode) and not mode & stat.S_IROTH:
                return False
    return True
