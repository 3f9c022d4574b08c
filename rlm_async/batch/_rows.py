"""Output rows: one per input, the batch's machine-readable result.

    {"id": "q1", "line": 1, "status": "ok", "answer": "42", "error": null,
     "usage": {"calls": 7, "prompt_tokens": 9120, "cached_tokens": 4096, "completion_tokens": 380,
               "total_tokens": 9500, "journal_hits": 0, "failed_calls": 0, "refused_calls": 0},
     "cost_usd": 0.0151, "cache_hit_ratio": 0.4491, "limit_hit": null,
     "started_at": "2026-12-01T10:00:00.123+00:00", "wall_s": 3.2}

Statuses: the query's own (`ok`, `partial`, `max_iterations`, `budget_exceeded`, `timeout`,
`error`),
`invalid` (bad input: `error` names the line and the problem), and `not_started` (the
batch cap could not cover the query: `error` starts with "budget:"). Every status but
`not_started` is final (and `budget_exceeded` by the batch's cap, `limit_hit` "batch.usd"
or "batch.total_tokens"): a resumed batch keeps those rows and skips their items.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from .._result import RLMResult
from .._types import Usage
from ._budget import AdmissionRefused

__all__ = ["FINAL_STATUSES", "BatchRow", "RowStatus"]

RowStatus = Literal[
    "ok", "partial", "max_iterations", "budget_exceeded", "timeout", "error", "invalid", "not_started"
]
FINAL_STATUSES: frozenset[str] = frozenset(
    {"ok", "partial", "max_iterations", "budget_exceeded", "timeout", "error", "invalid"}
)
ANSWERED: frozenset[str] = frozenset({"ok", "max_iterations"})


_USAGE_KEYS = (
    "calls",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "journal_hits",
    "failed_calls",
    "refused_calls",
)


def _usage_dict(u: Usage) -> dict[str, int]:
    return {**{k: getattr(u, k) for k in _USAGE_KEYS}, "total_tokens": u.total_tokens}


def _usage_of(data: Any) -> Usage:
    if not isinstance(data, dict):
        return Usage()
    n = {k: int(data.get(k) or 0) for k in _USAGE_KEYS}
    return Usage(
        n["prompt_tokens"],
        n["completion_tokens"],
        n["cached_tokens"],
        calls=n["calls"],
        journal_hits=n["journal_hits"],
        failed_calls=n["failed_calls"],
        refused_calls=n["refused_calls"],
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchRow:
    """The outcome of one input."""

    id: str | int | None
    line: int | None
    status: RowStatus
    answer: str | None = None
    error: str | None = None
    """Why the query did not answer (or answered only partly); `None` for "ok"."""
    usage: Usage = field(default_factory=Usage)
    """Tokens and calls (its `cost_usd` is this row's `cost_usd`); journal hits cost nothing."""
    cost_usd: float = 0.0
    limit_hit: str | None = None
    """Which cap ended or prevented the query ("usd", "batch.usd", ...)."""
    started_at: float | None = None
    """Unix time the query started; `None` if it never did."""
    wall_s: float | None = None
    result: RLMResult | None = field(default=None, compare=False, repr=False)
    """The full result (Python API only; not written to the output file)."""

    @property
    def key(self) -> str:
        return str(self.id) if self.id is not None else f"#line{self.line}"

    @property
    def final(self) -> bool:
        """Whether a resumed batch keeps this row: not for `not_started`, nor for a query
        cut short by the batch's cap (rather than its own), which a rerun resumes."""
        if self.status == "budget_exceeded" and (self.limit_hit or "").startswith("batch."):
            return False
        return self.status in FINAL_STATUSES

    @property
    def cache_hit_ratio(self) -> float:
        u = self.usage
        return u.cached_tokens / u.prompt_tokens if u.prompt_tokens else 0.0

    @classmethod
    def of_result(cls, id: str | int, line: int | None, result: RLMResult, started_at: float) -> BatchRow:
        t = result.total
        return cls(
            id=id,
            line=line,
            status=result.status,
            answer=result.response,
            error=result.detail if result.status != "ok" else None,
            usage=t,
            cost_usd=t.cost_usd,
            limit_hit=result.limit_hit,
            started_at=started_at,
            wall_s=result.execution_time,
            result=result,
        )

    @classmethod
    def invalid(cls, id: str | int | None, line: int | None, problem: str | Exception) -> BatchRow:
        """Bad input: a problem found while reading the file is already worded whole; one
        raised later (loading the context, checking its type) is prefixed with its line."""
        if isinstance(problem, Exception):
            problem = f"line {line}: {problem}" if line is not None else str(problem)
        return cls(id=id, line=line, status="invalid", error=problem)

    @classmethod
    def failed(
        cls, id: str | int | None, line: int | None, exc: BaseException, started_at: float, wall_s: float
    ) -> BatchRow:
        """A query that raised instead of returning a result."""
        return cls(
            id=id,
            line=line,
            status="error",
            error=f"{type(exc).__name__}: {exc}",
            started_at=started_at,
            wall_s=wall_s,
        )

    @classmethod
    def not_started(
        cls, id: str | int | None, line: int | None, refusal: AdmissionRefused | None
    ) -> BatchRow:
        """A query the batch's cap could not cover (`refusal`: the cap's last refusal)."""
        return cls(
            id=id,
            line=line,
            status="not_started",
            error=f"budget: {refusal}" if refusal is not None else "budget",
            limit_hit=refusal.limit if refusal is not None else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "line": self.line,
            "status": self.status,
            "answer": self.answer,
            "error": self.error,
            "usage": _usage_dict(self.usage),
            "cost_usd": round(self.cost_usd, 8),
            "cache_hit_ratio": round(self.cache_hit_ratio, 4),
            "limit_hit": self.limit_hit,
            "started_at": _iso(self.started_at),
            "wall_s": None if self.wall_s is None else round(self.wall_s, 4),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BatchRow:
        """A row read back from an output file (for resume and the summary)."""
        status = data.get("status")
        if status not in FINAL_STATUSES and status != "not_started":
            raise ValueError(f"unknown status {status!r}")
        wall = data.get("wall_s")
        return cls(
            id=data.get("id"),
            line=data.get("line"),
            status=status,
            answer=data.get("answer"),
            error=data.get("error"),
            usage=_usage_of(data.get("usage")),
            cost_usd=float(data.get("cost_usd") or 0.0),
            limit_hit=data.get("limit_hit"),
            started_at=_parse_iso(data.get("started_at")),
            wall_s=float(wall) if isinstance(wall, int | float) else None,
        )


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


def _parse_iso(text: object) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None
