"""Keep the garbage collector off the long-lived heap while a wide fan-out runs.

A fan-out of thousands creates tens of thousands of short-lived objects (tasks, frames,
futures), and CPython's allocation-driven collector answers with full (generation 2)
collections, each of which walks every tracked object in the process: every module,
function and class imported, the engine's state. Measured in `benchmarks/fanout.py` at
5,000 sub-calls, about a third of the engine's CPU went to collections, most of it to
eight full ones.

`long_lived_frozen()` raises the young generation's threshold for the duration (fewer
young collections, and so far fewer full ones), moves the objects alive when the outermost fan-out starts into the
permanent generation (`gc.freeze()`), so collections during the fan-out only walk what it
created, and gives them back (`gc.unfreeze()`) when the last concurrent fan-out ends, so
nothing that becomes cyclic garbage meanwhile is kept for good. Both calls are O(1) list
splices. Nested and concurrent fan-outs share one freeze (a count). A process that froze
objects on its own (a pre-fork server) keeps them frozen: we only unfreeze what was not
frozen before us.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["MIN_PROMPTS", "long_lived_frozen"]

MIN_PROMPTS = 256
"""Narrower fan-outs are left alone: their collections are cheap."""

YOUNG_THRESHOLD = 20_000
"""Allocations between young collections during a fan-out (CPython's default is 700): each
sub-call allocates hundreds of tracked objects that live until it finishes, so collecting
every 700 walks the same survivors again and again and promotes them into full collections."""

_depth = 0
_owns = False
_saved = gc.get_threshold()


@contextmanager
def long_lived_frozen(prompts: int) -> Iterator[None]:
    """Freeze the current heap for the duration of a fan-out of `prompts` sub-calls."""
    global _depth, _owns, _saved
    if prompts < MIN_PROMPTS:
        yield
        return
    if _depth == 0:
        _saved = thresholds = gc.get_threshold()
        # Only freeze when nothing else did: unfreezing would also thaw someone else's freeze.
        _owns = gc.get_freeze_count() == 0
        if _owns:
            gc.freeze()
        gc.set_threshold(max(thresholds[0], YOUNG_THRESHOLD), *thresholds[1:])
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            gc.set_threshold(*_saved)
            if _owns:
                gc.unfreeze()
                _owns = False
