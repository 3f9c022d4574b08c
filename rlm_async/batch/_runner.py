"""The runner loop: items in, rows out, at most `concurrency` queries at once, each started
only when the batch budget admits it.

    async with stream_rows(run_query, items, config=..., governor=..., concurrency=8,
                           budget=BudgetLimits(max_usd=5.0)) as rows:
        async for row in rows:          # as they finish
            ...

Items are taken in order. An invalid item becomes an `invalid` row at once. A valid one
waits for a free slot, then for admission (see `_budget.py`): refused while queries run,
it waits for one to finish and asks again; refused with none running, it gets a
`not_started` row and the loop moves on (a smaller query may still fit).

`BatchControl.stop()` (a first Ctrl-C) stops starting queries; the running ones finish and
get their rows. `BatchControl.cancel()` (a second) cancels them too: they get no row, and
what they paid for is in the journal, so a rerun resumes them. A finished query's row is
delivered under a shield, so a cancel never loses a row that was paid for.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Protocol

import anyio
import anyio.to_thread
from anyio.abc import TaskGroup

from .._config import RLMConfig
from .._context import Context
from .._governor import BudgetLedger, BudgetLimits, Charge, Governor, LedgerLog
from .._result import RLMResult
from ..exceptions import ConfigError, ContextTypeError, MissingAPIKey
from ._budget import BatchBudget, CostEstimator, Lease
from ._items import BatchItem, InputProblem, InvalidItem, ItemChecker
from ._rows import BatchRow

__all__ = ["BatchControl", "BatchObserver", "BatchRunner", "QueryFn", "stream_rows"]

QueryFn = Callable[[str, Context, BudgetLedger], Awaitable[RLMResult]]
"""Runs one query (`query`, `context`) with its ledger under the given parent ledger:
`RLM.acompletion(context, query, ledger_parent=parent)`."""


class BatchObserver(Protocol):
    """Watches a batch (the progress display); called on the event loop, must not block."""

    def batch_started(self, budget: BatchBudget) -> None: ...
    def query_started(self, item: BatchItem) -> None: ...
    def row_done(self, row: BatchRow) -> None: ...


class BatchControl:
    """Steers a running batch from outside: stop starting queries, or cancel running ones.

    Also carries what a resumed batch brings along: `spent_before` (what earlier runs
    spent, counted against the cap), `spend_log` (where the batch ledger writes its books,
    for the next run's `spent_before`) and an optional observer."""

    def __init__(
        self,
        *,
        spent_before: Charge | None = None,
        observer: BatchObserver | None = None,
        spend_log: LedgerLog | None = None,
    ) -> None:
        self.spent_before = spent_before
        self.observer = observer
        self.spend_log = spend_log
        self.stopping = False
        self.cancelled = False
        self._scope: anyio.CancelScope | None = None
        self._wake: Callable[[], None] | None = None

    def stop(self) -> None:
        """Start no more queries; running ones finish and get their rows."""
        self.stopping = True
        if self._wake is not None:
            self._wake()

    def cancel(self) -> None:
        """Cancel running queries too (they get no row; a rerun resumes them)."""
        self.stopping = self.cancelled = True
        if self._scope is not None:
            self._scope.cancel()


class BatchRunner:
    """The loop. One per batch; `run` once."""

    def __init__(
        self,
        run_query: QueryFn,
        *,
        config: RLMConfig,
        governor: Governor,
        concurrency: int = 8,
        budget: BudgetLimits | None = None,
        control: BatchControl | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if concurrency < 1:
            raise ConfigError(f"batch concurrency is {concurrency}; use at least 1")
        self._run_query = run_query
        self._concurrency = concurrency
        self.control = control or BatchControl()
        self.budget = BatchBudget(
            budget,
            CostEstimator(config, governor.prices),
            parent=governor.process_ledger,
            spent_before=self.control.spent_before,
            log=self.control.spend_log,
        )
        self._observer = self.control.observer
        self._wall = wall_clock
        self._changed = anyio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def _wait_change(self) -> None:
        await self._changed.wait()

    async def run(
        self, items: Iterable[BatchItem | InvalidItem], deliver: Callable[[BatchRow], Awaitable[None]]
    ) -> None:
        """Run every item, handing each row to `deliver` (awaited under a shield)."""
        control = self.control
        control._wake = self._notify
        if self._observer is not None:
            self._observer.batch_started(self.budget)
        with anyio.CancelScope() as scope:
            control._scope = scope
            if control.cancelled:
                scope.cancel()
            async with anyio.create_task_group() as tg:
                for item in items:
                    if control.stopping:
                        break
                    if isinstance(item, InvalidItem):
                        await self._deliver(deliver, BatchRow.invalid(item.id, item.line, item.problem))
                        continue
                    await self._start(tg, item, deliver)
        control._wake = None
        control._scope = None

    async def _start(
        self, tg: TaskGroup, item: BatchItem, deliver: Callable[[BatchRow], Awaitable[None]]
    ) -> None:
        while self.budget.running >= self._concurrency and not self.control.stopping:
            await self._wait_change()
        if self.control.stopping:
            return
        try:
            chars = item.context_chars()
        except InputProblem as exc:
            await self._deliver(deliver, BatchRow.invalid(item.id, item.line, exc))
            return
        prior = self.budget.estimator.prior(chars, len(item.query))
        while True:
            lease = self.budget.admit(prior)
            if lease is not None or self.budget.running == 0 or self.control.stopping:
                break
            await self._wait_change()  # a query finishing frees budget and refines the estimate
        if self.control.stopping:
            if lease is not None:
                lease.close(learn=False)
            return
        if lease is None:
            await self._deliver(deliver, BatchRow.not_started(item.id, item.line, self.budget.last_refusal))
            return
        if self._observer is not None:
            self._observer.query_started(item)
        tg.start_soon(self._run_one, item, lease, deliver)

    async def _run_one(
        self, item: BatchItem, lease: Lease, deliver: Callable[[BatchRow], Awaitable[None]]
    ) -> None:
        started = self._wall()
        row: BatchRow | None = None
        result: RLMResult | None = None
        try:
            try:
                context = await anyio.to_thread.run_sync(item.load_context)
            except InputProblem as exc:
                row = BatchRow.invalid(item.id, item.line, exc)
                return
            try:
                result = await self._run_query(item.query, context, lease.ledger)
            except ContextTypeError as exc:
                row = BatchRow.invalid(item.id, item.line, exc)
                return
            except (MissingAPIKey, ConfigError):
                raise  # misconfiguration: every query would fail alike, so stop the batch
            except Exception as exc:
                if self.control.cancelled:
                    # Raised on its way out of the cancel (an error of a part being torn down,
                    # e.g. a worker killed under a cell reading from it, can come out instead
                    # of the cancellation): a cancelled query, which gets no row, so that a
                    # rerun resumes it (its paid calls replay from the journal) rather than
                    # keeping an "error" for it.
                    return
                row = BatchRow.failed(item.id, item.line, exc, started, self._wall() - started)
                return
            row = BatchRow.of_result(item.id, item.line, result, started)
        finally:
            if result is None:
                lease.close(learn=False)
            else:
                lease.close_after(result.status, journal_hits=result.total.journal_hits)
            self._notify()
            if row is not None:
                await self._deliver(deliver, row)

    async def _deliver(self, deliver: Callable[[BatchRow], Awaitable[None]], row: BatchRow) -> None:
        with anyio.CancelScope(shield=True):
            await deliver(row)
        if self._observer is not None:
            self._observer.row_done(row)


def check_items(
    items: Iterable[BatchItem | InvalidItem | Mapping[str, Any]],
) -> Iterable[BatchItem | InvalidItem]:
    """Python-API items (mappings or `BatchItem`s) through the same checks as a file's lines."""
    checker = ItemChecker()
    for n, item in enumerate(items, start=1):
        if isinstance(item, InvalidItem):
            yield item
        else:
            yield checker.check(item, item.line if isinstance(item, BatchItem) else n)


@asynccontextmanager
async def stream_rows(
    run_query: QueryFn,
    items: Iterable[BatchItem | InvalidItem | Mapping[str, Any]],
    *,
    config: RLMConfig,
    governor: Governor,
    concurrency: int = 8,
    budget: BudgetLimits | None = None,
    control: BatchControl | None = None,
) -> AsyncIterator[AsyncIterator[BatchRow]]:
    """Run a batch in a task group of its own; the body reads rows as they finish. Leaving
    the body early cancels what still runs."""
    runner = BatchRunner(
        run_query, config=config, governor=governor, concurrency=concurrency, budget=budget, control=control
    )
    send, receive = anyio.create_memory_object_stream[BatchRow](math.inf)

    async def produce() -> None:
        async with send:
            await runner.run(check_items(items), send.send)

    async with anyio.create_task_group() as tg, receive:
        tg.start_soon(produce)
        yield receive
        tg.cancel_scope.cancel()  # the body left before the end: stop what still runs
