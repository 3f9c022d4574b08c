"""How late the service's event loop runs: the saturation signal of an async server.

Everything the service does (HTTP, every query's engine, their model calls and REPL
workers' messages) shares one event loop. When callbacks are ready faster than it runs
them, each waits its turn: a timer due in 50 ms fires later, a response that arrived sits
in its socket. `watch` sleeps `interval_s` over and over and records by how much each
wake-up came late, in a histogram `/metrics` exposes as `rlm_event_loop_lag_seconds`.

A burst of 100 queries whose fan-outs land together showed it (`benchmarks/serve_load.py`,
a probe every 5 ms): the loop ran on time through the queries' root turns and up to 40-60
ms late for about 0.7 s while their 2,000 sub-calls were sent and answered (a full garbage
collection and the worker pool's refills among it then; see `rlm_async._gc` and the pool).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Awaitable, Callable

import anyio

__all__ = ["BUCKETS_S", "LoopLag"]

BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
"""Upper bounds of the histogram's buckets (a last one, +Inf, holds the rest)."""


class LoopLag:
    """A histogram of the loop's lateness, filled by `watch` (run it in the loop it
    measures). Time is injected so tests can drive it."""

    def __init__(
        self,
        interval_s: float = 0.05,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, not {interval_s!r}")
        self.interval_s = interval_s
        self._clock = clock
        self._sleep = sleep
        self.counts = [0] * (len(BUCKETS_S) + 1)
        """Wake-ups per bucket (not cumulative; `cumulative()` is what Prometheus reads)."""
        self.sum_s = 0.0
        self.count = 0

    def record(self, lag_s: float) -> None:
        lag_s = max(0.0, lag_s)
        self.counts[bisect.bisect_left(BUCKETS_S, lag_s)] += 1
        self.sum_s += lag_s
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """`(le, count)` pairs as Prometheus' `_bucket` series has them: each bucket counts
        every wake-up at most that late."""
        out: list[tuple[str, int]] = []
        total = 0
        for bound, n in zip((*map(repr, BUCKETS_S), "+Inf"), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out

    async def watch(self) -> None:
        """Sleep `interval_s`, record how late the wake-up came, forever (cancel to stop)."""
        while True:
            asked = self._clock()
            await self._sleep(self.interval_s)
            self.record(self._clock() - asked - self.interval_s)
