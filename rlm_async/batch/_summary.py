"""The end-of-batch summary: rows by status, tokens, dollars, cache hit ratio, latency."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from rich.table import Table

from ._rows import BatchRow

__all__ = ["BatchSummary", "render_summary"]

_ORDER = ("ok", "partial", "max_iterations", "budget_exceeded", "timeout", "error", "invalid", "not_started")


def _quantile(values: list[float], q: float) -> float | None:
    """Nearest-rank quantile; `None` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 1))))
    return ordered[rank - 1]


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchSummary:
    """Totals over every row of the output (kept from earlier runs included)."""

    rows: int
    by_status: dict[str, int] = field(default_factory=dict)
    calls: int = 0
    journal_hits: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    p50_s: float | None = None
    p95_s: float | None = None
    cap_usd: float | None = None
    cap_tokens: int | None = None
    interrupted: bool = False
    """Ctrl-C stopped the batch before every input had a row."""
    missing: int = 0
    """Inputs with no row yet (an interrupted batch): rerun to finish them."""

    @property
    def cache_hit_ratio(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def exit_code(self) -> int:
        """130 interrupted, 3 the budget left queries not started, 1 some rows failed, 0
        every input answered (`ok` or `max_iterations`)."""
        if self.interrupted or self.missing:
            return 130
        if self.by_status.get("not_started"):
            return 3
        if any(self.by_status.get(s) for s in ("partial", "budget_exceeded", "timeout", "error", "invalid")):
            return 1
        return 0

    @classmethod
    def of_rows(
        cls,
        rows: Iterable[BatchRow],
        *,
        cap_usd: float | None = None,
        cap_tokens: int | None = None,
        interrupted: bool = False,
        expected: int | None = None,
    ) -> BatchSummary:
        rows = list(rows)
        statuses: Counter[str] = Counter(r.status for r in rows)
        latencies = [
            r.wall_s for r in rows if r.wall_s is not None and r.status not in ("invalid", "not_started")
        ]
        return cls(
            rows=len(rows),
            by_status={s: statuses[s] for s in _ORDER if statuses[s]},
            calls=sum(r.usage.calls for r in rows),
            journal_hits=sum(r.usage.journal_hits for r in rows),
            prompt_tokens=sum(r.usage.prompt_tokens for r in rows),
            cached_tokens=sum(r.usage.cached_tokens for r in rows),
            completion_tokens=sum(r.usage.completion_tokens for r in rows),
            cost_usd=sum(r.cost_usd for r in rows),
            p50_s=_quantile(latencies, 0.5),
            p95_s=_quantile(latencies, 0.95),
            cap_usd=cap_usd,
            cap_tokens=cap_tokens,
            interrupted=interrupted,
            missing=max(0, expected - len(rows)) if expected is not None else 0,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "by_status": dict(self.by_status),
            "missing": self.missing,
            "interrupted": self.interrupted,
            "calls": self.calls,
            "journal_hits": self.journal_hits,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "cost_usd": round(self.cost_usd, 8),
            "cap_usd": self.cap_usd,
            "cap_tokens": self.cap_tokens,
            "cache_hit_ratio": round(self.cache_hit_ratio, 4),
            "p50_s": self.p50_s,
            "p95_s": self.p95_s,
            "exit_code": self.exit_code,
        }


def render_summary(s: BatchSummary) -> Table:
    """A two-column rich table (the CLI prints it to stderr)."""
    table = Table(title="batch summary", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    status = ", ".join(f"{name} {n:,}" for name, n in s.by_status.items()) or "none"
    table.add_row("rows", f"{s.rows:,} ({status})")
    if s.missing:
        table.add_row("not yet run", f"{s.missing:,}: interrupted; rerun the same command to finish")
    if s.by_status.get("not_started"):
        table.add_row(
            "budget",
            f"{s.by_status['not_started']:,} queries not started: the batch cap could not cover them",
        )
    table.add_row(
        "tokens",
        f"{s.total_tokens:,} ({s.prompt_tokens:,} prompt, {s.cached_tokens:,} cached, {s.completion_tokens:,} completion)",
    )
    cap = f" of ${s.cap_usd:,.2f} cap" if s.cap_usd is not None else ""
    table.add_row("dollars", f"${s.cost_usd:,.4f}{cap}")
    if s.cap_tokens is not None:
        table.add_row("token cap", f"{s.total_tokens:,} of {s.cap_tokens:,}")
    table.add_row("calls", f"{s.calls:,} ({s.journal_hits:,} from the journal)")
    table.add_row("cache hit ratio", f"{s.cache_hit_ratio:.1%} of prompt tokens")
    if s.p50_s is not None and s.p95_s is not None:
        table.add_row("query latency", f"p50 {s.p50_s:.2f} s, p95 {s.p95_s:.2f} s")
    table.add_row("exit code", str(s.exit_code))
    return table
