"""Everything the service reads from the engine's events and results, in one place.

Events are becoming one frozen dataclass per kind and the usage types are being replaced;
the progress stream, the metrics, the OpenTelemetry spans and the job records read them
only through the functions here, so such a change is made once, in this module.
"""

from __future__ import annotations

from typing import Any

from .. import _events
from .._result import RLMResult
from .._types import Usage

__all__ = [
    "PROGRESS_KINDS",
    "event_fields",
    "openai_usage",
    "progress_of",
    "result_summary",
    "usage_of",
    "usage_of_event",
]

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
    "worker.start": ("isolated", "tier", "duration_s", "pooled"),
    "budget.refuse": ("limit", "cap", "committed", "requested"),
}


def event_fields(event: _events.Event) -> dict[str, Any]:
    """The event's own fields (kind, ids and time apart), by name: the one place the
    service reads an event's payload."""
    return event.payload()


def progress_of(event: _events.Event) -> dict[str, Any] | None:
    """A small JSON-ready progress record for a client, or `None` for kinds not shown."""
    if event.kind not in PROGRESS_KINDS:
        return None
    fields = event_fields(event)
    record: dict[str, Any] = {"kind": event.kind, "depth": event.depth}
    for name in _PROGRESS_FIELDS.get(event.kind, ()):
        if name in fields:
            record[name] = fields[name]
    return record


def usage_of_event(event: _events.Event) -> Usage | None:
    """What a `call.finish` event adds to a query's running totals (so a cancelled query
    keeps what it spent); `None` for other kinds."""
    if event.kind != "call.finish":
        return None
    f = event_fields(event)
    tokens = Usage(
        int(f.get("prompt_tokens") or 0),
        int(f.get("completion_tokens") or 0),
        int(f.get("cached_tokens") or 0),
    )
    return Usage.of_call(
        str(f.get("status")),
        tokens,
        cost_usd=float(f.get("cost_usd") or 0.0),
        from_journal=bool(f.get("from_journal")),
    )


def usage_of(result: RLMResult) -> Usage:
    """The whole tree's totals from a finished result."""
    return result.total


def openai_usage(usage: Usage) -> dict[str, Any]:
    """OpenAI's `usage` object, `cached_tokens` where OpenAI puts it, plus calls and dollars."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "rlm_calls": usage.calls,
        "rlm_cost_usd": round(usage.cost_usd, 8),
    }


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
