"""The bookkeeping of one query: what every part of the engine writes to, and what the
result is assembled from. It outlives cancellation, so a partial result can always be built."""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import _events
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
    pending_subcalls: int = 0
    """Sub-call prompts admitted and not yet answered, over the whole tree."""
    unsent: dict[tuple[str, int], int] = field(default_factory=dict)
    """(model, depth) -> sub-call prompts refused at admission, before any work: not calls,
    and not one record each (see `fanout`)."""
    last_unsent: Exception | None = None
    """Why prompts were last refused at admission (a `BudgetExceeded` names its limit)."""
    iterations: int = 0
    """Root-loop iterations started (depth 0 only)."""
    _call_ids: int = 0

    def refuse_unsent(self, model: str, depth: int, count: int, why: Exception) -> None:
        """Count prompts refused at admission: one event for all of them, never a record each."""
        key = (model, depth)
        self.unsent[key] = self.unsent.get(key, 0) + count
        self.last_unsent = why
        _events.emit(_events.SubcallsRefused, model=model, count=count, reason=str(why))

    def next_call_id(self) -> str:
        self._call_ids += 1
        return f"c{self._call_ids}"
