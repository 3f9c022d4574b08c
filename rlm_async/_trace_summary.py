"""Rebuild the figures of one query from its events: the tree, the totals, the critical path.

`summarize(events)` works on any sequence of `Event`s — a loaded trace file or events
captured in memory. It trusts their fields (typed, and checked by the trace reader where
they come from a file), but tolerates gaps (a killed run leaves calls and nodes without a
finish; they end at the last event and have status "unfinished").

All times in the result are seconds relative to the query's `query.start`.

The critical path is the chain of work that determined the wall time. Within a node, the
chain is built backwards from the node's end: the step (a call the node made, one of its
REPL cells, or a child started outside any cell) that finished last, then the step that
finished last before that one started, and so on — which, for an RLM loop, is its root
calls and cells in order. Within a cell, the same walk over the children the cell started
(by node start time) picks the slowest of each concurrent wave. A child on the chain is
expanded the same way, so the path descends through child RLMs to the sub-call that held
everyone up. `critical_path_s` sums the model-call time on that chain: the wall time the
run could not go below however widely it fanned out, unless those calls got faster.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from ._events import (
    CallFinish,
    CallHedge,
    CallHedgeEnd,
    CallRetry,
    CallStart,
    CellFinish,
    CellStart,
    Event,
    IterationStart,
    NodeFinish,
    NodeStart,
    QueryFinish,
    QueryStart,
    SubcallsRefused,
)
from ._trace_path import critical_path
from ._trace_spans import CallSpan, CellSpan, NodeSpan, PathStep, TraceSummary
from ._types import Usage

__all__ = ["CallSpan", "CellSpan", "NodeSpan", "PathStep", "TraceSummary", "summarize"]

# Times on one monotonic clock, compared after subtraction: only float noise to absorb.
_TOL = 1e-9


class _Node:
    __slots__ = (
        "calls",
        "children",
        "depth",
        "end",
        "error",
        "finished",
        "iterations",
        "label",
        "model",
        "node_id",
        "node_kind",
        "parent_id",
        "start",
        "status",
    )

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.parent_id: str | None = None
        self.depth: int | None = None
        self.node_kind: str | None = None
        self.model: str | None = None
        self.label: str | None = None
        self.start: float | None = None
        self.end: float | None = None
        self.finished = False
        self.status: str | None = None
        self.error: str | None = None
        self.iterations = 0
        self.calls: list[str] = []
        self.children: list[str] = []


class _Call:
    __slots__ = ("end", "finish", "hedge_won", "hedges", "retries", "start", "started")

    def __init__(self, started: CallStart | CallFinish, start: float) -> None:
        self.started = started
        """Its call.start, or its call.finish when the start was lost."""
        self.start = start
        self.end: float | None = None
        self.finish: CallFinish | None = None
        self.retries = 0
        self.hedges: list[float] = []
        self.hedge_won = False


class _Fold:
    """The events of one query folded into nodes, calls and cells, in the order they came."""

    def __init__(self) -> None:
        self.nodes: dict[str, _Node] = {}
        self.calls: dict[str, _Call] = {}
        self.cells: dict[tuple[str | None, int, int], dict[str, Any]] = {}
        self.query_start: QueryStart | None = None
        self.query_finish: QueryFinish | None = None
        self.query_id: str | None = None
        self.last_seen: dict[str, float] = {}
        self.unsent = 0
        """Sub-calls refused at admission (`SubcallsRefused`): refused calls, never calls."""

    def node(self, node_id: str) -> _Node:
        found = self.nodes.get(node_id)
        if found is None:
            found = self.nodes[node_id] = _Node(node_id)
        return found

    def add(self, e: Event) -> None:
        self.query_id = self.query_id or e.query_id
        if e.node_id is not None:
            self.last_seen[e.node_id] = e.time
        match e:
            case CallStart() | CallFinish() | CallRetry() | CallHedge() | CallHedgeEnd():
                self._add_call(e)
            case NodeStart() | NodeFinish() | IterationStart():
                if e.node_id is not None:
                    self._add_node(e, self.node(e.node_id))
            case CellStart():
                self.cells.setdefault((e.node_id, e.iteration, e.cell), {})["start"] = e.time
            case CellFinish():
                self.cells.setdefault((e.node_id, e.iteration, e.cell), {}).update(end=e.time, finish=e)
            case QueryStart():
                self.query_start = e
            case QueryFinish():
                self.query_finish = e
            case SubcallsRefused():
                self.unsent += e.count

    def _add_call(self, e: CallStart | CallFinish | CallRetry | CallHedge | CallHedgeEnd) -> None:
        calls = self.calls
        match e:
            case CallStart():
                calls[e.call_id] = _Call(e, e.time)
            case CallFinish():
                call = calls.get(e.call_id)
                if call is None:  # the start was lost: place it by its latency
                    call = calls[e.call_id] = _Call(e, e.time - e.latency_s)
                call.end, call.finish = e.time, e
            case CallRetry():
                if e.call_id in calls:
                    calls[e.call_id].retries += 1
            case CallHedge():
                if e.call_id in calls:
                    calls[e.call_id].hedges.append(e.time)
            case CallHedgeEnd():
                if e.call_id in calls and e.copy > 0 and e.outcome == "won":
                    calls[e.call_id].hedge_won = True

    @staticmethod
    def _add_node(e: NodeStart | NodeFinish | IterationStart, n: _Node) -> None:
        match e:
            case NodeStart():
                n.start, n.parent_id, n.depth = e.time, e.parent_id, e.depth
                n.node_kind, n.model, n.label = e.node_kind, e.model, e.label
            case NodeFinish():
                n.end, n.status, n.error = e.time, e.status, e.error
                n.finished = True
            case IterationStart():
                n.iterations = max(n.iterations, e.iteration)


def _select(events: Iterable[Event], query_id: str | None) -> list[Event]:
    events = list(events)
    if query_id is None:
        found = sorted({e.query_id for e in events if e.query_id is not None})
        if len(found) > 1:
            raise ValueError(f"events from {len(found)} queries ({', '.join(found)}): pass query_id=")
        query_id = found[0] if found else None
    return [e for e in events if e.query_id in (query_id, None)]


def summarize(events: Iterable[Event], *, query_id: str | None = None) -> TraceSummary:
    """Rebuild one query's tree, totals, concurrency and critical path from its events.

    `query_id` picks one query when the events hold several (`ValueError` otherwise).
    """
    selected = _select(events, query_id)
    if not selected:
        return _empty(query_id)
    starts = [e.time for e in selected if e.kind == "query.start"]
    t0 = starts[0] if starts else min(e.time for e in selected)
    last = max(e.time for e in selected)

    fold = _Fold()
    for e in selected:
        fold.add(e)
    nodes, calls, cells = fold.nodes, fold.calls, fold.cells
    query_start, query_finish, last_seen = fold.query_start, fold.query_finish, fold.last_seen
    qid = query_id or fold.query_id

    call_spans = _call_spans(calls, nodes, t0, last)
    node_spans, roots = _node_spans(nodes, call_spans, last_seen, t0, last)
    cell_spans = _cell_spans(cells, t0, last)
    if query_finish is not None:
        wall = query_finish.wall_s
    else:
        wall = last - t0
    concurrency, peak, peak_by_depth = _concurrency(call_spans)
    path = critical_path(node_spans, roots, call_spans, cell_spans)
    return TraceSummary(
        query_id=qid,
        status=query_finish.status if query_finish is not None else "unfinished",
        wall_s=wall,
        budget_usd=query_start.budget_usd if query_start is not None else None,
        nodes=node_spans,
        roots=roots,
        calls=call_spans,
        cells=cell_spans,
        totals=_totals(call_spans) + Usage(refused_calls=fold.unsent),
        by_model=_grouped(call_spans, lambda c: c.model),
        by_depth=dict(sorted(_grouped(call_spans, lambda c: c.depth).items())),
        peak_in_flight=peak,
        peak_in_flight_by_depth=peak_by_depth,
        concurrency=concurrency,
        critical_path=tuple(path),
        critical_path_s=sum(step.duration for step in path if step.kind == "call"),
        retries=sum(c.retries for c in call_spans),
        reported=query_finish.payload() if query_finish is not None else {},
    )


def _empty(query_id: str | None) -> TraceSummary:
    return TraceSummary(
        query_id=query_id,
        status="unfinished",
        wall_s=0.0,
        budget_usd=None,
        nodes={},
        roots=(),
        calls=(),
        cells=(),
        totals=Usage(),
        by_model={},
        by_depth={},
        peak_in_flight=0,
        peak_in_flight_by_depth={},
        concurrency=(),
        critical_path=(),
        critical_path_s=0.0,
    )


def _call_spans(
    calls: Mapping[str, _Call],
    nodes: dict[str, _Node],
    t0: float,
    last: float,
) -> tuple[CallSpan, ...]:
    """The calls, each also attached to its node (created if it never announced itself)."""
    spans = []
    for call_id, c in calls.items():
        # The engine emits a call inside its own node's bind(): the envelope names the node.
        first, fin, node_id = c.started, c.finish, c.started.node_id
        parent_id = first.parent_id if isinstance(first, CallStart) else None
        depth = first.depth
        if node_id is not None:
            n = nodes.get(node_id)
            if n is None:  # its kind is settled later, from whether it has children
                n = nodes[node_id] = _Node(node_id)
                n.parent_id, n.depth = parent_id, first.depth
            n.calls.append(call_id)
            depth = n.depth if n.depth is not None else depth
        spans.append(
            CallSpan(
                call_id=call_id,
                node_id=node_id,
                parent_id=parent_id,
                depth=depth or 0,
                call_kind=first.call_kind if isinstance(first, CallStart) else "sub",
                model=first.model if isinstance(first, CallStart) else "?",
                start=c.start - t0,
                end=(c.end if c.end is not None else last) - t0,
                status=fin.status if fin is not None else "unfinished",
                prompt_tokens=fin.prompt_tokens if fin is not None else 0,
                cached_tokens=fin.cached_tokens if fin is not None else 0,
                completion_tokens=fin.completion_tokens if fin is not None else 0,
                cost_usd=fin.cost_usd if fin is not None else 0.0,
                attempts=(fin.attempts if fin is not None else 0) or 1,
                retries=c.retries,
                hedges=tuple(t - t0 for t in c.hedges),
                hedge_won=c.hedge_won,
                from_journal=fin.from_journal if fin is not None else False,
                error=fin.error if fin is not None else None,
                text=fin.text if fin is not None else None,
            )
        )
    spans.sort(key=lambda s: s.start)
    return tuple(spans)


def _node_spans(
    nodes: Mapping[str, _Node],
    call_spans: tuple[CallSpan, ...],
    last_seen: Mapping[str, float],
    t0: float,
    last: float,
) -> tuple[dict[str, NodeSpan], tuple[str, ...]]:
    call_by_id = {c.call_id: c for c in call_spans}
    roots: list[str] = []
    for n in nodes.values():
        if n.parent_id is not None and n.parent_id in nodes and n.parent_id != n.node_id:
            nodes[n.parent_id].children.append(n.node_id)
        else:
            n.parent_id = None
            roots.append(n.node_id)

    # Depth and missing times come from the relatives, so fill them top-down then bottom-up.
    def fill(n: _Node, parent_depth: int | None, seen: set[str]) -> tuple[float, float]:
        seen.add(n.node_id)
        if n.depth is None:
            n.depth = parent_depth + 1 if parent_depth is not None else 0
        bounds = [(call_by_id[c].start + t0, call_by_id[c].end + t0) for c in n.calls]
        bounds += [fill(nodes[c], n.depth, seen) for c in n.children if c not in seen]
        if n.node_id in last_seen:  # its own iteration and cell events
            bounds.append((last_seen[n.node_id], last_seen[n.node_id]))
        if n.start is None:
            n.start = min((b[0] for b in bounds), default=last)
        if n.end is None:
            n.end = max((b[1] for b in bounds), default=last)
        return n.start, n.end

    seen: set[str] = set()
    for root in roots:
        fill(nodes[root], None, seen)
    spans = {}
    for n in sorted(nodes.values(), key=lambda n: n.start if n.start is not None else last):
        if n.node_id not in seen:  # unreachable (a parent cycle): still report it
            fill(n, None, seen)
        assert n.start is not None and n.end is not None and n.depth is not None
        spans[n.node_id] = NodeSpan(
            node_id=n.node_id,
            parent_id=n.parent_id,
            depth=n.depth,
            node_kind=n.node_kind or ("rlm" if n.children else "llm"),
            model=n.model,
            label=n.label,
            start=n.start - t0,
            end=n.end - t0,
            status=n.status or ("ok" if n.finished else "unfinished"),
            error=n.error,
            children=tuple(n.children),
            calls=tuple(n.calls),
            iterations=n.iterations,
        )
    return spans, tuple(roots)


def _cell_spans(
    cells: Mapping[tuple[str | None, int, int], dict[str, Any]],
    t0: float,
    last: float,
) -> tuple[CellSpan, ...]:
    spans = []
    for (node_id, iteration, cell), record in cells.items():
        fin: CellFinish | None = record.get("finish")
        end = record.get("end", last)
        start = record.get("start", end - (fin.duration_s if fin is not None else 0.0))
        spans.append(
            CellSpan(
                node_id=node_id,
                iteration=iteration,
                cell=cell,
                start=start - t0,
                end=end - t0,
                status=fin.status if fin is not None else "unfinished",
                error=fin.error if fin is not None else None,
                stdout_chars=fin.stdout_chars if fin is not None else None,
                stderr_chars=fin.stderr_chars if fin is not None else None,
            )
        )
    spans.sort(key=lambda s: s.start)
    return tuple(spans)


def _totals(calls: Iterable[CallSpan]) -> Usage:
    return sum((c.totals for c in calls), Usage())


def _grouped(calls: Iterable[CallSpan], key: Any) -> dict[Any, Usage]:
    groups: dict[Any, Usage] = {}
    for c in calls:
        groups[key(c)] = groups.get(key(c), Usage()) + c.totals
    return groups


def _concurrency(
    calls: tuple[CallSpan, ...],
) -> tuple[tuple[tuple[float, int], ...], int, dict[int, int]]:
    # An end and a start at the same instant do not overlap: ends sort first.
    edges = sorted(
        [(c.start, 1, c.depth) for c in calls] + [(c.end, -1, c.depth) for c in calls],
        key=lambda edge: (edge[0], edge[1]),
    )
    series: list[tuple[float, int]] = []
    level = peak = 0
    by_depth: dict[int, int] = defaultdict(int)
    peak_by_depth: dict[int, int] = defaultdict(int)
    for t, delta, depth in edges:
        level += delta
        by_depth[depth] += delta
        peak = max(peak, level)
        peak_by_depth[depth] = max(peak_by_depth[depth], by_depth[depth])
        if series and series[-1][0] == t:
            series[-1] = (t, level)
        else:
            series.append((t, level))
    return tuple(series), peak, dict(sorted(peak_by_depth.items()))


# -- critical path ----------------------------------------------------------------------
