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
import contextvars
import math
import sys
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import anyio
import anyio.abc

from .. import _events
from .._config import HedgeConfig
from .._governor import CallTally, Governor
from .._types import Completion, HedgeSummary, Usage
from ..exceptions import BudgetExceeded
from .hedge_policy import HedgePolicy, HedgeReason, Running

__all__ = ["FanoutHedger", "HedgeBook", "book_for", "hedge_alone"]

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


class _Race:
    """One sub-call's copies. The original runs in the caller's task under `original`, a
    cancel scope; only if the monitor orders a hedge is anything more made (a cancel scope
    and a task per copy, in the hedger's task group): a call never hedged costs what an
    unhedged call costs, plus this object."""

    __slots__ = (
        "call_id",
        "context",
        "ended",
        "errors",
        "launched",
        "original",
        "running",
        "scopes",
        "send_copy",
        "settled",
        "started",
        "tally",
        "totals",
        "winner",
    )

    def __init__(self, call_id: str, send_copy: SendCopy, tally: CallTally, started: float) -> None:
        self.call_id = call_id
        self.send_copy = send_copy
        self.tally = tally
        """The logical call's tally: every copy's spend is added in."""
        self.started = started
        self.context = contextvars.copy_context()
        """The call's context (its node and sinks bound): hedge copies run in a copy of it."""
        self.original = anyio.CancelScope()
        self.scopes: list[anyio.CancelScope] = []
        """One per hedge copy launched."""
        self.winner: tuple[int, Completion] | None = None
        self.errors: list[BaseException] = []
        self.launched = 0
        self.running = 0
        """Hedge copies launched and not yet ended."""
        self.settled: anyio.Event | None = None
        """Set when `running` falls to 0; replaced by whoever waits for it."""
        self.ended = False
        """The race returned or raised: a copy that has not started yet is not sent."""
        self.totals = _Tally()

    def win(self, n: int, completion: Completion) -> None:
        self.winner = (n, completion)
        if n:
            self.original.cancel()
        for k, scope in enumerate(self.scopes, start=1):
            if k != n:
                scope.cancel()

    def cancel_hedges(self) -> None:
        for scope in self.scopes:
            scope.cancel()

    async def hedges_ended(self) -> None:
        """Until every hedge copy launched so far (and any launched meanwhile) has ended."""
        while self.running:
            settled = self.settled = anyio.Event()
            await settled.wait()


@dataclass(slots=True)
class _Slot:
    copy_starts: list[float] = field(default_factory=list)
    """Start (or request) time of every copy, the original first; empty until it races."""
    done: bool = False
    race: _Race | None = None
    """Set while the slot's call is racing: the monitor may order copies only then."""


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
        self._dormant = False
        """The monitor waits for the first stage: only `_wake_at` finished calls wake it."""
        self._wake_at = self._policy.first_stage_count(total)

    def _poke(self) -> None:
        # While no rule can fire, a call starting or finishing need not wake the monitor:
        # one wake-up per call would cost about what the rest of the hedging costs.
        if not self._dormant or self._finished >= self._wake_at:
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
        """Until every slot is done: decide, launch the copies, sleep until something
        changes. Hedge copies run in this task's task group, in their call's context."""
        async with anyio.create_task_group() as tg:
            while self._finished < self._total:
                history = self._book.history(self._model)
                if not self._policy.may_hedge(
                    total=self._total, finished=self._finished, history_size=len(history)
                ):
                    # History only grows when a fan-out ends; one that ends while this one
                    # waits is heard of at its first stage.
                    self._changed = anyio.Event()
                    self._dormant = True
                    await self._changed.wait()
                    self._dormant = False
                    continue
                now = self._clock()
                running = [
                    Running(i, len(s.copy_starts), now - s.copy_starts[-1], now - s.copy_starts[0])
                    for i, s in enumerate(self._slots)
                    if s.race is not None and not s.done
                ]
                allowance = min(
                    self._policy.allowance(self._total, self._requested),
                    self._book.allowance(self._config),
                )
                decision = self._policy.decide(
                    total=self._total,
                    finished_latencies=self._latencies,
                    running=running,
                    history=history,
                    allowance=allowance,
                )
                for slot, why in decision.hedge:
                    self._launch(tg, slot, why, now)
                self._changed = anyio.Event()  # before the tick: a change during it is not lost
                await anyio.sleep(_TICK_S)
                if decision.recheck_in_s is None or decision.recheck_in_s > _TICK_S:
                    wait = math.inf if decision.recheck_in_s is None else decision.recheck_in_s - _TICK_S
                    with anyio.move_on_after(wait):
                        await self._changed.wait()

    def _launch(self, tg: anyio.abc.TaskGroup, slot: int, why: HedgeReason, now: float) -> None:
        s = self._slots[slot]
        race = s.race
        assert race is not None
        s.copy_starts.append(now)
        self._requested += 1
        self._book.in_flight += 1
        race.launched += 1
        race.running += 1
        scope = anyio.CancelScope()
        race.scopes.append(scope)
        # A task started inside `context.run` runs in a copy of that context: the copy's
        # events name its call's node, and reach the call's sinks.
        race.context.run(tg.start_soon, self._copy, race, race.launched, why, scope)

    async def _copy(self, race: _Race, n: int, why: HedgeReason, scope: anyio.CancelScope) -> None:
        """Hedge copy `n` of `race`, in the monitor's task group. Never raises but cancellation."""
        if race.ended or race.winner is not None:  # the race ended before this task ran: not sent
            self._copy_ended(race)
            return
        mine = CallTally()
        outcome = "cancelled"
        _events.emit(
            _events.CallHedge,
            call_id=race.call_id,
            copy=n,
            reason=str(why),
            age_s=self._clock() - race.started,
        )
        try:
            completion: Completion | None = None
            with scope:
                completion = await race.send_copy(mine)
            if completion is not None:
                outcome = "won" if race.winner is None else "late"
                if race.winner is None:
                    race.win(n, completion)
        except BudgetExceeded as exc:
            outcome = "refused"
            race.errors.append(exc)
        except Exception as exc:
            outcome = "failed"
            race.errors.append(exc)
        finally:
            self._settle(race, n, outcome, mine)
            self._copy_ended(race)
            self._poke()

    def _copy_ended(self, race: _Race) -> None:
        race.running -= 1
        self._book.in_flight -= 1
        if race.running == 0 and race.settled is not None:
            race.settled.set()

    def _settle(self, race: _Race, n: int, outcome: str, mine: CallTally) -> None:
        """Copy `n` ended with `outcome`: its spend goes into the call's tally and the race's."""
        tally = race.tally
        tally.spent += mine.spent
        tally.waited_s += mine.waited_s
        tally.backoff_s += mine.backoff_s
        self._account(race.totals, n, outcome, mine)
        if race.launched:
            _events.emit(
                _events.CallHedgeEnd,
                call_id=race.call_id,
                copy=n,
                outcome=outcome,
                prompt_tokens=mine.spent.usage.prompt_tokens,
                completion_tokens=mine.spent.usage.completion_tokens,
                cost_usd=float(mine.spent.usd),
            )

    async def race(
        self, slot: int, call_id: str, send_copy: SendCopy, tally: CallTally
    ) -> tuple[Completion, HedgeSummary | None]:
        """Run slot `slot`'s original here and any copies the monitor orders beside it,
        until one answers; `tally` receives what every copy took."""
        s = self._slots[slot]
        started = self._clock()
        s.copy_starts = [started]
        race = s.race = _Race(call_id, send_copy, tally, started)
        self._poke()
        try:
            mine = CallTally()
            outcome = "cancelled"
            try:
                completion: Completion | None = None
                with race.original:  # cancelled only by a hedge that won
                    completion = await send_copy(mine)
                if completion is not None:
                    outcome = "won" if race.winner is None else "late"
                    if race.winner is None:
                        race.win(0, completion)
            except BudgetExceeded as exc:
                outcome = "refused"
                race.errors.append(exc)
            except Exception as exc:
                outcome = "failed"
                race.errors.append(exc)
            finally:
                self._settle(race, 0, outcome, mine)
            # The original failed: copies still running may answer (the monitor may add more).
            await race.hedges_ended()
        finally:
            s.race = None  # no more copies
            race.ended = True
            if race.running:  # the winner is in, or this call was cancelled: stop the rest
                race.cancel_hedges()
                with anyio.CancelScope(shield=True):  # their spend must reach the tally
                    await race.hedges_ended()
        if race.winner is not None:
            bisect.insort(self._latencies, self._clock() - started)
            race.totals.won = race.winner[0] != 0
            return race.winner[1], race.totals.summary()
        raise race.errors[0]

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


_T = TypeVar("_T")


async def hedge_alone(
    config: HedgeConfig,
    book: HedgeBook,
    *,
    key: str,
    clock: Callable[[], float],
    call: Callable[[tuple[FanoutHedger, int]], Awaitable[_T]],
) -> _T:
    """One call outside any fan-out (a child RLM's turn), hedged as a fan-out of one: by the
    `quantile` rule over earlier calls recorded under `key`, so that a kind of call is
    judged against its own history (a turn that writes code is slower than a sub-call)."""
    hedger = FanoutHedger(config, book, model=key, total=1, clock=clock)
    answer: list[_T] = []
    failure: list[Exception] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(hedger.monitor)
        try:
            answer.append(await call((hedger, 0)))
        except Exception as exc:  # raised below, as itself: not wrapped in the group's error
            failure.append(exc)
        finally:
            hedger.finish(0)
    if failure:
        raise failure[0]
    return answer[0]
