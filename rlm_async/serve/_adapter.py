"""Everything the service reads from the engine's events and results, in one place.

Events are becoming one frozen dataclass per kind and the usage types are being replaced;
the progress stream, the metrics, the OpenTelemetry spans and the job records read them
only through the functions here, so such a change is made once, in this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .. import _events
from .._result import RLMResult

__all__ = ["PROGRESS_KINDS", "Usage", "event_fields", "progress_of", "usage_of"]

PROGRESS_KINDS = frozenset(
    {
        "query.start",
        "query.finish",
        "iteration.start",
        "iteration.finish",
        "call.finish",
        "cell.finish",
        "worker.start",
        "budget.refuse",
    }
)
"""The event kinds a client sees as progress (the others are too many or too internal)."""

_PROGRESS_FIELDS = {
    "query.start": ("context_type", "context_chars", "max_depth"),
    "query.finish": ("status", "wall_s", "calls", "cost_usd"),
    "iteration.start": ("iteration",),
    "iteration.finish": ("iteration", "duration_s"),
    "call.finish": (
        "call_id",
        "status",
        "prompt_tokens",
        "cached_tokens",
        "completion_tokens",
        "cost_usd",
        "latency_s",
        "from_journal",
    ),
    "cell.finish": ("iteration", "cell", "status", "duration_s"),
    "worker.start": ("isolated", "duration_s"),
    "budget.refuse": ("limit", "cap", "committed", "requested"),
}


def event_fields(event: _events.Event) -> dict[str, Any]:
    """The event's own fields (kind, ids and time apart)."""
    return dict(event.fields)


def progress_of(event: _events.Event) -> dict[str, Any] | None:
    """A small JSON-ready progress record for a client, or `None` for kinds not shown."""
    if event.kind not in PROGRESS_KINDS:
        return None
    fields = event.fields
    record: dict[str, Any] = {"kind": event.kind, "depth": event.depth}
    for name in _PROGRESS_FIELDS.get(event.kind, ()):
        if name in fields:
            record[name] = fields[name]
    return record


@dataclass(slots=True)
class Usage:
    """Running totals of one query, from its events while it runs (so a cancelled query
    keeps what it spent) and from its result when it ends."""

    calls: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    by_kind: dict[str, int] = field(default_factory=dict)

    def add_event(self, event: _events.Event) -> None:
        if event.kind != "call.finish":
            return
        f = event.fields
        if f.get("status") == "budget":
            return
        self.calls += 1
        self.prompt_tokens += int(f.get("prompt_tokens") or 0)
        self.cached_tokens += int(f.get("cached_tokens") or 0)
        self.completion_tokens += int(f.get("completion_tokens") or 0)
        self.cost_usd += float(f.get("cost_usd") or 0.0)

    def to_openai(self) -> dict[str, Any]:
        """OpenAI's `usage` object, with `cached_tokens` where OpenAI puts it, plus the cost."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
            "rlm_calls": self.calls,
            "rlm_cost_usd": round(self.cost_usd, 8),
        }


def usage_of(result: RLMResult) -> Usage:
    """The whole tree's totals from a finished result."""
    t = result.total
    return Usage(
        calls=t.calls,
        prompt_tokens=t.prompt_tokens,
        cached_tokens=t.cached_tokens,
        completion_tokens=t.completion_tokens,
        cost_usd=t.cost_usd,
    )


def result_summary(result: RLMResult) -> dict[str, Any]:
    """What a job record keeps of a result: the answer, how it ended, and its totals."""
    return {
        "answer": result.response,
        "status": result.status,
        "detail": result.detail,
        "limit_hit": result.limit_hit,
        "iterations": result.iterations,
        "execution_time": result.execution_time,
        "root_model": result.root_model,
        "failures": len(result.failures),
    }
