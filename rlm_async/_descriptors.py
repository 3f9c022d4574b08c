"""How many connections this process can hold open at once: the file-descriptor budget.

Every request in flight holds one socket, so a fan-out of 10,000 needs 10,000 descriptors.
Many systems start a process with a soft `RLIMIT_NOFILE` of 1024 under a hard limit of
hundreds of thousands; a process may raise its own soft limit up to the hard one without
privileges. `connection_budget()` does that once per process (the first time anyone asks)
and derives the cap on connections from what is then available: the soft limit, less the
descriptors already open, less a reserve for everything else (REPL workers' pipes, trace
and journal files, a simulator in the same process), never above `MAX_CONNECTIONS`.

The transport's connection pool and the governor's default `max_concurrency` both use the
cap, so a fan-out wider than it queues for a connection; it never fails with `EMFILE`.
Not a sandbox limit: REPL workers set their own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache

__all__ = ["MAX_CONNECTIONS", "RESERVED_DESCRIPTORS", "ConnectionBudget", "connection_budget"]

MAX_CONNECTIONS = 16_384
"""The cap whatever the limit allows: beyond this many requests in flight per process, one
event loop's CPU, not descriptors, is what runs out."""
RESERVED_DESCRIPTORS = 512
"""Kept back for everything that is not a connection."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionBudget:
    """The descriptor limit as found and as left, and the connection cap derived from it."""

    soft_before: int
    """The soft `RLIMIT_NOFILE` the process started with (-1: unlimited or unknown)."""
    soft: int
    """The soft limit after raising it toward the hard one."""
    hard: int
    """The hard limit (-1: unlimited)."""
    open_at_start: int
    """Descriptors already open when the budget was taken."""
    connections: int
    """Requests in flight at once, at most: the connection pool's size."""

    @property
    def why(self) -> str:
        """One sentence saying where `connections` comes from."""
        raised = f" (raised from {self.soft_before})" if self.soft != self.soft_before else ""
        hard = "unlimited" if self.hard < 0 else str(self.hard)
        if self.connections >= MAX_CONNECTIONS:
            return (
                f"{self.connections} connections: the built-in ceiling; RLIMIT_NOFILE soft {self.soft}"
                f"{raised}, hard {hard}"
            )
        return (
            f"{self.connections} connections: RLIMIT_NOFILE soft {self.soft}{raised}, hard {hard}, less "
            f"{self.open_at_start} descriptors open and {RESERVED_DESCRIPTORS} reserved; raise the hard "
            "limit (ulimit -Hn) for wider fan-outs"
        )


def _open_descriptors() -> int:
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one listdir itself holds
    except OSError:  # no /proc (macOS): assume a fresh process
        return 16


@cache
def connection_budget() -> ConnectionBudget:
    """Raise the soft `RLIMIT_NOFILE` toward the hard limit (once per process) and return
    the connection cap that leaves. Without the `resource` module (Windows): the ceiling."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return ConnectionBudget(
            soft_before=-1, soft=-1, hard=-1, open_at_start=0, connections=MAX_CONNECTIONS
        )
    soft_before, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Enough for the ceiling and the reserve; never above the hard limit.
    wanted = MAX_CONNECTIONS + RESERVED_DESCRIPTORS + 1024
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    soft = soft_before
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):  # a platform that refuses: keep what we have
            pass
    open_now = _open_descriptors()
    if soft == resource.RLIM_INFINITY:
        connections = MAX_CONNECTIONS
    else:
        connections = max(1, min(MAX_CONNECTIONS, soft - open_now - RESERVED_DESCRIPTORS))
    infinity = resource.RLIM_INFINITY
    return ConnectionBudget(
        soft_before=-1 if soft_before == infinity else soft_before,
        soft=-1 if soft == infinity else soft,
        hard=-1 if hard == infinity else hard,
        open_at_start=open_now,
        connections=connections,
    )
