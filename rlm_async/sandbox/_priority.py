"""Lowering a worker's session below the engine's, where the kernel schedules sessions as groups.

Each worker runs in a session of its own (bubblewrap's `--new-session`, `start_new_session`
outside it), so that the code cannot reach the engine's terminal. Where the kernel's
autogroup is on (`/proc/sys/kernel/sched_autogroup_enabled`: most distributions) and the
processes are in the root cgroup (not a container's or a systemd service's own), the
scheduler shares the CPU between sessions first and between a session's processes only
then. The nice value the bootstrap gives itself then weighs only against the worker's own
threads, and each worker's session weighs as much as the engine's whole process: cells that
compute hold up the engine's event loop, which every query's model calls go through (four
spinning cells made 60 queries take 1.25 x as long; `benchmarks/cpu_priority.py`).
Writing a nice value to `/proc/<pid>/autogroup` of a session's leader lowers that session's
group as a whole.

The kernel lets a process without CAP_SYS_ADMIN make that change once per 100 ms machine
wide (EAGAIN otherwise). An engine running as root lowers every worker at once; an
unprivileged one as often as the kernel allows: a pool's pre-started worker tries from the
moment its session exists until it is up (`_process`) and again while it waits idle
(`_pool`); one started on demand, which a query waits for, tries once it is up. In a
container, where the processes sit in the container's cgroup and autogroup does not apply,
the workers' own nice value is what the scheduler weighs, and it needs no privilege.
"""

from __future__ import annotations

import errno
import os
from typing import Literal

__all__ = ["Lowered", "autogroup_on", "lower_session"]

Lowered = Literal["lowered", "busy", "unneeded", "refused"]
"""What lowering a worker's session came to: lowered (or it was already), "busy" (the
kernel's rate limit: try again in 100 ms), "unneeded" (nice 0, or no autogroup on this
kernel or it is off: the caller's `autogroup_on` check, made before it looks for the
session's leader), or "refused" (not permitted, or the process is gone)."""

_ENABLED = "/proc/sys/kernel/sched_autogroup_enabled"


def _own_nice() -> int:
    """The nice value of the engine's own session group: 0 where it cannot be read, and
    where the engine never left init's session (the root group, whose file reads empty,
    weighs as nice 0)."""
    try:
        with open("/proc/self/autogroup", encoding="ascii") as f:
            return int(f.read().split()[-1])  # "/autogroup-123 nice 0"
    except (OSError, ValueError, IndexError):
        return 0


def autogroup_on() -> bool:
    """Whether the kernel schedules sessions as groups now (it can be switched at run time)."""
    try:
        with open(_ENABLED, encoding="ascii") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def lower_session(pid: int, nice: int) -> Lowered:
    """Set the session group that `pid` leads to `nice` (> 0) below the engine's own (at
    most 19). The caller has checked `autogroup_on` and makes sure `pid` is still its
    worker's: a pid is another process's once reaped."""
    target = min(19, _own_nice() + nice)
    try:
        fd = os.open(f"/proc/{pid}/autogroup", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, str(target).encode())
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno == errno.EAGAIN:
            return "busy"
        return "refused"
    return "lowered"
