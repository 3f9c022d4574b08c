"""What a query returns: the answer, how the run ended, and everything it cost.

`RLMResult` carries the official package's fields (`response`, `usage_summary`,
`execution_time`, `root_model`, `prompt`) so code written for it reads results unchanged,
plus our own: the status and which limit ended the run, every call record, the tree,
per-model and per-depth usage and dollars, sub-call failures, journal hits, cache ratios.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ._types import CallRecord

__all__ = [
    "ModelUsageSummary",
    "RLMResult",
    "RunStatus",
    "SubCallFailure",
    "SubCallResult",
    "UsageSummary",
    "UsageTotals",
]

RunStatus = Literal["ok", "max_iterations", "budget_exceeded", "timeout", "error"]


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


@dataclass(slots=True)
class UsageTotals:
    """Tokens, dollars and calls for one model or one depth."""

    calls: int = 0
    """Calls sent (journal hits included, budget refusals not)."""
    failed_calls: int = 0
    refused_calls: int = 0
    """Calls the budget refused before sending."""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    journal_hits: int = 0

    @property
    def cache_hit_ratio(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def add(self, record: CallRecord) -> None:
        if record.status == "budget":
            self.refused_calls += 1
            return
        self.calls += 1
        if record.status != "ok":
            self.failed_calls += 1
        self.prompt_tokens += record.usage.prompt_tokens
        self.cached_tokens += record.usage.cached_tokens
        self.completion_tokens += record.usage.completion_tokens
        self.cost_usd += record.cost_usd
        self.journal_hits += int(record.from_journal)

    def to_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "failed_calls": self.failed_calls,
            "refused_calls": self.refused_calls,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "completion_tokens": self.completion_tokens,
            "cost_usd": round(self.cost_usd, 8),
            "journal_hits": self.journal_hits,
            "cache_hit_ratio": round(self.cache_hit_ratio, 4),
        }


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
    by_model: dict[str, UsageTotals] = field(default_factory=dict)
    by_depth: dict[int, UsageTotals] = field(default_factory=dict)
    total: UsageTotals = field(default_factory=UsageTotals)
    limit_hit: str | None = None
    """Which budget limit ended the run ("usd", "total_tokens", "calls", "seconds", ...)."""
    events: list[Any] = field(default_factory=list)
    """The query's events when tracing was requested (see `rlm_async._trace`)."""

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
            "total": self.total.to_dict(),
            "by_model": {m: t.to_dict() for m, t in self.by_model.items()},
            "by_depth": {str(d): t.to_dict() for d, t in sorted(self.by_depth.items())},
            "failures": [{"node_id": f.node_id, "depth": f.depth, "error": f.error} for f in self.failures],
            "usage_summary": self.usage_summary.to_dict(),
        }
