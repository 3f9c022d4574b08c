"""The bookkeeping of one query: what every part of the engine writes to, and what the
result is assembled from. It outlives cancellation, so a partial result can always be built."""

from __future__ import annotations

from dataclasses import dataclass, field

from .._governor import BudgetLedger
from .._result import SubCallFailure, SubCallResult
from .._tree import CallTree
from .._types import CallRecord

__all__ = ["QueryState"]


@dataclass(slots=True, kw_only=True)
class QueryState:
    query_id: str
    tree: CallTree
    ledger: BudgetLedger
    records: list[CallRecord] = field(default_factory=list)
    """Every model call, paid, failed, refused or cancelled."""
    failures: list[SubCallFailure] = field(default_factory=list)
    subcall_results: list[SubCallResult] = field(default_factory=list)
    """Every sub-call answer already paid for, kept even when the run ends early."""
    iterations: int = 0
    """Root-loop iterations started (depth 0 only)."""
    isolation: str | None = None
    """The sandbox tier of the query's workers, set when one starts."""
    _call_ids: int = 0

    def next_call_id(self) -> str:
        self._call_ids += 1
        return f"c{self._call_ids}"
