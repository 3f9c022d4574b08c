"""Batch pipelines: a dataset of queries under one budget, resumable, with progress.

    from rlm_async import RLM, BudgetLimits
    async with RLM(config=config) as rlm:
        async for row in rlm.abatch(items, concurrency=16, budget=BudgetLimits(max_usd=5.0)):
            print(row.id, row.status, row.answer)

or from the command line, `rlm-async batch queries.jsonl --out answers.jsonl --budget-usd 5`.
See docs/batch.md. The pieces are separable, so a distributed runner can reuse them:
input reading and checks (`read_items`, `ItemChecker`), the budget (`BatchBudget`,
`CostEstimator`, `Lease`), the loop (`BatchRunner`), the output (`OutputFile`), progress
(`BatchProgress`) and the summary (`BatchSummary`). Sits on top of the engine; the engine
never imports it.
"""

from ._budget import AdmissionRefused, BatchBudget, CostEstimator, Lease
from ._items import (
    DEFAULT_MAX_CONTEXT_CHARS,
    BatchItem,
    InputProblem,
    InvalidItem,
    ItemChecker,
    count_inputs,
    read_items,
)
from ._output import BatchOutputError, OutputFile, Resumed
from ._pipeline import run_file
from ._progress import BatchProgress, BatchSnapshot
from ._rows import FINAL_STATUSES, BatchRow, RowStatus
from ._runner import BatchControl, BatchObserver, BatchRunner, QueryFn, stream_rows
from ._spend import SpendLog, spend_log_path
from ._summary import BatchSummary, render_summary

__all__ = [
    "DEFAULT_MAX_CONTEXT_CHARS",
    "FINAL_STATUSES",
    "AdmissionRefused",
    "BatchBudget",
    "BatchControl",
    "BatchItem",
    "BatchObserver",
    "BatchOutputError",
    "BatchProgress",
    "BatchRow",
    "BatchRunner",
    "BatchSnapshot",
    "BatchSummary",
    "CostEstimator",
    "InputProblem",
    "InvalidItem",
    "ItemChecker",
    "Lease",
    "OutputFile",
    "QueryFn",
    "Resumed",
    "RowStatus",
    "SpendLog",
    "count_inputs",
    "read_items",
    "render_summary",
    "run_file",
    "spend_log_path",
    "stream_rows",
]
