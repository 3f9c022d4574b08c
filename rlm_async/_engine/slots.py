"""A process-wide cap on live REPL workers that nested RLMs cannot deadlock.

Each worker is a Python process (about 50 MB resident, plus its context), so a query that
fans out into child RLMs, or many queries at once, could otherwise start any number of
them. `WorkerSlots` counts the workers alive in the process (one instance per event loop
and cap, shared by every query) and makes the rest wait for a slot.

Why it cannot deadlock: a parent holds its worker while its children wait for theirs. So
a worker with `below` levels of RLMs possible under it (`max_depth - 1 - depth`) may start
only while fewer than `cap - below` workers are alive: every level keeps one slot for the
levels under it. Take the waiting holders with the fewest levels below, m: each holder
took its slot while fewer than `cap - m` were alive, so at most `cap - m` are alive, and a
child of theirs (m - 1 levels below) needs fewer than `cap - m + 1`: it can start. Workers
with nothing below never wait on anyone. It needs `cap >= max_depth` (checked by
`RLMConfig`), so that a root can start at all.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.lowlevel

__all__ = ["WorkerSlots", "shared_slots"]


class WorkerSlots:
    """Live REPL workers, capped at `cap` (`None`: counted, not capped)."""

    def __init__(self, cap: int | None) -> None:
        self.cap = cap
        self.live = 0
        self.peak = 0
        """Most workers alive at once (for tests and reports)."""
        self.waiting = 0
        self._changed: anyio.Event | None = None

    @asynccontextmanager
    async def hold(self, *, below: int) -> AsyncIterator[None]:
        """Hold one slot for a worker with `below` levels of child RLMs possible under it."""
        await self._acquire(below)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, below: int) -> None:
        if self.cap is not None:
            limit = max(self.cap - below, 1)
            while self.live >= limit:
                if self._changed is None:
                    self._changed = anyio.Event()
                changed = self._changed
                self.waiting += 1
                try:
                    await changed.wait()
                finally:
                    self.waiting -= 1
        self.live += 1
        self.peak = max(self.peak, self.live)

    def _release(self) -> None:
        self.live -= 1
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()  # every waiter checks again; the first ones to run take the slots


_shared: anyio.lowlevel.RunVar[dict[int | None, WorkerSlots]] = anyio.lowlevel.RunVar(
    "rlm_async_worker_slots"
)


def shared_slots(cap: int | None) -> WorkerSlots:
    """The event loop's slots for this cap: every query that names the same cap shares them."""
    try:
        by_cap = _shared.get()
    except LookupError:
        by_cap = {}
        _shared.set(by_cap)
    slots = by_cap.get(cap)
    if slots is None:
        slots = by_cap[cap] = WorkerSlots(cap)
    return slots
