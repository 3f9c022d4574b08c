"""A batch from an input file to an output file: resume, run, write, summarise.

    summary = await run_file(rlm, Path("queries.jsonl"), Path("answers.jsonl"),
                             concurrency=16, budget=BudgetLimits(max_usd=5.0))

The pieces it wires: `read_items` (input), `OutputFile` (append + fsync, repair, resume
index), `RLM.abatch` (the runner under the batch budget), `BatchProgress`, `BatchSummary`.
With `handle_sigint`, a first Ctrl-C stops starting queries and a second cancels the
running ones; either way every row written is complete and a rerun finishes the rest.
"""

from __future__ import annotations

import functools
import signal
from contextlib import aclosing
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread

from .._events import EventSink
from .._governor import BudgetLimits, Charge
from .._types import Usage
from ._items import DEFAULT_MAX_CONTEXT_CHARS, BatchItem, InvalidItem, count_inputs, read_items
from ._output import OutputFile
from ._progress import BatchProgress
from ._rows import BatchRow
from ._runner import BatchControl
from ._spend import SpendLog, spend_log_path
from ._summary import BatchSummary

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .._rlm import RLM

__all__ = ["run_file"]


async def run_file(
    rlm: RLM,
    input_path: Path,
    output_path: Path,
    *,
    concurrency: int = 8,
    budget: BudgetLimits | None = None,
    max_context_chars: int = DEFAULT_MAX_CONTEXT_CHARS,
    progress: BatchProgress | None = None,
    handle_sigint: bool = False,
    extra_sinks: tuple[EventSink, ...] = (),
) -> BatchSummary:
    """Run every input of `input_path` that has no final row in `output_path` yet.

    The cap counts what earlier runs of this batch spent: the larger of the spend log's
    books (beside the output, `<out>.spend`: every call they made, including those of
    queries a crash cut off) and the kept rows' cost (the rows are fsynced, the log is not)."""
    fresh = not await anyio.Path(output_path).exists()
    output = await anyio.to_thread.run_sync(OutputFile.open, output_path)
    spend: SpendLog | None = None
    try:
        spend = await anyio.to_thread.run_sync(
            functools.partial(SpendLog.open, spend_log_path(Path(output_path)), fresh=fresh)
        )
        total = await anyio.to_thread.run_sync(count_inputs, input_path)
        kept = list(output.rows.values())
        rows_spent = Charge(
            sum((r.usage for r in kept), Usage()), sum((_decimal(r.cost_usd) for r in kept), _decimal(0.0))
        )
        if progress is not None:
            progress.set_total(total, already_done=len(kept))
        control = BatchControl(
            spent_before=_larger(spend.carried, rows_spent), observer=progress, spend_log=spend
        )
        not_started: list[BatchRow] = []

        def todo() -> Iterator[BatchItem | InvalidItem]:
            for item in read_items(input_path, max_context_chars=max_context_chars):
                if not output.done(item.key):
                    yield item

        sinks = (*((progress,) if progress is not None else ()), *extra_sinks)
        async with anyio.create_task_group() as tg:
            if handle_sigint:
                tg.start_soon(_watch_sigint, control, progress)
            rows = rlm.abatch(
                todo(), concurrency=concurrency, budget=budget, control=control, event_sinks=sinks
            )
            async with aclosing(rows):
                async for row in rows:
                    await anyio.to_thread.run_sync(output.append, row)
                    if not row.final:
                        not_started.append(row)
            tg.cancel_scope.cancel()
        return BatchSummary.of_rows(
            [*output.rows.values(), *not_started],
            cap_usd=budget.max_usd if budget is not None else None,
            cap_tokens=budget.max_total_tokens if budget is not None else None,
            interrupted=control.stopping,
            expected=total,
        )
    finally:
        output.close()
        if spend is not None:
            spend.close()


async def _watch_sigint(control: BatchControl, progress: BatchProgress | None) -> None:
    with anyio.open_signal_receiver(signal.SIGINT) as signals:
        async for _ in signals:
            cancelling = control.stopping
            if progress is not None:
                progress.interrupted(cancelling=cancelling)
            if cancelling:
                control.cancel()
                return
            control.stop()


def _larger(a: Charge, b: Charge) -> Charge:
    """Per quantity, the larger of two accounts of the same spending."""
    ua, ub = a.usage, b.usage
    usage = Usage(
        max(ua.prompt_tokens, ub.prompt_tokens),
        max(ua.completion_tokens, ub.completion_tokens),
        max(ua.cached_tokens, ub.cached_tokens),
        calls=max(ua.calls, ub.calls),
    )
    return Charge(usage, max(a.usd, b.usd))


def _decimal(x: float) -> Decimal:
    return Decimal(str(x))
