"""Injected time: the clock and sleep types the governor takes, and a manual clock for tests.

Every waiting the governor does (token buckets, the 429 pause gate, retry backoff) goes
through a `sleep` it was given and reads a `clock` it was given, so tests move time by hand
instead of sleeping.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import anyio.lowlevel

__all__ = ["Clock", "ManualClock", "Sleep", "wait_until_idle"]

Clock = Callable[[], float]
"""Seconds on a monotonic clock."""
Sleep = Callable[[float], Awaitable[None]]
"""Waits that many seconds on the matching clock; must be cancellable."""


class ManualClock:
    """A test double: a clock that moves only when told, and a `sleep` that waits on it.

        clock = ManualClock()
        governor = Governor(config, clock=clock, sleep=clock.sleep)
        clock.advance(1.5)              # wakes every sleeper due by then
        async with clock.autojump():    # or: jump to the next deadline whenever all tasks wait
            ...

    Not thread-safe: one event loop. Not a real-time clock: nothing moves unless advanced.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._heap: list[tuple[float, int, anyio.Event]] = []
        self._seq = itertools.count()

    def __call__(self) -> float:
        return self._now

    @property
    def now(self) -> float:
        return self._now

    @property
    def sleepers(self) -> int:
        """Tasks now sleeping on this clock."""
        return sum(1 for _, _, ev in self._heap if not ev.is_set())

    def next_deadline(self) -> float | None:
        while self._heap and self._heap[0][2].is_set():  # woken or cancelled: drop
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await anyio.lowlevel.checkpoint()
            return
        event = anyio.Event()
        heapq.heappush(self._heap, (self._now + seconds, next(self._seq), event))
        try:
            await event.wait()
        finally:
            event.set()  # a cancelled sleeper leaves the heap lazily

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every sleeper whose deadline has come."""
        if seconds < 0:
            raise ValueError(f"time cannot go backwards ({seconds:g} s)")
        self._now += seconds
        while self._heap and self._heap[0][0] <= self._now:
            heapq.heappop(self._heap)[2].set()

    def advance_to_next(self) -> bool:
        """Jump to the earliest deadline; False when nobody sleeps."""
        deadline = self.next_deadline()
        if deadline is None:
            return False
        self.advance(max(0.0, deadline - self._now))
        return True

    @asynccontextmanager
    async def autojump(self) -> AsyncIterator[None]:
        """While the block runs, jump to the next deadline whenever every other task waits
        (trio's `MockClock(autojump_threshold=0)`). Idle detection on asyncio looks at the
        loop's ready queue, so real timers and I/O are not waited for: tests only. Inside
        the block, do not call `wait_until_idle` yourself: the two would wait for each other."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._jumper)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()

    async def _jumper(self) -> None:
        while True:
            await wait_until_idle()
            if not self.advance_to_next():
                await anyio.sleep(0.001)  # nobody sleeps on us: let real time pass a little


async def wait_until_idle() -> None:
    """Return once every other task is waiting for something (test helper). On asyncio it
    checks the loop's ready queue, which is exact and fast, where anyio's
    `wait_all_tasks_blocked` polls with real 0.1 s sleeps."""
    import asyncio  # only to look at the ready queue; nothing here schedules on asyncio

    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # trio: its own idle detection is exact
        await anyio.wait_all_tasks_blocked()
        return
    quiet = 0
    while quiet < 3:  # three passes with nothing runnable but us
        await anyio.lowlevel.checkpoint()
        quiet = quiet + 1 if not loop._ready else 0  # type: ignore[attr-defined]
