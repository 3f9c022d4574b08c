"""What a trace summary is made of: spans of calls, cells and nodes, the critical path's
steps, and the summary itself. Plain data."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ._types import Usage

__all__ = ["CallSpan", "CellSpan", "NodeSpan", "PathStep", "TraceSummary"]


@dataclass(frozen=True, slots=True)
class CallSpan:
    """One model call, from `call.start` to `call.finish`."""

    call_id: str
    node_id: str | None
    parent_id: str | None
    depth: int
    call_kind: str
    model: str
    start: float
    end: float
    status: str
    """As the engine reported it ("ok", "error", "budget", "cancelled"), or "unfinished"."""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    attempts: int = 1
    retries: int = 0
    """`call.retry` events seen for this call."""
    hedges: tuple[float, ...] = ()
    """When each hedge copy of this call was ordered (`call.hedge`), on the trace's clock."""
    hedge_won: bool = False
    """A hedge copy's answer was the one used."""
    from_journal: bool = False
    error: str | None = None
    text: str | None = None
    """Output text, only when the engine was told to put it in events."""

    @property
    def duration(self) -> float:
        return self.end - self.start

    @property
    def totals(self) -> Usage:
        """What this call adds to totals (`Usage.of_call`)."""
        tokens = Usage(self.prompt_tokens, self.completion_tokens, self.cached_tokens)
        return Usage.of_call(self.status, tokens, cost_usd=self.cost_usd, from_journal=self.from_journal)


@dataclass(frozen=True, slots=True)
class CellSpan:
    """One REPL cell an RLM node ran."""

    node_id: str | None
    iteration: int | None
    cell: int | None
    start: float
    end: float
    status: str
    error: str | None = None
    stdout_chars: int | None = None
    stderr_chars: int | None = None

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class NodeSpan:
    """A node of the call tree: an RLM loop ("rlm") or one model call ("llm")."""

    node_id: str
    parent_id: str | None
    """`None` for a root, or when the parent never appeared in the events."""
    depth: int
    node_kind: str
    model: str | None
    label: str | None
    start: float
    end: float
    status: str
    error: str | None = None
    children: tuple[str, ...] = ()
    calls: tuple[str, ...] = ()
    iterations: int = 0
    """Highest iteration number seen in this node's `iteration.start` events."""

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class PathStep:
    """One step of the critical path, in pre-order: a node, then what it waited on."""

    kind: Literal["node", "call", "cell"]
    id: str
    """node_id, call_id, or "<node_id>/<iteration>.<cell>" for a cell."""
    node_id: str | None
    depth: int
    start: float
    end: float
    model: str | None = None

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class TraceSummary:
    query_id: str | None
    status: str
    """query.finish's status, or "unfinished"."""
    wall_s: float
    budget_usd: float | None
    nodes: Mapping[str, NodeSpan]
    """Every node, in order of start."""
    roots: tuple[str, ...]
    calls: tuple[CallSpan, ...]
    """Every call, in order of start."""
    cells: tuple[CellSpan, ...]
    totals: Usage
    """Every call's `CallSpan.totals` added up, counted as `RLMResult.total` counts them."""
    by_model: Mapping[str, Usage]
    by_depth: Mapping[int, Usage]
    peak_in_flight: int
    peak_in_flight_by_depth: Mapping[int, int]
    concurrency: tuple[tuple[float, int], ...]
    """(time, calls in flight from then on), one point per change."""
    critical_path: tuple[PathStep, ...]
    critical_path_s: float
    """Model-call time on the critical path (see the module docstring)."""
    retries: int = 0
    reported: Mapping[str, Any] = field(default_factory=dict)
    """query.finish's fields as the engine sent them, to compare with the rebuilt totals."""

    @property
    def critical_calls(self) -> tuple[str, ...]:
        return tuple(step.id for step in self.critical_path if step.kind == "call")


# -- building ---------------------------------------------------------------------------
