"""Keep the garbage collector out of fan-outs.

A fan-out of thousands creates hundreds of tracked objects per sub-call (tasks, frames,
futures, the HTTP client's request and connection objects) that all live until that
sub-call's answer is read, so every collection during the fan-out walks objects that are
still alive and frees nothing. Measured in `benchmarks/fanout.py` at 5,000 sub-calls: with
the young generation collected every 20,000 allocations (CPython's default is 700), the
collector still took 0.31-0.41 s of the engine's 3 s (99 young and 9 middle collections);
before that change, eight full collections had taken a third of it. And what a fan-out
leaves behind is freed by reference counting: a collection at the end of such a run found
no unreachable object.

The same holds for many narrow fan-outs at once: a service answering 100 queries, each
fanning out 20 sub-calls, holds 2,000 sub-calls in flight when their fan-outs land together.
Measured in `benchmarks/serve_load.py` (100 users, `gc.callbacks` in the server): from the
moment they land to the last answer, the collector took 0.34 s of the server's event loop
(four full collections of up to 90 ms each), about a third of its CPU in that window; with
a pause while the fan-outs together held 256 sub-calls or more, 0.004-0.007 s.

And what a collection costs is the process's heap, not the fan-out's width: a full one
walks every tracked object. With that threshold of 256, a full collection of the ~100,000
objects the server and its hundred queries held ran in every burst measured (eleven of
eleven), 50-75 ms of the event loop each; in the four whose timing was logged, just as the
fan-outs began, before the thirteenth brought the pause. Pausing costs next to nothing
(freezing and unfreezing splice lists; they do not walk objects), so there is no
threshold: pausing from the first fan-out, none ran until after the burst's last answer
(six bursts; four of them alternated with the threshold, `benchmarks/serve_load.py`'s
`gc_burst`: the collector's time in a burst 86-100 ms before, 18-21 after).

`long_lived_frozen()` therefore, while any fan-out runs in the process:

* moves the objects alive when the pause starts into the permanent generation
  (`gc.freeze()`), so that a collection that does run (see below) walks only what was made
  since, and when the pause ends, moves everything alive then (the fan-outs' survivors
  too) into the oldest generation (`gc.freeze()`, `gc.unfreeze()`), where only a full
  collection walks it;
* turns automatic collection off (`gc.disable()`), and back on when the pause ends: when
  the last fan-out running ends.

Garbage in reference cycles made meanwhile (an exception's traceback, say) waits until
then. So that a process whose fan-outs overlap without end (a busy service, a batch) never
goes without collecting, a fan-out that starts or ends when collection has been off for
`MAX_PAUSE_S` runs a full collection (of what was made since the pause began: the frozen
heap is not walked) and restarts the count; a young one would leave cycles that had aged
into the oldest generation uncollected for as long as the pause lasts. A process that froze
objects or disabled the collector on its own keeps them so: we only undo what we did.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["MAX_PAUSE_S", "long_lived_frozen"]

MAX_PAUSE_S = 30.0
"""The longest automatic collection stays off while fan-outs keep overlapping."""

_in_flight = 0
"""Sub-calls of the fan-outs running now, all of them."""
_paused = False
_owns_freeze = False
_owns_disable = False
_paused_at = 0.0


@contextmanager
def long_lived_frozen(prompts: int, *, clock: Callable[[], float] = time.monotonic) -> Iterator[None]:
    """Count a fan-out of `prompts` sub-calls in while it runs; freeze the current heap and
    pause automatic collection while any fan-out holds sub-calls (one of none changes
    nothing)."""
    global _in_flight
    _in_flight += prompts
    if not _paused and _in_flight > 0:
        _pause(clock)
    elif _paused:
        _collect_if_paused_too_long(clock)
    try:
        yield
    finally:
        _in_flight -= prompts
        if _paused:
            if _in_flight == 0:
                _resume()
            else:
                _collect_if_paused_too_long(clock)


def _pause(clock: Callable[[], float]) -> None:
    global _paused, _owns_freeze, _owns_disable, _paused_at
    _paused = True
    # Only undo what we do: unfreezing would also thaw someone else's freeze.
    _owns_freeze = gc.get_freeze_count() == 0
    if _owns_freeze:
        gc.freeze()
    _owns_disable = gc.isenabled()
    gc.disable()
    _paused_at = clock()


def _resume() -> None:
    global _paused, _owns_freeze, _owns_disable
    _paused = False
    if _owns_freeze:
        # Freezing again first moves what the fan-outs left alive (their records, the
        # tree's nodes, events not yet written) to the oldest generation with the rest,
        # unwalked: collected at once, it cost 0.12 s at 5,000 sub-calls.
        gc.freeze()
        gc.unfreeze()
        _owns_freeze = False
    if _owns_disable:
        gc.enable()
        _owns_disable = False


def _collect_if_paused_too_long(clock: Callable[[], float]) -> None:
    global _paused_at
    now = clock()
    if _owns_disable and now - _paused_at >= MAX_PAUSE_S:
        gc.collect()
        _paused_at = now
