"""Structured events: one `emit(kind, **fields)` for every layer, delivered to the sinks of
the query that caused them.

Which query, node and depth an event belongs to is carried in context variables, bound
once where a node starts (`bind(...)`) and inherited by every task it spawns (anyio copies
the context into child tasks), so no layer passes ids by hand.

Events are plain data. Sinks (the trace writer, the live progress display, user hooks) are
callables that must not block; an exception in a sink is logged and swallowed, because
observing a run must never break it.

The vocabulary (every event also carries query_id, node_id and depth):

    query.start       query_id, context_type, context_chars, root_prompt_chars, max_depth,
                      max_in_flight, max_in_flight_why (the connection cap and its reason)
    query.finish      status, wall_s, calls, prompt_tokens, cached_tokens, completion_tokens, cost_usd
    node.start        node_id, parent_id, depth, node_kind ("rlm" | "llm"), model, label
    node.finish       node_id, status, error
    iteration.start   iteration
    iteration.finish  iteration, duration_s
    call.start        call_id, node_id, parent_id, call_kind (root|sub|child|final), model, prompt_chars
    call.retry        call_id, attempt, error, wait_s
    call.finish       call_id, status, prompt_tokens, cached_tokens, completion_tokens, cost_usd,
                      latency_s, attempts, from_journal, error
    cell.start        iteration, cell
    cell.finish       iteration, cell, duration_s, status, stdout_chars, stderr_chars, error
    worker.start      pid, isolated
    worker.kill       pid, reason
    limiter.wait      endpoint, model, waited_s, reason
    ratelimit.pause   endpoint, model, pause_s
    budget.reserve    limit summary; budget.refuse  limit, cap, committed, requested; budget.settle
    warmup.decision   decision, reason, prefix_tokens, batch_size
    server.detected   endpoint, model, server, evidence, cache, cache_source, context_window,
                      window_source, max_concurrency, limits_source, count_tokens
    journal.hit       call_id

A "node" is an RLM loop (node_kind "rlm": the query's root and every child RLM) or one
model call (node_kind "llm"), so the tree of nodes is the task tree of the query.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import structlog

__all__ = ["Event", "EventSink", "bind", "current_ids", "emit", "sinks"]

_log = structlog.get_logger("rlm_async")


@dataclass(frozen=True, slots=True)
class Event:
    kind: str
    """Dotted name, e.g. "call.start", "call.finish", "cell.finish", "limiter.wait"."""
    time: float
    query_id: str | None
    node_id: str | None
    depth: int | None
    fields: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "time": self.time,
            "query_id": self.query_id,
            "node_id": self.node_id,
            "depth": self.depth,
            **self.fields,
        }


EventSink = Callable[[Event], None]

_Ids = tuple[str | None, str | None, int | None]
# One variable for the three ids, not three: `emit` reads them on every event, `bind` sets
# them on every node, and one get/set costs the same as each of three.
_ids: contextvars.ContextVar[_Ids] = contextvars.ContextVar("rlm_ids", default=(None, None, None))
_sinks: contextvars.ContextVar[tuple[EventSink, ...]] = contextvars.ContextVar("rlm_sinks", default=())
_clock: contextvars.ContextVar[Callable[[], float]] = contextvars.ContextVar(
    "rlm_clock", default=time.monotonic
)


def current_ids() -> tuple[str | None, str | None, int | None]:
    return _ids.get()


@contextmanager
def bind(
    *,
    query_id: str | None = None,
    node_id: str | None = None,
    depth: int | None = None,
) -> Iterator[None]:
    """Bind ids for everything emitted inside the block (and in tasks started inside it)."""
    outer_query, outer_node, outer_depth = _ids.get()
    token = _ids.set(
        (
            outer_query if query_id is None else query_id,
            outer_node if node_id is None else node_id,
            outer_depth if depth is None else depth,
        )
    )
    try:
        yield
    finally:
        _ids.reset(token)


@contextmanager
def sinks(*new: EventSink, clock: Callable[[], float] | None = None) -> Iterator[None]:
    """Deliver events emitted inside the block to `new` as well as to the enclosing sinks."""
    token = _sinks.set(_sinks.get() + new)
    clock_token = _clock.set(clock) if clock is not None else None
    try:
        yield
    finally:
        _sinks.reset(token)
        if clock_token is not None:
            _clock.reset(clock_token)


def emit(kind: str, **fields: Any) -> Event | None:
    """Send an event to the current sinks. Costs one tuple lookup when nobody listens."""
    targets = _sinks.get()
    if not targets:
        return None
    query_id, node_id, depth = _ids.get()
    event = Event(kind, _clock.get()(), query_id, node_id, depth, fields)
    for sink in targets:
        try:
            sink(event)
        except Exception:  # a broken observer must not break the run
            _log.exception("event sink failed", sink=repr(sink), event_kind=kind)
    return event
