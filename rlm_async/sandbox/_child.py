"""A worker's top process: started by `subprocess.Popen`, its exit heard through a pidfd.

Why not the event loop's subprocess API (`anyio.open_process`): on uvloop that forks the
engine (libuv's `uv_spawn`), copying its page tables, where `subprocess.Popen` uses vfork.
Measured (`benchmarks/spawn.py`, a parent holding 250 MB): 2.5 ms of the engine's CPU per
start on uvloop's path, 0.43 ms on asyncio's, 0.20-0.24 ms here on either; a service's
worker pool starts one per query. On asyncio the loop calls Popen too, and then waits for
each child in a thread of its own (Python 3.11's ThreadedChildWatcher); here a pidfd turns
readable when the child exits, and the loop waits on it like on a socket: no thread, no
fork.

Where pidfds are missing (not Linux 5.3 or later) or refused (a seccomp filter),
`anyio.open_process` as before.
"""

from __future__ import annotations

import functools
import os
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import anyio

__all__ = ["ChildProcess", "PidfdChild", "start_child"]


class ChildProcess(Protocol):
    """What the sandbox needs of a started process (anyio's `Process` has it too)."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...


class PidfdChild:
    """A `subprocess.Popen` child whose exit the event loop waits for on a pidfd."""

    def __init__(self, popen: subprocess.Popen[bytes], pidfd: int) -> None:
        self._popen = popen
        self._pidfd: int | None = pidfd
        self._waiting = anyio.Lock()
        """One task waits on the pidfd at a time (a descriptor takes one reader); the
        others find the status once it is reaped."""

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once the child has exited (reaped here, without blocking), else
        None; negative: the signal that ended it."""
        return self._popen.poll()

    async def wait(self) -> int:
        async with self._waiting:
            while (rc := self._popen.poll()) is None:
                assert self._pidfd is not None  # closed only once reaped
                await anyio.wait_readable(self._pidfd)
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None
        return rc


async def start_child(
    argv: Sequence[str],
    *,
    stdout: int,
    stderr: int,
    env: Mapping[str, str],
    cwd: str,
    pass_fds: Sequence[int],
) -> ChildProcess:
    """Start `argv` in a session of its own, stdin from /dev/null, stdout and stderr to the
    given descriptors, `pass_fds` inherited. Raises `OSError` when it cannot be started."""
    options: dict[str, Any] = {
        "stdin": subprocess.DEVNULL,
        "stdout": stdout,
        "stderr": stderr,
        "env": env,
        "cwd": cwd,
        "start_new_session": True,
        "pass_fds": pass_fds,
    }
    if not _pidfds_work():
        return await anyio.open_process(argv, **options)
    # On the loop, as asyncio's own subprocess_exec does: vfork returns once the child has
    # exec'd (a fraction of a millisecond), and nothing awaits between start and pidfd.
    popen = subprocess.Popen(argv, **options)  # noqa: ASYNC220
    try:
        pidfd = os.pidfd_open(popen.pid)  # a zombie's too: Popen reaps only when asked
    except OSError:  # out of descriptors: nothing may be left running unwatched
        popen.kill()
        popen.wait()
        raise
    return PidfdChild(popen, pidfd)


@functools.cache
def _pidfds_work() -> bool:
    """Whether this process may open pidfds (checked once, on itself)."""
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return False
    return True
