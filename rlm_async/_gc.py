"""Keep the garbage collector out of a wide fan-out.

A fan-out of thousands creates hundreds of tracked objects per sub-call (tasks, frames,
futures, the HTTP client's request and connection objects) that all live until that
sub-call's answer is read, so every collection during the fan-out walks objects that are
still alive and frees nothing. Measured in `benchmarks/fanout.py` at 5,000 sub-calls: with
the young generation collected every 20,000 allocations (CPython's default is 700), the
collector still took 0.31-0.41 s of the engine's 3 s (99 young and 9 middle collections);
before that change, eight full collections had taken a third of it. And what a fan-out
leaves behind is freed by reference counting: a collection at the end of such a run found
no unreachable object.

`long_lived_frozen()` therefore, for the duration of a fan-out of `MIN_PROMPTS` or more:

* moves the objects alive when the outermost fan-out starts into the permanent generation
  (`gc.freeze()`), so that a collection that does run (see below) walks only what was made
  since, and when the last concurrent fan-out ends, moves everything alive then (the
  fan-out's survivors too) into the oldest generation (`gc.freeze()`, `gc.unfreeze()`),
  where only a full collection walks it;
* turns automatic collection off (`gc.disable()`), and back on when the last one ends.

Garbage in reference cycles made meanwhile (an exception's traceback, say) waits until
then. So that a process whose wide fan-outs overlap without end (a service) never goes
without collecting, a fan-out that starts or ends when collection has been off for
`MAX_PAUSE_S` runs one collection of the young and middle generations and restarts the
count. Nested and concurrent fan-outs share one pause (a count). A process that froze
objects or disabled the collector on its own keeps them so: we only undo what we did.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["MAX_PAUSE_S", "MIN_PROMPTS", "long_lived_frozen"]

MIN_PROMPTS = 256
"""Narrower fan-outs are left alone: their collections are cheap."""

MAX_PAUSE_S = 30.0
"""The longest automatic collection stays off while fan-outs keep overlapping."""

_depth = 0
_owns_freeze = False
_owns_disable = False
_paused_at = 0.0


@contextmanager
def long_lived_frozen(prompts: int, *, clock: Callable[[], float] = time.monotonic) -> Iterator[None]:
    """Freeze the current heap and pause automatic collection while a fan-out of
    `prompts` sub-calls runs."""
    global _depth, _owns_freeze, _owns_disable, _paused_at
    if prompts < MIN_PROMPTS:
        yield
        return
    if _depth == 0:
        # Only undo what we do: unfreezing would also thaw someone else's freeze.
        _owns_freeze = gc.get_freeze_count() == 0
        if _owns_freeze:
            gc.freeze()
        _owns_disable = gc.isenabled()
        gc.disable()
        _paused_at = clock()
    else:
        _collect_if_paused_too_long(clock)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            if _owns_freeze:
                # Freezing again first moves what the fan-out left alive (its records, the
                # tree's nodes, events not yet written) to the oldest generation with the
                # rest, unwalked: collected at once, it cost 0.12 s at 5,000 sub-calls.
                gc.freeze()
                gc.unfreeze()
                _owns_freeze = False
            if _owns_disable:
                gc.enable()
                _owns_disable = False
        else:
            _collect_if_paused_too_long(clock)


def _collect_if_paused_too_long(clock: Callable[[], float]) -> None:
    global _paused_at
    now = clock()
    if _owns_disable and now - _paused_at >= MAX_PAUSE_S:
        gc.collect(1)
        _paused_at = now
