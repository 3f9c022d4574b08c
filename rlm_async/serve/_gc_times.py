"""The garbage collector's collections and the time they took, by generation, for
`/metrics` (`rlm_gc_collections_total`, `rlm_gc_seconds_total`).

A collection stops the whole process, so the service's one event loop with it: a full one
walks every tracked object, tens of milliseconds in a server holding a hundred queries
(`rlm_async._gc` measured 50-75 ms). These counters say how often that happens and for how
long, beside `rlm_event_loop_lag_seconds`, which says how late the loop ran for any reason.
Read through `gc.callbacks`, which CPython calls around every collection, automatic or not.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

__all__ = ["GcTimes"]


class GcTimes:
    """Collections and seconds per generation (0, 1, 2) while installed."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self.collections = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self._started: float | None = None

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = self._clock()
        elif self._started is not None:
            generation = info["generation"]
            self.collections[generation] += 1
            self.seconds[generation] += self._clock() - self._started
            self._started = None

    def install(self) -> None:
        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def remove(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)
