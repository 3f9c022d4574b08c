"""What a query returns: the answer, how the run ended, and everything it cost.

`RLMResult` carries the official package's fields (`response`, `usage_summary`,
`execution_time`, `root_model`, `prompt`) so code written for it reads results unchanged,
plus our own: the status and which limit ended the run, every call record, the tree,
per-model and per-depth `Usage` (tokens, dollars, calls, journal hits, cache hit ratio),
sub-call failures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ._types import CallRecord, Usage

__all__ = [
    "ModelUsageSummary",
    "RLMResult",
    "RunStatus",
    "SubCallFailure",
    "SubCallResult",
    "UsageSummary",
    "UsageTotals",
]

RunStatus = Literal["ok", "partial", "max_iterations", "budget_exceeded", "timeout", "error"]
"""How a run ended. "partial": the model answered, but some sub-calls it asked for failed
(`failed_subcalls` says how many), so the answer was built without their results; a run
with sub-calls refused by the budget is "budget_exceeded" instead, never "ok"."""


@dataclass(slots=True)
class ModelUsageSummary:
    """The official package's per-model usage shape."""

    total_calls: int = 0
    total_input_tokens: int = 0
    total_output_tokens: int = 0

    def to_dict(self) -> dict[str, int]:
        return {
            "total_calls": self.total_calls,
            "total_input_tokens": self.total_input_tokens,
            "total_output_tokens": self.total_output_tokens,
        }


@dataclass(slots=True)
class UsageSummary:
    model_usage_summaries: dict[str, ModelUsageSummary]

    def to_dict(self) -> dict[str, Any]:
        return {"model_usage_summaries": {m: u.to_dict() for m, u in self.model_usage_summaries.items()}}


UsageTotals = Usage
"""The name `RLMResult.total`, `by_model` and `by_depth` had before there was one usage
type: they are `Usage` now (frozen, added with `+`; see the README's "Changes")."""


@dataclass(frozen=True, slots=True)
class SubCallFailure:
    """One item of a fan-out that failed; its slot in the batch held an "Error:" string."""

    node_id: str
    depth: int
    error: str


@dataclass(frozen=True, slots=True)
class SubCallResult:
    """A sub-call's answer, kept so a run that ends early loses nothing it paid for."""

    node_id: str
    depth: int
    prompt_preview: str
    response: str


@dataclass(slots=True, kw_only=True)
class RLMResult:
    response: str | None
    """The final answer; for a run that ended early, the best answer known (may be None)."""
    status: RunStatus
    detail: str | None = None
    """Why the run ended when status is not "ok", with the number that was hit."""
    root_model: str
    prompt: Any = None
    """The root prompt (the query), as the official package reports it."""
    execution_time: float
    iterations: int = 0
    calls: list[CallRecord] = field(default_factory=list)
    nodes: list[dict[str, Any]] = field(default_factory=list)
    failures: list[SubCallFailure] = field(default_factory=list)
    subcall_results: list[SubCallResult] = field(default_factory=list)
    by_model: dict[str, Usage] = field(default_factory=dict)
    by_depth: dict[int, Usage] = field(default_factory=dict)
    total: Usage = field(default_factory=Usage)
    """Every call's `CallRecord.totals` added up (as are `by_model` and `by_depth`)."""
    limit_hit: str | None = None
    """Which budget limit ended the run ("usd", "total_tokens", "calls", "seconds", ...)."""
    failed_subcalls: int = 0
    """Sub-calls (plain or child RLMs) whose slot held an "Error:" instead of an answer:
    failed at the server, or refused by the budget or at admission."""
    usage_estimated: bool = False
    """Some server answered without reporting usage: those calls are counted at their
    reservation (an upper bound), so `total` may be more than was really used."""
    events: list[Any] = field(default_factory=list)
    """The query's events when tracing was requested (see `rlm_async._trace`)."""
    isolation: str | None = None
    """The sandbox tier the query's REPL workers ran under: "bubblewrap", "landlock" or
    "none" (None when no worker started). See docs/security.md for what each isolates."""
    metadata: dict[str, Any] | None = None
    """With `RLM(logger=...)`: the official package's trajectory of this call
    (`{"run_metadata", "iterations"}`, see `rlm_async.logger`); else None."""

    @property
    def usage_summary(self) -> UsageSummary:
        summaries: dict[str, ModelUsageSummary] = {}
        for model, t in self.by_model.items():
            summaries[model] = ModelUsageSummary(t.calls, t.prompt_tokens, t.completion_tokens)
        return UsageSummary(summaries)

    @property
    def cost_usd(self) -> float:
        return self.total.cost_usd

    def to_dict(self) -> dict[str, Any]:
        return {
            "response": self.response,
            "status": self.status,
            "detail": self.detail,
            "root_model": self.root_model,
            "execution_time": self.execution_time,
            "iterations": self.iterations,
            "limit_hit": self.limit_hit,
            "isolation": self.isolation,
            "failed_subcalls": self.failed_subcalls,
            "usage_estimated": self.usage_estimated,
            "total": self.total.to_dict(),
            "by_model": {m: t.to_dict() for m, t in self.by_model.items()},
            "by_depth": {str(d): t.to_dict() for d, t in sorted(self.by_depth.items())},
            "failures": [{"node_id": f.node_id, "depth": f.depth, "error": f.error} for f in self.failures],
            "usage_summary": self.usage_summary.to_dict(),
        }
