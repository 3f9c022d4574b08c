"""Rebuild the figures of one query from its events: the tree, the totals, the critical path.

`summarize(events)` works on any sequence of `Event`s — a loaded trace file or events
captured in memory — and tolerates gaps (a killed run leaves calls and nodes without a
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

from bisect import bisect_right
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ._events import Event
from ._types import Usage

__all__ = ["CallSpan", "CellSpan", "NodeSpan", "PathStep", "TraceSummary", "summarize"]

# Times on one monotonic clock, compared after subtraction: only float noise to absorb.
_TOL = 1e-9


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
    __slots__ = ("end", "event_depth", "fields", "finish", "node_id", "retries", "start")

    def __init__(self, e: Event, start: float) -> None:
        self.fields = e.fields
        # The engine emits a call inside its node's bind(); a field, if any, is more precise.
        self.node_id = _str(e.fields.get("node_id", e.node_id))
        self.start = start
        self.end: float | None = None
        self.finish: Mapping[str, Any] = {}
        self.event_depth = e.depth
        self.retries = 0


def _int(value: Any) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def _float(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


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

    nodes: dict[str, _Node] = {}
    calls: dict[str, _Call] = {}
    cells: dict[tuple[str | None, Any, Any], dict[str, Any]] = {}
    query_start: Mapping[str, Any] = {}
    reported: Mapping[str, Any] = {}
    finish_time: float | None = None
    qid = query_id

    def node(node_id: str) -> _Node:
        found = nodes.get(node_id)
        if found is None:
            found = nodes[node_id] = _Node(node_id)
        return found

    last_seen: dict[str, float] = {}
    for e in selected:
        kind, f = e.kind, e.fields
        qid = qid or e.query_id
        if e.node_id is not None:
            last_seen[e.node_id] = e.time
        if kind == "call.start":
            call_id = _str(f.get("call_id"))
            if call_id is not None:
                calls[call_id] = _Call(e, e.time)
        elif kind == "call.finish":
            call_id = _str(f.get("call_id"))
            if call_id is None:
                continue
            call = calls.get(call_id)
            if call is None:  # the start was lost: place it by its latency
                call = calls[call_id] = _Call(e, e.time - _float(f.get("latency_s")))
            call.end, call.finish = e.time, f
        elif kind == "call.retry":
            call_id = _str(f.get("call_id"))
            if call_id in calls:
                calls[call_id].retries += 1
        elif kind == "node.start":
            node_id = _str(f.get("node_id", e.node_id))
            if node_id is None:
                continue
            n = node(node_id)
            n.start = e.time
            n.parent_id = _str(f.get("parent_id"))
            depth = f.get("depth", e.depth)
            n.depth = depth if isinstance(depth, int) else None
            n.node_kind = _str(f.get("node_kind"))
            n.model = _str(f.get("model"))
            n.label = _str(f.get("label"))
        elif kind == "node.finish":
            node_id = _str(f.get("node_id", e.node_id))
            if node_id is not None:
                n = node(node_id)
                n.end, n.status, n.error = e.time, _str(f.get("status")), _str(f.get("error"))
                n.finished = True
        elif kind == "iteration.start" and e.node_id is not None:
            n = node(e.node_id)
            n.iterations = max(n.iterations, _int(f.get("iteration")))
        elif kind in ("cell.start", "cell.finish"):
            key = (e.node_id, f.get("iteration"), f.get("cell"))
            record = cells.setdefault(key, {})
            record["start" if kind == "cell.start" else "end"] = e.time
            if kind == "cell.finish":
                record.update(finish=f)
        elif kind == "query.start":
            query_start = f
        elif kind == "query.finish":
            reported, finish_time = dict(f), e.time

    call_spans = _call_spans(calls, nodes, t0, last)
    node_spans, roots = _node_spans(nodes, call_spans, last_seen, t0, last)
    cell_spans = _cell_spans(cells, t0, last)
    wall = reported.get("wall_s")
    if not isinstance(wall, int | float) or isinstance(wall, bool):
        wall = (finish_time if finish_time is not None else last) - t0
    concurrency, peak, peak_by_depth = _concurrency(call_spans)
    path = _critical_path(node_spans, roots, call_spans, cell_spans)
    budget = query_start.get("budget_usd")
    return TraceSummary(
        query_id=qid,
        status=_str(reported.get("status")) or "unfinished",
        wall_s=float(wall),
        budget_usd=float(budget) if isinstance(budget, int | float) else None,
        nodes=node_spans,
        roots=roots,
        calls=call_spans,
        cells=cell_spans,
        totals=_totals(call_spans),
        by_model=_grouped(call_spans, lambda c: c.model),
        by_depth=dict(sorted(_grouped(call_spans, lambda c: c.depth).items())),
        peak_in_flight=peak,
        peak_in_flight_by_depth=peak_by_depth,
        concurrency=concurrency,
        critical_path=tuple(path),
        critical_path_s=sum(step.duration for step in path if step.kind == "call"),
        retries=sum(c.retries for c in call_spans),
        reported=reported,
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
        f, fin, node_id = c.fields, c.finish, c.node_id
        parent_id = _str(f.get("parent_id"))
        depth = c.event_depth
        if node_id is not None:
            n = nodes.get(node_id)
            if n is None:  # its kind is settled later, from whether it has children
                n = nodes[node_id] = _Node(node_id)
                n.parent_id, n.depth = parent_id, c.event_depth
            n.calls.append(call_id)
            depth = n.depth if n.depth is not None else depth
        spans.append(
            CallSpan(
                call_id=call_id,
                node_id=node_id,
                parent_id=parent_id,
                depth=depth or 0,
                call_kind=_str(f.get("call_kind")) or "sub",
                model=_str(f.get("model") or fin.get("model")) or "?",
                start=c.start - t0,
                end=(c.end if c.end is not None else last) - t0,
                status=_str(fin.get("status")) or ("unfinished" if c.end is None else "ok"),
                prompt_tokens=_int(fin.get("prompt_tokens")),
                cached_tokens=_int(fin.get("cached_tokens")),
                completion_tokens=_int(fin.get("completion_tokens")),
                cost_usd=_float(fin.get("cost_usd")),
                attempts=_int(fin.get("attempts")) or 1,
                retries=c.retries,
                from_journal=bool(fin.get("from_journal")),
                error=_str(fin.get("error")),
                text=_str(fin.get("text")),
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
    cells: Mapping[tuple[str | None, Any, Any], dict[str, Any]],
    t0: float,
    last: float,
) -> tuple[CellSpan, ...]:
    spans = []
    for (node_id, iteration, cell), record in cells.items():
        fin = record.get("finish", {})
        end = record.get("end", last)
        start = record.get("start", end - _float(fin.get("duration_s")))
        spans.append(
            CellSpan(
                node_id=node_id,
                iteration=iteration if isinstance(iteration, int) else None,
                cell=cell if isinstance(cell, int) else None,
                start=start - t0,
                end=end - t0,
                status=_str(fin.get("status")) or ("unfinished" if "end" not in record else "ok"),
                error=_str(fin.get("error")),
                stdout_chars=fin.get("stdout_chars"),
                stderr_chars=fin.get("stderr_chars"),
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


@dataclass(frozen=True, slots=True)
class _Item:
    start: float
    end: float
    kind: Literal["node", "call", "cell"]
    ref: Any


def _chain(items: list[_Item]) -> list[_Item]:
    """Walking back from the end: what finished last, then what finished last before that
    started, and so on. Strictly earlier starts only, so concurrent equals are not chained.

    A container's own end is no bound: a node's call may finish a hair after the node
    (the engine closes the node, then emits call.finish)."""
    if not items:
        return []
    # Among equal ends, the one that started first (the longest) goes last: it is the pick.
    ordered = sorted(items, key=lambda it: (it.end, -it.start))
    ends = [it.end for it in ordered]
    chosen: list[_Item] = []
    cursor = float("inf")
    j = len(ordered) - 1
    while j >= 0:
        item = ordered[j]
        if item.start < cursor:
            chosen.append(item)
            cursor = item.start
            j = bisect_right(ends, cursor + _TOL, 0, j) - 1
        else:
            j -= 1
    chosen.reverse()
    return chosen


def _critical_path(
    nodes: Mapping[str, NodeSpan],
    roots: tuple[str, ...],
    calls: tuple[CallSpan, ...],
    cells: tuple[CellSpan, ...],
) -> list[PathStep]:
    calls_of: dict[str | None, list[CallSpan]] = defaultdict(list)
    for c in calls:
        calls_of[c.node_id].append(c)
    cells_of: dict[str | None, list[CellSpan]] = defaultdict(list)
    for cell in cells:
        cells_of[cell.node_id].append(cell)

    out: list[PathStep] = []
    expanded: set[str] = set()

    def expand(node_id: str) -> None:
        if node_id in expanded:  # guards against a malformed parent cycle
            return
        expanded.add(node_id)
        n = nodes[node_id]
        out.append(PathStep("node", node_id, node_id, n.depth, n.start, n.end, n.model))
        own_cells = cells_of.get(node_id, [])  # sorted by start, sequential within a node
        cell_starts = [cell.start for cell in own_cells]
        in_cell: dict[int, list[_Item]] = defaultdict(list)
        items = [_Item(c.start, c.end, "call", c) for c in calls_of.get(node_id, [])]
        items += [_Item(cell.start, cell.end, "cell", i) for i, cell in enumerate(own_cells)]
        for child_id in n.children:
            child = nodes[child_id]
            item = _Item(child.start, child.end, "node", child_id)
            i = bisect_right(cell_starts, child.start + _TOL) - 1
            if i >= 0 and child.start <= own_cells[i].end + _TOL:
                in_cell[i].append(item)
            else:
                items.append(item)
        for item in _chain(items):
            if item.kind == "call":
                c = item.ref
                out.append(PathStep("call", c.call_id, c.node_id, c.depth, c.start, c.end, c.model))
            elif item.kind == "cell":
                cell = own_cells[item.ref]
                cell_id = f"{node_id}/{cell.iteration}.{cell.cell}"
                out.append(PathStep("cell", cell_id, node_id, n.depth, cell.start, cell.end))
                for sub in _chain(in_cell[item.ref]):
                    expand(sub.ref)
            else:
                expand(item.ref)

    if roots:
        expand(max(roots, key=lambda r: nodes[r].end))
    return out
