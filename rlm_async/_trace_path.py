"""The critical path of one query, from its spans: the chain of work that determined the
wall time (see `_trace_summary`'s docstring for the rule). Pure functions over the spans."""

from __future__ import annotations

from bisect import bisect_right
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ._trace_spans import CallSpan, CellSpan, NodeSpan, PathStep

__all__ = ["critical_path"]

# Times on one monotonic clock, compared after subtraction: only float noise to absorb.
_TOL = 1e-9


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


def critical_path(
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
