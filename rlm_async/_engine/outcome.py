"""Named outcomes of an RLM node, in place of (answer, status, detail, limit) tuples."""

from __future__ import annotations

from dataclasses import dataclass

from .._result import RunStatus

__all__ = ["RunEnded", "RunOutcome"]


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """How one RLM loop (the query's root or a child) ended."""

    answer: str | None
    status: RunStatus
    detail: str | None = None
    limit: str | None = None
    """Which budget limit ended the run (`usd`, `calls`, ...), when one did."""


class RunEnded(Exception):
    """A root call of an RLM node could not be made (budget, fatal transport error), or its
    worker, started beside its first root call, did not come up: the node ends at once with
    this outcome, which carries no answer."""

    def __init__(self, status: RunStatus, detail: str, limit: str | None = None) -> None:
        super().__init__(detail)
        self.outcome = RunOutcome(None, status, detail, limit)
