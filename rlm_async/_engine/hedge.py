"""Hedged sub-calls: the mechanism that carries out `HedgePolicy`'s decisions.

One `FanoutHedger` per fan-out of a model with `HedgeConfig(enabled=True)`. Its `monitor`
task (in the fan-out's task group) asks the policy, whenever a sub-call starts or finishes
or a threshold comes due, which sub-calls get another copy, and tells each one's race.
`race` (called by `CallPath` inside the journal, so the journal and the call records see one
logical call) runs the copies in a task group: each copy is a full governed call with its
own budget reservation, limits and retries; the first answer wins and the task group is
cancelled, which cancels the other copies' HTTP requests (the transport closes their
connections). A hedge the budget refuses is not sent ("no reservation, no hedge"); if every
running copy fails, the race raises the first failure, as an unhedged call would.

Process-wide state (latencies of earlier fan-outs per model, hedge copies in flight) lives in
a `HedgeBook`, one per governor, as the governor's limits are.
"""

from __future__ import annotations

import bisect
import math
import sys
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .. import _events
from .._config import HedgeConfig
from .._governor import CallTally, Governor
from .._types import Completion, HedgeSummary, Usage
from ..exceptions import BudgetExceeded
from .hedge_policy import HedgePolicy, HedgeReason, Running

__all__ = ["FanoutHedger", "HedgeBook", "book_for"]

_HISTORY = 2000
"""Latencies kept per model: recent enough to follow a provider's drift."""
_TICK_S = 0.02
"""Least time between two decisions: each scans every running call, and a 1,000-way
fan-out finishes calls far more often than a hedge needs deciding."""


class HedgeBook:
    """Per process (per governor): each model's latencies from finished fan-outs, and the
    hedge copies in flight across every fan-out."""

    def __init__(self) -> None:
        self._recent: dict[str, deque[float]] = {}
        self._sorted: dict[str, list[float]] = {}
        self.in_flight = 0

    def history(self, model: str) -> list[float]:
        """Sorted latencies of this model's finished fan-outs (the most recent `_HISTORY`)."""
        return self._sorted.get(model, [])

    def record(self, model: str, latencies: list[float]) -> None:
        if not latencies:
            return
        recent = self._recent.setdefault(model, deque(maxlen=_HISTORY))
        recent.extend(latencies)
        self._sorted[model] = sorted(recent)

    def allowance(self, config: HedgeConfig) -> int:
        return sys.maxsize if config.max_in_flight is None else config.max_in_flight - self.in_flight


_books: weakref.WeakKeyDictionary[Governor, HedgeBook] = weakref.WeakKeyDictionary()


def book_for(governor: Governor) -> HedgeBook:
    """The hedge book of the process that `governor` governs."""
    book = _books.get(governor)
    if book is None:
        book = _books[governor] = HedgeBook()
    return book


@dataclass(slots=True)
class _Slot:
    copy_starts: list[float] = field(default_factory=list)
    """Start (or request) time of every copy, the original first; empty until it races."""
    done: bool = False
    orders: tuple[MemoryObjectSendStream[HedgeReason], MemoryObjectReceiveStream[HedgeReason]] | None = None


@dataclass(slots=True)
class _Tally:
    """One race's bookkeeping, turned into a `HedgeSummary` at its end."""

    sent: int = 0
    won: bool = False
    cancelled: int = 0
    failed: int = 0
    refused: int = 0
    extra: Usage = field(default_factory=Usage)

    def summary(self) -> HedgeSummary | None:
        if not (self.sent or self.refused):
            return None
        return HedgeSummary(
            sent=self.sent,
            won=self.won,
            cancelled=self.cancelled,
            failed=self.failed,
            refused=self.refused,
            extra=self.extra,
        )


SendCopy = Callable[[CallTally], Awaitable[Completion]]
"""Sends one copy as a governed call, reporting what it took into the tally it is given."""


class FanoutHedger:
    """Hedging for one fan-out: `monitor` decides, `race` runs each sub-call's copies."""

    def __init__(
        self,
        config: HedgeConfig,
        book: HedgeBook,
        *,
        model: str,
        total: int,
        clock: Callable[[], float],
    ) -> None:
        self._config = config
        self._policy = HedgePolicy(config)
        self._book = book
        self._model = model
        self._total = total
        self._clock = clock
        self._slots = [_Slot() for _ in range(total)]
        self._finished = 0
        self._latencies: list[float] = []
        self._requested = 0
        self._changed = anyio.Event()

    def _poke(self) -> None:
        self._changed.set()

    def finish(self, slot: int) -> None:
        """Slot `slot` is done, whatever happened to it (answered, failed, from the journal)."""
        s = self._slots[slot]
        if not s.done:
            s.done = True
            self._finished += 1
            self._poke()
            if self._finished == self._total:
                self._book.record(self._model, self._latencies)

    async def monitor(self) -> None:
        """Until every slot is done: decide, order the copies, sleep until something changes."""
        while self._finished < self._total:
            history = self._book.history(self._model)
            if not self._policy.may_hedge(
                total=self._total, finished=self._finished, history_size=len(history)
            ):
                self._changed = anyio.Event()
                await self._changed.wait()
                continue
            now = self._clock()
            running = [
                Running(i, len(s.copy_starts), now - s.copy_starts[-1], now - s.copy_starts[0])
                for i, s in enumerate(self._slots)
                if s.copy_starts and not s.done and s.orders is not None
            ]
            allowance = min(
                self._policy.allowance(self._total, self._requested), self._book.allowance(self._config)
            )
            decision = self._policy.decide(
                total=self._total,
                finished_latencies=self._latencies,
                running=running,
                history=history,
                allowance=allowance,
            )
            for slot, why in decision.hedge:
                s = self._slots[slot]
                assert s.orders is not None
                s.copy_starts.append(now)
                self._requested += 1
                self._book.in_flight += 1
                s.orders[0].send_nowait(why)
            self._changed = anyio.Event()  # before the tick: a change during it is not lost
            await anyio.sleep(_TICK_S)
            if decision.recheck_in_s is None or decision.recheck_in_s > _TICK_S:
                wait = math.inf if decision.recheck_in_s is None else decision.recheck_in_s - _TICK_S
                with anyio.move_on_after(wait):
                    await self._changed.wait()

    async def race(
        self, slot: int, call_id: str, send_copy: SendCopy, tally: CallTally
    ) -> tuple[Completion, HedgeSummary | None]:
        """Run slot `slot`'s copies until one answers; `tally` receives what every copy took."""
        s = self._slots[slot]
        started = self._clock()
        s.copy_starts = [started]
        send, receive = anyio.create_memory_object_stream[HedgeReason](
            max_buffer_size=self._config.max_copies
        )
        s.orders = (send, receive)
        self._poke()
        race = _Tally()
        winner: list[tuple[int, Completion]] = []
        errors: list[BaseException] = []
        running = 1
        launched = 0
        try:
            async with anyio.create_task_group() as tg:

                async def copy(n: int, why: HedgeReason | None) -> None:
                    nonlocal running
                    mine = CallTally()
                    outcome = "cancelled"
                    if n:
                        _events.emit(
                            _events.CallHedge,
                            call_id=call_id,
                            copy=n,
                            reason=str(why),
                            age_s=self._clock() - started,
                        )
                    try:
                        completion = await send_copy(mine)
                    except BudgetExceeded as exc:
                        outcome = "refused"
                        errors.append(exc)
                    except Exception as exc:
                        outcome = "failed"
                        errors.append(exc)
                    else:
                        outcome = "won" if not winner else "late"
                        if not winner:
                            winner.append((n, completion))
                            tg.cancel_scope.cancel()
                    finally:
                        running -= 1
                        if n:
                            self._book.in_flight -= 1
                        tally.spent += mine.spent
                        tally.waited_s += mine.waited_s
                        tally.backoff_s += mine.backoff_s
                        self._account(race, n, outcome, mine)
                        if n or launched:
                            _events.emit(
                                _events.CallHedgeEnd,
                                call_id=call_id,
                                copy=n,
                                outcome=outcome,
                                prompt_tokens=mine.spent.usage.prompt_tokens,
                                completion_tokens=mine.spent.usage.completion_tokens,
                                cost_usd=float(mine.spent.usd),
                            )
                        if running == 0 and not winner:
                            tg.cancel_scope.cancel()  # every copy failed: no hedge is coming to wait for
                        self._poke()

                tg.start_soon(copy, 0, None)
                async for why in receive:
                    launched += 1
                    running += 1
                    tg.start_soon(copy, launched, why)
        finally:
            s.orders = None
            send.close()
            # Orders the race never picked up: their copies were never sent.
            while True:
                try:
                    receive.receive_nowait()
                except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                    break
                self._book.in_flight -= 1
            receive.close()
        if winner:
            bisect.insort(self._latencies, self._clock() - started)
            race.won = winner[0][0] != 0
            return winner[0][1], race.summary()
        raise errors[0]

    @staticmethod
    def _account(race: _Tally, n: int, outcome: str, mine: CallTally) -> None:
        if outcome == "refused":
            race.refused += 1 if n else 0  # the original's refusal is the call's, not a hedge's
            return
        if n:
            race.sent += 1
        if outcome == "cancelled":
            race.cancelled += 1
        elif outcome == "failed":
            race.failed += 1
        if outcome != "won":
            race.extra = race.extra + mine.spent.as_usage()
